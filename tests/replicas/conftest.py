"""Fixtures of the replica tests: a real redis-server per test, and a client of it."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gpuctl.store.shared import connect

from .redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for this test, killed however the test ends."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (CI installs Debian's: "
                    "apt-get install -y redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()
