"""Browser sessions for the status page: a key is typed once, the browser keeps a cookie.

A gpuctl key must never sit in a URL (logs, history) or in ``localStorage`` (any script on
the origin reads it). So signing in exchanges the key for an opaque random token in an
``HttpOnly`` cookie, and the server keeps only the token's SHA-256 (a stolen memory dump
gives no usable cookie). Each session also has a CSRF token that the page sends in a header
with every state-changing call; a cross-site form cannot read it, and ``SameSite=Strict``
keeps the cookie off cross-site requests besides.

Sessions live in memory: a gateway restart signs everyone out, which is fine for a page that
is one form away. The key behind a session is looked up again on every use, so revoking a
key ends its sessions at once. The table is bounded; the oldest session goes first.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gpuctl.store.keys import ApiKey, KeyStore

__all__ = ["COOKIE", "MAX_SESSIONS", "SESSION_SECONDS", "Session", "Sessions"]

COOKIE = "gpuctl_session"
#: A session ends this long after it was last used.
SESSION_SECONDS = 12 * 3600.0
#: At most this many sessions at once; signing in past it ends the least recently used.
MAX_SESSIONS = 4096


@dataclass
class Session:
    key_id: str
    csrf: str
    last_used: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    """Opaque cookie token -> the key that signed in, with a CSRF token each."""

    def __init__(self, keys: KeyStore, *, clock: Callable[[], float] = time.monotonic,
                 max_sessions: int = MAX_SESSIONS, ttl: float = SESSION_SECONDS) -> None:
        self.keys = keys
        self.clock = clock
        self.max_sessions = max_sessions
        self.ttl = ttl
        self._by_digest: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_digest)

    def sign_in(self, secret: str) -> tuple[str, ApiKey, Session] | None:
        """A new session for a valid key: (cookie token, key, session); None for a bad key."""
        key = self.keys.authenticate(secret)
        if key is None:
            return None
        token = secrets.token_urlsafe(32)
        session = Session(key.id, secrets.token_urlsafe(24), self.clock())
        self._by_digest[_digest(token)] = session
        while len(self._by_digest) > self.max_sessions:
            self._by_digest.popitem(last=False)
        return token, key, session

    def lookup(self, token: str | None) -> tuple[ApiKey, Session] | None:
        """The live session of a cookie token and its key (still valid), else None."""
        if not token:
            return None
        digest = _digest(token)
        session = self._by_digest.get(digest)
        if session is None:
            return None
        now = self.clock()
        if now - session.last_used > self.ttl:
            del self._by_digest[digest]
            return None
        key = self.keys.active(session.key_id)
        if key is None:
            del self._by_digest[digest]
            return None
        session.last_used = now
        self._by_digest.move_to_end(digest)
        return key, session

    def sign_out(self, token: str | None) -> None:
        if token:
            self._by_digest.pop(_digest(token), None)

    @staticmethod
    def csrf_ok(session: Session, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(session.csrf.encode(), sent.encode())
