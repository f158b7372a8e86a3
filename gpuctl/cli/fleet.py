"""``gpuctl discover | status | resume | pause``: one engine call each, then the renderer.

No policy here: which GPU a name means, whether a resume is needed, when Ollama counts as
ready, all of that is the engine's (``Engine.gpu``/``wake``/``pause``), exactly as for the
gateway's admin routes. ``--demo`` asks the running ``gpuctl serve --demo`` instead
(``cli/remote.py``, through the demo gateway's admin API) and prints the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Annotated

import typer

from gpuctl.cli.context import AppContext, run_sync
from gpuctl.cli.gpucache import complete_gpu, write_cache
from gpuctl.cli.output import emit_json, gpu_detail_table, gpu_table, message, render

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from gpuctl.cli.remote import DemoEndpoint
    from gpuctl.engine.api import ActionResult, GpuView, Progress, ProgressCallback

__all__ = [
    "StageLabel", "discover", "pause", "progress_reporter", "register", "resume", "status",
]

GpuArg = Annotated[
    str,
    typer.Argument(
        metavar="GPU",
        help="Workspace id, name, or a unique prefix of the name.",
        autocompletion=complete_gpu,
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (stable keys) on stdout.")]
DemoOpt = Annotated[bool, typer.Option(
    "--demo", help="Show the simulated fleet of the running `gpuctl serve --demo`.")]

STAGES = {
    "resuming": "resuming (cloud)",
    "running": "running, waiting for Ollama",
    "ollama_ready": "Ollama ready",
    "loading": "loading model",
    "queued": "queued",
}


def _remember(app: AppContext, gpus: list[GpuView]) -> None:
    """Keep the names for shell completion; a cache that cannot be written is no error."""
    with suppress(OSError):
        write_cache(app.cache_dir(), gpus)


def _demo(app: AppContext) -> DemoEndpoint:
    from gpuctl.cli.remote import DEMO_FILE, find_demo

    return find_demo(app.cache_dir() / DEMO_FILE)


def discover(ctx: typer.Context, as_json: JsonOpt = False, demo: DemoOpt = False) -> None:
    """List the GPU workspaces matching the filter.

    Asks the cloud only: no GPU is woken or probed. With --demo, asks the running demo.
    """
    app = AppContext.of(ctx)

    async def go() -> list[GpuView]:
        async with app.engine_session() as engine:
            await engine.refresh(probe=False)
            return engine.gpus()

    if demo:
        from gpuctl.cli.remote import demo_gpus

        gpus = demo_gpus(_demo(app))
    else:
        gpus = run_sync(go())
    _remember(app, gpus)  # the demo's names complete too
    if not gpus and not as_json:
        flt = app.config.cloud_api.machine_name_filter
        message(app, f"No GPU workspaces match the filter {flt!r} (cloud_api.machine_name_filter)."
                if flt else "No GPU workspaces found.")
        return
    render(app, {"discovered_gpus": len(gpus), "gpus": gpus}, as_json=as_json,
           table=None if as_json else gpu_table(gpus, with_models=False))


def status(
    ctx: typer.Context,
    gpu: Annotated[str | None, typer.Argument(
        metavar="GPU", help="One GPU (id, name or unique prefix); all when left out.",
        autocompletion=complete_gpu, show_default=False)] = None,
    as_json: JsonOpt = False,
    demo: DemoOpt = False,
) -> None:
    """Show state, IP, flavour, models, slots and leases.

    Running GPUs are probed for the models they have and have loaded; paused GPUs are
    not woken. With --demo, shows the running demo's fleet.
    """
    app = AppContext.of(ctx)

    async def go() -> tuple[list[GpuView], GpuView | None]:
        async with app.engine_session() as engine:
            await engine.refresh(probe=True)
            return engine.gpus(), engine.gpu(gpu) if gpu is not None else None

    if demo:
        from gpuctl.cli.remote import demo_gpu, demo_gpus

        endpoint = _demo(app)
        one = demo_gpu(endpoint, gpu) if gpu is not None else None
        gpus = demo_gpus(endpoint) if one is None else [one]
        if one is None:
            _remember(app, gpus)  # the demo's names complete too
    else:
        gpus, one = run_sync(go())
        _remember(app, gpus)
    if one is not None:
        render(app, one, as_json=as_json, table=None if as_json else gpu_detail_table(one))
        return
    if not gpus and not as_json:
        message(app, "No GPU workspaces found. Check `gpuctl config show` (cloud_api).")
        return
    render(app, {"gpus": gpus}, as_json=as_json,
           table=None if as_json else gpu_table(gpus, with_models=True))


def resume(
    ctx: typer.Context,
    gpu: GpuArg,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Return only once Ollama on the GPU answers.")] = False,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", metavar="S", min=0.0,
        help="With --wait: give up after S seconds (default: the config's startup timeout "
             "plus Ollama readiness wait).")] = None,
    as_json: JsonOpt = False,
    demo: Annotated[bool, typer.Option(
        "--demo", help="Resume a GPU of the running `gpuctl serve --demo`.")] = False,
) -> None:
    """Resume a paused GPU. A running GPU is a success, not an error."""
    app = AppContext.of(ctx)
    if timeout is not None and not wait:
        raise typer.BadParameter("--timeout only makes sense with --wait", param_hint="--timeout")
    if demo:
        from gpuctl.cli.remote import demo_action

        with _spinner(app, f"Resuming {gpu}", enabled=wait):
            result = demo_action(_demo(app), gpu, "resume", wait=wait, timeout=timeout)
        _report(app, result, as_json)
        return

    async def go(progress: ProgressCallback | None) -> ActionResult:
        async with app.engine_session() as engine:
            await engine.refresh(probe=True)  # a running GPU: is its Ollama up already?
            return await engine.wake(gpu, wait=wait, timeout=timeout, progress=progress)

    with progress_reporter(app, f"Resuming {gpu}", enabled=wait) as progress:
        result = run_sync(go(progress))
    _report(app, result, as_json)


def pause(
    ctx: typer.Context,
    gpu: GpuArg,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Return only once the cloud reports the GPU paused.")] = False,
    as_json: JsonOpt = False,
    demo: Annotated[bool, typer.Option(
        "--demo", help="Pause a GPU of the running `gpuctl serve --demo`.")] = False,
) -> None:
    """Pause a GPU (it stops costing credits). A paused GPU is a success, not an error."""
    app = AppContext.of(ctx)
    if demo:
        from gpuctl.cli.remote import demo_action

        with _spinner(app, f"Pausing {gpu}", enabled=wait):
            result = demo_action(_demo(app), gpu, "pause", wait=wait)
        _report(app, result, as_json)
        return

    async def go() -> ActionResult:
        async with app.engine_session() as engine:
            await engine.refresh(probe=True)
            return await engine.pause(gpu, wait=wait)

    with _spinner(app, f"Pausing {gpu}", enabled=wait):
        result = run_sync(go())
    _report(app, result, as_json)


def _report(app: AppContext, result: ActionResult, as_json: bool) -> None:
    if as_json:
        emit_json(result)
    else:
        message(app, result.message)
    if not result.success:
        raise typer.Exit(1)


class StageLabel:
    """A spinner label that recomputes the elapsed time on every refresh."""

    def __init__(self, title: str, stage: str = "waiting") -> None:
        self.title = title
        self.stage = stage
        self.started = time.monotonic()

    def __rich__(self) -> RenderableType:
        from rich.text import Text

        seconds = int(time.monotonic() - self.started)
        return Text(f"{self.title}: {self.stage} · {seconds // 60}:{seconds % 60:02d}")


@contextmanager
def progress_reporter(
    app: AppContext, title: str, *, enabled: bool
) -> Iterator[ProgressCallback | None]:
    """A spinner with the wake stage and elapsed time on stderr (plain lines off a tty)."""
    if not enabled:
        yield None
        return
    console: Console = app.err
    label = StageLabel(title, "asking the cloud")

    def on_progress(update: Progress) -> None:
        stage = STAGES.get(update.stage, update.stage)
        label.stage = f"{stage} ({update.message})" if update.message else stage
        if not console.is_terminal:
            message(app, f"{title}: {stage} after {update.elapsed_seconds:.0f} s")

    if not console.is_terminal:
        yield on_progress
        return
    with console.status(label, spinner="dots"):
        yield on_progress


@contextmanager
def _spinner(app: AppContext, title: str, *, enabled: bool) -> Iterator[None]:
    if not enabled or not app.err.is_terminal:
        yield
        return
    with app.err.status(StageLabel(title, "waiting for the cloud"), spinner="dots"):
        yield


def register(app: typer.Typer) -> None:
    """Add the fleet commands to the root Typer app."""
    app.command("discover")(discover)
    app.command("status")(status)
    app.command("resume")(resume)
    app.command("pause")(pause)
