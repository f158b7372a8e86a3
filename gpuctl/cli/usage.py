"""``gpuctl usage``: what the fleet billed in a window, who used it, and what pausing saved.

It reads the local state dir (as ``gpuctl keys`` does), or a running gateway through
``GET /admin/usage`` with ``--url`` and a key (``--key``, ``GPUCTL_GATEWAY_KEY``), or the
running demo with ``--demo``. The figures come from ``engine.usage.usage_report`` either way;
this module only picks the source and prints: a Rich table (GPU-hours), ``--json`` (the
report's stable keys, seconds) or ``--csv`` (one line per row, seconds).
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Annotated

import typer

from gpuctl.cli.output import emit_json, message

if TYPE_CHECKING:
    from rich.table import Table

    from gpuctl.cli.context import AppContext
    from gpuctl.engine.usage import UsageReport

__all__ = ["usage"]

CSV_COLUMNS = ("key", "serving_s", "waking_s", "held_s", "total_s", "requests", "tokens_in",
               "tokens_out", "wait_median_s", "wait_p90_s", "cold", "credits")


def usage(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(
        "--since", metavar="D", help="Start: a duration before now (7d, 12h), a date "
        "(2026-11-01, UTC) or an ISO time.")] = "7d",
    until: Annotated[str | None, typer.Option(
        "--until", metavar="D", help="End, in the same forms (default: now).",
        show_default=False)] = None,
    by: Annotated[str, typer.Option(
        "--by", metavar="user|gpu|model|day|hour", help="One row per ...")] = "user",
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV on stdout.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON (stable keys) on stdout.")] = False,
    url: Annotated[str | None, typer.Option(
        "--url", metavar="U", envvar="GPUCTL_GATEWAY_URL", show_envvar=True,
        help="Ask a running gateway instead of the local state dir.",
        show_default=False)] = None,
    key: Annotated[str | None, typer.Option(
        "--key", metavar="K", envvar="GPUCTL_GATEWAY_KEY", show_envvar=True,
        help="The gateway key for --url (an admin key sees every user).",
        show_default=False)] = None,
    demo: Annotated[bool, typer.Option(
        "--demo", help="Ask the running `gpuctl serve --demo`.")] = False,
) -> None:
    """GPU-hours billed, the always-on figure, savings, and each user's share."""
    from gpuctl.cli.context import AppContext
    from gpuctl.engine.usage import BY

    app_ctx = AppContext.of(ctx)
    if by not in BY:
        raise typer.BadParameter(f"use one of {', '.join(BY)}", param_hint="--by")
    report = _report(app_ctx, since=since, until=until, by=by, url=url, key=key, demo=demo)
    if as_json:
        emit_json(report.model_dump(mode="json"))
    elif as_csv:
        typer.echo(_csv(report), nl=False)
    else:
        _print(app_ctx, report)


def _report(app_ctx: AppContext, *, since: str, until: str | None, by: str, url: str | None,
            key: str | None, demo: bool) -> UsageReport:
    from gpuctl.engine.usage import UsageReport

    params = {"since": since, "by": by, **({"until": until} if until else {})}
    if demo:
        from gpuctl.cli.remote import DEMO_FILE, find_demo, gateway_get
        from gpuctl.config import cache_dir

        endpoint = find_demo(cache_dir(app_ctx.env) / DEMO_FILE)
        return UsageReport.model_validate(
            gateway_get(endpoint.url, endpoint.key, "/admin/usage", params))
    if url:
        from gpuctl.cli.remote import gateway_get
        from gpuctl.errors import CredentialsError

        if not key:
            raise CredentialsError("--url needs a gateway key",
                                   hint="Pass --key or set GPUCTL_GATEWAY_KEY.")
        return UsageReport.model_validate(gateway_get(url, key, "/admin/usage", params))
    import time

    from gpuctl.engine.usage import parse_when, usage_report

    now = time.time()
    store = app_ctx.open_store()
    try:
        return usage_report(store, since=parse_when(since, now),
                            until=parse_when(until, now) if until else now, by=by,
                            cost=app_ctx.config.cost)
    finally:
        store.close()


def _csv(report: UsageReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in report.rows:
        gs, waits = row.gpu_seconds, row.waits
        writer.writerow([row.key, gs.serving, gs.waking, gs.held, gs.total, row.requests,
                         row.tokens_in, row.tokens_out,
                         "" if waits.median_s is None else waits.median_s,
                         "" if waits.p90_s is None else waits.p90_s, waits.cold, row.credits])
    return out.getvalue()


class _Unit:
    """GPU-hours, or GPU-seconds for a window that billed less than an hour (a demo)."""

    def __init__(self, billed: float) -> None:
        self.hours = billed >= 3600
        self.name = "GPU-hours" if self.hours else "GPU-seconds"

    def __call__(self, seconds: float) -> str:
        return f"{seconds / 3600:.2f}" if self.hours else f"{seconds:.1f}"


def _print(app_ctx: AppContext, report: UsageReport) -> None:
    out = app_ctx.out
    attributed = sum(r.gpu_seconds.total for r in report.rows)
    lost = sum(report.unattributed.values())
    unit = _Unit(report.billed_gpu_seconds)
    out.print(f"Usage {report.since} → {report.until}, by {report.by} ({unit.name})")
    always_on = report.always_on_gpu_seconds
    out.print(f"Billed {unit(report.billed_gpu_seconds)} of {unit(always_on)} always-on: "
              f"saved {report.savings * 100:.1f} %")
    if not report.rows and not report.billed_gpu_seconds:
        message(app_ctx, "Nothing billed and no requests in this window.")
        return
    out.print(_table(report, attributed, lost, unit))


def _table(report: UsageReport, attributed: float, lost: float, _hours: _Unit) -> Table:
    from rich.table import Table

    credits = any(r.credits for r in report.rows)
    table = Table(box=None, header_style="bold", show_footer=False)
    columns = [report.by.upper(), "SERVING", "WAKING", "HELD", "TOTAL", "REQUESTS",
               "TOKENS IN", "TOKENS OUT", "WAIT P50", "WAIT P90", "COLD"]
    if credits:
        columns.append("CREDITS")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in report.rows:
        gs, waits = row.gpu_seconds, row.waits
        cells = [row.key, _hours(gs.serving), _hours(gs.waking), _hours(gs.held),
                 _hours(gs.total), str(row.requests), str(row.tokens_in), str(row.tokens_out),
                 "-" if waits.median_s is None else f"{waits.median_s:.1f}s",
                 "-" if waits.p90_s is None else f"{waits.p90_s:.1f}s", str(waits.cold)]
        if credits:
            cells.append(f"{row.credits:.2f}")
        table.add_row(*cells)
    blank = [""] * (len(columns) - 5)
    table.add_row("attributed", "", "", "", _hours(attributed), *blank, end_section=True)
    others = report.billed_gpu_seconds - attributed - lost
    if others > 1.0:  # a user key sees its own rows only: the rest is the other users'
        table.add_row("other users", "", "", "", _hours(others), *blank)
    for reason, seconds in report.unattributed.items():
        table.add_row(f"unattributed: {reason}", "", "", "", _hours(seconds), *blank)
    table.add_row("billed", "", "", "", _hours(report.billed_gpu_seconds), *blank)
    return table
