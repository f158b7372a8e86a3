"""``gpuctl top``: the status page's view in a terminal, refreshed every second.

It reads a running gateway's ``GET /gpu/overview`` (the same data the page shows, filtered
for the key's owner) with ``cli/remote.py``: ``--url``/``--key`` (or ``GPUCTL_GATEWAY_URL``
and ``GPUCTL_GATEWAY_KEY``), or ``--demo`` for the running ``serve --demo``. No policy here:
it renders what the gateway says. ``q`` quits (Ctrl-C too). When the gateway stops
answering, the view shrinks to one line saying so and comes back with the gateway; a key the
gateway refuses ends ``top`` with exit 4.

The frame is built by ``frame()``, a pure function of the overview and the time, so tests
render it to an 80-column console with the clock wherever they like.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer

from gpuctl.cli.context import AppContext
from gpuctl.cli.output import duration as _duration
from gpuctl.errors import UsageError

if TYPE_CHECKING:
    from rich.console import RenderableType

    from gpuctl.engine.overview import FleetOverview, GpuOverview

__all__ = ["REFRESH_SECONDS", "Keys", "frame", "gone_line", "top", "watch"]

REFRESH_SECONDS = 1.0


class Keys(Protocol):
    """Where key presses come from: ``wait`` returns one, or None after ``timeout``."""

    def wait(self, timeout: float) -> str | None: ...


class _NoKeys:
    """stdin is not a terminal: only Ctrl-C stops ``top``."""

    def wait(self, timeout: float) -> str | None:
        time.sleep(timeout)
        return None


class _TtyKeys:
    """Single key presses from a terminal in cbreak mode (no Enter needed, no echo)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def wait(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(self.fd, 32)
        return data.decode("utf-8", "replace")[:1] if data else "q"  # EOF: the tty is gone


@contextlib.contextmanager
def _terminal_keys() -> Iterator[Keys]:
    if not sys.stdin.isatty():
        yield _NoKeys()
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield _TtyKeys(fd)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- the frame -----------------------------------------------------------------------------------


def _state(gpu: GpuOverview, me: str) -> str:
    state = gpu.state.value
    if state == "starting" and gpu.action is not None and gpu.action.kind == "resume":
        return "waking"
    if state == "idle":
        return "ready"
    if state in ("active", "busy"):
        return "serving you" if me in gpu.serving else "serving"
    return state


_STAGES = {"resuming": "cloud resuming", "running": "Ollama starting",
           "ollama_ready": "Ollama ready"}


def _detail(gpu: GpuOverview, me: str, now: float) -> str:
    action = gpu.action
    shown = _state(gpu, me)
    if action is not None and action.kind == "resume" and shown == "waking":
        about = (f" of ~{_duration(action.estimate_seconds)}"
                 if action.estimate_seconds is not None else "")
        stage = _STAGES.get(action.stage, "asking the cloud")
        return f"{stage}, {_duration(now - action.started_at)}{about}"
    if action is not None and shown == "pausing":
        return f"pausing for {_duration(now - action.started_at)}"
    parts = [f"{'you' if lease.user == me else lease.user} "
             f"{_duration(lease.expires_at - now)} left" for lease in gpu.leases]
    if parts:
        return "leased: " + ", ".join(parts)
    if gpu.state.value == "paused" and gpu.estimated_resume_seconds:
        return f"wakes in ~{_duration(gpu.estimated_resume_seconds)}"
    return gpu.last_error or ""


def frame(state: dict[str, Any], *, now: float, source: str) -> RenderableType:
    """One screen of ``top`` from a ``/gpu/overview`` answer, as of wall-clock ``now``."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from gpuctl.engine.overview import FleetOverview

    fleet: FleetOverview = FleetOverview.model_validate(state["fleet"])
    me = str(state["me"]["name"])
    role = " (admin)" if state["me"].get("admin") else ""
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    title = Text(f"gpuctl top · {source} · {me}{role} · {clock} · q quits",
                 style="bold", no_wrap=True, overflow="ellipsis")

    gpus = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    gpus.add_column("GPU", no_wrap=True, max_width=14, overflow="ellipsis")
    gpus.add_column("STATE", no_wrap=True)
    gpus.add_column("SLOTS", justify="right", no_wrap=True)
    gpus.add_column("WHAT", no_wrap=True, overflow="ellipsis", max_width=34)
    gpus.add_column("MODELS", no_wrap=True, overflow="ellipsis", max_width=24)
    for gpu in fleet.gpus:
        models = ", ".join(f"{m}*" if m in gpu.loaded else m for m in gpu.models) or "?"
        gpus.add_row(gpu.name, _state(gpu, me), f"{gpu.slots_in_use}/{gpu.slots}",
                     _detail(gpu, me, now), models)
    parts: list[RenderableType] = [title, gpus]

    if fleet.queue:
        queue = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
        for name in ("WAITING FOR", "N", "LONGEST", "ABOUT"):
            queue.add_column(name, no_wrap=True, overflow="ellipsis",
                             justify="left" if name == "WAITING FOR" else "right")
        for line in fleet.queue:
            where = f" (you #{line.users.index(me) + 1})" if me in line.users else ""
            queue.add_row(line.model + where, str(line.waiting),
                          _duration(now - line.since), _duration(line.estimate_seconds))
        parts += [Text(""), queue]
    else:
        parts += [Text(""), Text("Nobody is waiting.", style="dim")]

    usage = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("USER", "REQUESTS", "TOKENS IN", "TOKENS OUT", "GPU-H"):
        usage.add_column(name, no_wrap=True, overflow="ellipsis",
                         justify="left" if name == "USER" else "right")
    for row in state.get("usage") or []:
        usage.add_row(str(row["user"]), str(row["requests"]), str(row["tokens_in"]),
                      str(row["tokens_out"]), f"{row['gpu_hours']:.2f}")
    parts += [Text(""), Text("Usage since the gateway's store began (the page has today's):",
                             style="dim", no_wrap=True, overflow="ellipsis"),
              usage if usage.row_count else Text("No requests yet.", style="dim")]
    return Group(*parts)


def gone_line(message: str, now: float) -> RenderableType:
    from rich.text import Text

    clock = time.strftime("%H:%M:%S", time.localtime(now))
    return Text(f"{clock} {message}; retrying every second (q quits)", style="bold red")


# -- the loop -------------------------------------------------------------------------------------


def watch(app: AppContext, fetch: Callable[[], dict[str, Any]], source: str, keys: Keys, *,
          clock: Callable[[], float] = time.time, frames: int | None = None) -> None:
    """Fetch and draw every second until ``q`` (or ``frames`` frames, for tests).

    The first fetch fails loudly (a wrong URL is an error, not a screen); later failures
    show one line and retry, so ``top`` outlives a gateway restart.
    """
    from rich.live import Live

    from gpuctl.cli.remote import GatewayGone

    view = frame(fetch(), now=clock(), source=source)
    shown = 0
    with Live(view, console=app.out, auto_refresh=False, transient=False) as live:
        while True:
            live.update(view, refresh=True)
            shown += 1
            if frames is not None and shown >= frames:
                return
            key = keys.wait(REFRESH_SECONDS)
            if key is not None and key.lower() == "q":
                return
            try:
                view = frame(fetch(), now=clock(), source=source)
            except GatewayGone as exc:
                view = gone_line(exc.message, clock())


def top(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(
        "--url", metavar="U", envvar="GPUCTL_GATEWAY_URL",
        help="The gateway, e.g. http://gateway:8000 (or GPUCTL_GATEWAY_URL).",
        show_default=False)] = None,
    key: Annotated[str | None, typer.Option(
        "--key", metavar="K", envvar="GPUCTL_GATEWAY_KEY",
        help="Your gpuctl key (better: GPUCTL_GATEWAY_KEY, kept out of shell history).",
        show_default=False, show_envvar=False)] = None,
    demo: Annotated[bool, typer.Option(
        "--demo", help="Watch the running `gpuctl serve --demo`.")] = False,
) -> None:
    """Watch the fleet live: GPUs, waits, leases and usage, refreshed every second.

    The terminal twin of the gateway's /ui/ page. Press q to quit.
    """
    from gpuctl.cli.remote import DEMO_FILE, find_demo, gateway_overview

    app = AppContext.of(ctx)
    if demo:
        endpoint = find_demo(app.cache_dir() / DEMO_FILE)
        url, key = endpoint.url, endpoint.key
    elif not url or not key:
        missing = "--url (or GPUCTL_GATEWAY_URL)" if not url else "--key (or GPUCTL_GATEWAY_KEY)"
        raise UsageError(f"gpuctl top needs {missing}",
                         hint="Give the gateway and your key, or watch the demo with "
                              "`gpuctl top --demo`.")
    gateway_url, gateway_key = url, key

    def fetch() -> dict[str, Any]:
        return gateway_overview(gateway_url, gateway_key)

    with _terminal_keys() as keys:
        watch(app, fetch, gateway_url, keys)
