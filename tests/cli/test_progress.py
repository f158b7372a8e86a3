"""The spinner of ``resume --wait``: stage and elapsed time on stderr, plain lines off a tty."""

from __future__ import annotations

import io

from rich.console import Console

from gpuctl.cli.context import AppContext
from gpuctl.cli.fleet import StageLabel, progress_reporter
from gpuctl.engine.api import Progress

from .conftest import Cloud, Gpuctl


def test_stage_label_shows_the_stage_and_the_elapsed_time() -> None:
    label = StageLabel("Resuming gpu-a", "resuming (cloud)")
    label.started -= 75  # as if it began 75 s ago

    out = io.StringIO()
    Console(file=out, width=120).print(label)

    assert out.getvalue().strip() == "Resuming gpu-a: resuming (cloud) · 1:15"


def test_on_a_terminal_the_spinner_ends_showing_the_last_stage() -> None:
    out = io.StringIO()
    app = AppContext(env={}, _err=Console(file=out, force_terminal=True, width=120))

    with progress_reporter(app, "Resuming gpu-a", enabled=True) as report:
        assert report is not None
        report(Progress(stage="resuming", elapsed_seconds=1))
        report(Progress(stage="ollama_ready", elapsed_seconds=80))

    assert "Resuming gpu-a: Ollama ready" in out.getvalue()


def test_off_a_terminal_each_stage_is_one_plain_line() -> None:
    out = io.StringIO()
    app = AppContext(env={}, _err=Console(file=out, force_terminal=False, width=120))

    with progress_reporter(app, "Resuming gpu-a", enabled=True) as report:
        assert report is not None
        report(Progress(stage="resuming", elapsed_seconds=1))
        report(Progress(stage="running", elapsed_seconds=70))
        report(Progress(stage="ollama_ready", elapsed_seconds=80))

    assert out.getvalue().splitlines() == [
        "Resuming gpu-a: resuming (cloud) after 1 s",
        "Resuming gpu-a: running, waiting for Ollama after 70 s",
        "Resuming gpu-a: Ollama ready after 80 s",
    ]


def test_without_wait_there_is_no_progress_callback() -> None:
    with progress_reporter(AppContext(env={}), "x", enabled=False) as report:
        assert report is None


def test_resume_wait_timeout_fails_with_exit_1_and_says_it_keeps_resuming(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    ws = cloud.sim.add("gpu-a", ip="127.0.0.1")
    cloud.sim.settle_after_reads = 1_000_000  # never finishes within the timeout

    result = gpuctl_on("resume", "gpu-a", "--wait", "--timeout", "0.2")

    assert result.exit_code == 1
    assert "not ready within 0.2 s" in result.stderr
    assert cloud.sim.resume_posts[ws.id] == 1
