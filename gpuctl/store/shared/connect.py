"""One Redis client per replica, and what "Redis is unreachable" means to the gateway.

A replica that cannot reach Redis cannot know the global slot counts, so it must not grant
a slot: ``unreachable`` turns the client's connection and timeout errors into ``Unavailable``
(503 with ``Retry-After``) and the request is refused, never admitted over the limit.
Requests that already hold a slot keep it; their renewals fail quietly and are retried.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.asyncio as aioredis
import redis.exceptions

from gpuctl.errors import Unavailable

__all__ = ["RETRY_AFTER_SECONDS", "StoreUnreachable", "connect", "text", "unreachable"]

#: What a client is told to wait when Redis is down: a restart of Redis takes seconds.
RETRY_AFTER_SECONDS = 5.0

#: The errors that mean "Redis did not answer", as opposed to a bug in a script.
StoreUnreachable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def connect(url: str, *, timeout: float = 1.0) -> aioredis.Redis:
    """A client for ``url`` whose calls fail within ``timeout`` seconds when Redis is gone.

    A bounded timeout is what keeps a request from hanging on a dead Redis: it is refused
    with 503 instead. ``decode_responses`` stays off; callers decode the little they read.
    """
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout,
        health_check_interval=0, retry_on_timeout=False,
    )


@contextlib.contextmanager
def unreachable(what: str) -> Iterator[None]:
    """Turn "Redis did not answer" into a 503 the gateway already knows how to send."""
    try:
        yield
    except StoreUnreachable as exc:
        raise Unavailable(
            f"the shared store (Redis) is unreachable, cannot {what}",
            retry_after=RETRY_AFTER_SECONDS,
            hint="The gateway recovers by itself once Redis answers again.",
        ) from exc


def text(value: bytes | str) -> str:
    """A reply from the client (bytes: ``decode_responses`` is off) as text."""
    return value.decode() if isinstance(value, bytes) else value
