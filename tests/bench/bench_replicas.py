"""What replicas cost per request: the engine's grant and release alone vs with global slots
in a real Redis.

Run: ``.venv/bin/python tests/bench/bench_replicas.py [--calls 5000] [--rounds 5]``. It
starts its own ``redis-server`` on a free loopback port (persistence off), builds an
engine over a simulated fleet of 10 warm GPUs (fake clock), and times ``acquire`` +
``release`` per request in three ways:

- ``single``: no Redis (``store.url`` empty), today's path;
- ``replica, hand-off``: a slot freed and taken again on the same replica keeps its Redis
  entry (no round trip), the common case under load when requests queue;
- ``replica, round trip``: every grant takes an entry in Redis (one Lua script) and every
  release gives it back (one ZREM), the case of an idle fleet.

Figures: the benchmark thread's CPU per request (``time.thread_time_ns``: the gateway's own
cost, what the issue's "per-request CPU" means), wall time per request, and the Redis
server's CPU per request (from ``/proc/<pid>/stat``). Medians of ``--rounds``. The
whole-request figure to compare with is the gateway's ~359 µs CPU per request (README,
Performance). It prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gpuctl.config import Config  # noqa: E402
from gpuctl.engine import Engine, FakeClock  # noqa: E402
from gpuctl.engine import replicas as replicas_mod  # noqa: E402
from gpuctl.engine.replicas import SharedSlotGate  # noqa: E402
from gpuctl.sim.cloud import SimCloud  # noqa: E402
from gpuctl.store import Store  # noqa: E402
from gpuctl.store.shared import GlobalSlots, SlotHolder, connect  # noqa: E402
from tests.replicas.redis_server import RedisServer  # noqa: E402

GPUS = 10
REQUEST_CPU_US = 359.0  # the whole gateway's CPU per request (design notes, granian)


def _server_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _engine() -> Engine:
    clock = FakeClock()
    cloud = SimCloud(clock, ollama_seconds=0)
    for n in range(GPUS):
        cloud.add(f"gpu-{n:02d}", status="running", models=[f"model{n}:latest"])
    config = Config.model_validate({"gpu": {"slots": 4, "auto_pause": False},
                                    "timing": {"poll_interval_seconds": 1e9}})
    engine = Engine(config, cloud, Store.memory(), clock=clock, nodes=cloud.node)
    await engine.start()
    return engine


async def _round(engine: Engine, gate: SharedSlotGate | None, calls: int,
                 round_trip: bool, server_pid: int | None) -> tuple[float, float, float]:
    cpu0, wall0 = time.thread_time_ns(), time.perf_counter_ns()
    srv0 = _server_cpu_s(server_pid) if server_pid else 0.0
    for i in range(calls):
        ticket = await engine.acquire(f"model{i % GPUS}:latest", f"user{i % 50}")
        engine.release(ticket)
        if gate is not None and round_trip:
            gate.return_spares()  # SPARE_SECONDS is 0 here: every entry goes back at once
            await asyncio.gather(*gate._tasks)
    cpu = (time.thread_time_ns() - cpu0) / calls / 1000
    wall = (time.perf_counter_ns() - wall0) / calls / 1000
    srv = ((_server_cpu_s(server_pid) - srv0) * 1e6 / calls) if server_pid else 0.0
    return cpu, wall, srv


async def bench(calls: int, rounds: int) -> None:
    rows: list[tuple[str, float, float, float]] = []
    engine = await _engine()
    runs = [await _round(engine, None, calls, False, None) for _ in range(rounds)]
    rows.append(("single (no Redis)", *map(statistics.median, zip(*runs, strict=True))))
    await engine.stop()

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            assert server.proc is not None
            for label, round_trip in (("replica, hand-off", False),
                                      ("replica, round trip", True)):
                replicas_mod.SPARE_SECONDS = 0.0 if round_trip else 3600.0
                client = connect(server.url)
                gate = SharedSlotGate(SlotHolder(GlobalSlots(client)))
                engine = await _engine()
                engine.attach_gate(gate)
                runs = [await _round(engine, gate, calls, round_trip, server.proc.pid)
                        for _ in range(rounds)]
                rows.append((label, *map(statistics.median, zip(*runs, strict=True))))
                await engine.stop()
                await gate.close()
                await client.aclose()
        finally:
            server.stop()

    base = rows[0][1]
    print(f"{calls} acquire+release per round, median of {rounds} rounds, {GPUS} warm GPUs")
    print(f"{'path':<22} {'CPU µs/req':>10} {'wall µs/req':>11} {'Redis CPU µs':>12} "
          f"{'whole request vs single':>24}")
    for label, cpu, wall, srv in rows:
        ratio = (REQUEST_CPU_US + cpu - base) / REQUEST_CPU_US
        print(f"{label:<22} {cpu:>10.1f} {wall:>11.1f} {srv:>12.1f} {ratio:>23.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(bench(args.calls, args.rounds))


if __name__ == "__main__":
    main()
