"""Who is calling: ``Authorization: Bearer KEY`` checked against the key store, O(1).

There is no anonymous user: no key, a bad key and a revoked key are all 401; a user key on an
admin route is 403. The secret is never logged or echoed; errors say only what was wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpuctl.errors import GpuctlError
from gpuctl.store.keys import ApiKey, KeyStore

__all__ = ["AuthError", "Authenticator", "bearer_token"]


class AuthError(GpuctlError):
    """401 (who are you?) or 403 (not allowed); carries its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.http_status = status


def bearer_token(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    """Turns an Authorization header into the caller's ``ApiKey``, or an ``AuthError``."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    def check(self, authorization: str | None, *, admin: bool = False) -> ApiKey:
        token = bearer_token(authorization)
        if token is None:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'", 401)
        key = self.keys.authenticate(token)
        if key is None:
            raise AuthError("invalid or revoked API key", 401)
        if admin and not key.is_admin:
            raise AuthError("this endpoint needs an admin key", 403)
        self.keys.mark_used(key.id)
        return key

    def check_raw(self, headers: Iterable[tuple[bytes, bytes]], *, admin: bool = False) -> ApiKey:
        """``check`` over raw ASGI headers (the hot path's form)."""
        for name, value in headers:
            if name == b"authorization":
                return self.check(value.decode("latin-1"), admin=admin)
        return self.check(None, admin=admin)
