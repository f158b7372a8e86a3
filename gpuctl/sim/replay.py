"""Replay a workload through the real engine, on virtual time, over the simulated cloud.

``gpuctl simulate`` asks: what would these requests have cost, and how long would people
have waited, under another setting? There is no second model of the engine to answer it:
``replay`` builds the real ``Engine`` with the config to judge, a ``SimCloud`` shaped like
the fleet (``FleetSpec``: GPUs, their models, resume, pause and Ollama start times) and an
in-memory store, and plays every request as a caller would (acquire, hold the slot for its
service time, release) on a ``VirtualClock``, which jumps to the next event whenever nothing
can run. A week of a busy group replays in seconds.

What it measures (``Outcome``):

- GPU-hours billed: each GPU from the moment a resume is asked until its pause has finished
  (resuming and pausing machines are allocated, so billed), up to the end of the window;
- the always-on figure (every GPU for the whole window) and the offline optimum
  (``offline_optimum``: knowing every arrival, keep a GPU up through a gap shorter than
  resume + Ollama start + pause, else pause and wake just in time);
- requests, the ones that waited for a wake (the engine told them a resume was under way),
  their wait's median, p90 and max, requests refused, and resumes sent.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuctl.config import Config
from gpuctl.engine import Engine, Progress, Usage, VirtualClock
from gpuctl.errors import GpuctlError
from gpuctl.sim.cloud import SimCloud, SimMachine
from gpuctl.sim.workload import DAY, Request
from gpuctl.store import Store

__all__ = ["FleetSpec", "GpuSpec", "Outcome", "offline_optimum", "replay", "run_replay"]

#: Stages of a wake a held request is told about: hearing one of the GPU that then served
#: it means it waited for a wake (not for a slot while another GPU was woken).
_WAKE_STAGES = frozenset({"resuming", "running"})
#: The window starts on a Monday at 00:00 UTC (2027-01-18), so a week's hours of the week
#: are what a policy that learns by hour of the week sees.
MONDAY = 1_800_230_400.0


@dataclass(frozen=True)
class GpuSpec:
    """One GPU of the replayed fleet."""

    name: str
    models: tuple[str, ...]
    resume_s: float = 120.0
    pause_s: float = 60.0
    ollama_s: float = 5.0


@dataclass(frozen=True)
class FleetSpec:
    gpus: tuple[GpuSpec, ...]

    @classmethod
    def twins(cls, count: int, models: Sequence[str], *, resume_s: float = 120.0,
              pause_s: float = 60.0, ollama_s: float = 5.0) -> FleetSpec:
        """``count`` identical GPUs, each with every one of ``models``."""
        return cls(tuple(
            GpuSpec(f"gpu-{n + 1}", tuple(sorted(set(models))), resume_s, pause_s, ollama_s)
            for n in range(count)
        ))


@dataclass
class Outcome:
    """What one setting would have cost and made people wait, over the window."""

    gpu_hours: float
    always_on_hours: float
    optimum_hours: float
    window_hours: float
    requests: int
    refused: int
    cold_waits: int
    wait_median_s: float
    wait_p90_s: float
    wait_max_s: float
    resumes: int
    per_gpu_hours: dict[str, float] = field(default_factory=dict)

    @property
    def over_optimum(self) -> float:
        return self.gpu_hours / self.optimum_hours if self.optimum_hours else math.inf


def run_replay(
    requests: Sequence[Request], config: Config, fleet: FleetSpec, *,
    window_s: float | None = None, history: Sequence[Request] = (), start_wall: float = MONDAY,
) -> Outcome:
    """``replay`` in a fresh event loop (for the CLI and benchmarks)."""
    return asyncio.run(replay(requests, config, fleet, window_s=window_s, history=history,
                              start_wall=start_wall))


async def replay(
    requests: Sequence[Request], config: Config, fleet: FleetSpec, *,
    window_s: float | None = None, history: Sequence[Request] = (), start_wall: float = MONDAY,
) -> Outcome:
    """Play ``requests`` through a real engine with ``config`` over a simulated ``fleet``.

    ``window_s``: how long the window lasts (default: to the end of the last day the
    requests touch). ``history``: requests of the time before the window, handed to the
    engine as what it has seen (a policy that learns from history learns from them); with
    negative times they are placed as they are, else as whole weeks ending at the window.
    ``start_wall``: the window's start on the wall clock (default: a Monday 00:00 UTC).
    """
    clock = VirtualClock(wall_start=start_wall)
    cloud = SimCloud(clock)
    store = Store.memory()
    machines: list[SimMachine] = []
    for spec in fleet.gpus:
        machine = cloud.add(spec.name, models=spec.models, resume_seconds=spec.resume_s,
                            pause_seconds=spec.pause_s, ollama_seconds=spec.ollama_s)
        machines.append(machine)
        store.save_models(machine.id, [{"name": m, "model": m} for m in spec.models], 0)
        store.record_resume(machine.id, spec.resume_s + spec.ollama_s, ok=True, at=0)
    last = max((r.arrival_s + r.service_s for r in requests), default=0.0)
    window = window_s if window_s is not None else max(DAY, math.ceil(last / DAY) * DAY)
    engine = Engine(config, cloud, store, clock=clock, nodes=cloud.node, cost_meter=False)
    if history:
        before = 0.0
        if min(r.arrival_s for r in history) >= 0:
            # Whole weeks that end where the window begins, on the same day of the week.
            span = max(DAY, math.ceil(max(r.arrival_s for r in history) / DAY) * DAY)
            before = math.ceil(span / (7 * DAY)) * 7 * DAY
        engine.learn_from((r.model, start_wall - before + r.arrival_s,
                           start_wall - before + r.arrival_s + r.service_s, r.user)
                          for r in history)
    await engine.start()
    caller = _Callers(engine, clock)
    feeder = asyncio.ensure_future(caller.feed(requests))
    try:
        await clock.run_until(window)
    finally:
        feeder.cancel()
        for task in list(caller.tasks):
            task.cancel()
        await asyncio.gather(feeder, *caller.tasks, return_exceptions=True)
        await engine.stop()
        store.close()
    per_gpu = {m.name: _billed(m, clock, window) / 3600 for m in machines}
    waits = sorted(caller.cold)
    return Outcome(
        gpu_hours=sum(per_gpu.values()),
        always_on_hours=len(machines) * window / 3600,
        optimum_hours=offline_optimum(requests, fleet, config.gpu.slots) / 3600,
        window_hours=window / 3600,
        requests=len(requests),
        refused=caller.refused,
        cold_waits=len(waits),
        wait_median_s=statistics.median(waits) if waits else 0.0,
        wait_p90_s=_quantile(waits, 0.9),
        wait_max_s=waits[-1] if waits else 0.0,
        resumes=cloud.total_resumes,
        per_gpu_hours=per_gpu,
    )


class _Callers:
    """The people of the trace: each request acquires, holds its slot, releases."""

    def __init__(self, engine: Engine, clock: VirtualClock) -> None:
        self.engine = engine
        self.clock = clock
        self.tasks: set[asyncio.Task[None]] = set()
        self.cold: list[float] = []
        self.refused = 0

    async def feed(self, requests: Sequence[Request]) -> None:
        start = self.clock.now()
        for request in requests:
            delay = start + request.arrival_s - self.clock.now()
            if delay > 0:
                await self.clock.sleep(delay)
            task = asyncio.ensure_future(self.one(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def one(self, request: Request) -> None:
        woken: set[str] = set()

        def heard(progress: Progress) -> None:
            if progress.stage in _WAKE_STAGES and progress.gpu_id:
                woken.add(progress.gpu_id)

        began = self.clock.now()
        try:
            ticket = await self.engine.acquire(request.model, request.user, progress=heard)
        except GpuctlError:
            self.refused += 1
            return
        if ticket.gpu_id in woken:
            self.cold.append(self.clock.now() - began)
        try:
            await self.clock.sleep(request.service_s)
        finally:
            self.engine.release(ticket, Usage(tokens_out=request.tokens_out))


def _billed(machine: SimMachine, clock: VirtualClock, window: float) -> float:
    """Seconds ``machine`` was allocated (resume asked → pause done) within the window."""
    offset = clock.wall() - clock.now()
    end = window + offset
    billed = 0.0
    up_since: float | None = None
    for action in machine.actions:
        if action.kind == "resume" and up_since is None:
            up_since = action.created
            continue
        # A failed resume ends with the machine paused again, like a finished pause.
        ended = (action.kind, action.status) in (("resume", "failed"), ("pause", "success"))
        if ended and up_since is not None:
            billed += min(end, action.updated or end) - up_since
            up_since = None
    if up_since is not None:
        billed += max(0.0, end - up_since)
    return billed


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def offline_optimum(requests: Sequence[Request], fleet: FleetSpec, slots: int) -> float:
    """GPU-seconds a clairvoyant scheduler would bill for ``requests`` on ``fleet``.

    GPUs are grouped by the models they have (twins share a group); each request goes to
    the first group with its model. Within a group the k-th GPU is needed while more than
    (k-1)·``slots`` requests run at once. Each GPU's busy periods are merged across gaps
    shorter than its break-even (resume + Ollama start + pause: a gap that long costs as much
    kept up as paused), and each up-period costs its length plus that break-even once.
    """
    groups: dict[tuple[str, ...], list[GpuSpec]] = {}
    for gpu in fleet.gpus:
        groups.setdefault(gpu.models, []).append(gpu)
    demand: dict[tuple[str, ...], list[tuple[float, int]]] = {key: [] for key in groups}
    for r in requests:
        for key in groups:
            if r.model in key:
                demand[key] += [(r.arrival_s, 1), (r.arrival_s + r.service_s, -1)]
                break
    total = 0.0
    for key, gpus in groups.items():
        events = sorted(demand[key], key=lambda e: (e[0], e[1]))
        for level, gpu in enumerate(gpus):
            floor = level * slots  # this GPU is busy while more than ``floor`` requests run
            breakeven = gpu.resume_s + gpu.ollama_s + gpu.pause_s
            periods: list[list[float]] = []
            running = 0
            opened: float | None = None
            for at, step in events:
                before = running
                running += step
                if before <= floor < running and opened is None:
                    opened = at
                elif running <= floor < before and opened is not None:
                    if periods and opened - periods[-1][1] < breakeven:
                        periods[-1][1] = at
                    else:
                        periods.append([opened, at])
                    opened = None
            total += sum(end - begin + breakeven for begin, end in periods)
    return total


def describe(outcome: Outcome) -> dict[str, Any]:
    """The figures of one outcome, as ``--json`` prints them."""
    return {
        "gpu_hours": round(outcome.gpu_hours, 3),
        "always_on_gpu_hours": round(outcome.always_on_hours, 3),
        "optimum_gpu_hours": round(outcome.optimum_hours, 3),
        "over_optimum": round(outcome.over_optimum, 3),
        "requests": outcome.requests,
        "refused": outcome.refused,
        "waited_for_wake": outcome.cold_waits,
        "wait_median_s": round(outcome.wait_median_s, 1),
        "wait_p90_s": round(outcome.wait_p90_s, 1),
        "wait_max_s": round(outcome.wait_max_s, 1),
        "resumes": outcome.resumes,
    }
