"""Benchmark: relayed chunks/s of one gateway process vs two replicas (``serve --workers 2``)
sharing one Redis, on this machine's two cores.

Run: ``.venv/bin/python tests/bench/bench_replicas_scale.py [--streams 128] [--repeats 3]``.
It prints figures and asserts nothing.

Setup: one simulated Ollama node (``bench_gateway.py --role node``: 32 chunks 50 ms apart)
and the lean load generator of ``bench_gateway.py``; a real ``redis-server``; the gateway
as ``gpuctl serve`` runs it (static provider, keys in SQLite) in five shapes: one process
without Redis, one replica with ``store.url``, ``--workers 2``, two independent processes
without Redis (the control), and ``--workers 2`` again under half the load. Each phase
runs for a bounded time.

Why capacity. Two cores cannot run two saturated gateways *and* the node and the load
generator that feed them: whatever the gateways gain, the node and the client lose, so the
wall-clock chunks/s of the whole machine says little about the gateways. What scales is
the gateway's CPU per relayed chunk: ``capacity`` is the chunks/s one core of gateway
would relay at the measured cost (1 / CPU per chunk), summed over the processes that can
each have a core; the scaling figure is the two-worker capacity over the one-process
capacity (2.0× means a replica costs nothing extra per chunk).

Why the load is per process. A gateway's CPU per chunk falls as its load rises (one turn
of the event loop serves more sockets: 65 µs at 128 streams, 53 µs at 256, measured here),
so two workers that share the load of one process each run at half its load and look
dearer for a reason that has nothing to do with replicas. Two gateways that each have a
core, as the issue's figure asks, each carry a full load: so each shape gets ``--streams``
streams and ``CONNECTIONS`` connections of plain chats *per process* (the two-worker shape
twice the one-process load; the machine carries that: it is the load of one process at
256 streams). The half-load shape, two workers under one process's load, is printed
beside it for comparison.

The control. Two cores also run the node and the load generator, and their work doubles
with the load, so some of what two workers cost more per chunk is the machine's, not the
replicas'. ``two processes, no Redis`` runs two independent single gateways (each its own
home and store, no sharing at all), each under the same load as a worker: the scaling two
processes that share nothing reach on this machine, the ceiling for the replicas' figure.

Before the streams, a phase of plain (non-streamed) chats gives the CPU per request (all
processes). CPU comes from ``/proc/<pid>/task/*/schedstat`` (ns), counted until
``SETTLE_SECONDS`` after each phase, so the background work the requests cause (a replica
publishes and folds in their ledger rows about once a second) is charged to them; each
process's idle CPU rate (the replica's sync loop, heartbeats), measured before any load, is
subtracted ("net"). Each repeat runs every shape in turn, so a slow spell of the machine
touches all of them; medians and each run's ratios are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gpuctl.store.keys import KeyStore  # noqa: E402
from tests.bench.bench_gateway import (  # noqa: E402
    Load,
    Phase,
    _free_port,
    _raise_fd_limit,
    cpu_seconds,
    run_phase,
    wait_up,
)
from tests.replicas.redis_server import RedisServer  # noqa: E402

GATEWAY_BENCH = ROOT / "tests" / "bench" / "bench_gateway.py"
ONE = "one process, no Redis"
REPLICA = "one replica (Redis)"
TWO = "two workers (Redis)"
TWO_SAME_TOTAL = "two workers, half load"
TWO_ALONE = "two processes, no Redis"
#: Connections of plain (non-streamed) chats per gateway process.
CONNECTIONS = 64
#: Background work a phase causes (ledger rows published about once a second) is done by
#: this long after it.
SETTLE_SECONDS = 3.0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def _home(tmp: Path, node_url: str) -> tuple[Path, str]:
    """A GPUCTL_HOME with a config for the static node and one key; returns its key."""
    home = tmp / "home"
    (home / "state").mkdir(parents=True)
    (home / "config.toml").write_text(
        "[server]\nmax_queue = 4096\nmax_connections_per_client = 0\n"
        "max_slots_per_user = 4096\n"
        f'[cloud_api]\nprovider = "static"\nhosts = [{json.dumps(node_url)}]\n'
        "[gpu]\nslots = 4096\n")
    keys = KeyStore.open(home / "state")
    _, key = keys.create("bench")
    keys.close()
    return home, key


async def _together(loads: list[Load], connections: int, *, stream: bool,
                    per_client: int, seconds: float) -> Phase:
    """One phase over every gateway at once, the connections split evenly between them."""
    parts = await asyncio.gather(*[
        run_phase(load, None, connections // len(loads), stream=stream, per_client=per_client,
                  time_limit=seconds) for load in loads])
    return Phase(requests=sum(p.requests for p in parts), chunks=sum(p.chunks for p in parts),
                 errors=sum(p.errors for p in parts), seconds=max(p.seconds for p in parts))


async def _phase(urls: list[str], key: str, pids: list[int], streams: int, connections: int,
                 seconds: float) -> dict[str, float]:
    loads = [Load(url, key) for url in urls]
    await asyncio.sleep(SETTLE_SECONDS)  # the start's background work done
    idle0 = {pid: cpu_seconds(pid) for pid in pids}
    t0 = time.perf_counter()
    await asyncio.sleep(2.0)
    idle = {pid: (cpu_seconds(pid) - idle0[pid]) / (time.perf_counter() - t0) for pid in pids}
    await _together(loads, 64, stream=False, per_client=5, seconds=5)  # warm up
    await asyncio.sleep(SETTLE_SECONDS)

    async def charged(run: Awaitable[Phase]) -> tuple[Phase, dict[int, float]]:
        """A phase, and each process's CPU for it, its background work after included."""
        cpu0 = {pid: cpu_seconds(pid) for pid in pids}
        t0 = time.perf_counter()
        phase = await run
        await asyncio.sleep(SETTLE_SECONDS)
        took = time.perf_counter() - t0
        return phase, {pid: cpu_seconds(pid) - cpu0[pid] - idle[pid] * took for pid in pids}

    plain, plain_net = await charged(
        _together(loads, connections, stream=False, per_client=150, seconds=seconds))
    plain_cpu = sum(plain_net.values())
    phase, net = await charged(
        _together(loads, streams, stream=True, per_client=100, seconds=seconds))
    for load in loads:
        await load.pool.aclose()
    chunks = max(1, phase.chunks)
    total = sum(net.values())
    # One core each: the capacity of n processes is n chunks per (CPU per chunk) second.
    per_chunk = total / chunks
    return {
        "requests_per_s": plain.requests / plain.seconds,
        "net_cpu_us_per_req": plain_cpu / max(1, plain.requests) * 1e6,
        "chunks_per_s": phase.chunks / phase.seconds,
        "errors": phase.errors + plain.errors,
        "net_cpu_us_per_chunk": per_chunk * 1e6,
        "capacity_chunks_per_s": len(pids) / per_chunk if per_chunk > 0 else 0.0,
        "idle_cpu_ms_per_s": sum(idle.values()) * 1e3,
        "busiest_worker_share": max(net.values()) / total if total > 0 else 0.0,
    }


