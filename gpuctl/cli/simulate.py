"""``gpuctl simulate``: what other settings would have cost, and made people wait.

Parses the flags, picks the workload and the fleet (a trace, the sample week, or the request
log of the local state dir or, with ``--url``, of a running gateway through its admin-only
``GET /admin/requests``), hands them to ``sim.study.run_study`` (which replays through the
real engine) and renders the verdict. No policy here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NamedTuple

import typer

from gpuctl.cli.context import AppContext, run_sync
from gpuctl.cli.output import emit_json
from gpuctl.errors import UsageError

if TYPE_CHECKING:
    from rich.table import Table

    from gpuctl.engine.requestlog import FleetGpu, RequestLog
    from gpuctl.sim.replay import FleetSpec
    from gpuctl.sim.study import StudyResult
    from gpuctl.sim.workload import Request

__all__ = ["simulate"]


class _Workload(NamedTuple):
    requests: list[Request]
    history: list[Request]
    source: str
    notes: list[str]
    start_wall: float | None = None  # None: the replay's Monday
    window_s: float | None = None
    fleet: list[FleetGpu] | None = None  # a gateway's learnt fleet (--url)


def simulate(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="D",
        help="Replay the request log from D (7d, 12h, 2026-11-01) until now; the default "
             "when neither --trace nor --sample is given.")] = None,
    trace: Annotated[Path | None, typer.Option(
        "--trace", metavar="FILE", dir_okay=False,
        help="CSV of requests: arrival_s,user,model,service_s[,tokens_out].")] = None,
    sample: Annotated[bool, typer.Option(
        "--sample", help="A built-in synthetic week of a 12-person group (see the README).")
    ] = False,
    shape: Annotated[str, typer.Option(
        "--shape", help="With --sample: 'group' (the default week) or 'deadline' (a week "
                        "before a deadline).")] = "group",
    seed: Annotated[int, typer.Option("--seed", help="With --sample: which week to draw.")] = 1,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=V1,V2",
        help="A config key and the values to try; several --set make a grid.")] = None,
    policy: Annotated[str | None, typer.Option(
        "--policy", metavar="P1,P2", help="Pause policies to try: fixed, adaptive.")] = None,
    gpus: Annotated[int | None, typer.Option(
        "--gpus", min=1, max=64, help="What if the fleet had N identical GPUs.")] = None,
    resume_s: Annotated[float | None, typer.Option(
        "--resume-s", min=1, max=3600, help="What if a resume took S seconds.")] = None,
    pause_s: Annotated[float | None, typer.Option(
        "--pause-s", min=1, max=3600, help="What if a pause took S seconds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    url: Annotated[str | None, typer.Option(
        "--url", metavar="U", envvar="GPUCTL_GATEWAY_URL", show_envvar=True,
        help="Read the request log and fleet of a running gateway instead of the local "
             "state dir.", show_default=False)] = None,
    key: Annotated[str | None, typer.Option(
        "--key", metavar="K", envvar="GPUCTL_GATEWAY_KEY", show_envvar=True,
        help="An admin key of the gateway for --url.", show_default=False)] = None,
) -> None:
    """Replay a workload under other settings: GPU-hours, waits, the best trade-off."""
    from gpuctl.sim.study import parse_sets, run_study, settings_grid

    app = AppContext.of(ctx)
    config = app.config
    policies = [p.strip() for p in (policy or "").split(",") if p.strip()]
    grid = settings_grid(parse_sets(sets or []), policies)
    remote = None
    if url and trace is None and not sample:
        if not key:
            from gpuctl.errors import CredentialsError

            raise CredentialsError("--url needs a gateway key",
                                   hint="Pass --key or set GPUCTL_GATEWAY_KEY (an admin key).")
        remote = (url, key)
    work = _workload(app, since, trace, sample, shape, seed, remote)
    requests, history, source, notes = work.requests, work.history, work.source, work.notes
    fleet, fleet_note = _fleet(app, requests, sample=sample, gpus=gpus, resume_s=resume_s,
                               pause_s=pause_s, learnt=work.fleet)
    notes.append(fleet_note)
    timing: dict[str, float] = {}
    if work.start_wall is not None:
        timing["start_wall"] = work.start_wall
    if work.window_s is not None:
        timing["window_s"] = work.window_s
    rate = config.cost.credits_per_gpu_hour or None  # 0: no price set, no credits shown
    if not as_json:
        app.err.print(f"replaying {len(requests):,} requests under {len(grid) or 1} "
                      "setting(s)…", highlight=False)
    result = run_sync(run_study(config, requests, fleet, grid, source=source, history=history,
                                notes=notes, credits_per_gpu_hour=rate, **timing))
    if as_json:
        emit_json(result)
        return
    app.out.print(_table(result))
    for note in result.notes:
        app.out.print(f"  {note}", highlight=False, markup=False)
    app.out.print(result.verdict, highlight=False, markup=False)


def _workload(
    app: AppContext, since: str | None, trace: Path | None, sample: bool, shape: str, seed: int,
    remote: tuple[str, str] | None = None,
) -> _Workload:
    from gpuctl.sim.workload import WEEK, Request, read_trace, synthetic_week

    if sum((since is not None, trace is not None, sample)) > 1:
        raise UsageError("give one workload: --since D, --trace FILE or --sample")
    if trace is not None:
        requests = read_trace(trace)
        note = ("The adaptive policy learnt from the trace itself, as if the week before had "
                "looked the same.")
        return _Workload(requests, requests, f"trace {trace}", [note])
    if sample:
        requests = synthetic_week(shape, seed)
        # Two weeks before it, each another draw of the same shape: a habit shows in both.
        history = synthetic_week(shape, seed + 1000) + [
            Request(r.arrival_s + WEEK, r.user, r.model, r.service_s, r.tokens_out)
            for r in synthetic_week(shape, seed + 2000)
        ]
        note = (f"Sample week '{shape}' (seed {seed}); the adaptive policy learnt from the two "
                "weeks before it (other draws of the same shape).")
        return _Workload(requests, history, f"sample {shape} week, seed {seed}", [note])
    if remote is not None:
        return _gateway_log(*remote, since or "7d")
    return _request_log(app, since or "7d")


def _request_log(app: AppContext, since: str) -> _Workload:
    """The local request log from ``since`` to now, and the two weeks before as history."""
    import time

    from gpuctl.engine.usage import parse_when
    from gpuctl.sim.workload import WEEK, from_request_log

    now = time.time()
    start = parse_when(since, now)
    store = app.open_store()
    try:
        rows = store.requests(start, now)
        before = store.requests(start - 2 * WEEK, start)
    finally:
        store.close()
    requests = from_request_log(rows, start)
    if not requests:
        raise UsageError(
            f"the request log has no served requests since {since}",
            hint="Run gpuctl serve for a while first, or try --sample or --trace FILE.",
        )
    history = from_request_log(before, start)
    note = (f"The request log of this machine's state dir, the {now - start:,.0f} s to now; "
            f"the adaptive policy learnt from the {len(history):,} requests of the two "
            "weeks before.")
    return _Workload(requests, history, f"request log since {since}", [note], start,
                     max(now - start, requests[-1].arrival_s + requests[-1].service_s))


def _gateway_log(url: str, key: str, since: str) -> _Workload:
    """A running gateway's request log (``GET /admin/requests``) from ``since`` to its now,
    the two weeks before as history, and the fleet it learnt."""
    import time
    from datetime import datetime, timezone

    import httpx

    from gpuctl.cli.remote import gateway_get
    from gpuctl.engine.requestlog import RequestLog
    from gpuctl.engine.usage import parse_when
    from gpuctl.sim.workload import WEEK

    parse_when(since, time.time())  # a bad --since is a usage error before any network
    timeout = httpx.Timeout(300.0, connect=3.0)  # a capped week takes seconds to read
    url = url.rstrip("/")

    def read(params: dict[str, str]) -> RequestLog:
        return RequestLog.model_validate(
            gateway_get(url, key, "/admin/requests", params, timeout=timeout))

    def iso(epoch: float) -> str:
        return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat()

    log = read({"since": since})
    start, now = log.since, log.until
    before = read({"since": iso(max(0.0, start - 2 * WEEK)), "until": iso(start)})
    requests = _from_rows(log, start)
    if not requests:
        raise UsageError(f"the gateway at {url} has no served requests since {since}",
                         hint="Try an earlier --since, or --sample or --trace FILE.")
    history = _from_rows(before, start)
    notes = [f"The request log of the gateway at {url}, the {now - start:,.0f} s to "
             f"{'its first request left out' if log.truncated else 'now'}; the adaptive "
             f"policy learnt from the {len(history):,} requests of the two weeks before."]
    for part, cut in (("window", log), ("history", before)):
        if cut.truncated:
            notes.append(f"The gateway sent only the first {cut.limit:,} requests of the "
                         f"{part} (its cap); the replay covers what they span.")
    return _Workload(requests, history, f"request log of {url} since {since}", notes, start,
                     max(now - start, requests[-1].arrival_s + requests[-1].service_s),
                     log.fleet)


def _from_rows(log: RequestLog, start: float) -> list[Request]:
    from gpuctl.sim.workload import Request

    return sorted(Request(at - start, user, model, service_s, tokens_out)
                  for at, user, model, service_s, tokens_out in log.rows)


def _fleet(
    app: AppContext, requests: list[Request], *, sample: bool, gpus: int | None,
    resume_s: float | None, pause_s: float | None, learnt: list[FleetGpu] | None = None,
) -> tuple[FleetSpec, str]:
    from gpuctl.sim.replay import FleetSpec
    from gpuctl.sim.study import fleet_from_learnt, fleet_from_store

    models = sorted({r.model for r in requests})
    if gpus is None and learnt is not None:
        remote = fleet_from_learnt(learnt, resume_s=resume_s, pause_s=pause_s)
        if remote is not None:
            return remote, (f"Fleet: the {len(remote.gpus)} GPU(s) the gateway knows, with "
                            "their models and learnt resume times.")
    elif gpus is None and not sample:
        store = app.open_store()
        try:
            known = fleet_from_store(store, resume_s=resume_s, pause_s=pause_s)
        finally:
            store.close()
        if known is not None:
            return known, (f"Fleet: the {len(known.gpus)} GPU(s) the store knows, with their "
                           "models and learnt resume times.")
    count = gpus or 3
    fleet = FleetSpec.twins(count, models, resume_s=resume_s or 120.0, pause_s=pause_s or 60.0)
    spec = fleet.gpus[0]
    return fleet, (f"Fleet: {count} identical GPUs with every model of the workload, "
                   f"{spec.resume_s:g} s resumes, {spec.pause_s:g} s pauses, "
                   f"{spec.ollama_s:g} s for Ollama to start.")


def _table(result: StudyResult) -> Table:
    from rich.table import Table

    credits = any(s.credits is not None for s in result.settings)
    table = Table(
        title=(f"{result.source}: {result.requests:,} requests, {result.gpus} GPUs, "
               f"{result.window_hours:g} h; always on "
               f"{result.settings[0].always_on_gpu_hours:,.1f} GPU-h, offline optimum "
               f"{result.settings[0].optimum_gpu_hours:,.1f} GPU-h"),
        title_justify="left",
    )
    table.add_column("setting")
    table.add_column("GPU-h", justify="right")
    if credits:
        table.add_column("credits", justify="right")
    table.add_column("× optimum", justify="right")
    table.add_column("waited for a wake", justify="right")
    table.add_column("wait p50/p90/max s", justify="right")
    table.add_column("resumes", justify="right")
    table.add_column("refused", justify="right")
    table.add_column("")
    for s in result.settings:
        marks = []
        if s.pareto:
            marks.append("front")
        if s.recommended:
            marks.append("recommended")
        if s.current:
            marks.append("current")
        row = [s.label, f"{s.gpu_hours:,.2f}"]
        if credits:
            row.append("" if s.credits is None else f"{s.credits:,.1f}")
        row += [
            f"{s.over_optimum:.2f}", str(s.waited_for_wake),
            f"{s.wait_median_s:.0f}/{s.wait_p90_s:.0f}/{s.wait_max_s:.0f}",
            str(s.resumes), str(s.refused), ", ".join(marks),
        ]
        table.add_row(*row)
    return table
