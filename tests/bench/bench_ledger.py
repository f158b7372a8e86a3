"""What the ledger costs per request on the engine's path, and per background tick.

Run it as a script: ``python tests/bench/bench_ledger.py`` (it is not collected by pytest).
A simulated fleet of 8 GPUs on a fake clock serves requests on the fast path, timed per
request (the benchmark thread's CPU time, medians of several rounds):

- ``bare``: ``acquire`` + ``release`` with no ledger row (what the engine did before);
- ``ledger``: the same with a row: ``begin_request``, ``acquire(request=)``, ``release``
  (which fills the row), ``end_request`` (which keeps it for the flush and the meter);
- ``flush``: writing the kept rows to SQLite, per row (the background loop's part);
- ``meter``: one background tick of the cost meter after 10,000 requests by 50 users, per
  request (the incremental attribution that feeds ``/metrics`` and budgets).

The difference ``ledger - bare`` is the ledger's cost on a request's path; the gateway's
part (one dict lookup for the budget header when a key has none) is not in it. The target
is at most 15 µs per request. Figures print; they never decide a test.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpuctl.config import Config
from gpuctl.engine import Engine, FakeClock
from gpuctl.sim.cloud import SimCloud
from gpuctl.store import Store

_now = time.thread_time_ns
MODEL = "llama3.2:latest"
USERS = [f"user{i}" for i in range(50)]


async def _engine(state: Path) -> tuple[Engine, FakeClock, Store]:
    clock = FakeClock()
    cloud = SimCloud(clock, ollama_seconds=0)
    for n in range(8):
        cloud.add(f"gpu-{n}", status="running", models=[MODEL])
    store = Store.open(state)
    config = Config.model_validate({"gpu": {"slots": 4, "auto_pause": False},
                                    "timing": {"poll_interval_seconds": 1e9}})
    engine = Engine(config, cloud, store, clock=clock, nodes=cloud.node)
    await engine.start()
    return engine, clock, store


async def _round(engine: Engine, n: int, *, ledger: bool) -> float:
    start = _now()
    for i in range(n):
        user = USERS[i % len(USERS)]
        if ledger:
            row = engine.begin_request("key_" + user, user, "/api/chat", MODEL)
            ticket = await engine.acquire(MODEL, user, request=row)
            engine.release(ticket)
            engine.end_request(row, 200)
        else:
            ticket = await engine.acquire(MODEL, user)
            engine.release(ticket)
    return (_now() - start) / n / 1000


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine, clock, store = await _engine(Path(tmp))
        rounds, n = 7, 10_000
        bare, ledger, flush = [], [], []
        for _ in range(rounds):
            bare.append(await _round(engine, n, ledger=False))
            ledger.append(await _round(engine, n, ledger=True))
            start = _now()
            store.flush()
            flush.append((_now() - start) / n / 1000)
        await clock.advance(1.0)
        meter = []
        for _ in range(rounds):
            await _round(engine, n, ledger=True)
            await clock.advance(1.0)
            start = _now()
            engine._meter.advance(None)  # one tick's attribution of what closed
            meter.append((_now() - start) / n / 1000)
            store.flush()
        await engine.stop()
        store.close()
    b, led = statistics.median(bare), statistics.median(ledger)
    print(f"{'per request, CPU µs (median of ' + str(rounds) + ')':<44}{'value':>10}")
    print(f"{'bare: acquire + release':<44}{b:>10.2f}")
    print(f"{'ledger: + begin/end_request, row filled':<44}{led:>10.2f}")
    print(f"{'ledger cost on the request path':<44}{led - b:>+10.2f}")
    print(f"{'flush to SQLite, per row (background)':<44}{statistics.median(flush):>10.2f}")
    print(f"{'meter tick, per request (background)':<44}{statistics.median(meter):>10.2f}")


if __name__ == "__main__":
    asyncio.run(main())
