"""Out of file descriptors, the gateway refuses connections; it does not flood its log or die.

Under systemd's default soft limit (1,024), 1,100 idle connections once took the gateway
down with 235,163 logged tracebacks in 30 s. Here ``gpuctl serve --demo`` runs as a real
process under a hard limit of 256 descriptors (so raising the soft limit cannot help), 400
connections are opened at it, then closed: it must stay quiet, keep running and serve again.
(Before ``fd_budget`` capped the connections served at once below the descriptors, granian's
runtime sometimes panicked on ``TooManyOpenFiles`` here and the process aborted.)
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gpuctl.gateway.server import FD_RESERVE, fd_budget

LIMIT = 256
CONNECTIONS = 400
_START = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({n}, {n})); "
          "sys.argv = ['gpuctl', 'serve', '--demo', '--port', '0']; "
          "from gpuctl.cli.main import run; run()")


def _wait_for_url(proc: subprocess.Popen[str], stderr: Path) -> str:
    """The URL the demo prints on stderr (polled from its file: never a blocking read)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"Gateway:\s+(http://\S+)", stderr.read_text())
        if found:
            return found.group(1)
        time.sleep(0.1)
    raise AssertionError("the demo gateway did not print its URL")


def test_fd_exhaustion_refuses_connections_quietly_and_recovers(gpuctl_home: Path,
                                                                tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", _START.format(n=LIMIT)],
                                env={**os.environ, "GPUCTL_HOME": str(gpuctl_home)},
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            url = _wait_for_url(proc, stderr_path)
            intro = stderr_path.stat().st_size
            host, port = url.removeprefix("http://").rsplit(":", 1)
            conns: list[socket.socket] = []
            try:
                for _ in range(CONNECTIONS):  # the kernel's backlog takes what is not accepted
                    conns.append(socket.create_connection((host, int(port)), timeout=5))
                time.sleep(3)  # the gateway sits at its limit
                assert proc.poll() is None
                assert stderr_path.stat().st_size - intro < 20_000, stderr_path.read_text()[-2000:]
            finally:
                for conn in conns:
                    conn.close()
            deadline = time.monotonic() + 10
            while True:  # descriptors come back as the gateway sees the closes
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not serve again"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(45) == 0
            assert stderr_path.stat().st_size - intro < 20_000
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_the_connection_cap_leaves_descriptors_for_each_connections_node_side() -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert fd_budget(10**9) == max(16, (soft - FD_RESERVE) // 2)
    assert fd_budget(20) == min(20, max(16, (soft - FD_RESERVE) // 2))
