"""``store.url``: empty keeps the embedded SQLite store; only redis URLs are accepted."""

from __future__ import annotations

import pytest

from gpuctl.config import load_config
from gpuctl.errors import ConfigError


def test_store_url_defaults_to_empty_the_embedded_sqlite_store() -> None:
    assert load_config(env={}).config.store.url == ""


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380"])
def test_store_url_takes_redis_urls_from_the_environment(url: str) -> None:
    loaded = load_config(env={"GPUCTL_STORE__URL": url})
    assert loaded.config.store.url == url
    assert loaded.source_of("store.url") == "env GPUCTL_STORE__URL"


@pytest.mark.parametrize("url", ["postgres://db/gpuctl", "127.0.0.1:6379", "http://redis"])
def test_store_url_refuses_what_it_would_not_use(url: str) -> None:
    with pytest.raises(ConfigError, match=r"store\.url"):
        load_config(env={"GPUCTL_STORE__URL": url})
