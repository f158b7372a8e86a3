"""Benchmark: what a replica costs, measured side by side with a plain gateway at the same
moment, so that the machine's swings touch both alike.

Run: ``.venv/bin/python tests/bench/bench_replicas_ab.py [--repeats 5] [--streams 48]``.
It prints figures and asserts nothing.

Why side by side. On a shared 2-core machine the CPU one gateway spends per request swings
by a third from one run to the next (279–452 µs measured for the very same process), more
than the effect to be measured, so shapes run one after the other (``bench_replicas_scale``)
cannot tell a 1.2× cost from noise. Here all of them run *at once*, each under the same
load, fed by one simulated node and one load generator:

- ``plain``: one ``gpuctl serve`` without Redis (the single-process figure);
- ``replica``: one ``gpuctl serve`` with ``store.url`` (a group of one, Redis db 0);
- ``workers``: ``gpuctl serve --workers 2`` (a group of two, Redis db 1);
- ``alone``: two more plain processes, the control for the workers (two gateways that
  share nothing, on the same port layout of load).

Every process gets ``--streams`` streams (32 chunks 50 ms apart) and ``--connections``
connections of plain chats, in phases that run at the same time for all shapes. The
figures are each shape's CPU per request and per chunk (``/proc/<pid>/task/*/schedstat``,
counted until the background work the requests cause is done, each process's idle rate
subtracted) and, per repeat, the ratios that answer the issue's two questions:

- CPU per request with Redis vs one process: ``replica`` / ``plain``;
- chunks/s of two replicas on two cores vs one: each worker relays ``1 / CPU per chunk``
  chunks a second on a core of its own, so two workers relay ``2 × plain / workers`` times
  what one plain process does (2.0× means a replica costs nothing more per chunk). The
  same figure for ``alone`` is what two processes that share nothing reach here, and
  ``per core, worker vs alone`` (``alone`` CPU per chunk over a worker's) is what a worker
  relays on a core against an unshared process: two workers on cores of their own relay
  twice that of one process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_gateway import (  # noqa: E402
    Load,
    Phase,
    _free_port,
    _raise_fd_limit,
    cpu_seconds,
    run_phase,
    wait_up,
)
from tests.bench.bench_replicas_scale import GATEWAY_BENCH, _children, _home  # noqa: E402
from tests.replicas.redis_server import RedisServer  # noqa: E402

#: The background work a phase causes (ledger rows published about once a second) is done
#: by this long after it.
SETTLE_SECONDS = 3.0


@dataclass
class Gateway:
    """One shape: its ``serve`` processes, the URLs to load and the pids to charge."""

    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    idle: dict[int, float] = field(default_factory=dict)

    def cpu(self) -> dict[int, float]:
        return {pid: cpu_seconds(pid) for pid in self.pids}


async def _start(gw: Gateway, home: Path, extra_env: dict[str, str], args: list[str],
                 key: str) -> None:
    port = _free_port()
    env = {**os.environ, "GPUCTL_HOME": str(home), **extra_env}
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "gpuctl", "serve", "--port", str(port), *args],
        env=env, stderr=subprocess.DEVNULL)
    gw.procs.append(proc)
    gw.urls.append(f"http://127.0.0.1:{port}")
    await wait_up(gw.urls[-1], key, timeout=60)
    gw.pids += _children(proc.pid) if "--workers" in args else [proc.pid]


async def _all_at_once(gateways: list[Gateway], key: str, per_process: int, *, stream: bool,
                       seconds: float) -> tuple[dict[str, Phase], dict[str, float]]:
    """One phase on every gateway at once, ``per_process`` clients per process; each
    shape's requests and chunks, and its CPU net of idle."""
    loads = {gw.name: [Load(url, key) for url in gw.urls] for gw in gateways}
    cpu0 = {gw.name: gw.cpu() for gw in gateways}
    t0 = time.perf_counter()

    async def shape(gw: Gateway) -> Phase:
        clients = per_process * len(gw.pids) // len(gw.urls)
        parts = await asyncio.gather(*[
            run_phase(load, None, clients, stream=stream, per_client=100_000,
                      time_limit=seconds) for load in loads[gw.name]])
        return Phase(requests=sum(p.requests for p in parts),
                     chunks=sum(p.chunks for p in parts),
                     errors=sum(p.errors for p in parts))

    phases = dict(zip([gw.name for gw in gateways],
                      await asyncio.gather(*[shape(gw) for gw in gateways]), strict=True))
    await asyncio.sleep(SETTLE_SECONDS)
    took = time.perf_counter() - t0
    net = {}
    for gw in gateways:
        now = gw.cpu()
        net[gw.name] = sum(now[pid] - cpu0[gw.name][pid] - gw.idle[pid] * took
                           for pid in gw.pids)
    for load_list in loads.values():
        for load in load_list:
            await load.pool.aclose()
    return phases, net


