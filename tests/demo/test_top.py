"""``gpuctl top`` against the demo fleet behind the real gateway: the frame in 80 columns with
the clock moving, ``q`` in a real terminal (a pty), a gateway that goes away, bad input."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import select
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
from rich.console import Console

from gpuctl.cli.context import AppContext
from gpuctl.cli.remote import GatewayGone, gateway_overview
from gpuctl.cli.top import frame, watch

from .conftest import DemoFactory, gpuctl_beside


def rendered(state: dict[str, Any], now: float, width: int = 80) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(frame(state, now=now, source="http://127.0.0.1:8000"))
    return console.export_text().splitlines()


async def overview(url: str, key: str) -> dict[str, Any]:
    return await asyncio.to_thread(gateway_overview, url, key)


async def test_the_frame_fits_80_columns_and_counts_down_as_time_passes(
    start_demo: DemoFactory,
) -> None:
    async with start_demo(reservation_minutes=2) as demo:
        await demo.ollama().chat(model="llama3.2", messages=[{"role": "user", "content": "Hi"}])
        state = await overview(demo.url, demo.fleet.key)
    now = state["fleet"]["at"]
    lines = rendered(state, now)
    assert all(len(line) <= 80 for line in lines), lines
    text = "\n".join(lines)
    assert "gpuctl top" in lines[0] and "demo (admin)" in lines[0]
    gpu1 = next(line for line in lines if line.startswith("gpu-1"))
    assert "ready" in gpu1 and "leased: you 2 min left" in gpu1
    assert "paused" in next(line for line in lines if line.startswith("gpu-3"))
    assert "Nobody is waiting." in text
    assert any(line.startswith("demo ") for line in lines)  # the usage table
    later = "\n".join(rendered(state, now + 75))
    assert "leased: you 45 s left" in later  # the same snapshot, 75 s on


async def test_q_quits_top_in_a_real_terminal(start_demo: DemoFactory) -> None:
    async with start_demo() as demo:
        del demo  # published in $GPUCTL_HOME: `top --demo` finds it
        controller, terminal = pty.openpty()
        env = {**os.environ, "COLUMNS": "80", "LINES": "30", "TERM": "xterm"}
        proc = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "gpuctl", "top", "--demo"],
            stdin=terminal, stdout=terminal, stderr=terminal, env=env)
        os.close(terminal)
        try:
            screen = await asyncio.to_thread(_read_until, controller, b"gpu-3", 20)
            assert b"gpuctl top" in screen
            os.write(controller, b"q")
            assert await asyncio.to_thread(proc.wait, 10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            os.close(controller)


def _read_until(fd: int, wanted: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{wanted!r} not shown within {timeout} s: {seen[-400:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            seen += os.read(fd, 65536)
    return seen


class _Script:
    """Key presses for ``watch``: none, so it draws the frames it is asked for."""

    def wait(self, timeout: float) -> str | None:
        return None


async def test_a_gateway_that_goes_away_shrinks_the_view_to_one_line(
    start_demo: DemoFactory,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening
        async with start_demo() as demo:
            urls = [demo.url, dead, demo.url]
            out = io.StringIO()
            app = AppContext(env=dict(os.environ))
            # A terminal, so that Live draws every frame (off a terminal it draws the last).
            app._out = Console(file=out, width=200, color_system=None, force_terminal=True)

            def fetch() -> dict[str, Any]:
                return gateway_overview(urls.pop(0) if len(urls) > 1 else urls[0],
                                        demo.fleet.key)

            await asyncio.to_thread(watch, app, fetch, demo.url, _Script(), frames=3)
    text = out.getvalue()
    assert "does not answer (ConnectError); retrying every second" in text
    frames = text.split("does not answer")
    assert "gpuctl top" in frames[0] and "gpuctl top" in frames[1]  # back once it answers


async def test_top_refuses_bad_input_with_the_documented_exit_codes(
    start_demo: DemoFactory,
) -> None:
    no_key = await gpuctl_beside("top", "--url", "http://127.0.0.1:9")
    assert no_key.exit_code == 2 and "--key" in no_key.output
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        gone = await gpuctl_beside("top", "--url", f"http://127.0.0.1:{closed.getsockname()[1]}",
                                   "--key", "sk-x")
    assert gone.exit_code == 1 and "does not answer" in gone.output
    async with start_demo() as demo:
        refused = await gpuctl_beside("top", "--url", demo.url, "--key", "sk-wrong")
        assert refused.exit_code == 4 and "refused the key" in refused.output
        async with httpx.AsyncClient(base_url=demo.url) as c:
            assert (await c.get("/gpu/overview")).status_code == 401
    assert GatewayGone.default_hint
