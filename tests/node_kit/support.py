"""Test helpers for the GPU node kit (``gpu-node/``): a stub ``ollama`` CLI, a runner for
``entrypoint.sh``, and ``caddy`` running the node's Caddyfile.

The stub stands in for the ``ollama`` binary of the official image. It records every call
(as JSON lines) and does what ``config.json`` tells it: fail ``list`` or ``pull`` a number
of times, hang, exit at start. Like the real CLI, ``list`` fails until ``serve`` is up. A
stub ``sleep`` records the backoff it was asked for and sleeps at most 50 ms, so retry
tests check the schedule without waiting it out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

GPU_NODE = Path(__file__).resolve().parents[2] / "gpu-node"
ENTRYPOINT = GPU_NODE / "entrypoint.sh"

_STUB_OLLAMA = '''\
"""Stand-in for the ollama CLI: records calls; fails, hangs or exits when told to."""
import json, os, signal, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))


def record(**event):
    event["t"] = time.monotonic()
    with open(os.path.join(HERE, "calls.jsonl"), "a") as f:
        f.write(json.dumps(event) + "\\n")


def config():
    try:
        with open(os.path.join(HERE, "config.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def bump(key):
    path = os.path.join(HERE, "count-" + key.replace("/", "_").replace(":", "_"))
    n = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as f:
        f.write(str(n))
    return n


def fails(n, limit):
    return limit == -1 or n <= limit


cfg = config()
cmd = sys.argv[1] if len(sys.argv) > 1 else ""

if cmd == "serve":
    record(cmd="serve", pid=os.getpid())
    if "serve_exit_at_start" in cfg:
        sys.exit(cfg["serve_exit_at_start"])

    def on_stop(signum, frame):
        record(cmd="serve-signal", signal=signal.Signals(signum).name)
        sys.exit(cfg.get("serve_exit_on_term", 0))

    def on_usr1(signum, frame):
        record(cmd="serve-exit")
        sys.exit(cfg.get("serve_exit_on_usr1", 3))

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_usr1)
    open(os.path.join(HERE, "serving"), "w").close()  # now `list` can reach the server
    while True:
        signal.pause()

elif cmd == "list":
    n = bump("list")
    record(cmd="list", n=n)
    if cfg.get("list_hang"):
        time.sleep(3600)
    up = os.path.exists(os.path.join(HERE, "serving"))
    if not up or fails(n, cfg.get("list_fail", 0)):
        record(cmd="list-failed", n=n)
        sys.stderr.write("Error: could not connect to ollama server\\n")
        sys.exit(1)
    record(cmd="list-ok", n=n)
    print("NAME    ID    SIZE    MODIFIED")

elif cmd == "pull":
    model = sys.argv[2]
    n = bump("pull-" + model)
    record(cmd="pull", model=model, n=n)
    if model in cfg.get("pull_hang", []):
        def on_term(signum, frame):
            record(cmd="pull-terminated", model=model)
            sys.exit(143)

        signal.signal(signal.SIGTERM, on_term)
        time.sleep(3600)
    if fails(n, cfg.get("pull_fail", {}).get(model, 0)):
        if "pull_fail_text" in cfg:
            sys.stderr.write(cfg["pull_fail_text"])
        else:
            sys.stdout.write("pulling manifest \\x1b[?25l\\r\\x1b[Kpulling manifest\\n")
            sys.stderr.write("Error: pull model manifest: file does not exist\\n")
        sys.exit(1)
    print("success")

else:
    sys.stderr.write("stub ollama: unexpected arguments %r\\n" % sys.argv[1:])
    sys.exit(2)
'''

_STUB_SLEEP = '''\
"""Stand-in for sleep(1): records the duration asked for, sleeps at most 50 ms."""
import json, os, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
seconds = float(sys.argv[1])
with open(os.path.join(HERE, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"cmd": "sleep", "seconds": seconds, "t": time.monotonic()}) + "\\n")
time.sleep(min(seconds, 0.05))
'''


class StubOllama:
    """A directory holding the stub ``ollama`` and ``sleep``; prepend it to ``PATH``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        for name, source in (("ollama", _STUB_OLLAMA), ("sleep", _STUB_SLEEP)):
            path = directory / name
            path.write_text(f"#!{sys.executable} -S\n{source}")
            path.chmod(0o755)

    def configure(self, **settings: Any) -> None:
        (self.dir / "config.json").write_text(json.dumps(settings))

    def calls(self, cmd: str | None = None) -> list[dict[str, Any]]:
        path = self.dir / "calls.jsonl"
        if not path.exists():
            return []
        events = [json.loads(line) for line in path.read_text().splitlines()]
        return [e for e in events if cmd is None or e["cmd"] == cmd]

    def wait_for_call(self, cmd: str, timeout: float = 10) -> dict[str, Any]:
        """The first recorded ``cmd`` call, polling the record until ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.calls(cmd)
            if found:
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"the stub never saw {cmd!r}; calls: {self.calls()}")

    def backoffs(self) -> list[float]:
        """Whole-second sleeps after the server first answered: the waits between pulls."""
        events = self.calls()
        answered = next((i for i, e in enumerate(events) if e["cmd"] == "list-ok"), len(events))
        later = events[answered:]
        return [e["seconds"] for e in later if e["cmd"] == "sleep" and e["seconds"] >= 1]

    def pulled(self) -> list[str]:
        """Models in the order ``ollama pull`` was called, one entry per attempt."""
        return [e["model"] for e in self.calls("pull")]

    def env(self, **settings: str) -> dict[str, str]:
        """A clean environment for the entrypoint: the stubs first on PATH, plus ``settings``."""
        env = {
            "PATH": f"{self.dir}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(self.dir),
            "LANG": "C.UTF-8",
            "GPUCTL_PULL_BACKOFF_SECONDS": "0",
        }
        env.update(settings)
        return env


class EntrypointRun:
    """``entrypoint.sh`` running in its own session, its output collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["bash", str(ENTRYPOINT)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 10) -> None:
        """Block until a line contains ``text``; fail (with the output) if it never comes."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: self._eof or any(text in line for line in self.lines), timeout
            )
            if not found or not any(text in line for line in self.lines):
                raise AssertionError(f"no line containing {text!r}; output:\n{self.output}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 15) -> int:
        """Wait for the entrypoint to exit; its exit status."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """Kill the whole session (entrypoint, stub server, any child) if still running."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self._reader.join(5)
            self.proc.stdout.close()