async def _repeat(tmp: Path, node_url: str, redis: RedisServer, streams: int,
                  connections: int, seconds: float) -> dict[str, float]:
    base, key = _home(tmp / "base", node_url)
    homes = {}
    for name in ("plain", "replica", "workers", "alone-1", "alone-2"):
        homes[name] = tmp / name
        shutil.copytree(base, homes[name])
    plain, replica, workers, alone = (Gateway("plain"), Gateway("replica"),
                                      Gateway("workers"), Gateway("alone"))
    gateways = [plain, replica, workers, alone]
    db0, db1 = redis.url, redis.url.rsplit("/", 1)[0] + "/1"
    try:
        await _start(plain, homes["plain"], {}, [], key)
        await _start(replica, homes["replica"], {"GPUCTL_STORE__URL": db0}, [], key)
        await _start(workers, homes["workers"], {"GPUCTL_STORE__URL": db1},
                     ["--workers", "2"], key)
        await _start(alone, homes["alone-1"], {}, [], key)
        await _start(alone, homes["alone-2"], {}, [], key)
        await asyncio.sleep(SETTLE_SECONDS)
        idle0 = {gw.name: gw.cpu() for gw in gateways}
        t0 = time.perf_counter()
        await asyncio.sleep(2.0)
        for gw in gateways:
            now = gw.cpu()
            gw.idle = {pid: (now[pid] - idle0[gw.name][pid]) / (time.perf_counter() - t0)
                       for pid in gw.pids}
        await _all_at_once(gateways, key, 8, stream=False, seconds=3)  # warm up
        await asyncio.sleep(SETTLE_SECONDS)
        plain_phase, plain_cpu = await _all_at_once(gateways, key, connections, stream=False,
                                                    seconds=seconds)
        stream_phase, stream_cpu = await _all_at_once(gateways, key, streams, stream=True,
                                                      seconds=seconds)
    finally:
        for gw in gateways:
            for proc in gw.procs:
                proc.terminate()
            for proc in gw.procs:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    figures: dict[str, float] = {}
    for gw in gateways:
        figures[f"{gw.name} µs/request"] = (
            plain_cpu[gw.name] / max(1, plain_phase[gw.name].requests) * 1e6)
        figures[f"{gw.name} µs/chunk"] = (
            stream_cpu[gw.name] / max(1, stream_phase[gw.name].chunks) * 1e6)
        figures[f"{gw.name} errors"] = (plain_phase[gw.name].errors
                                        + stream_phase[gw.name].errors)
        figures[f"{gw.name} idle ms/s"] = sum(gw.idle.values()) * 1e3
    figures["CPU/request, replica vs plain"] = (
        figures["replica µs/request"] / figures["plain µs/request"])
    figures["CPU/request, workers vs plain"] = (
        figures["workers µs/request"] / figures["plain µs/request"])
    figures["chunks/s, 2 workers vs 1 plain"] = (
        2 * figures["plain µs/chunk"] / figures["workers µs/chunk"])
    figures["chunks/s, 2 alone vs 1 plain"] = (
        2 * figures["plain µs/chunk"] / figures["alone µs/chunk"])
    # What a worker relays per core against a process that shares nothing, both measured
    # under the very same conditions: the replicas' own cost, the machine's taken out.
    figures["per core, worker vs alone"] = (
        figures["alone µs/chunk"] / figures["workers µs/chunk"])
    return figures


async def bench(repeats: int, streams: int, connections: int, seconds: float) -> None:
    _raise_fd_limit()
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer(tmp)
        redis.start()
        node_port = _free_port()
        node = subprocess.Popen([sys.executable, str(GATEWAY_BENCH),  # noqa: ASYNC220
                                 "--role", "node", "--port", str(node_port)], cwd=ROOT)
        try:
            node_url = f"http://127.0.0.1:{node_port}"
            await wait_up(node_url, None)
            for i in range(repeats):
                print(f"repeat {i + 1}/{repeats}", file=sys.stderr, flush=True)
                runs.append(await _repeat(tmp / f"run-{i}", node_url, redis, streams,
                                          connections, seconds))
        finally:
            node.terminate()
            node.wait(10)
            redis.stop()
    print(f"\n# all shapes at once; per process {streams} streams (32 chunks 50 ms apart), "
          f"{connections} connections of plain chats; {repeats} repeats")
    print(f"{'figure':36}{'median':>10}   each repeat")
    for name in runs[0]:
        values = [r[name] for r in runs]
        print(f"{name:36}{statistics.median(values):>10.2f}   "
              + " ".join(f"{v:.2f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--streams", type=int, default=48, help="streams per process")
    parser.add_argument("--connections", type=int, default=24,
                        help="connections of plain chats per process")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(bench(args.repeats, args.streams, args.connections, args.seconds))


if __name__ == "__main__":
    main()