async def _shape(label: str, args: list[str], envs: list[dict[str, str]], key: str,
                 streams: int, connections: int, seconds: float) -> dict[str, float]:
    """Start ``gpuctl serve`` once per environment in ``envs`` (each on its own port), run
    the phases over all of them, stop them."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        urls = []
        for env in envs:
            port = _free_port()
            procs.append(subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "gpuctl", "serve", "--port", str(port), *args],
                env=env, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
            await wait_up(urls[-1], key, timeout=60)
        workers = "--workers" in args
        pids = [pid for proc in procs for pid in (_children(proc.pid) if workers
                                                   else [proc.pid])]
        print(f"{label}: serving (pids {pids})", file=sys.stderr, flush=True)
        return await _phase(urls, key, pids, streams, connections, seconds)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def bench(streams: int, repeats: int, seconds: float, shapes_wanted: int) -> None:
    _raise_fd_limit()
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
            home, key = _home(tmp, node_url)
            base = {**os.environ, "GPUCTL_HOME": str(home)}
            shared = {**base, "GPUCTL_STORE__URL": redis.url}
            # The control: a second gateway with its own home (a copy: same key, own store).
            shutil.copytree(home, tmp / "home-2")
            second = {**os.environ, "GPUCTL_HOME": str(tmp / "home-2")}
            # (label, serve's arguments, environments, load: how many processes' worth)
            shapes = [(ONE, [], [base], 1), (REPLICA, [], [shared], 1),
                      (TWO, ["--workers", "2"], [shared], 2),
                      (TWO_ALONE, [], [base, second], 2),
                      (TWO_SAME_TOTAL, ["--workers", "2"], [shared], 1)][:shapes_wanted]
            runs: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in shapes}
            for i in range(repeats):
                for label, args, envs, load in shapes:
                    print(f"run {i + 1}/{repeats}: {label}", file=sys.stderr, flush=True)
                    runs[label].append(await _shape(label, args, envs, key, streams * load,
                                                    CONNECTIONS * load, seconds))
        finally:
            node.terminate()
            node.wait(10)
            redis.stop()
    table = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
             for label, rs in runs.items()}
    print(f"\n# {streams} concurrent streams (32 chunks, 50 ms apart) and {CONNECTIONS} "
          f"connections of plain chats per gateway process, medians of {repeats}")
    keys = list(next(iter(table.values())))
    print(f"{'figure':28}" + "".join(f"{label:>26}" for label in table))
    for k in keys:
        print(f"{k:28}" + "".join(f"{row[k]:>26.2f}" for row in table.values()))
    one = table[ONE]["capacity_chunks_per_s"]
    print("capacity vs one process: " + ", ".join(
        f"{label} {row['capacity_chunks_per_s'] / one:.2f}x" for label, row in table.items()
        if label != ONE))
    single = table[ONE]["net_cpu_us_per_req"]
    print("CPU per request vs one process: " + ", ".join(
        f"{label} {row['net_cpu_us_per_req'] / single:.2f}x" for label, row in table.items()
        if label != ONE))
    print("per run (capacity vs one process, CPU/request vs one process):")
    for label, rs in runs.items():
        if label != ONE:
            print(f"  {label}: " + "; ".join(
                f"{r['capacity_chunks_per_s'] / o['capacity_chunks_per_s']:.2f}x, "
                f"{r['net_cpu_us_per_req'] / o['net_cpu_us_per_req']:.2f}x"
                for r, o in zip(rs, runs[ONE], strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=128,
                        help="concurrent streams per gateway process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--shapes", type=int, default=5,
                        help="run only the first N shapes (of five; the order above)")
    args = parser.parse_args()
    asyncio.run(bench(args.streams, args.repeats, args.seconds, args.shapes))


if __name__ == "__main__":
    main()
