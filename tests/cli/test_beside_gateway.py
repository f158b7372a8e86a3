"""A laptop command run beside a live gateway that shares its state dir.

Fault run 1 of issue 9: ``gpuctl status`` wrote its own (empty) lease set over the gateway's,
so after a restart the gateway held no leases. Only the gateway writes leases and usage; a
command reads them (and shows them) and leaves them alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from conftest import served_url  # tests/conftest.py

from gpuctl.store import Store
from gpuctl.store.keys import KeyStore

from .conftest import Cloud, Gpuctl

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py: the gpuctl_process fixture


def _stored_leases(home: Path) -> list[tuple[str, str]]:
    store = Store.open(home / "state", reader=True)
    try:
        return [(r.gpu_id, r.user) for r in store.load_leases(0.0)]
    finally:
        store.close()


def test_status_beside_a_live_gateway_shows_its_leases_and_never_writes_them(
    cloud: Cloud, gpuctl_on: Gpuctl, gpuctl_home: Path, gpuctl_process: GpuctlProcess,
) -> None:
    machine = cloud.sim.add("gpu-a", id="id-gpu-a", status="running", ip="127.0.0.1")
    keys = KeyStore.open(gpuctl_home / "state")
    _, secret = keys.create("alice")
    keys.close()
    env = {**cloud.env(), "GPUCTL_TIMING__POLL_INTERVAL_SECONDS": "0.2"}
    with gpuctl_process("serve", "--port", "0", env=env) as proc, \
            httpx.Client(base_url=served_url(proc), timeout=10,
                         headers={"Authorization": f"Bearer {secret}"}) as client:
            answer = client.post("/api/chat", json={"model": "llama3.2", "stream": False})
            assert answer.status_code == 200, answer.text
            # The gateway writes its leases on its next poll (0.2 s here): wait for that,
            # bounded (another process, on the real clock).
            deadline = time.monotonic() + 10
            while not _stored_leases(gpuctl_home) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _stored_leases(gpuctl_home) == [(machine.id, "alice")]

            result = gpuctl_on("status", "--json")
            assert result.exit_code == 0, result.output
            (gpu,) = json.loads(result.stdout)["gpus"]
            assert [lease["user"] for lease in gpu["leases"]] == ["alice"]
            assert _stored_leases(gpuctl_home) == [(machine.id, "alice")]

            assert gpuctl_on("discover", "--json").exit_code == 0
            assert _stored_leases(gpuctl_home) == [(machine.id, "alice")]
