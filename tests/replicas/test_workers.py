"""``gpuctl serve --workers N``: N processes on one socket, each a replica through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from conftest import served_url  # tests/conftest.py

from gpuctl.store import Store

from .gateways import SECRET, SLOTS, Fleet, env, fleet, prepare_state, until, warm
from .redis_server import RedisServer

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py


async def _replicas_serving(url: str, model: str, count: int) -> list[tuple[int, str]]:
    """``count`` requests on fresh connections: (status, the replica that answered)."""

    async def one() -> tuple[int, str]:
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     headers={"Authorization": f"Bearer {SECRET}"}) as client:
            reply = await client.post("/api/chat", json={
                "model": model, "stream": False,
                "messages": [{"role": "user", "content": "hi"}]})
            return reply.status_code, reply.headers.get("x-gpuctl-replica", "")

    return await asyncio.gather(*[one() for _ in range(count)])


@dataclass
class _Workers:
    proc: subprocess.Popen[str]
    url: str
    fleet: Fleet
    gpu_id: str
    model: str
    state: Path


@contextlib.contextmanager
def _two_workers(redis_server: RedisServer, gpuctl_process: GpuctlProcess,
                 tmp_path: Path) -> Iterator[_Workers]:
    """``serve --workers 2`` over one running GPU of a simulated fleet."""
    with fleet(1, chunks=3, interval=0.05) as f:
        gpu_id, model = warm(f)
        state = tmp_path / "state"
        prepare_state(state, f)
        with gpuctl_process("serve", "--port", "0", "--workers", "2",
                            env=env(f, redis_server.url, state)) as proc:
            yield _Workers(proc, served_url(proc), f, gpu_id, model, state)


def test_two_workers_share_the_port_and_stop_cleanly_on_sigterm(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    with _two_workers(redis_server, gpuctl_process, tmp_path) as w:
        proc, url, f, gpu_id, model, state = (w.proc, w.url, w.fleet, w.gpu_id, w.model,
                                              w.state)
        seen: set[str] = set()

        def both_served() -> bool:
            results = asyncio.run(_replicas_serving(url, model, 8))
            assert [status for status, _ in results] == [200] * 8
            seen.update(replica for _, replica in results)
            return len(seen) == 2

        until(both_served, timeout=30)
        pids = {int(replica.split("@")[0]) for replica in seen}
        assert proc.pid not in pids  # the workers answer, not the parent
        # Each worker has a store of its own: worker 0 the state dir's, worker 1 one
        # seeded with its known models.
        second = Store.open(state / "workers" / "1", reader=True)
        assert [m["name"] for m in second.known_models()[gpu_id]] == [model]
        second.close()
        assert f.nodes[gpu_id].peak_streams <= SLOTS
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert all(_gone(pid) for pid in pids)  # the workers are gone too


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _line_with(proc: subprocess.Popen[str], *words: str) -> str:
    """The next stderr line of ``proc`` holding all ``words`` (bounded to 200 lines)."""
    assert proc.stderr is not None
    for _ in range(200):
        line = proc.stderr.readline()
        if all(word in line for word in words):
            return line
    raise AssertionError(f"no line with {words}")


def test_a_dead_worker_is_logged_the_other_serves_and_workers_outlive_no_parent(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    with _two_workers(redis_server, gpuctl_process, tmp_path) as w:
        proc, url, model = w.proc, w.url, w.model
        assert proc.stderr is not None
        started = [int(proc.stderr.readline().rsplit("pid ", 1)[1].rstrip(")\n"))
                   for _ in range(2)]
        os.kill(started[0], signal.SIGKILL)  # within CRASH_LOOP_SECONDS of its start
        _line_with(proc, "worker 0", "not restarted (crash loop)")
        results = asyncio.run(_replicas_serving(url, model, 4))
        assert results == [(200, results[0][1])] * 4
        assert results[0][1].startswith(f"{started[1]}@")
        proc.kill()  # the parent dies without forwarding anything
        until(lambda: _gone(started[1]), timeout=40)  # its stdin closed: it drained


def test_workers_without_a_store_url_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpuctl", "serve", "--port", "0", "--workers", "2"],
        env={"GPUCTL_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "store.url" in result.stderr
    assert "Redis" in result.stderr


@pytest.mark.parametrize("args", [["--workers", "0"], ["--workers", "65"],
                                  ["--worker", "0:nonsense"], ["--worker", "0:987"]])
def test_worker_counts_and_sockets_out_of_range_are_usage_errors(
        tmp_path: Path, args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpuctl", "serve", "--port", "0", *args],
        env={"GPUCTL_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
             "GPUCTL_STORE__URL": "redis://127.0.0.1:1/0"},
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
