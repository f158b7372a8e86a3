"""``gpuctl serve --workers N``: N gateway processes on one machine, one port.

The parent binds N listening sockets to the port with ``SO_REUSEPORT`` and each worker
inherits one. Why not one socket shared by all: the kernel then gives a new connection to
whichever worker accepts first, and a burst of connections (a load balancer's keep-alive
pool, a client's) landed two to one on one worker (67% of the CPU in the benchmark), which
stays so for the connections' life; ``SO_REUSEPORT`` spreads connections evenly by their
addresses. Why the parent binds rather than each worker: ``--port 0`` and privileged ports
work as for one process, and a socket outlives its worker: connections that arrive while a
worker restarts wait in its queue and are served by its successor (the parent closes the
socket of a worker it gives up on). Each worker is a replica of the ordinary kind
(``store.url``): slots, the leader lease and keys are shared through Redis as between hosts.

State: each worker has its own SQLite store, as a replica on its own host has: worker 0
the state dir's own (so ``gpuctl usage`` on this host reads the group's ledger, which the
replicas fold into every store), worker i > 0 one under ``{state_dir}/workers/{i}``. Two
processes writing one store would step on each other: the lease table is written as a
whole document (``save_leases``), and each replica publishes its store's rows to the
others, so rows two workers wrote into one store would be told apart by neither. A new
worker store is seeded with the main store's known models and resume and load history, so
a fresh worker knows at once which paused GPU holds a model. API keys stay in the main
state dir (written by ``gpuctl keys``, read by every worker, shared through Redis).

The parent forwards SIGTERM and SIGINT to every worker, waits for them to drain, and exits
0 (SIGTERM) or 130 (SIGINT). A worker that dies on its own is logged and restarted, since
the others carry on meanwhile and a machine should not lose a core of gateway to one crash;
a worker that dies within ``CRASH_LOOP_SECONDS`` of its start is not restarted again (a
crash loop is a configuration error, not bad luck), and when no worker is left the parent
exits 1. A worker whose parent disappears (SIGKILL) sees its stdin close and stops.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpuctl.store import Store

__all__ = ["CRASH_LOOP_SECONDS", "Workers", "seed_worker_store", "worker_state_dir"]

log = logging.getLogger("gpuctl.workers")

#: A worker that exits this soon after its start is in a crash loop: it is not restarted.
CRASH_LOOP_SECONDS = 10.0

#: How long the parent waits past the workers' drain grace before it kills one.
KILL_AFTER_GRACE_SECONDS = 10.0


def worker_state_dir(state_dir: Path, index: int) -> Path:
    """Where worker ``index`` keeps its own SQLite store (worker 0: the state dir's)."""
    return state_dir / "workers" / str(index) if index else state_dir


def seed_worker_store(main_dir: Path, worker: Store) -> None:
    """Give a new worker store what the main store knows about the fleet (known models,
    resume and load history), so the worker routes and wakes as well informed as one
    process would. Only when the worker's store has no models yet."""
    if worker.known_models() or not (main_dir / "gpuctl.db").exists():
        return
    main = Store.open(main_dir, reader=True)
    try:
        for gpu_id, models in main.known_models().items():
            worker.save_models(gpu_id, models, 0.0)
        for gpu_id, resumes in main.resume_history().items():
            for at, (seconds, ok) in enumerate(resumes):
                worker.record_resume(gpu_id, seconds, ok=ok, at=float(at))
        for model, loads in main.load_history().items():
            for at, seconds in enumerate(loads):
                worker.record_load(model, seconds, float(at))
    finally:
        main.close()


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class Workers:
    """The parent of N ``gpuctl serve --worker I:FD`` processes, worker I on ``socks[I]``."""

    def __init__(self, socks: list[socket.socket], args: list[str], *, grace: float,
                 say: Callable[[str], None]) -> None:
        self.count = len(socks)
        self.say = say  # one line on stderr per worker started
        self.socks = socks
        self.args = args  # passed on to each worker's ``serve`` (e.g. --insecure-http)
        self.grace = grace
        self.workers: dict[int, _Worker] = {}
        self.received: list[signal.Signals] = []

    def _spawn(self, index: int) -> _Worker:
        fd = self.socks[index].fileno()
        argv = [sys.executable, "-m", "gpuctl", "serve", "--worker", f"{index}:{fd}",
                *self.args]
        # stdin is a pipe the worker watches: it closes when this process dies, however.
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, pass_fds=(fd,))
        self.say(f"worker {index} started (pid {proc.pid})")
        return _Worker(index, proc)

    def run(self) -> int:
        """Start the workers, supervise them until a signal, then drain: the exit code."""
        previous = {sig: signal.signal(sig, self._forward)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self.workers[index] = self._spawn(index)
            while self.workers and not self.received:
                self._reap()
                time.sleep(0.1)
            return self._drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _forward(self, signum: int, _frame: object) -> None:
        sig = signal.Signals(signum)
        self.received.append(sig)
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(sig)

    def _reap(self) -> None:
        """Log a worker that died on its own; restart it unless it is crash-looping."""
        for index, worker in list(self.workers.items()):
            code = worker.proc.poll()
            if code is None or self.received:
                continue
            lived = time.monotonic() - worker.started
            if lived < CRASH_LOOP_SECONDS:
                log.error("worker %d (pid %d) exited with code %d after %.1f s; not "
                          "restarted (crash loop); %d workers left", index, worker.proc.pid,
                          code, lived, len(self.workers) - 1)
                del self.workers[index]
                self.socks[index].close()  # the kernel stops sending connections there
            else:
                log.error("worker %d (pid %d) exited with code %d; restarting it",
                          index, worker.proc.pid, code)
                self.workers[index] = self._spawn(index)

    def _drain(self) -> int:
        """Wait for every worker's drain (killing one that outlives the grace)."""
        deadline = time.monotonic() + self.grace + KILL_AFTER_GRACE_SECONDS
        for worker in self.workers.values():
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop within the grace; killed",
                          worker.index, worker.proc.pid)
                worker.proc.kill()
                worker.proc.wait()
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
        if not self.received:
            log.error("no worker left; the gateway stops")
            return 1
        if signal.SIGINT in self.received and signal.SIGTERM not in self.received:
            return 130
        return 0

