"""Every test gets a temp ``GPUCTL_HOME``, an environment without gpuctl's variables and an
in-memory keyring, so no test reads the developer's config, tokens or OS keyring."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import keyring
import pytest
from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError

_CLEARED_PREFIXES = ("GPUCTL_", "CLOUD_", "OLLAMA_")
_CLEARED_NAMES = ("CREDENTIALS_DIRECTORY",)


class MemoryKeyring(KeyringBackend):
    """A keyring that keeps secrets in a dict: no daemon, nothing leaves the test."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.secrets.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.secrets[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.secrets.pop((service, username), None) is None:
            raise PasswordDeleteError("not found")


@pytest.fixture(autouse=True)
def gpuctl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``GPUCTL_HOME`` and an environment free of gpuctl's variables."""
    for name in list(os.environ):
        if name.startswith(_CLEARED_PREFIXES) or name in _CLEARED_NAMES:
            monkeypatch.delenv(name)
    home = tmp_path / "gpuctl-home"
    home.mkdir()
    monkeypatch.setenv("GPUCTL_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def memory_keyring() -> Iterator[MemoryKeyring]:
    """Swap the process keyring for an in-memory one for the duration of a test."""
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    try:
        yield backend
    finally:
        keyring.set_keyring(previous)


GpuctlProcess = Callable[..., contextlib.AbstractContextManager["subprocess.Popen[str]"]]


@pytest.fixture
def gpuctl_process(gpuctl_home: Path) -> GpuctlProcess:
    """``with gpuctl_process("serve", "--demo", env={...}) as proc``: gpuctl as a real
    process (stderr piped, as text), killed and reaped however the test ends."""

    @contextlib.contextmanager
    def start(*args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
        full_env = {**os.environ, "GPUCTL_HOME": str(gpuctl_home), **(env or {})}
        proc = subprocess.Popen([sys.executable, "-m", "gpuctl", *args], env=full_env,
                                stderr=subprocess.PIPE, text=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()

    return start


def served_url(proc: subprocess.Popen[str]) -> str:
    """The URL a ``gpuctl serve`` process started by ``gpuctl_process`` printed in its banner
    ("gpuctl gateway on http://HOST:PORT"): read from its stderr, bounded to the first lines."""
    assert proc.stderr is not None
    for _ in range(50):
        line = proc.stderr.readline()
        match = re.search(r"gateway on http://([\d.]+:\d+)", line)
        if match:
            return f"http://{match.group(1)}"
        if not line:
            break
    raise AssertionError("the gateway printed no banner")
