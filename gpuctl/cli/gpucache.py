"""The last discovery, cached for shell completion: TAB must never wait on the network.

``discover`` and ``status`` write ``<cache dir>/gpus.json``; completing a GPU argument only
reads it. A missing or broken cache completes nothing rather than failing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

__all__ = ["CACHE_FILE", "complete_gpu", "fast_cache_dir", "read_cache", "write_cache"]

CACHE_FILE = "gpus.json"


class _Named(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...


def write_cache(directory: Path, gpus: Iterable[_Named]) -> None:
    """Replace the cache atomically, so a concurrent TAB never reads half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    data = [{"id": gpu.id, "name": gpu.name} for gpu in gpus]
    tmp = directory / f".{CACHE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(directory / CACHE_FILE)


def read_cache(directory: Path) -> list[dict[str, str]]:
    try:
        data = json.loads((directory / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    return [
        {"id": str(item["id"]), "name": str(item["name"])}
        for item in data
        if isinstance(item, dict) and "id" in item and "name" in item
    ]


def fast_cache_dir() -> Path:
    """``gpuctl.config.cache_dir()`` without importing pydantic (a test keeps them equal)."""
    home = os.environ.get("GPUCTL_HOME")
    if home:
        return Path(home).expanduser() / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir("gpuctl"))


def complete_gpu(incomplete: str) -> list[tuple[str, str]]:
    """Typer ``autocompletion``: GPU names (then ids) starting with what was typed."""
    gpus = read_cache(fast_cache_dir())
    names = [(g["name"], g["id"]) for g in gpus if g["name"].startswith(incomplete)]
    if names:
        return names
    return [(g["id"], g["name"]) for g in gpus if g["id"].startswith(incomplete)]
