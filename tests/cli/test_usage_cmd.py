"""``gpuctl usage`` on the local state dir: table, JSON, CSV, credits, and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from gpuctl.cli.main import app
from gpuctl.store import RequestRow, Store, TimelineEvent


def gpuctl(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), prog_name="gpuctl")


def _ledger(state: Path) -> None:
    """One GPU woken for ann an hour ago: 100 s waking, 50 s serving, 600 s held, paused."""
    now = time.time()
    t = now - 3600
    store = Store.open(state)
    for at, status, cause in ((t - 10, "paused", "outside"), (t, "resuming", "gateway"),
                              (t + 100, "ready", "observed"), (t + 750, "pausing", "gateway"),
                              (t + 780, "paused", "observed")):
        store.ledger.add_event(TimelineEvent("ws-1", at, status, cause, "gpu-a10"))
    store.ledger.add_request(RequestRow(
        at=t - 1, key_id="key_a", user="ann", route="/api/chat", model="llama3.2",
        gpu_id="ws-1", status=200, queued_s=101, wake_gpu="ws-1", served_at=t + 100,
        service_s=50, lease_s=600, tokens_in=10, tokens_out=20))
    store.close()


def test_usage_reads_the_state_dir_and_adds_up(gpuctl_home: Path) -> None:
    _ledger(gpuctl_home / "state")
    (gpuctl_home / "config.toml").write_text(
        "[cost]\ncredits_per_gpu_hour = 10\n[cost.flavours]\n\"gpu-a10\" = 36\n")
    result = gpuctl("usage", "--since", "2h", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (row,) = report["rows"]
    assert row["key"] == "ann"
    assert row["gpu_seconds"] == {"serving": 50.0, "waking": 100.0, "held": 600.0,
                                  "total": 750.0}
    assert row["credits"] == 7.5  # 750 s at the flavour's 36 credits/hour
    assert (row["requests"], row["tokens_in"], row["tokens_out"]) == (1, 10, 20)
    assert row["waits"] == {"median_s": 101.0, "p90_s": 101.0, "cold": 1}
    assert report["billed_gpu_seconds"] == 780.0
    assert report["unattributed"] == {"pausing": 30.0}
    # Always-on counts ws-1 from when the ledger first saw it (an hour and 10 s ago), not the
    # whole two-hour window.
    assert report["always_on_gpu_seconds"] == pytest.approx(3610.0, abs=5)
    table = gpuctl("usage", "--since", "2h")
    assert "ann" in table.stdout and "CREDITS" in table.stdout and "7.50" in table.stdout
    assert "(GPU-seconds)" in table.stdout and "750.0" in table.stdout  # under an hour


def test_usage_by_day_and_csv(gpuctl_home: Path) -> None:
    _ledger(gpuctl_home / "state")
    result = gpuctl("usage", "--since", "2h", "--by", "model", "--csv")
    assert result.exit_code == 0, result.output
    header, line = result.stdout.splitlines()
    assert header.split(",")[:5] == ["key", "serving_s", "waking_s", "held_s", "total_s"]
    assert line.startswith("llama3.2,50.0,100.0,600.0,750.0,1,10,20")


def test_usage_rejects_a_bad_grouping_or_time_with_exit_2() -> None:
    assert gpuctl("usage", "--by", "planet").exit_code == 2
    bad = gpuctl("usage", "--since", "yesterday-ish")
    assert bad.exit_code == 2
    assert "Hint: Use a duration" in bad.output


def test_usage_url_without_a_key_exits_4() -> None:
    result = gpuctl("usage", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 4
    assert "GPUCTL_GATEWAY_KEY" in result.output
