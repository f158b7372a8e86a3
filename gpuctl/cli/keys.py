"""``gpuctl keys create | list | revoke | import | budget``: the gateway's API keys.

Keys live, hashed, in the same SQLite file ``gpuctl serve`` reads, so a key created or revoked
here takes effect on the gateway's next request, with no restart. ``create`` prints the
secret once (on stdout, so it can be piped); nothing else ever shows it. ``list`` joins each
key with the usage the engine recorded for its user (the key's name) and, for a key with a
budget, the GPU-hours it used of it this period. ``budget`` sets or removes that budget; the
gateway reads it within ``engine.budgets.REFRESH_SECONDS``. With ``store.url`` it goes to
Redis first and every replica takes it within a second (``store.shared.budgets``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from gpuctl.cli.output import emit_json, message, render

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from rich.table import Table

    from gpuctl.cli.context import AppContext
    from gpuctl.engine.budgets import BudgetStatus
    from gpuctl.store.keys import ApiKey, KeyStore
    from gpuctl.store.shared import SharedKeys
    from gpuctl.store.store import UsageTotals

__all__ = ["app", "budget", "create", "import_keys", "list_keys", "revoke"]

app = typer.Typer(name="keys", help="Manage the gateway's API keys.", no_args_is_help=True)

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (stable keys) on stdout.")]


def _app(ctx: typer.Context) -> AppContext:
    from gpuctl.cli.context import AppContext

    return AppContext.of(ctx)


@contextmanager
def _key_store(app_ctx: AppContext, *, changes: bool = True) -> Iterator[KeyStore]:
    """The key store for one command, closed (and its writes flushed) when it is done.
    ``changes``: the command changes keys, so with replicas this host's table is published
    after it (a command that only reads publishes nothing: it is no writer of the group's
    keys)."""
    from gpuctl.config import state_dir
    from gpuctl.store.keys import KeyStore

    keys = KeyStore.open(state_dir(app_ctx.config, app_ctx.env))
    try:
        yield keys
        if changes and app_ctx.config.store.url:  # replicas: every gateway within a second
            _publish(app_ctx.config.store.url, keys)
    finally:
        keys.close()


def _publish(url: str, keys: KeyStore) -> None:
    _shared_keys(url, lambda shared: shared.publish(keys.hashed()))


def _on_redis(url: str, call: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """``call`` with a client of the replicas' Redis (``store.url``), closed after."""
    import asyncio

    from gpuctl.store.shared import connect

    async def run() -> T:
        client = connect(url)
        try:
            return await call(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


def _shared_keys(url: str, call: Callable[[SharedKeys], Awaitable[T]]) -> T:
    """``call`` on the replicas' shared key directory."""
    from gpuctl.store.shared import SharedKeys

    return _on_redis(url, lambda client: call(SharedKeys(client)))


def _find(app_ctx: AppContext, key_id: str) -> ApiKey:
    """A key by id: this host's, or with replicas one made on another host."""
    from gpuctl.errors import NotFoundError

    try:
        with _key_store(app_ctx, changes=False) as keys:
            return keys.get(key_id)
    except NotFoundError:
        url = app_ctx.config.store.url
        found = _shared_keys(url, lambda shared: shared.get(key_id)) if url else None
        if found is None:
            raise
        return found


def _share_budget(url: str, key_id: str, budget: tuple[float, str] | None) -> None:
    """Set the budget for every replica (they write it into their stores within a second)."""
    import time

    from gpuctl.errors import ActionRefused
    from gpuctl.store.shared.budgets import SharedBudgets

    if not _on_redis(url, lambda client: SharedBudgets(client).set(key_id, budget,
                                                                   time.time())):
        raise ActionRefused(
            f"the shared store holds a later change of {key_id}'s budget; left as it is",
            hint="Another host's clock is ahead of this one's; check both (NTP).")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def _budget_json(status: BudgetStatus | None) -> dict[str, Any] | None:
    if status is None:
        return None
    return {"gpu_hours": round(status.gpu_seconds / 3600, 4), "per": status.per,
            "used_gpu_hours": round(status.used / 3600, 4), "resets_at": _iso(status.resets_at)}


def _budget_text(status: BudgetStatus | None) -> str:
    if status is None:
        return "-"
    return f"{status.used / 3600:.2f}/{status.gpu_seconds / 3600:g} h per {status.per}"


def _key_json(key: ApiKey, usage: UsageTotals | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": key.id, "name": key.name, "email": key.email, "role": key.role,
        "created": _iso(key.created), "last_used": _iso(key.last_used),
        "revoked": _iso(key.revoked),
    }
    if usage is not None:
        data.update(requests=usage.requests, tokens_in=usage.tokens_in,
                    tokens_out=usage.tokens_out, gpu_seconds=round(usage.gpu_seconds, 1))
    return data


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="Who the key is for.",
                                      show_default=False)],
    email: Annotated[str, typer.Option("--email", help="Contact address.")] = "",
    admin: Annotated[bool, typer.Option(
        "--admin", help="May pull/delete models and resume/pause GPUs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print it once: store it now, it cannot be shown again."""
    app_ctx = _app(ctx)
    with _key_store(app_ctx) as keys:
        key, secret = keys.create(name, email=email, admin=admin)
    if as_json:
        emit_json({**_key_json(key), "key": secret})
        return
    typer.echo(secret)
    message(app_ctx, f"Created {key.role} key {key.id} for {key.name}. "
                     "This is the only time the key is shown: store it now.")


@app.command("list")
def list_keys(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List keys with their use: requests, tokens, GPU-seconds (never the keys)."""
    import time

    from gpuctl.engine.budgets import budget_status
    from gpuctl.store import UsageTotals

    app_ctx = _app(ctx)
    with _key_store(app_ctx, changes=False) as keys:
        records = keys.all()
    store = app_ctx.open_store()
    try:
        usage = store.usage()
        budgets = budget_status(store, time.time())
    finally:
        store.close()
    rows = [(k, usage.get(k.name, UsageTotals()), budgets.get(k.id)) for k in records]
    render(app_ctx, [{**_key_json(k, u), "budget": _budget_json(b)} for k, u, b in rows],
           as_json=as_json, table=_table(rows) if not as_json else None)
    if not rows and not as_json:
        message(app_ctx, "No keys yet. Create one with `gpuctl keys create --name NAME`.")


def _table(rows: list[tuple[ApiKey, UsageTotals, BudgetStatus | None]]) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("ID", "NAME", "EMAIL", "ROLE", "CREATED", "LAST USED", "REQUESTS",
                   "TOKENS", "GPU-SECONDS", "BUDGET (USED/BUDGET)"):
        justify = "right" if column in ("REQUESTS", "TOKENS", "GPU-SECONDS") else "left"
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for key, use, status in rows:
        role = key.role if key.active else f"{key.role} (revoked)"
        table.add_row(key.id, key.name, key.email or "-", role, _when(key.created),
                      _when(key.last_used), str(use.requests),
                      str(use.tokens_in + use.tokens_out), f"{use.gpu_seconds:.0f}",
                      _budget_text(status))
    return table


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="The id `keys list` shows.",
                                          show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key; a running gateway refuses it from the next request on."""
    from gpuctl.errors import NotFoundError

    app_ctx = _app(ctx)
    try:
        with _key_store(app_ctx) as keys:
            key = keys.revoke(key_id)
    except NotFoundError:
        if not app_ctx.config.store.url:
            raise
        # Replicas: a key made on another host is revoked in the shared directory.
        key = _shared_keys(app_ctx.config.store.url, lambda shared: shared.revoke(key_id))
    if as_json:
        emit_json(_key_json(key))
    else:
        message(app_ctx, f"Revoked {key.id} ({key.name}).")


@app.command("budget")
def budget(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="The id `keys list` shows.",
                                          show_default=False)],
    gpu_hours: Annotated[float | None, typer.Option(
        "--gpu-hours", metavar="N", min=0.0, help="GPU-hours the key may cause per period.",
        show_default=False)] = None,
    per: Annotated[str, typer.Option(
        "--per", metavar="day|week|month", help="The period (UTC; weeks start on Monday).")
    ] = "day",
    none: Annotated[bool, typer.Option("--none", help="Remove the key's budget.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Limit the GPU-hours a key may cause; past it, warm GPUs serve it but none wakes."""
    import math

    from gpuctl.engine.budgets import PERIODS
    from gpuctl.errors import UsageError

    if (gpu_hours is None) == (not none):
        raise UsageError("give either --gpu-hours N or --none",
                         hint="e.g. `gpuctl keys budget KEY_ID --gpu-hours 2 --per day`.")
    if gpu_hours is not None and not math.isfinite(gpu_hours):
        raise UsageError(f"--gpu-hours must be a number of hours, not {gpu_hours}")
    if per not in PERIODS:
        raise UsageError(f"--per must be one of {', '.join(PERIODS)}, not {per!r}")
    app_ctx = _app(ctx)
    key = _find(app_ctx, key_id)
    if key.is_admin and not none:
        raise UsageError(f"{key.id} is an admin key; admin keys have no budget",
                         hint="Give the person a user key for their own work.")
    seconds = None if none else float(gpu_hours or 0.0) * 3600.0
    if app_ctx.config.store.url:  # replicas: Redis first, so a change it refused is nowhere
        _share_budget(app_ctx.config.store.url, key.id,
                      None if seconds is None else (seconds, per))
    store = app_ctx.open_store()
    try:
        store.ledger.set_budget(key.id, seconds, per)
    finally:
        store.close()
    if as_json:
        emit_json({"id": key.id, "name": key.name, "budget": None if none else
                   {"gpu_hours": gpu_hours, "per": per}})
    elif none:
        message(app_ctx, f"Removed the budget of {key.id} ({key.name}).")
    else:
        message(app_ctx, f"{key.id} ({key.name}) may cause {gpu_hours:g} GPU-hours per {per}; "
                         "past that, GPUs that are awake still serve it, but none wakes for it.")


@app.command("import")
def import_keys(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE", dir_okay=False, show_default=False,
                                         help="The old service's api_keys.json.")],
    as_json: JsonOpt = False,
) -> None:
    """Import the old service's api_keys.json; the keys keep working, stored hashed."""
    app_ctx = _app(ctx)
    with _key_store(app_ctx) as keys:
        imported = keys.import_file(file)
    if as_json:
        emit_json([_key_json(k) for k in imported])
        return
    message(app_ctx, f"Imported {len(imported)} key(s) from {file}. The file still holds them "
                     "in plain text: delete it once the gateway works.")