CADDYFILE = GPU_NODE / "Caddyfile"


def free_port() -> int:
    """A loopback port free right now (the OS picks it; Caddy binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def caddy_env(home: Path, **settings: str) -> dict[str, str]:
    """Caddy's environment: every file it writes (autosave, certificates, the smallstep
    trust-store dir) under ``home``, and the Caddyfile's settings."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home / "home"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
    }
    env.update(settings)
    return env


class CaddyProcess:
    """``caddy run`` on ``gpu-node/Caddyfile`` as a child process bound to 127.0.0.1.

    The site address and the upstream come from the environment, exactly as the compose
    file passes them; the admin API is off in the Caddyfile itself. ``stop`` always kills it.
    """

    def __init__(self, home: Path, *, scheme: str, upstream: str, token: str) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log_path = home / "caddy.log"
        env = caddy_env(
            home,
            GPUCTL_NODE_FQDN=self.url,
            GPUCTL_NODE_BIND="127.0.0.1",
            GPUCTL_NODE_HTTP_PORT=str(free_port()),  # redirects for https sites, never :80
            GPUCTL_OLLAMA_UPSTREAM=upstream,
            GPUCTL_NODE_TOKEN=token,
        )
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            ["caddy", "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def root_cert(self) -> Path:
        """The root of Caddy's internal CA (it signs the certificate of an IP-address site)."""
        return self.home / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    def wait_ready(self, timeout: float = 15) -> None:
        """Return once Caddy answers an HTTP request (TLS included); fail with its log."""
        deadline = time.monotonic() + timeout
        last_error = "not tried"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"caddy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # Any HTTP answer will do (a 401 included); the certificate is checked by
                # the tests themselves.
                httpx.get(self.url + "/", timeout=1, verify=False)
                return
            except (httpx.HTTPError, ssl.SSLError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise AssertionError(f"caddy never answered ({last_error}):\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
