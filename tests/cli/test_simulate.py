"""``gpuctl simulate`` end to end, in-process: flags, workloads, fleets, table and JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gpuctl.store import Store
from gpuctl.store.ledger import RequestRow

from .conftest import Gpuctl

TRACE = "arrival_s,user,model,service_s\n" + "".join(
    f"{i * 240},alice,llama3.2,20\n" for i in range(15)
)


def trace_file(tmp_path: Path) -> str:
    path = tmp_path / "trace.csv"
    path.write_text(TRACE)
    return str(path)


def test_a_trace_sweep_prints_json_with_every_setting(gpuctl: Gpuctl, tmp_path: Path) -> None:
    result = gpuctl("simulate", "--trace", trace_file(tmp_path), "--gpus", "1",
                    "--set", "timing.reservation_minutes=2,5", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["label"] for s in data["settings"]] == ["current config", "lease 2 min",
                                                      "lease 5 min"]
    assert data["recommended"] == "lease 5 min"
    assert data["requests"] == 15 and data["gpus"] == 1
    row = data["settings"][2]
    assert set(row) >= {"gpu_hours", "credits", "always_on_gpu_hours", "optimum_gpu_hours",
                        "waited_for_wake", "wait_median_s", "wait_p90_s", "wait_max_s",
                        "resumes", "pareto", "recommended"}
    assert row["credits"] is None  # no price configured


def test_the_table_marks_the_front_and_says_what_switching_saves(
    gpuctl: Gpuctl, tmp_path: Path
) -> None:
    result = gpuctl("simulate", "--trace", trace_file(tmp_path), "--gpus", "1",
                    "--set", "timing.reservation_minutes=5")
    assert result.exit_code == 0, result.output
    assert "recommended" in result.stdout and "front" in result.stdout
    assert "Switch to lease 5 min" in result.stdout
    assert "1 identical GPUs" in result.stdout


def test_what_ifs_change_the_fleet(gpuctl: Gpuctl, tmp_path: Path) -> None:
    slow = json.loads(gpuctl("simulate", "--trace", trace_file(tmp_path), "--gpus", "1",
                             "--resume-s", "300", "--json").stdout)
    fast = json.loads(gpuctl("simulate", "--trace", trace_file(tmp_path), "--gpus", "1",
                             "--resume-s", "30", "--json").stdout)
    assert slow["settings"][0]["wait_max_s"] > 300 > 40 > fast["settings"][0]["wait_max_s"]


def test_the_fleet_comes_from_the_store_when_it_knows_one(
    gpuctl: Gpuctl, gpuctl_home: Path, tmp_path: Path
) -> None:
    store = Store.open(gpuctl_home / "state")
    for gpu in ("ws-a", "ws-b"):
        store.save_models(gpu, [{"name": "llama3.2:latest", "model": "llama3.2:latest"}], 0)
        store.record_resume(gpu, 65.0, ok=True, at=0)
    store.close()
    result = gpuctl("simulate", "--trace", trace_file(tmp_path), "--json")
    data = json.loads(result.stdout)
    assert data["gpus"] == 2
    assert any("the store knows" in n for n in data["notes"])
    assert 60 <= data["settings"][0]["wait_max_s"] <= 67  # 60 s resume + 5 s Ollama start


def test_two_workloads_are_a_usage_error(gpuctl: Gpuctl, tmp_path: Path) -> None:
    both = gpuctl("simulate", "--sample", "--trace", trace_file(tmp_path))
    assert both.exit_code == 2 and "one workload" in both.stderr


def test_bad_settings_are_usage_errors(gpuctl: Gpuctl, tmp_path: Path) -> None:
    trace = trace_file(tmp_path)
    unknown = gpuctl("simulate", "--trace", trace, "--set", "timing.lease=3")
    assert unknown.exit_code == 2 and "config key" in unknown.stderr
    negative = gpuctl("simulate", "--trace", trace, "--set", "timing.reservation_minutes=-1")
    assert negative.exit_code == 2 and "reservation_minutes" in negative.stderr
    assert gpuctl("simulate", "--trace", trace, "--gpus", "0").exit_code == 2
    assert gpuctl("simulate", "--trace", trace, "--resume-s", "1e9").exit_code == 2


def test_a_bad_trace_names_its_line(gpuctl: Gpuctl, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("arrival_s,user,model,service_s\n0,alice,llama3.2,twenty\n")
    result = gpuctl("simulate", "--trace", str(path))
    assert result.exit_code == 2 and "line 2: service_s" in result.stderr


def test_policies_are_a_dimension_of_the_grid(gpuctl: Gpuctl, tmp_path: Path) -> None:
    result = gpuctl("simulate", "--trace", trace_file(tmp_path), "--gpus", "1",
                    "--set", "timing.reservation_minutes=5", "--policy", "fixed,adaptive",
                    "--json")
    assert result.exit_code == 0, result.output
    labels = [s["label"] for s in json.loads(result.stdout)["settings"]]
    assert labels == ["current config", "lease 5 min, policy fixed",
                      "lease 5 min, policy adaptive"]
    bad = gpuctl("simulate", "--trace", trace_file(tmp_path), "--policy", "psychic")
    assert bad.exit_code == 2 and "pause_policy" in bad.stderr


def test_credits_follow_the_configured_price(gpuctl: Gpuctl, tmp_path: Path) -> None:
    gpuctl.env["GPUCTL_COST__CREDITS_PER_GPU_HOUR"] = "2.5"
    result = gpuctl("simulate", "--trace", trace_file(tmp_path), "--gpus", "1",
                    "--set", "timing.reservation_minutes=5", "--json")
    data = json.loads(result.stdout)
    for row in data["settings"]:
        assert row["credits"] == pytest.approx(2.5 * row["gpu_hours"], abs=0.01)
    saved = data["saved_gpu_hours"]
    assert data["saved_credits"] == pytest.approx(2.5 * saved, abs=0.01)
    assert "credits" in gpuctl("simulate", "--trace", trace_file(tmp_path), "--gpus", "1",
                               "--set", "timing.reservation_minutes=5").stdout


def log_requests(home: Path, ago: list[float], *, refused: int = 0) -> None:
    """Rows in the request log, ``ago`` seconds before now, as the gateway writes them."""
    now = time.time()
    store = Store.open(home / "state")
    store.save_models("ws-a", [{"name": "llama3.2:latest", "model": "llama3.2:latest"}], 0)
    store.record_resume("ws-a", 65.0, ok=True, at=0)
    for n, seconds in enumerate(ago):
        at = now - seconds
        store.ledger.add_request(RequestRow(
            at=at, key_id="k1", user="alice", route="/api/chat", model="llama3.2:latest",
            gpu_id="ws-a", status=200, served_at=at, service_s=20.0, tokens_out=100,
            outcome="refused" if n < refused else "ok"))
    store.close()


def test_the_request_log_is_the_default_workload(gpuctl: Gpuctl, gpuctl_home: Path) -> None:
    log_requests(gpuctl_home, [3 * 86_400 - i * 240 for i in range(15)] + [30 * 86_400],
                 refused=2)
    result = gpuctl("simulate", "--set", "timing.reservation_minutes=5", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"] == "request log since 7d"
    assert data["requests"] == 13  # 15 in the window, 2 of them refused; one a month ago
    assert data["window_hours"] == pytest.approx(7 * 24, abs=0.1)
    assert data["gpus"] == 1
    assert data["recommended"] == "lease 5 min"
    recent = gpuctl("simulate", "--since", "2d", "--json")
    assert recent.exit_code == 2 and recent.stdout == ""  # nothing in the last two days


def test_an_empty_request_log_says_what_to_do_instead(gpuctl: Gpuctl) -> None:
    result = gpuctl("simulate", "--since", "1d")
    assert result.exit_code == 2
    assert "no served requests since 1d" in result.stderr and "--sample" in result.stderr
    assert gpuctl("simulate", "--since", "yesterday-ish").exit_code == 2
    assert gpuctl("simulate", "--since", "7d", "--sample").exit_code == 2
