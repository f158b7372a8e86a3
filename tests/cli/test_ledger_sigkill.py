"""A gateway killed with SIGKILL: request rows lost are at most the unflushed ones, and the
timeline change behind a cloud action is on disk before the cloud hears of it."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from conftest import served_url  # tests/conftest.py

from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import ServerThread
from gpuctl.sim.surf_api import SurfApiSim
from gpuctl.store import Store
from gpuctl.store.keys import KeyStore

from .conftest import TOKEN

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py


def _until(condition: Callable[[], bool], *, timeout: float = 20.0) -> None:
    """Wait, bounded, for a real process to get somewhere (real time, polled)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.02)


def _count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def _env(sim_url: str) -> dict[str, str]:
    return {
        "GPUCTL_CLOUD_API__BASE_URL": f"{sim_url}/v1",
        "GPUCTL_CLOUD_API__MACHINE_NAME_FILTER": "gpu",
        "GPUCTL_GPU__OLLAMA_URL": "http://{ip}",  # each sim workspace's ip is host:port
        "GPUCTL_TIMING__POLL_INTERVAL_SECONDS": "0.5",  # the flush interval
        "GPUCTL_API_TOKEN": TOKEN,
    }


def _url(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    return served_url(proc)


def test_sigkill_keeps_flushed_rows_and_the_resume_it_had_sent(
    gpuctl_home: Path, gpuctl_process: GpuctlProcess,
) -> None:
    keys = KeyStore.open(gpuctl_home / "state")
    _, secret = keys.create("alice")
    keys.close()
    db = gpuctl_home / "state" / "gpuctl.db"
    sim = SurfApiSim(token=TOKEN, resume_seconds=3600)  # a resume that stays in flight
    with ServerThread(sim) as sim_url, ServerThread(SimOllama(["llama3.2"])) as warm_url, \
            ServerThread(SimOllama(["qwen3:8b"])) as cold_url:
        sim.cloud.add("gpu-warm", ip=warm_url.removeprefix("http://"), status="running",
                      models=["llama3.2:latest"])
        cold = sim.cloud.add("gpu-cold", ip=cold_url.removeprefix("http://"),
                             models=["qwen3:8b"])
        store = Store.open(gpuctl_home / "state")  # seen awake before: a wake for requests
        store.save_models(cold.id, [{"name": "qwen3:8b", "model": "qwen3:8b"}], 0.0)
        store.close()
        with gpuctl_process("serve", "--port", "0", env=_env(sim_url)) as proc, \
                httpx.Client(base_url=_url(proc), timeout=10,
                             headers={"Authorization": f"Bearer {secret}"}) as client:
            for _ in range(5):
                ok = client.post("/api/generate", json={"model": "llama3.2", "stream": False})
                assert ok.status_code == 200
            # The background loop writes them, with no request and no shutdown to help.
            _until(lambda: _count(db, "SELECT COUNT(*) FROM request_log") == 5)
            # A request for a model only the paused GPU has: the gateway resumes it and holds
            # the request. Kill it once the cloud has the resume.
            held = client.build_request("POST", "/api/generate",
                                        json={"model": "qwen3:8b", "stream": False})
            with httpx.Client(base_url=client.base_url, headers=client.headers,
                              timeout=1) as waiting, contextlib.suppress(httpx.ReadTimeout):
                waiting.send(held)
            _until(lambda: sim.cloud.resume_calls[cold.id] == 1)
            for _ in range(3):  # rows the next flush would have written
                assert client.post("/api/generate", json={"model": "llama3.2",
                                                          "stream": False}).status_code == 200
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
    rows = _count(db, "SELECT COUNT(*) FROM request_log")
    assert 5 <= rows <= 9  # the flushed five survive; only the last interval may be lost
    conn = sqlite3.connect(db)
    events = conn.execute(
        "SELECT status, cause FROM gpu_timeline WHERE gpu_id = ? ORDER BY rowid", (cold.id,)
    ).fetchall()
    conn.close()
    assert ("resuming", "gateway") in events  # written before the cloud was asked
