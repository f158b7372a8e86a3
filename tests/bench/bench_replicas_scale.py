"""Benchmark: relayed chunks/s of one gateway process vs two replicas (``serve --workers 2``)
sharing one Redis, on this machine's two cores.

Run: ``.venv/bin/python tests/bench/bench_replicas_scale.py [--streams 256] [--repeats 3]``.
It prints figures and asserts nothing.

Setup: one simulated Ollama node (``bench_gateway.py --role node``: 32 chunks 50 ms apart)
and the lean load generator of ``bench_gateway.py``; a real ``redis-server``; the gateway
as ``gpuctl serve`` runs it (static provider, keys in SQLite) in three shapes: one process
without Redis, one replica with ``store.url``, and ``--workers 2``. Each phase runs
``--streams`` concurrent streams for a bounded time.

Why two figures. Two cores cannot run two saturated gateways *and* the node and the load
generator that feed them: whatever the gateways gain, the node and the client lose, so the
wall-clock chunks/s of the whole machine says little about the gateways. What scales is
the gateway's CPU per relayed chunk: ``capacity`` is the chunks/s one core of gateway
would relay at the measured cost (1 / CPU per chunk), summed over the processes that can
each have a core; the scaling figure is the two-worker capacity over the one-process
capacity (2.0× means a replica costs nothing extra per chunk). The wall-clock chunks/s and
the split of CPU between the two workers are printed beside it. Before the streams, a
phase of non-streamed chats on 64 connections gives the CPU per request (all processes).
CPU comes from
``/proc/<pid>/task/*/schedstat`` (ns), counted until ``SETTLE_SECONDS`` after each phase,
so the background work the requests cause (a replica publishes and folds in their ledger
rows about once a second) is charged to them; each process's idle CPU rate (the replica's
sync loop, heartbeats), measured before any load, is subtracted ("net").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


async def _phase(url: str, key: str, pids: list[int], streams: int,
                 seconds: float) -> dict[str, float]:
    load = Load(url, key)
    await asyncio.sleep(SETTLE_SECONDS)  # the start's background work done
    idle0 = {pid: cpu_seconds(pid) for pid in pids}
    t0 = time.perf_counter()
    await asyncio.sleep(2.0)
    idle = {pid: (cpu_seconds(pid) - idle0[pid]) / (time.perf_counter() - t0) for pid in pids}
    await run_phase(load, None, 64, stream=False, per_client=5, time_limit=5)  # warm up
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
        run_phase(load, None, 64, stream=False, per_client=150, time_limit=seconds))
    plain_cpu = sum(plain_net.values())
    phase, net = await charged(
        run_phase(load, None, streams, stream=True, per_client=100, time_limit=seconds))
    await load.pool.aclose()
    chunks = max(1, phase.chunks)
    total = sum(net.values())
    # One core each: the capacity of n processes is n chunks per (CPU per chunk) second.
    per_chunk = total / chunks
    return {
        "requests_per_s_c64": plain.requests / plain.seconds,
        "net_cpu_us_per_req_c64": plain_cpu / max(1, plain.requests) * 1e6,
        "chunks_per_s": phase.chunks / phase.seconds,
        "errors": phase.errors + plain.errors,
        "net_cpu_us_per_chunk": per_chunk * 1e6,
        "capacity_chunks_per_s": len(pids) / per_chunk if per_chunk > 0 else 0.0,
        "idle_cpu_ms_per_s": sum(idle.values()) * 1e3,
        "busiest_worker_share": max(net.values()) / total if total > 0 else 0.0,
    }


async def _shape(label: str, args: list[str], env: dict[str, str], key: str,
                 streams: int, seconds: float) -> dict[str, float]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gpuctl", "serve",  # noqa: ASYNC220
                             "--port", str(port), *args], env=env, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_up(url, key, timeout=60)
        workers = "--workers" in args
        pids = _children(proc.pid) if workers else [proc.pid]
        print(f"{label}: serving (pids {pids})", file=sys.stderr, flush=True)
        return await _phase(url, key, pids, streams, seconds)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def bench(streams: int, repeats: int, seconds: float) -> None:
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
            shapes = [("one process, no Redis", [], base),
                      ("one replica (Redis)", [], {**base, "GPUCTL_STORE__URL": redis.url}),
                      ("two workers (Redis)", ["--workers", "2"],
                       {**base, "GPUCTL_STORE__URL": redis.url})]
            runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in shapes}
            for i in range(repeats):
                for label, args, env in shapes:
                    print(f"run {i + 1}/{repeats}: {label}", file=sys.stderr, flush=True)
                    runs[label].append(await _shape(label, args, env, key, streams, seconds))
        finally:
            node.terminate()
            node.wait(10)
            redis.stop()
    table = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
             for label, rs in runs.items()}
    print(f"\n# {streams} concurrent streams (32 chunks, 50 ms apart), medians of {repeats}")
    keys = list(next(iter(table.values())))
    print(f"{'figure':28}" + "".join(f"{label:>24}" for label in table))
    for k in keys:
        print(f"{k:28}" + "".join(f"{row[k]:>24.2f}" for row in table.values()))
    one = table["one process, no Redis"]["capacity_chunks_per_s"]
    replica = table["one replica (Redis)"]["capacity_chunks_per_s"]
    two = table["two workers (Redis)"]["capacity_chunks_per_s"]
    print(f"capacity, two workers vs one process: {two / one:.2f}x; "
          f"vs one replica: {two / replica:.2f}x")
    single = table["one process, no Redis"]["net_cpu_us_per_req_c64"]
    print("CPU per request vs one process: " + ", ".join(
        f"{label} {row['net_cpu_us_per_req_c64'] / single:.2f}x" for label, row in table.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(bench(args.streams, args.repeats, args.seconds))


if __name__ == "__main__":
    main()
