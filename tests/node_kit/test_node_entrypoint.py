"""``gpu-node/entrypoint.sh`` against a stub ``ollama``: start-up, pulls, retries, exit codes,
signals. Each test runs the real script under bash; nothing is mocked inside it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest

from .conftest import StartEntrypoint
from .support import ENTRYPOINT, StubOllama

EX_CONFIG = 64
EX_UNAVAILABLE = 69
EX_PULL_FAILED = 75

SERVING = "serving; waiting for ollama serve to exit"


def test_pulls_every_model_in_order_after_the_server_answers(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    run = start_entrypoint(GPUCTL_PULL_MODELS=" llama3.2, qwen2.5:7b ,,llama3.2,hf.co/a/b:Q4_K_M")
    run.wait_for(SERVING)

    assert stub.pulled() == ["llama3.2", "qwen2.5:7b", "hf.co/a/b:Q4_K_M"]
    calls = [c["cmd"] for c in stub.calls()]
    assert calls.index("list-ok") < calls.index("pull"), "no pull before the server answers"
    assert "all 3 model(s) pulled" in run.output
    assert run.proc.poll() is None, "the entrypoint keeps the server in the foreground"

    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_waits_for_the_server_before_pulling(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(list_fail=3)
    run = start_entrypoint(GPUCTL_PULL_MODELS="llama3.2")
    run.wait_for(SERVING)

    events = [c["cmd"] for c in stub.calls() if c["cmd"] in ("list-failed", "list-ok", "pull")]
    assert events[-2:] == ["list-ok", "pull"]
    assert events.count("list-failed") >= 3
    assert "ollama serve is answering" in run.output
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_a_failing_pull_is_retried_with_doubling_backoff(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(pull_fail={"b": 3})
    run = start_entrypoint(
        GPUCTL_PULL_MODELS="a,b,c", GPUCTL_PULL_ATTEMPTS="5", GPUCTL_PULL_BACKOFF_SECONDS="3"
    )
    run.wait_for(SERVING)

    assert stub.pulled() == ["a", "b", "b", "b", "b", "c"]
    assert stub.backoffs() == [3, 6, 12]
    assert (
        "pull of b failed (exit status 1: Error: pull model manifest: file does not exist); "
        "retrying in 3s"
    ) in run.output
    assert "pulling b (attempt 4/5)" in run.output
    assert "all 3 model(s) pulled" in run.output
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_a_failure_without_an_error_line_reports_the_last_thing_ollama_said(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(
        pull_fail={"a": 1},
        pull_fail_text="\x1b[?25lpulling 8eeb52dfb3bb  12%\r\x1b[Kdownload stalled\n\n",
    )
    run = start_entrypoint(GPUCTL_PULL_MODELS="a")
    run.wait_for(SERVING)

    assert "pull of a failed (exit status 1: download stalled); retrying in 0s" in run.output
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_backoff_is_capped_at_five_minutes(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(pull_fail={"a": -1})
    run = start_entrypoint(
        GPUCTL_PULL_MODELS="a", GPUCTL_PULL_ATTEMPTS="5", GPUCTL_PULL_BACKOFF_SECONDS="100"
    )
    run.wait_for(SERVING)

    assert stub.backoffs() == [100, 200, 300, 300]
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_a_model_that_never_pulls_is_reported_and_the_node_serves_the_rest(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(pull_fail={"b": -1})
    run = start_entrypoint(GPUCTL_PULL_MODELS="a,b,c", GPUCTL_PULL_ATTEMPTS="2")
    run.wait_for(SERVING)

    assert stub.pulled() == ["a", "b", "b", "c"]
    assert (
        "pull of b failed (exit status 1: Error: pull model manifest: file does not exist); "
        "giving up after 2 attempts" in run.output
    )
    assert "WARNING: could not pull 1 of 3 model(s): b; serving the rest" in run.output
    assert run.proc.poll() is None
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_strict_mode_stops_the_node_at_the_first_failed_model(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(pull_fail={"b": -1})
    run = start_entrypoint(
        GPUCTL_PULL_MODELS="a,b,c", GPUCTL_PULL_ATTEMPTS="2", GPUCTL_PULL_STRICT="1"
    )

    assert run.finish() == EX_PULL_FAILED
    assert stub.pulled() == ["a", "b", "b"], "c is not pulled for a node that will not serve"
    assert "ERROR: could not pull b and GPUCTL_PULL_STRICT=1: stopping the node" in run.output
    assert [c["signal"] for c in stub.calls("serve-signal")] == ["SIGTERM"], "server stopped"


def test_a_server_that_never_answers_fails_with_69_and_is_stopped(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(list_fail=-1)
    run = start_entrypoint(GPUCTL_PULL_MODELS="a", GPUCTL_START_TIMEOUT_SECONDS="1")

    assert run.finish() == EX_UNAVAILABLE
    assert "ERROR: ollama serve did not answer within 1s (GPUCTL_START_TIMEOUT_SECONDS)" in (
        run.output
    )
    assert stub.pulled() == []
    assert [c["signal"] for c in stub.calls("serve-signal")] == ["SIGTERM"], "no orphan server"


def test_a_hanging_readiness_probe_is_cut_off_at_the_start_timeout(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(list_hang=True)
    run = start_entrypoint(GPUCTL_PULL_MODELS="a", GPUCTL_START_TIMEOUT_SECONDS="1")

    # The probe runs under `timeout 1`: a hung `ollama list` costs 1 s, not its 3600 s.
    assert run.finish(timeout=10) == EX_UNAVAILABLE
    assert "did not answer within 1s" in run.output


def test_a_server_that_dies_at_start_fails_with_69_and_its_status(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(serve_exit_at_start=5, list_fail=-1)
    run = start_entrypoint(GPUCTL_PULL_MODELS="a", GPUCTL_START_TIMEOUT_SECONDS="30")

    assert run.finish() == EX_UNAVAILABLE
    assert "ERROR: ollama serve exited with status 5 before it answered" in run.output


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GPUCTL_PULL_ATTEMPTS", "0", "GPUCTL_PULL_ATTEMPTS must be a whole number >= 1 (got '0')"),
        ("GPUCTL_PULL_ATTEMPTS", "three", "must be a whole number >= 1 (got 'three')"),
        ("GPUCTL_START_TIMEOUT_SECONDS", "-5", "must be a whole number >= 1 (got '-5')"),
        ("GPUCTL_PULL_BACKOFF_SECONDS", "1.5", "must be a whole number >= 0 (got '1.5')"),
        ("GPUCTL_PULL_STRICT", "maybe", "GPUCTL_PULL_STRICT must be 1 or 0 (got 'maybe')"),
        ("GPUCTL_PULL_MODELS", "llama3.2,rm -rf", "'rm -rf' is not a model name"),
        ("GPUCTL_PULL_MODELS", "a;b", "'a;b' is not a model name"),
    ],
)
def test_a_malformed_setting_exits_64_before_starting_anything(
    stub: StubOllama, start_entrypoint: StartEntrypoint, name: str, value: str, message: str
) -> None:
    run = start_entrypoint(**{name: value})

    assert run.finish() == EX_CONFIG
    assert message in run.output
    assert stub.calls() == [], "nothing was started"


def test_leading_zeros_are_decimal_not_octal(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(pull_fail={"a": 1})
    run = start_entrypoint(GPUCTL_PULL_MODELS="a", GPUCTL_PULL_BACKOFF_SECONDS="010")
    run.wait_for(SERVING)

    assert stub.backoffs() == [10]
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_an_empty_model_list_serves_without_pulling(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    run = start_entrypoint(GPUCTL_PULL_MODELS=" , ")
    run.wait_for(SERVING)

    assert stub.pulled() == []
    assert "GPUCTL_PULL_MODELS is empty: serving the models already on the volume" in run.output
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_ollama_models_is_not_read_as_a_pull_list(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    run = start_entrypoint(OLLAMA_MODELS="/root/.ollama/models")
    run.wait_for(SERVING)

    assert stub.pulled() == []
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_reaches_ollama_as_sigterm(
    stub: StubOllama, start_entrypoint: StartEntrypoint, signum: signal.Signals
) -> None:
    stub.configure(serve_exit_on_term=0)
    run = start_entrypoint(GPUCTL_PULL_MODELS="a")
    run.wait_for(SERVING)

    run.signal(signum)

    assert run.finish() == 0
    # A background job of a non-interactive shell ignores SIGINT: forwarding it as SIGTERM
    # is what makes Ctrl-C (docker run -it) stop Ollama.
    assert [c["signal"] for c in stub.calls("serve-signal")] == ["SIGTERM"]
    assert f"received SIG{signum.name.removeprefix('SIG')}: stopping ollama serve" in run.output


def test_the_exit_status_is_ollamas_own_after_a_stop(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(serve_exit_on_term=7)
    run = start_entrypoint()
    run.wait_for(SERVING)

    run.signal(signal.SIGTERM)

    assert run.finish() == 7
    assert "ollama serve stopped with status 7" in run.output


def test_a_stop_during_a_hanging_pull_ends_the_pull_and_the_server(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(pull_hang=["big"])
    run = start_entrypoint(GPUCTL_PULL_MODELS="big,after")
    stub.wait_for_call("pull")

    run.signal(signal.SIGTERM)

    assert run.finish() == 0
    assert [c["model"] for c in stub.calls("pull-terminated")] == ["big"]
    assert [c["signal"] for c in stub.calls("serve-signal")] == ["SIGTERM"]
    assert "after" not in stub.pulled()


def test_each_pull_attempt_is_bounded_by_the_pull_timeout(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(pull_hang=["big"])
    run = start_entrypoint(
        GPUCTL_PULL_MODELS="big,small",
        GPUCTL_PULL_ATTEMPTS="2",
        GPUCTL_PULL_TIMEOUT_SECONDS="1",
    )
    run.wait_for(SERVING, timeout=15)

    assert stub.pulled() == ["big", "big", "small"]
    assert "pull of big failed (timed out after 1s (GPUCTL_PULL_TIMEOUT_SECONDS)); retrying" in (
        run.output
    )
    run.signal(signal.SIGTERM)
    assert run.finish() == 0


def test_when_ollama_exits_on_its_own_the_entrypoint_exits_with_its_status(
    stub: StubOllama, start_entrypoint: StartEntrypoint
) -> None:
    stub.configure(serve_exit_on_usr1=3)
    run = start_entrypoint(GPUCTL_PULL_MODELS="a")
    run.wait_for(SERVING)
    (server,) = stub.calls("serve")

    subprocess.run(["kill", "-USR1", str(server["pid"])], check=True)

    assert run.finish() == 3
    assert "ollama serve exited with status 3" in run.output


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (CI installs it: apt-get install -y shellcheck)",
)
def test_entrypoint_is_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", "--shell=bash", "--severity=style", str(ENTRYPOINT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
