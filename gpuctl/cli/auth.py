"""``gpuctl auth login | logout | status``: the SURF API token in the OS keyring.

The token is read from a hidden prompt or from stdin (``--with-token``), never from argv,
where it would land in shell history and ``ps``. ``login`` checks the token against the
API before storing it (a rejected token is not kept; an unreachable API only warns).
``status`` says where the token was found and whether the API accepts it, never the token.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from gpuctl.cli.context import AppContext, run_sync
from gpuctl.cli.output import emit_json, message

if TYPE_CHECKING:
    from gpuctl.credentials import Credentials

__all__ = ["app"]

app = typer.Typer(
    name="auth",
    help="Store, check and remove the SURF Research Cloud API token.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def _check(app_ctx: AppContext, credentials: Credentials) -> int:
    """Ask the API with these credentials; the number of workspaces the token sees."""
    from gpuctl.cloud import make_provider
    from gpuctl.cloud.surf import SurfProvider

    factory = app_ctx.cloud_factory or make_provider

    async def go() -> int:
        provider = factory(app_ctx.config, credentials)
        try:
            if isinstance(provider, SurfProvider):
                return await provider.verify()
            return len(await provider.list_workspaces())
        finally:
            await provider.aclose()

    return run_sync(go())


def _read_tokens(with_token: bool, csrf: bool) -> tuple[str, str | None]:
    if with_token:
        lines = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
        token = lines[0] if lines else ""
        csrf_token = lines[1] if len(lines) > 1 else None
    else:
        token = typer.prompt("SURF API token", hide_input=True, default="",
                             show_default=False).strip()
        csrf_token = None
        if csrf:
            csrf_token = typer.prompt("CSRF token", hide_input=True, default="",
                                      show_default=False).strip() or None
    if not token:
        from gpuctl.errors import UsageError

        raise UsageError("no token given",
                         hint="Paste the token at the prompt, or pipe it: "
                              "`gpuctl auth login --with-token < token.txt`.")
    return token, csrf_token


@app.command("login")
def login(
    ctx: typer.Context,
    with_token: Annotated[bool, typer.Option(
        "--with-token", help="Read the token from stdin (a second line: the CSRF token).")
    ] = False,
    csrf: Annotated[bool, typer.Option(
        "--csrf", help="Also ask for a CSRF token (token auth does not need one).")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Check the token against the API before storing it.")
    ] = True,
) -> None:
    """Store the SURF API token in the OS keyring."""
    from gpuctl.credentials import Credentials
    from gpuctl.errors import CloudError

    app_ctx = AppContext.of(ctx)
    credentials = app_ctx.credentials()
    credentials.usable_backend()  # refuse before asking for a secret we could not keep
    token, csrf_token = _read_tokens(with_token, csrf)
    if verify and app_ctx.config.cloud_api.provider == "surf":
        trial = Credentials({"GPUCTL_API_TOKEN": token,
                             **({"GPUCTL_CSRF_TOKEN": csrf_token} if csrf_token else {})},
                            keyring_backend=credentials.backend())
        try:
            count = _check(app_ctx, trial)
        except CloudError as exc:
            message(app_ctx, f"Warning: could not check the token ({exc.message}); "
                             "storing it anyway.")
        else:
            message(app_ctx, f"The SURF API accepts the token ({count} Compute workspaces "
                             "visible).")
    where = credentials.store("api_token", token)
    if csrf_token:
        credentials.store("csrf_token", csrf_token)
    message(app_ctx, f"Stored the token in the OS keyring ({where}).")
    env_found = credentials.find("api_token")
    if env_found is not None and not env_found.source.startswith("OS keyring"):
        message(app_ctx, f"Note: {env_found.source} is set and wins over the keyring.")


@app.command("logout")
def logout(ctx: typer.Context) -> None:
    """Remove the token (and CSRF token) from the OS keyring."""
    app_ctx = AppContext.of(ctx)
    credentials = app_ctx.credentials()
    removed = credentials.delete("api_token")
    credentials.delete("csrf_token")
    message(app_ctx, "Removed the token from the OS keyring." if removed
            else "No token was stored in the OS keyring.")
    still = credentials.find("api_token")
    if still is not None:
        message(app_ctx, f"Note: a token is still provided by {still.source}.")


@app.command("status")
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Where the token was found and whether the API accepts it (never the token)."""
    from gpuctl.errors import CloudError, CredentialsError

    app_ctx = AppContext.of(ctx)
    credentials = app_ctx.credentials()
    provider = app_ctx.config.cloud_api.provider
    found = credentials.find("api_token")
    csrf = credentials.find("csrf_token")
    node = credentials.find("node_token")
    report: dict[str, object] = {
        "provider": provider,
        "token_source": found.source if found else None,
        "csrf_token_source": csrf.source if csrf else None,
        "node_token_source": node.source if node else None,
        "accepted": None,
        "workspaces_visible": None,
        "problem": None,
    }
    exit_code = 0
    if provider == "static":
        report["problem"] = "provider is static: no SURF token needed"
    elif found is None:
        report["problem"] = "no token found in: " + "; ".join(credentials.places("api_token"))
        exit_code = 4
    else:
        try:
            report["workspaces_visible"] = _check(app_ctx, credentials)
            report["accepted"] = True
        except CredentialsError as exc:
            report["accepted"] = False
            report["problem"] = exc.message
            exit_code = 4
        except CloudError as exc:
            report["problem"] = f"could not reach the API: {exc.message}"
            exit_code = 1
    if as_json:
        emit_json(report)
    else:
        _print_status(app_ctx, report)
    if exit_code:
        raise typer.Exit(exit_code)


def _print_status(app_ctx: AppContext, report: dict[str, object]) -> None:
    from gpuctl.cli.output import kv_table

    accepted = {True: "yes", False: "NO (rejected)", None: "not checked"}[
        report["accepted"]]  # type: ignore[index]
    rows = [
        ("provider", str(report["provider"])),
        ("API token", str(report["token_source"] or "not found")),
        ("accepted by the API", accepted),
        ("CSRF token", str(report["csrf_token_source"] or "not set (not needed)")),
        ("node token", str(report["node_token_source"] or "not set")),
    ]
    if report["workspaces_visible"] is not None:
        rows.append(("Compute workspaces visible", str(report["workspaces_visible"])))
    if report["problem"]:
        rows.append(("problem", str(report["problem"])))
    app_ctx.out.print(kv_table(rows))
