"""The ``gpuctl`` command: global options, sub-commands, and the one place errors are shown.

Every error a user can meet is a ``GpuctlError``; it becomes ``Error: ...`` and ``Hint: ...``
on stderr and its exit code (0 ok, 1 failure, 2 usage, 4 credentials, 130 interrupted).
Anything else is a bug: one line and a hint to rerun with ``--debug``, which shows the
traceback. Nothing heavy is imported here, so ``gpuctl --help`` and TAB stay fast; each
command imports what it needs when it runs.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import MutableMapping
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from gpuctl import __version__
from gpuctl.cli import auth, config_cmd, fleet, keys
from gpuctl.cli.completion import COMPLETE_VAR, completion
from gpuctl.cli.context import AppContext
from gpuctl.cli.serve import serve
from gpuctl.cli.simulate import simulate
from gpuctl.cli.top import top
from gpuctl.cli.usage import usage
from gpuctl.errors import GpuctlError

__all__ = ["app", "run"]


class _Root(TyperGroup):
    """Turns exceptions into the documented messages and exit codes, for every sub-command."""

    def _main_shell_completion(
        self, ctx_args: MutableMapping[str, Any], prog_name: str,
        complete_var: str | None = None,
    ) -> None:
        # Typer registers its shell classes only for apps with ``add_completion=True``
        # (which would add --install-completion/--show-completion); gpuctl has its own
        # ``completion`` command, so register them here, and only when a shell asks.
        if os.environ.get(complete_var or COMPLETE_VAR):
            from typer._completion_classes import completion_init

            completion_init()
        super()._main_shell_completion(ctx_args, prog_name, complete_var)

    def invoke(self, ctx: Any) -> Any:  # a typer Context; its base class is private
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            # A cloud action already sent goes on without us; say so instead of vanishing.
            typer.echo("Interrupted. (A resume or pause already sent goes on in the cloud; "
                       "see `gpuctl status`.)", err=True)
            raise typer.Exit(130) from None
        except GpuctlError as exc:
            _show_traceback(ctx)
            typer.echo(f"Error: {exc.message}", err=True)
            if exc.hint:
                typer.echo(f"Hint: {exc.hint}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:
            _show_traceback(ctx)
            detail = str(exc).splitlines()[0] if str(exc) else ""
            typer.echo(f"Error: unexpected {type(exc).__name__}"
                       + (f": {detail}" if detail else ""), err=True)
            typer.echo("Hint: this is a bug in gpuctl; rerun with --debug for the details "
                       "and report them.", err=True)
            raise typer.Exit(1) from None


def _show_traceback(ctx: typer.Context) -> None:
    obj = ctx.obj
    if isinstance(obj, AppContext) and obj.debug:
        typer.echo(traceback.format_exc(), err=True, nl=False)


app = typer.Typer(
    name="gpuctl",
    cls=_Root,
    help="Share rented SURF Research Cloud GPUs running Ollama: "
         "wake on demand, route, queue fairly, pause when idle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gpuctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="PATH", dir_okay=False,
        help="Config file (default: $GPUCTL_CONFIG, $GPUCTL_HOME/config.toml, or the "
             "user config dir).", show_default=False)] = None,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show tracebacks and debug logs.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Share rented SURF Research Cloud GPUs running Ollama."""
    app_ctx = ctx.obj if isinstance(ctx.obj, AppContext) else AppContext()
    if config is not None:
        app_ctx.config_file = config
    app_ctx.debug = app_ctx.debug or debug
    ctx.obj = app_ctx
    if app_ctx.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        # httpx/httpcore debug logs carry request headers: never let a token through.
        for noisy in ("httpcore", "hpack"):
            logging.getLogger(noisy).setLevel(logging.INFO)
        # One INFO line per HTTP request (every node probe: ~9k lines an hour on a fleet),
        # and keyring's backend discovery on every start: noise, not debugging help.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("keyring").setLevel(logging.INFO)


fleet.register(app)
app.add_typer(auth.app, name="auth")
app.add_typer(config_cmd.app, name="config")
app.add_typer(keys.app, name="keys")
app.command("completion")(completion)
app.command("serve")(serve)
app.command("usage")(usage)
app.command("top")(top)
app.command("simulate")(simulate)


def run() -> None:
    """Entry point of the ``gpuctl`` script and ``python -m gpuctl``."""
    app(prog_name="gpuctl")
