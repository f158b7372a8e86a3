"""What replicas cost per request: the engine's grant and release alone vs with global slots
in a real Redis.

Run: ``.venv/bin/python tests/bench/bench_replicas.py [--calls 5000] [--rounds 5]``. It
starts its own ``redis-server`` on a free loopback port (persistence off), builds an
engine over a simulated fleet of 10 warm GPUs (fake clock), and times ``acquire`` +
``release`` per request in three ways:

- ``single``: no Redis (``store.url`` empty), today's path;
- ``replica alone``: no other replica waits for the GPU, so a freed slot keeps its Redis
  entry as a spare for this replica's next request (``SPARE_SECONDS``, 2 s): no round trip
  while a GPU gets a request at least every 2 s from this replica;
- ``replica, fresh slot``: every grant takes an entry in Redis (one Lua script) and every
  release gives it back (one ZREM, batched per sync in the gateway, one per request here):
  requests further apart than the spare's 2 s. (Before spares lasted 2 s, 0.1 s, this was
  the path of every request on a lightly used fleet.)

While another replica waits for the GPU, a release costs one script call instead (whose
turn), about what an acquire costs. The second table gives the client CPU of one call of
each kind through redis-py's asyncio client: a ``PING`` (the floor of any call), the
acquire script through redis-py's ``Script`` object and through a bare
``execute_command("EVALSHA", …)`` with the preloaded SHA, a ``ZREM`` and a one-command
pipeline.

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


async def _call_costs(url: str, calls: int) -> list[tuple[str, float]]:
    """Client CPU µs of one Redis call of each kind (see the module docstring)."""
    client = connect(url)
    slots = GlobalSlots(client)
    script = slots._acquire  # the acquire script, registered
    await client.script_load(script.script)
    keys = [slots.key("bench-gpu"), slots.hand_key("bench-gpu", "bench")]

    async def through_script(i: int) -> None:
        await script(keys=keys, args=[10**9, 15_000, f"m{i}"])

    async def evalsha(i: int) -> None:
        await client.execute_command("EVALSHA", script.sha, 2, *keys, 10**9, 15_000, f"m{i}")

    async def zrem(i: int) -> None:
        await client.zrem(keys[0], f"m{i}")

    async def pipeline(i: int) -> None:
        async with client.pipeline(transaction=False) as pipe:
            pipe.zrem(keys[0], f"m{i}")
            await pipe.execute()

    async def ping(_i: int) -> None:
        await client.execute_command("PING")

    costs = []
    for label, call in (("PING", ping), ("acquire, Script object", through_script),
                        ("acquire, execute_command EVALSHA", evalsha), ("ZREM", zrem),
                        ("ZREM in a pipeline", pipeline)):
        cpu0 = time.thread_time_ns()
        for i in range(calls):
            await call(i)
        costs.append((label, (time.thread_time_ns() - cpu0) / calls / 1000))
    await client.aclose()
    return costs


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
            for label, round_trip in (("replica alone", False),
                                      ("replica, fresh slot", True)):
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
            costs = await _call_costs(server.url, calls)
        finally:
            server.stop()

    base = rows[0][1]
    print(f"{calls} acquire+release per round, median of {rounds} rounds, {GPUS} warm GPUs")
    print(f"{'path':<22} {'CPU µs/req':>10} {'wall µs/req':>11} {'Redis CPU µs':>12} "
          f"{'whole request vs single':>24}")
    for label, cpu, wall, srv in rows:
        ratio = (REQUEST_CPU_US + cpu - base) / REQUEST_CPU_US
        print(f"{label:<22} {cpu:>10.1f} {wall:>11.1f} {srv:>12.1f} {ratio:>23.2f}×")
    print(f"\n{'one Redis call':<34} {'client CPU µs':>13}")
    for label, cpu in costs:
        print(f"{label:<34} {cpu:>13.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(bench(args.calls, args.rounds))


if __name__ == "__main__":
    main()
