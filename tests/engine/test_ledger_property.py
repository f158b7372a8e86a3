"""Property: on the real engine, every billed GPU-second of the ledger is accounted for.

Hypothesis drives random arrivals of random users, completions, client cancellations,
portal resumes, time passing (wakes, lease expiry, idle pauses) and restarts of the gateway
(a new engine over the reopened store) against a simulated fleet on a fake clock. The ledger
the engine wrote is then attributed over random windows: per GPU, attributed + unattributed
= billed, to the millisecond.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuctl.config import Config
from gpuctl.engine import Engine, FakeClock, Ticket
from gpuctl.engine.attribution import attribute
from gpuctl.sim.cloud import SimCloud
from gpuctl.store import RequestRow, Store

USERS = ("ann", "bob", "cy")
MODELS = ("llama3.2", "qwen3:8b")
Op = tuple[Any, ...]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.sampled_from(USERS), st.sampled_from(MODELS)),
        st.tuples(st.just("complete"), st.integers(0, 99)),
        st.tuples(st.just("cancel"), st.integers(0, 99)),
        st.tuples(st.just("portal"), st.sampled_from(("gpu-a", "gpu-b", "gpu-c"))),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 3.0, 17.0, 45.0, 400.0])),
        st.tuples(st.just("restart")),
    ),
    max_size=40,
)


def _config() -> Config:
    return Config.model_validate({
        "server": {"max_queue": 1000, "queue_timeout_seconds": 300},
        "gpu": {"slots": 2},
        "timing": {"reservation_minutes": 1, "fallback_reservation_minutes": 0.5,
                   "startup_timeout_seconds": 100, "ollama_readiness_wait_seconds": 30,
                   "poll_interval_seconds": 5},
    })


class _Run:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.clock = FakeClock()
        self.cloud = SimCloud(self.clock, resume_seconds=20, pause_seconds=10, ollama_seconds=2)
        self.cloud.add("gpu-a", status="running", models=["llama3.2:latest", "qwen3:8b"])
        self.cloud.add("gpu-b", models=["llama3.2:latest"])
        self.cloud.add("gpu-c", models=["qwen3:8b"])
        self.store = Store.open(state)
        self.engine: Engine | None = None
        self.pending: list[tuple[asyncio.Task[Ticket], RequestRow]] = []
        self.held: list[tuple[Ticket, RequestRow]] = []
        #: Per engine run: (start, the meter's mark, its billed and split totals).
        self.meters: list[tuple[float, float, dict[str, float], float]] = []

    async def start(self) -> None:
        self.engine = Engine(_config(), self.cloud, self.store, clock=self.clock,
                             nodes=self.cloud.node)
        self.started = self.clock.wall()
        await self.engine.start()

    async def stop(self) -> None:
        """The gateway goes away: waiters are cancelled, requests in flight are lost."""
        assert self.engine is not None
        for task, _ in self.pending:
            task.cancel()
        await asyncio.gather(*(t for t, _ in self.pending), return_exceptions=True)
        for _, row in self.pending:
            self.engine.end_request(row, 499)
        self.pending, self.held = [], []
        self.engine.tick()
        meter = self.engine._meter  # the running counters of /metrics and budgets
        split = sum(meter.totals.users.values()) + sum(meter.totals.unattributed.values())
        if meter.mark is not None:
            self.meters.append((self.started, meter.mark, dict(meter.totals.billed), split))
        await self.engine.stop()
        self.store.close()

    async def apply(self, op: Op) -> None:
        engine = self.engine
        assert engine is not None
        kind = op[0]
        if kind == "arrive":
            row = engine.begin_request("key_" + op[1], op[1], "/api/chat", op[2])
            task = asyncio.ensure_future(engine.acquire(op[2], op[1], request=row))
            self.pending.append((task, row))
        elif kind == "complete" and self.held:
            ticket, row = self.held.pop(op[1] % len(self.held))
            engine.release(ticket)
            engine.end_request(row, 200)
        elif kind == "cancel" and self.pending:
            task, _ = self.pending[op[1] % len(self.pending)]
            task.cancel()
        elif kind == "portal":
            machine = self.cloud.find(op[1])
            if machine.status == "paused":
                await self.cloud.resume(machine.id)
        elif kind == "advance":
            await self.clock.advance(op[1], step=1.0)
        elif kind == "restart":
            await self.stop()
            await self.clock.advance(7.0, step=1.0)  # down for a while
            self.store = Store.open(self.state)
            await self.start()
        await self.clock.settle()
        for task, row in [p for p in self.pending if p[0].done()]:
            self.pending.remove((task, row))
            if task.cancelled():
                engine.end_request(row, 499)
            elif task.exception() is not None:
                engine.end_request(row, 503)
            else:
                self.held.append((task.result(), row))


async def _scenario(ops: list[Op], cuts: list[float]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = _Run(Path(tmp))
        start = run.clock.wall()
        await run.start()
        try:
            for op in ops:
                await run.apply(op)
            await run.clock.advance(200.0, step=1.0)
        finally:
            await run.stop()
        end = run.clock.wall()
        store = Store.open(Path(tmp))
        events = store.ledger.timeline(until=end + 1)
        requests = store.requests(0, end + 1)
        store.close()
    # The meter, counting as time closes, bills what the ledger bills, split as wholly.
    for begun, mark, billed, split in run.meters:
        assert split == pytest.approx(sum(billed.values()), abs=1e-3)
        if mark > begun:
            full = attribute(events, requests, begun, mark).billed
            assert {g: s for g, s in billed.items() if s > 1e-6} == pytest.approx(
                {g: s for g, s in full.items() if s > 1e-6}, abs=1e-3)
    edges = sorted({start, end, *(start + c * (end - start) for c in cuts)})
    whole = attribute(events, requests, start, end)
    assert whole.billed, "the GPU running from the start bills"
    parts = [attribute(events, requests, a, b) for a, b in itertools.pairwise(edges)]
    for result in (whole, *parts):
        for gpu_id, billed in result.billed.items():
            shared = sum(s for k, s in result.shares.items() if k.gpu_id == gpu_id)
            assert shared == pytest.approx(billed, abs=1e-3), (gpu_id, result.since)
    for gpu_id, billed in whole.billed.items():
        assert sum(p.billed.get(gpu_id, 0.0) for p in parts) == pytest.approx(billed, abs=1e-3)
    # Serving is exactly the time some request held a slot: the union of the slot intervals.
    for gpu_id in whole.billed:
        slots = sorted((r.served_at, r.served_at + r.service_s) for r in requests
                       if r.gpu_id == gpu_id and r.served_at is not None and r.service_s > 0)
        union, reach = 0.0, start
        for a, b in slots:
            a, b = max(a, reach), min(b, end)
            if b > a:
                union += b - a
                reach = b
        serving = sum(s for k, s in whole.shares.items()
                      if k.gpu_id == gpu_id and k.kind == "serving")
        assert serving == pytest.approx(union, abs=1e-3), gpu_id
    assert all(r.outcome in ("ok", "cancelled", "refused", "error") for r in requests)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations, st.lists(st.floats(0.01, 0.99), max_size=3))
def test_the_engines_ledger_conserves_every_billed_second(ops: list[Op],
                                                          cuts: list[float]) -> None:
    asyncio.run(_scenario(ops, cuts))
