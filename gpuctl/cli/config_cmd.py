"""``gpuctl config path | show | set KEY VALUE``.

``show`` prints every key of the merged config with where its value came from (flag, env
variable, file, default); anything that looks secret is redacted. ``set`` edits the file
through tomlkit (``gpuctl.config.set_config_value``), so the user's comments survive.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from gpuctl.cli.context import AppContext
from gpuctl.cli.output import emit_json, message

__all__ = ["app", "redact"]

app = typer.Typer(
    name="config",
    help="Show and edit the config file.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_key)$", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@",
                           re.IGNORECASE)


def redact(key: str, value: Any) -> Any:
    """Hide secrets: values of secret-sounding keys, and credentials inside URLs."""
    if _SECRET_KEY.search(key) and value not in ("", None):
        return "***"
    if isinstance(value, str):
        return _URL_USERINFO.sub(r"\g<scheme>***@", value)
    if isinstance(value, list):
        return [redact(key, item) for item in value]
    return value


@app.command("path")
def path(ctx: typer.Context) -> None:
    """Print the config file's path (it need not exist yet)."""
    from gpuctl.config import config_path

    app_ctx = AppContext.of(ctx)
    typer.echo(str(config_path(app_ctx.config_file, app_ctx.env)))


@app.command("show")
def show(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Print the merged config; each value tagged with its source, secrets hidden."""
    app_ctx = AppContext.of(ctx)
    loaded = app_ctx.loaded()
    values: dict[str, dict[str, Any]] = {}
    for section, model in loaded.config:
        if isinstance(model, list):  # [[schedule]]: one row per key of each entry
            for n, entry in enumerate(model):
                for key, value in entry.model_dump(by_alias=True).items():
                    values[f"{section}[{n}].{key}"] = {"value": value,
                                                       "source": loaded.source_of(section)}
            continue
        for key, value in model:
            dotted = f"{section}.{key}"
            values[dotted] = {"value": redact(key, value), "source": loaded.source_of(dotted)}
    if as_json:
        emit_json({"path": str(loaded.path), "file_exists": loaded.file_exists,
                   "values": values})
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("KEY", no_wrap=True)
    table.add_column("VALUE")
    table.add_column("SOURCE", style="dim")
    for dotted, entry in values.items():
        table.add_row(dotted, _toml_text(entry["value"]), entry["source"])
    state = "" if loaded.file_exists else " (does not exist; defaults apply)"
    message(app_ctx, f"Config file: {loaded.path}{state}")
    app_ctx.out.print(table)


def _toml_text(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list)):
        return json.dumps(value)
    return str(value)


@app.command("set")
def set_(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="SECTION.KEY, e.g. cloud_api.machine_name_filter")],
    value: Annotated[str, typer.Argument(help="The new value (lists: JSON or a,b,c).")],
) -> None:
    """Set one key in the config file, keeping its comments and layout."""
    from gpuctl.config import config_path, set_config_value

    app_ctx = AppContext.of(ctx)
    target = config_path(app_ctx.config_file, app_ctx.env)
    stored = set_config_value(target, key, value)
    message(app_ctx, f"Set {key} = {_toml_text(redact(key, stored))} in {target}")
    env_name = "GPUCTL_" + key.replace(".", "__").upper()
    if env_name in app_ctx.env:
        message(app_ctx, f"Note: {env_name} is set and overrides the file.")
