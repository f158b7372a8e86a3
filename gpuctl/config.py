"""Configuration: pydantic models, TOML through tomlkit, platformdirs paths, env overrides.

Precedence, highest first: command-line flag > ``GPUCTL_SECTION__KEY`` environment variable >
config file > default. The config file is ``--config PATH``, else ``$GPUCTL_CONFIG``, else
``$GPUCTL_HOME/config.toml``, else the platformdirs config dir. ``GPUCTL_HOME`` moves every
gpuctl file at once (config, state, cache), which is what tests and containers want.

A config file of the service gpuctl replaces (``[server]``, ``[cloud_api]``, ``[timing]``,
``[paths] api_keys_file``) loads unchanged.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import platformdirs
import tomlkit
import tomlkit.exceptions
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpuctl.errors import ConfigError

__all__ = [
    "CloudApiConfig",
    "Config",
    "CostConfig",
    "GpuConfig",
    "LedgerConfig",
    "LoadedConfig",
    "PathsConfig",
    "ScheduleEntry",
    "ServerConfig",
    "StoreConfig",
    "TimingConfig",
    "cache_dir",
    "config_path",
    "load_config",
    "set_config_value",
    "state_dir",
]

APP = "gpuctl"
ENV_PREFIX = "GPUCTL_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_queue: int = Field(256, ge=0, description="requests waiting for a slot or a wake")
    queue_timeout_seconds: float = Field(900, gt=0)
    max_body_mb: float = Field(64, gt=0)
    wait_notice: Literal["comment", "thinking", "none"] = Field(
        "thinking", description="how a held stream hears its wait (gateway/notices.py)")
    tls_cert: str = Field("", description="PEM certificate chain file; a bare name is looked "
                          "up in $CREDENTIALS_DIRECTORY (systemd credentials)")
    tls_key: str = Field("", description="PEM private key file; as tls_cert")
    max_connections: int = Field(4096, ge=16, description="connections served at once; "
                                 "more wait in the listen backlog")
    header_timeout_seconds: float = Field(15, gt=0, description="longest a client may take "
                                          "to send a request head")
    max_connections_per_client: int = Field(256, ge=0, description="requests in flight "
                                            "from one client address; 0: no limit")
    body_timeout_seconds: float = Field(20, gt=0, description="longest a client may take "
                                        "to send a request body")
    stall_timeout_seconds: float = Field(60, gt=0, description="longest a write to a "
                                         "client may wait before its stream is cancelled")
    max_slots_per_user: int = Field(0, ge=0, description="slots one user may hold on one GPU "
                                    "at once; 0: half of gpu.slots, at least 1")


class CloudApiConfig(_Section):
    provider: Literal["surf", "static"] = "surf"
    base_url: str = "https://gw.live.surfresearchcloud.nl/v1"
    machine_name_filter: str = ""
    hosts: list[str] = Field(default_factory=list, description="provider = static only")


class GpuConfig(_Section):
    slots: int = Field(4, ge=1)
    ollama_url: str = "http://{ip}:11434"
    auto_pause: bool = True


class TimingConfig(_Section):
    reservation_minutes: float = Field(10, ge=0)
    fallback_reservation_minutes: float = Field(3, ge=0)
    startup_timeout_seconds: float = Field(600, gt=0)
    ollama_readiness_wait_seconds: float = Field(120, gt=0)
    poll_interval_seconds: float = Field(10, gt=0)
    pause_policy: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed: pause when the last lease ends; adaptive: learn the "
                             "group's rhythm (engine/pausepolicy.py)")
    max_idle_minutes: float = Field(
        30, ge=1, description="adaptive: longest an idle GPU is kept up")


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$|^24:00$")


def parse_days(spec: str) -> frozenset[int]:
    """``"mon-fri"``, ``"sat,sun"``, ``"mon,wed-fri"`` → weekday numbers (Monday 0)."""
    days: set[int] = set()
    for part in spec.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise ValueError(f"days must look like 'mon-fri' or 'sat,sun' (got {spec!r})")
        a, b = _DAYS.index(first), _DAYS.index(last or first)
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(days)


def minutes_of(hhmm: str) -> int:
    """``"09:30"`` → 570 (minutes after midnight); ``"24:00"`` → 1440."""
    match = _HHMM.match(hhmm.strip())
    if not match:
        raise ValueError(f"a time of day must be HH:MM (got {hhmm!r})")
    if hhmm.strip() == "24:00":
        return 1440
    return int(match.group(1)) * 60 + int(match.group(2))


class ScheduleEntry(_Section):
    """A ``[[schedule]]`` entry: keep GPUs awake, or paused when idle, at known times."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    gpus: list[str] = Field(default_factory=list, description="names or ids; empty: all")
    days: str = "mon-sun"
    from_: str = Field("00:00", alias="from")
    until: str = "24:00"
    timezone: str = "UTC"
    mode: Literal["awake", "paused"] = "awake"

    @field_validator("days")
    @classmethod
    def _days(cls, value: str) -> str:
        parse_days(value)
        return value

    @field_validator("from_", "until")
    @classmethod
    def _time(cls, value: str) -> str:
        minutes_of(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


class PathsConfig(_Section):
    state_dir: str = ""
    api_keys_file: str = Field("", description="the old service's key file, for `keys import`")


class LedgerConfig(_Section):
    keep_days: float = Field(90, gt=0, description="days of request rows kept; roll-ups stay")


class CostConfig(_Section):
    credits_per_gpu_hour: float = Field(0, ge=0, description="0: credits are not shown")
    flavours: dict[str, float] = Field(
        default_factory=dict, description="flavour name -> credits per hour, as SURF prices it"
    )


class StoreConfig(_Section):
    url: str = Field(
        "",
        description="empty: the embedded SQLite store, one process; redis:// or rediss://: "
        "every gateway pointing at it is a replica of one gateway",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        """Refuse a URL we would not use, at load time rather than at the first request."""
        value = value.strip()
        if value and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be empty (embedded SQLite) or a redis:// or rediss:// URL")
        return value


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    cloud_api: CloudApiConfig = Field(default_factory=CloudApiConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    timing: TimingConfig = Field(default_factory=TimingConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    schedule: list[ScheduleEntry] = Field(default_factory=list)
    store: StoreConfig = Field(default_factory=StoreConfig)


#: The tables of the config file (``[[schedule]]``, an array of tables, is not one of them:
#: it has no ``GPUCTL_SECTION__KEY`` form and ``config set`` does not edit it).
SECTIONS: dict[str, type[_Section]] = {
    name: info.annotation
    for name, info in Config.model_fields.items()
    if isinstance(info.annotation, type) and issubclass(info.annotation, _Section)
}
LISTS = ("schedule",)


@dataclass
class LoadedConfig:
    """The merged config, the file it came from, and where each value was set."""

    config: Config
    path: Path
    file_exists: bool
    sources: dict[str, str] = field(default_factory=dict)

    def source_of(self, dotted_key: str) -> str:
        return self.sources.get(dotted_key, "default")


def _home(env: Mapping[str, str]) -> Path | None:
    home = env.get("GPUCTL_HOME")
    return Path(home).expanduser() if home else None


def config_path(explicit: Path | str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The config file in use: ``--config``, ``$GPUCTL_CONFIG``, ``$GPUCTL_HOME``, platformdirs."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit).expanduser()
    if env.get("GPUCTL_CONFIG"):
        return Path(env["GPUCTL_CONFIG"]).expanduser()
    home = _home(env)
    if home is not None:
        return home / "config.toml"
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def state_dir(config: Config, env: Mapping[str, str] | None = None) -> Path:
    """Where durable state (the SQLite store) lives."""
    env = os.environ if env is None else env
    if config.paths.state_dir:
        return Path(config.paths.state_dir).expanduser()
    home = _home(env)
    if home is not None:
        return home / "state"
    return Path(platformdirs.user_data_dir(APP))


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Throw-away data, such as the last discovery used for shell completion."""
    env = os.environ if env is None else env
    home = _home(env)
    if home is not None:
        return home / "cache"
    return Path(platformdirs.user_cache_dir(APP))


def _describe(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _raise_validation(err: ValidationError, origin: str, *, hint: str | None = None) -> None:
    problem = err.errors()[0]
    key = _describe(problem["loc"])
    got = problem.get("input")
    msg = problem["msg"]
    if problem["type"] == "extra_forbidden":
        raise ConfigError(f"{origin}: unknown key '{key}'") from None
    raise ConfigError(f"{origin}: '{key}' {msg.lower()} (got {got!r})", hint=hint) from None


def _parse_env_value(raw: str) -> Any:
    """Env values are strings; lists may be JSON or comma-separated, pydantic converts the rest."""
    text = raw.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return raw


def _parse_value(key: str, raw: str) -> Any:
    """A value given as text (environment, ``config set``); ``hosts`` may be comma-separated."""
    value: Any = _parse_env_value(raw)
    if key == "hosts" and isinstance(value, str):
        value = [h.strip() for h in value.split(",") if h.strip()]
    return value


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, tuple[Any, str]]]:
    found: dict[str, dict[str, tuple[Any, str]]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in SECTIONS:
            continue
        if key not in SECTIONS[section].model_fields:
            raise ConfigError(f"environment variable {name}: unknown key '{section}.{key}'")
        value = _parse_value(key, raw)
        found.setdefault(section, {})[key] = (value, f"env {name}")
    return found


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        return tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(
    path: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Merge defaults, the config file, ``GPUCTL_*`` variables and flag ``overrides``.

    ``overrides`` maps dotted keys (``"server.port"``) to values given on the command line;
    ``None`` values are ignored so callers can pass every flag unconditionally.
    """
    env = os.environ if env is None else env
    file_path = config_path(path, env)
    file_data = _read_file(file_path)
    sources: dict[str, str] = {}

    merged: dict[str, Any] = {}
    for section, values in file_data.items():
        if section in LISTS and isinstance(values, list):
            merged[section] = values
            sources[section] = f"file {file_path}"
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(
                f"{file_path}: unknown section [{section}]",
                hint=f"Known sections: {', '.join('[' + s + ']' for s in SECTIONS)}, "
                     "[[schedule]].",
            )
        merged[section] = dict(values)
        for key in values:
            sources[f"{section}.{key}"] = f"file {file_path}"
    try:
        Config.model_validate(merged)
    except ValidationError as err:
        _raise_validation(err, str(file_path))

    for section, values in _env_overrides(env).items():
        for key, (value, origin) in values.items():
            merged.setdefault(section, {})[key] = value
            sources[f"{section}.{key}"] = origin
            try:
                Config.model_validate(merged)
            except ValidationError as err:
                _raise_validation(err, origin)

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        merged.setdefault(section, {})[key] = value
        sources[dotted] = "flag"
    try:
        config = Config.model_validate(merged)
    except ValidationError as err:
        _raise_validation(err, "command line")
        raise  # unreachable: _raise_validation always raises
    return LoadedConfig(config, file_path, file_path.exists(), sources)


def _coerce_for_toml(section: str, key: str, raw: str) -> Any:
    """Turn the text of ``config set`` into the type the model wants, validated."""
    model = SECTIONS[section]
    value = _parse_value(key, raw)
    try:
        checked = model.model_validate({key: value})
    except ValidationError as err:
        # The value typed was wrong, not the command: show a good one (the default).
        default = model.model_fields[key].get_default(call_default_factory=True)
        example = ",".join(default) if isinstance(default, list) else default
        example = str(example).lower() if isinstance(example, bool) else example
        _raise_validation(err, f"{section}.{key}",
                          hint=f"For example `gpuctl config set {section}.{key} {example}` "
                               "(the default).")
    return getattr(checked, key)


def set_config_value(path: Path, dotted_key: str, raw_value: str) -> Any:
    """Set one key in the TOML file, keeping the user's comments and layout (tomlkit)."""
    section, _, key = dotted_key.partition(".")
    if section not in SECTIONS or key not in SECTIONS[section].model_fields:
        known = ", ".join(f"{s}.{k}" for s, m in SECTIONS.items() for k in m.model_fields)
        raise ConfigError(f"unknown config key '{dotted_key}'", hint=f"Known keys: {known}.")
    value = _coerce_for_toml(section, key, raw_value)
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    table = doc.get(section)
    if table is None:
        table = tomlkit.table()
        doc[section] = table
    table[key] = value
    # Validate the whole file before writing, so a bad edit never lands.
    try:
        Config.model_validate(doc.unwrap())
    except ValidationError as err:
        _raise_validation(err, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomlkit.dumps(doc), encoding="utf-8")
    return value
