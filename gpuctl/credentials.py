"""Secrets: the environment, then credential files, then the OS keyring, in that order.

Like ``gh auth``: a headless server sets a variable (or systemd's ``LoadCredential=`` /
a Docker secret file), a laptop keeps the token in the OS keyring. Whatever gives a secret
also says where it came from, so ``gpuctl auth status`` can tell without printing it.

Lookup order for each secret (``api_token`` shown; ``csrf_token`` and ``node_token`` alike):

1. environment: ``GPUCTL_API_TOKEN``, then ``CLOUD_API_TOKEN`` (the replaced service's name)
2. ``GPUCTL_API_TOKEN_FILE`` (an explicit path beats a directory convention), then
   ``$CREDENTIALS_DIRECTORY/api_token`` (systemd credentials)
3. the OS keyring, service ``gpuctl``, user ``api_token``

A keyring backend that silently drops writes (keyring's ``fail`` and ``null`` backends, or a
chainer with no backend behind it) is refused with ``KeyringUnusable``: ``auth login`` must
never report success for a token it did not keep.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gpuctl.errors import ConfigError, CredentialsError, KeyringUnusable

if TYPE_CHECKING:
    from keyring.backend import KeyringBackend

__all__ = ["SERVICE", "Credentials", "Found", "SecretName"]

SERVICE = "gpuctl"

log = logging.getLogger(__name__)

SecretName = Literal["api_token", "csrf_token", "node_token"]

_ENV_NAMES: dict[str, tuple[str, ...]] = {
    "api_token": ("GPUCTL_API_TOKEN", "CLOUD_API_TOKEN"),
    "csrf_token": ("GPUCTL_CSRF_TOKEN", "CLOUD_CSRF_TOKEN"),
    "node_token": ("GPUCTL_NODE_TOKEN",),
}


@dataclass(frozen=True)
class Found:
    """A secret and where it was found. The value never shows in ``repr``."""

    value: str = field(repr=False)
    source: str


def _backend_name(backend: KeyringBackend) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"


def _unusable_reason(backend: KeyringBackend) -> str | None:
    """Why ``backend`` cannot keep a secret, or None when it can."""
    module = type(backend).__module__
    if module.startswith(("keyring.backends.fail", "keyring.backends.null")):
        return f"the keyring backend {_backend_name(backend)} does not store secrets"
    inner = getattr(backend, "backends", None)
    if module.startswith("keyring.backends.chainer") and not inner:
        return "no keyring backend is available (is a keyring daemon running?)"
    return None


class Credentials:
    """Finds, stores and forgets gpuctl's secrets. ``env`` and ``keyring`` are injectable."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        keyring_backend: KeyringBackend | None = None,
    ) -> None:
        self.env: Mapping[str, str] = os.environ if env is None else env
        self._backend = keyring_backend

    # -- lookup ---------------------------------------------------------------------------

    def places(self, name: SecretName) -> list[str]:
        """Every place ``find`` looks for ``name``, in order, for error messages."""
        upper = name.upper()
        return [
            *(f"environment variable {var}" for var in _ENV_NAMES[name]),
            f"file named by GPUCTL_{upper}_FILE",
            f"$CREDENTIALS_DIRECTORY/{name}",
            f"OS keyring (service {SERVICE!r}, user {name!r})",
        ]

    def find(self, name: SecretName, *, keyring: bool = True) -> Found | None:
        """The secret ``name`` from the first place that has it, or None. ``keyring=False``
        stops before the OS keyring (a companion of a secret that did not come from it)."""
        for var in _ENV_NAMES[name]:
            value = self.env.get(var, "").strip()
            if value:
                return Found(value, f"environment variable {var}")
        file_var = f"GPUCTL_{name.upper()}_FILE"
        if self.env.get(file_var):
            path = Path(self.env[file_var]).expanduser()
            return Found(self._read_file(path, file_var), f"file {path} (from {file_var})")
        cred_dir = self.env.get("CREDENTIALS_DIRECTORY")
        if cred_dir and (Path(cred_dir) / name).is_file():
            path = Path(cred_dir) / name
            return Found(self._read_file(path, "CREDENTIALS_DIRECTORY"), f"file {path}")
        return self._from_keyring(name) if keyring else None

    def setting_file(self, value: str, setting: str) -> Path:
        """A secret file a setting names (``server.tls_key``...): a path, or a bare name in
        ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=`` keeps the file out of the service's
        own files). Only the path is returned: the file's reader (granian) opens it."""
        path = Path(value).expanduser()
        cred_dir = self.env.get("CREDENTIALS_DIRECTORY")
        if not path.is_absolute() and os.sep not in value and cred_dir:
            candidate = Path(cred_dir) / value
            if candidate.is_file():
                return candidate
        if not path.is_file():
            raise ConfigError(f"{setting}: file {value!r} not found "
                              "(a path, or a name in $CREDENTIALS_DIRECTORY)")
        return path

    def require(self, name: SecretName) -> Found:
        """Like ``find``, but a missing secret is a ``CredentialsError`` listing the places."""
        found = self.find(name)
        if found is None:
            looked = "; ".join(self.places(name))
            what = "SURF API token" if name == "api_token" else name.replace("_", " ")
            raise CredentialsError(f"no {what} found (looked in: {looked})")
        return found

    # -- keyring --------------------------------------------------------------------------

    def backend(self) -> KeyringBackend:
        if self._backend is None:
            import keyring  # lazy: importing keyring scans entry points (slow start-up)

            self._backend = keyring.get_keyring()
        return self._backend

    def backend_description(self) -> str:
        return _backend_name(self.backend())

    def usable_backend(self) -> KeyringBackend:
        """The keyring backend, or ``KeyringUnusable`` when it would drop what it is given."""
        backend = self.backend()
        reason = _unusable_reason(backend)
        if reason is not None:
            raise KeyringUnusable(f"cannot store the token: {reason}")
        return backend

    def store(self, name: SecretName, value: str) -> str:
        """Keep ``value`` in the keyring; returns the backend's name for the user."""
        from keyring.errors import KeyringError

        backend = self.usable_backend()
        try:
            backend.set_password(SERVICE, name, value)
        except KeyringError as exc:
            raise KeyringUnusable(f"the keyring refused the token: {exc}") from None
        return _backend_name(backend)

    def delete(self, name: SecretName) -> bool:
        """Forget ``name`` in the keyring; False when there was nothing to forget."""
        from keyring.errors import KeyringError, PasswordDeleteError

        backend = self.backend()
        if _unusable_reason(backend) is not None:
            return False
        try:
            backend.delete_password(SERVICE, name)
        except PasswordDeleteError:
            return False
        except KeyringError as exc:
            raise KeyringUnusable(f"the keyring could not delete the token: {exc}") from None
        return True

    def _from_keyring(self, name: SecretName) -> Found | None:
        from keyring.errors import KeyringError

        backend = self.backend()
        if _unusable_reason(backend) is not None:
            return None
        try:
            value = backend.get_password(SERVICE, name)
        except KeyringError:
            return None
        except Exception as exc:  # backends are a zoo (D-Bus, Secret Service, KWallet …)
            log.debug("keyring %s failed to read %s: %s", _backend_name(backend), name, exc)
            return None
        if not value:
            return None
        return Found(value, f"OS keyring ({_backend_name(backend)})")

    @staticmethod
    def _read_file(path: Path, origin: str) -> str:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CredentialsError(
                f"cannot read the token file {path} (from {origin}): {exc.strerror}"
            ) from None
        if not value:
            raise CredentialsError(f"the token file {path} (from {origin}) is empty")
        return value
