"""``gpuctl serve --demo`` with a status page open: the page's live stream must not hold the
process when it is told to stop (before, it waited out the stream: ~21 s)."""

from __future__ import annotations

import re
import signal
import threading
from typing import TYPE_CHECKING

import httpx

from gpuctl.gateway.ui import STREAM_SECONDS

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py: the gpuctl_process fixture


def test_sigterm_with_a_page_open_ends_its_stream_and_exits_0(
    gpuctl_process: GpuctlProcess,
) -> None:
    with gpuctl_process("serve", "--demo", "--port", "0") as proc:
        assert proc.stderr is not None
        intro = []
        for line in proc.stderr:
            intro.append(line)
            if line.startswith("Watch the fleet"):
                break
        text = "".join(intro)
        url = re.search(r"^Gateway:  (http://\S+)", text, re.M)
        key = re.search(r"^Demo key: (\S+)$", text, re.M)
        assert url and key, text
        with httpx.Client(base_url=url.group(1), timeout=10) as client:
            assert client.post("/ui/session", json={"key": key.group(1)}).status_code == 200
            with client.stream("GET", "/ui/events") as events:
                lines = events.iter_lines()
                assert next(lines) == "retry: 1000"
                ended = threading.Event()

                def read_to_the_end() -> None:
                    for _ in lines:
                        pass
                    ended.set()

                reader = threading.Thread(target=read_to_the_end, daemon=True)
                reader.start()
                proc.send_signal(signal.SIGTERM)
                # Well before the stream would have ended by itself (STREAM_SECONDS).
                assert ended.wait(STREAM_SECONDS / 2), "the stream outlived the SIGTERM"
                assert proc.wait(STREAM_SECONDS / 2) == 0
