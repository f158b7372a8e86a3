"""Credentials: environment, then credential files, then the keyring; unusable keyrings refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from keyring.backend import KeyringBackend
from keyring.backends import fail, null
from keyring.backends.chainer import ChainerBackend

from gpuctl.credentials import SERVICE, Credentials
from gpuctl.errors import CredentialsError, KeyringUnusable


@pytest.fixture
def ring(memory_keyring: KeyringBackend) -> KeyringBackend:
    """The in-memory keyring of the root conftest, passed explicitly."""
    return memory_keyring


def test_gpuctl_api_token_wins_over_cloud_api_token_and_the_keyring(ring: KeyringBackend) -> None:
    ring.set_password(SERVICE, "api_token", "from-keyring")
    env = {"GPUCTL_API_TOKEN": "from-gpuctl", "CLOUD_API_TOKEN": "from-cloud"}

    found = Credentials(env, keyring_backend=ring).require("api_token")

    assert (found.value, found.source) == ("from-gpuctl", "environment variable GPUCTL_API_TOKEN")


def test_the_replaced_services_variable_is_accepted(ring: KeyringBackend) -> None:
    found = Credentials({"CLOUD_API_TOKEN": "old"}, keyring_backend=ring).require("api_token")

    assert found.value == "old"


def test_a_token_file_beats_the_keyring(ring: KeyringBackend, tmp_path: Path) -> None:
    ring.set_password(SERVICE, "api_token", "from-keyring")
    (tmp_path / "token").write_text("from-file\n")

    found = Credentials({"GPUCTL_API_TOKEN_FILE": str(tmp_path / "token")},
                        keyring_backend=ring).require("api_token")

    assert found.value == "from-file"
    assert "GPUCTL_API_TOKEN_FILE" in found.source


def test_systemd_credentials_directory_is_read(ring: KeyringBackend, tmp_path: Path) -> None:
    (tmp_path / "api_token").write_text("from-systemd")

    found = Credentials({"CREDENTIALS_DIRECTORY": str(tmp_path)},
                        keyring_backend=ring).require("api_token")

    assert found.value == "from-systemd"


def test_a_token_file_variable_pointing_nowhere_is_an_error(ring: KeyringBackend,
                                                            tmp_path: Path) -> None:
    creds = Credentials({"GPUCTL_API_TOKEN_FILE": str(tmp_path / "missing")},
                        keyring_backend=ring)

    with pytest.raises(CredentialsError, match="cannot read the token file"):
        creds.require("api_token")


def test_the_keyring_is_the_last_place(ring: KeyringBackend) -> None:
    ring.set_password(SERVICE, "api_token", "from-keyring")

    found = Credentials({}, keyring_backend=ring).require("api_token")

    assert found.value == "from-keyring"
    assert found.source.startswith("OS keyring")
    assert "from-keyring" not in repr(found)


def test_a_missing_token_lists_every_place_looked(ring: KeyringBackend) -> None:
    with pytest.raises(CredentialsError) as err:
        Credentials({}, keyring_backend=ring).require("api_token")

    assert err.value.exit_code == 4
    for place in ("GPUCTL_API_TOKEN", "CLOUD_API_TOKEN", "GPUCTL_API_TOKEN_FILE",
                  "$CREDENTIALS_DIRECTORY/api_token", "OS keyring"):
        assert place in err.value.message


@pytest.mark.parametrize("backend", [fail.Keyring(), null.Keyring()],  # type: ignore[no-untyped-call]
                         ids=["fail", "null"])
def test_keyrings_that_drop_secrets_are_refused(backend: object) -> None:
    creds = Credentials({}, keyring_backend=backend)  # type: ignore[arg-type]

    with pytest.raises(KeyringUnusable) as err:
        creds.store("api_token", "x")

    assert err.value.exit_code == 4
    assert "GPUCTL_API_TOKEN" in (err.value.hint or "")
    assert creds.find("api_token") is None  # reading from them is just "not found"


def test_an_empty_chainer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    chainer = ChainerBackend()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(ChainerBackend, "backends", [], raising=False)

    with pytest.raises(KeyringUnusable, match="no keyring backend"):
        Credentials({}, keyring_backend=chainer).store("api_token", "x")


def test_store_and_delete_round_trip(ring: KeyringBackend) -> None:
    creds = Credentials({}, keyring_backend=ring)

    creds.store("csrf_token", "c")
    assert creds.require("csrf_token").value == "c"
    assert creds.delete("csrf_token") is True
    assert creds.delete("csrf_token") is False
    assert creds.find("csrf_token") is None


class _Untouchable(KeyringBackend):
    """A keyring that notes every read (gpuctl swallows a backend's errors, so it must not
    raise), and fails any write."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reads: list[str] = []

    def get_password(self, service: str, username: str) -> str | None:
        self.reads.append(username)
        return None

    def set_password(self, service: str, username: str, password: str) -> None:
        raise AssertionError("the keyring was written")

    def delete_password(self, service: str, username: str) -> None:
        raise AssertionError("the keyring was written")


def test_a_token_in_the_environment_does_not_open_the_keyring_for_the_csrf_token() -> None:
    from gpuctl.cloud import make_provider
    from gpuctl.config import Config

    ring = _Untouchable()
    provider = make_provider(Config(), Credentials({"GPUCTL_API_TOKEN": "t"}, keyring_backend=ring))
    assert "x-csrftoken" not in provider._headers  # type: ignore[attr-defined]
    assert ring.reads == []


def test_a_token_from_the_keyring_brings_its_csrf_token_from_there_too(
    ring: KeyringBackend,
) -> None:
    from gpuctl.cloud import make_provider
    from gpuctl.config import Config

    ring.set_password(SERVICE, "api_token", "ring-token")
    ring.set_password(SERVICE, "csrf_token", "ring-csrf")
    provider = make_provider(Config(), Credentials({}, keyring_backend=ring))
    assert provider._headers["x-csrftoken"] == "ring-csrf"  # type: ignore[attr-defined]
