"""The one renderer: Rich tables for people, ``--json`` with stable keys for programs.

Data goes to stdout, messages to stderr. JSON is printed raw (not through Rich) so that no
colour, wrapping or highlighting can ever creep into a pipe. Keys follow the pydantic models'
field order, which is part of the interface.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from gpuctl.cli.context import AppContext
    from gpuctl.engine.api import GpuView

__all__ = [
    "duration",
    "emit_json",
    "gpu_detail_table",
    "gpu_table",
    "kv_table",
    "message",
    "render",
]


def emit_json(data: Any) -> None:
    """Print ``data`` (pydantic models welcome) as indented JSON on stdout."""
    typer.echo(json.dumps(_plain(data), indent=2, ensure_ascii=False))


def _plain(data: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, dict):
        return {str(k): _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return data


def message(ctx: AppContext, text: str, *, style: str | None = None) -> None:
    """A human message on stderr (never mixed into data)."""
    ctx.err.print(text, style=style, markup=False, highlight=False)


def render(ctx: AppContext, data: Any, *, as_json: bool, table: Table | None) -> None:
    """``--json``: the data; otherwise the table (if any) on stdout."""
    if as_json:
        emit_json(data)
    elif table is not None:
        ctx.out.print(table)


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _text(value: object) -> str:
    return "-" if value in (None, "", []) else str(value)


def gpu_table(gpus: Sequence[GpuView], *, with_models: bool) -> Table:
    """The fleet table.

    ``discover`` (the cloud's view, no probes) shows ids but no STATE, since an unprobed
    running GPU is not known to be ready. ``status`` (``with_models``) shows state, slots
    and models instead of ids, to fit a terminal; ``status GPU`` and ``--json`` have both.
    """
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ("NAME", "STATE", "CLOUD", "IP", "SIZE") if with_models else (
        "NAME", "CLOUD", "IP", "SIZE")
    for column in columns:
        table.add_column(column, no_wrap=True)
    if with_models:
        table.add_column("SLOTS", justify="right", no_wrap=True)
        table.add_column("LEASES (left)", overflow="fold")
        table.add_column("MODELS (loaded*)", overflow="fold")
    else:
        table.add_column("ID", overflow="fold", style="dim")
    for gpu in gpus:
        row = [gpu.name] + ([gpu.state.value] if with_models else [])
        row += [gpu.cloud_status, _text(gpu.ip), _text(gpu.size or gpu.flavor)]
        if with_models:
            row += [f"{gpu.slots_in_use}/{gpu.slots}", _leases(gpu) or "-",
                    _models(gpu.models, gpu.loaded)]
        else:
            row.append(gpu.id)
        table.add_row(*row)
    return table


def duration(seconds: float) -> str:
    """``15 s``, ``4 min``, ``1 h 5 min``: a lease of 15 s is not "0 min"."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min" + (f" {s % 60} s" if s % 60 and s < 600 else "")
    return f"{s // 3600} h {(s % 3600) // 60} min"


def _leases(gpu: GpuView) -> str:
    return ", ".join(f"{lease.user} {duration(lease.expires_in_seconds)}"
                     for lease in gpu.leases)


def _models(models: Iterable[str], loaded: Iterable[str]) -> str:
    in_memory = set(loaded)
    names = [f"{m}*" if m in in_memory else m for m in models]
    names += [f"{m}*" for m in sorted(in_memory - set(models))]
    return ", ".join(names) if names else "-"


def kv_table(rows: Iterable[tuple[str, str]]) -> Table:
    from rich.table import Table

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def gpu_detail_table(gpu: GpuView) -> Table:
    leases = ", ".join(f"{lease.user} ({duration(lease.expires_in_seconds)} left)"
                       for lease in gpu.leases)
    rows = [
        ("name", gpu.name),
        ("id", gpu.id),
        ("state", gpu.state.value),
        ("cloud status", gpu.cloud_status),
        ("ip", _text(gpu.ip)),
        ("fqdn", _text(gpu.fqdn)),
        ("size", _text(gpu.size)),
        ("flavour", _text(gpu.flavor)),
        ("actions", ", ".join(a for a, ok in (("resume", gpu.can_resume),
                                              ("pause", gpu.can_pause)) if ok) or "-"),
        ("slots", f"{gpu.slots_in_use}/{gpu.slots} in use, {gpu.queued} queued"),
        ("models", ", ".join(gpu.models) or "-"),
        ("loaded", ", ".join(gpu.loaded) or "-"),
        ("leases", leases or "-"),
    ]
    if gpu.estimated_resume_seconds is not None:
        rows.append(("resume takes", f"about {gpu.estimated_resume_seconds:.0f} s"))
    if gpu.last_error:
        rows.append(("last error", gpu.last_error))
    return kv_table(rows)
