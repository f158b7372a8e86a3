"""``gpuctl keys`` and ``gpuctl serve`` as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from conftest import served_url  # tests/conftest.py
from typer.testing import CliRunner, Result

from gpuctl.cli.context import AppContext
from gpuctl.cli.main import app
from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import ServerThread
from gpuctl.sim.surf_api import SurfApiSim
from gpuctl.store import Store
from gpuctl.store.keys import KeyStore

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py: the gpuctl_process fixture


def gpuctl(*args: str, env: dict[str, str] | None = None) -> Result:
    ctx = AppContext(env={**os.environ, **(env or {})})
    return CliRunner().invoke(app, list(args), obj=ctx, env=env, prog_name="gpuctl")


def test_keys_create_prints_the_key_once_on_stdout(gpuctl_home: Path) -> None:
    result = gpuctl("keys", "create", "--name", "alice", "--email", "a@uni.nl", "--admin")
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{40,}", secret)
    listed = gpuctl("keys", "list", "--json")
    assert secret not in listed.stdout
    (row,) = json.loads(listed.stdout)
    assert (row["name"], row["email"], row["role"]) == ("alice", "a@uni.nl", "admin")
    keys = KeyStore.open(gpuctl_home / "state")
    try:
        assert keys.authenticate(secret) is not None
    finally:
        keys.close()


def test_keys_list_shows_usage_from_the_engine_store(gpuctl_home: Path) -> None:
    gpuctl("keys", "create", "--name", "alice")
    store = Store.open(gpuctl_home / "state")
    store.record_usage("alice", tokens_in=10, tokens_out=32, gpu_seconds=4.5)
    store.close()
    (row,) = json.loads(gpuctl("keys", "list", "--json").stdout)
    assert (row["requests"], row["tokens_in"], row["tokens_out"], row["gpu_seconds"]) == \
        (1, 10, 32, 4.5)
    table = gpuctl("keys", "list")
    assert "alice" in table.stdout and "42" in table.stdout


def test_keys_revoke_then_the_key_is_refused(gpuctl_home: Path) -> None:
    secret = gpuctl("keys", "create", "--name", "alice").stdout.strip()
    (row,) = json.loads(gpuctl("keys", "list", "--json").stdout)
    result = gpuctl("keys", "revoke", row["id"])
    assert result.exit_code == 0
    keys = KeyStore.open(gpuctl_home / "state")
    try:
        assert keys.authenticate(secret) is None
    finally:
        keys.close()
    missing = gpuctl("keys", "revoke", "key_nope")
    assert missing.exit_code == 1
    assert "no key with id" in missing.stderr


def test_keys_import_reads_the_old_api_keys_json(gpuctl_home: Path, tmp_path: Path) -> None:
    path = tmp_path / "api_keys.json"
    path.write_text(json.dumps({"api_keys": {"sk-legacy": {"name": "bob", "email": "b@x"}}}))
    result = gpuctl("keys", "import", str(path))
    assert result.exit_code == 0
    assert "Imported 1 key" in result.stderr
    names = [r["name"] for r in json.loads(gpuctl("keys", "list", "--json").stdout)]
    assert names == ["bob"]


def test_serve_without_cloud_credentials_exits_4_without_prompting() -> None:
    result = gpuctl("serve", "--port", "0")
    assert result.exit_code == 4
    assert "Error:" in result.stderr


def test_serve_with_a_rejected_cloud_token_exits_4(gpuctl_home: Path) -> None:
    with ServerThread(SurfApiSim(token="right")) as url:
        result = gpuctl("serve", "--port", "0", env={
            "GPUCTL_API_TOKEN": "wrong", "GPUCTL_CLOUD_API__BASE_URL": f"{url}/v1"})
    assert result.exit_code == 4
    assert "rejected the token" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_drains_a_stream_on_sigterm_and_exits_0(
    gpuctl_home: Path, gpuctl_process: GpuctlProcess,
) -> None:
    keys = KeyStore.open(gpuctl_home / "state")
    _, secret = keys.create("alice")
    keys.close()
    node = SimOllama(["llama3.2"], chunks=5, interval=0.1)
    with ServerThread(node) as node_url:
        env = {"GPUCTL_CLOUD_API__PROVIDER": "static", "GPUCTL_CLOUD_API__HOSTS": node_url}
        with gpuctl_process("serve", "--port", "0", env=env) as proc:
            assert proc.stderr is not None
            url = served_url(proc)
            headers = {"Authorization": f"Bearer {secret}"}
            with httpx.Client(base_url=url, headers=headers, timeout=10) as client, \
                    client.stream("POST", "/api/chat", json={"model": "llama3.2"}) as r:
                lines = r.iter_lines()
                assert json.loads(next(lines))["done"] is False
                proc.send_signal(signal.SIGTERM)
                rest = [json.loads(line) for line in lines]
            assert rest[-1]["done"] is True
            assert proc.wait(15) == 0


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_serve_refuses_plain_http_off_loopback_without_insecure_http(host: str) -> None:
    result = gpuctl("serve", "--host", host, "--port", "0", "--demo")
    assert result.exit_code == 2
    assert "plain HTTP" in result.stderr and "--insecure-http" in result.stderr


def test_serve_refuses_a_tls_cert_without_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "gateway.crt"
    cert.write_text("not read before the check")
    result = gpuctl("serve", "--port", "0", "--demo",
                    env={"GPUCTL_SERVER__TLS_CERT": str(cert)})
    assert result.exit_code != 0
    assert "tls_key" in result.stderr


def test_serve_sends_a_node_token_from_a_credential_file_to_probes_and_proxy(
    gpuctl_home: Path, gpuctl_process: GpuctlProcess, tmp_path: Path,
) -> None:
    keys = KeyStore.open(gpuctl_home / "state")
    _, secret = keys.create("alice")
    keys.close()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "node_token").write_text("node-secret\n")
    node = SimOllama(["llama3.2"], token="node-secret")  # answers nothing without it
    with ServerThread(node) as node_url:
        env = {"GPUCTL_CLOUD_API__PROVIDER": "static", "GPUCTL_CLOUD_API__HOSTS": node_url,
               "CREDENTIALS_DIRECTORY": str(credentials)}
        with gpuctl_process("serve", "--port", "0", env=env) as proc:
            with httpx.Client(base_url=served_url(proc), timeout=10,
                              headers={"Authorization": f"Bearer {secret}"}) as client:
                r = client.post("/api/chat", json={"model": "llama3.2", "stream": False})
            assert r.status_code == 200, r.text  # the probe found the model: token sent
            assert node.last_headers["authorization"] == "Bearer node-secret"  # the proxy's
            assert node.requests["/api/tags"] >= 1
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
