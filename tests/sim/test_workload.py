"""Workloads: CSV traces checked row by row, and the synthetic weeks as documented."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from gpuctl.errors import UsageError
from gpuctl.sim import workload
from gpuctl.sim.workload import DAY, Request, parse_trace, read_trace, synthetic_week, write_trace

HEADER = "arrival_s,user,model,service_s\n"


def test_a_trace_is_sorted_started_at_zero_and_models_get_their_tag() -> None:
    text = HEADER + "130,bob,qwen2.5:7b,4\n100,alice,llama3.2,2.5\n"
    assert parse_trace(text) == [
        Request(0.0, "alice", "llama3.2:latest", 2.5),
        Request(30.0, "bob", "qwen2.5:7b", 4.0),
    ]


def test_tokens_out_is_optional_and_read_when_given() -> None:
    [request] = parse_trace("arrival_s,user,model,service_s,tokens_out\n0,a,m:1,1,42\n")
    assert request.tokens_out == 42


def test_a_written_trace_reads_back_the_same(tmp_path: Path) -> None:
    week = synthetic_week("group", 3)[:50]
    path = tmp_path / "t.csv"
    path.write_text(write_trace(week))
    again = read_trace(path)
    assert [(r.user, r.model, r.tokens_out) for r in again] == [
        (r.user, r.model, r.tokens_out) for r in week]
    assert again[-1].arrival_s == pytest.approx(week[-1].arrival_s - week[0].arrival_s, abs=1e-3)


@pytest.mark.parametrize(("row", "complaint"), [
    ("-1,alice,m,1", "line 2: arrival_s"),
    ("nan,alice,m,1", "line 2: arrival_s"),
    ("inf,alice,m,1", "line 2: arrival_s"),
    ("soon,alice,m,1", "line 2: arrival_s"),
    ("0,alice,m,-5", "line 2: service_s"),
    ("0,alice,m,100000", "line 2: service_s"),
    ("0,,m,1", "line 2: user"),
    ("0,alice,,1", "line 2: model"),
    ("0,al\x01ice,m,1", "line 2: user"),
    ("0," + "u" * 201 + ",m,1", "line 2: user"),
    ("0,alice,m", "line 2: service_s"),
])
def test_a_bad_row_is_refused_with_its_line(row: str, complaint: str) -> None:
    with pytest.raises(UsageError, match=complaint):
        parse_trace(HEADER + row + "\n")


def test_missing_columns_are_named() -> None:
    with pytest.raises(UsageError, match=r"missing column.*service_s"):
        parse_trace("arrival_s,user,model\n0,a,m\n")


def test_an_empty_trace_is_refused() -> None:
    with pytest.raises(UsageError, match="no requests"):
        parse_trace(HEADER)


def test_a_trace_past_the_row_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workload, "MAX_TRACE_ROWS", 3)
    with pytest.raises(UsageError, match="more than 3"):
        parse_trace(HEADER + "0,a,m,1\n" * 4)


def test_an_unreadable_trace_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="cannot read trace"):
        read_trace(tmp_path / "bin.csv")
    with pytest.raises(UsageError, match="cannot read trace"):
        read_trace(tmp_path / "missing.csv")


def test_the_same_seed_gives_the_same_week_and_another_seed_another() -> None:
    assert synthetic_week("group", 1) == synthetic_week("group", 1)
    assert synthetic_week("group", 1) != synthetic_week("group", 2)


def test_another_seed_is_another_week_of_the_same_people() -> None:
    """What a learning policy learns of a person (their think time) holds the next week."""
    def median_gap(week: list[Request], user: str) -> float:
        times = [r.arrival_s for r in week if r.user == user]
        gaps = sorted(b - a for a, b in pairwise(times) if b - a < 1800)
        return gaps[len(gaps) // 2]

    weeks = [synthetic_week("group", seed) for seed in (1, 2, 3)]
    for user in ("user01", "user05", "user08"):
        gaps = [median_gap(week, user) for week in weeks]
        assert max(gaps) < 1.6 * min(gaps), (user, gaps)
    assert median_gap(weeks[0], "user05") > 2 * median_gap(weeks[0], "user01")


def _per_day(week: list[Request]) -> Counter[int]:
    return Counter(int(r.arrival_s // DAY) for r in week)


def test_the_sample_week_is_a_busy_working_week_and_a_quiet_weekend() -> None:
    week = synthetic_week("group", 1)
    days = _per_day(week)
    assert all(250 <= days[d] <= 1200 for d in range(5))
    assert days[5] + days[6] < 150
    assert len({r.user for r in week}) == 12
    assert {r.model for r in week} == {workload.SMALL, workload.LARGE}
    assert all(0 <= r.arrival_s < 7 * DAY for r in week)
    # Monday 9:00-9:30 is the rush: busier than the same half hour on other weekdays.
    def rush(day: int) -> int:
        return sum(1 for r in week if day * DAY + 9 * 3600 <= r.arrival_s < day * DAY + 9.5 * 3600)
    assert rush(0) > max(rush(d) for d in (2, 4))


def test_the_deadline_week_works_late_and_at_the_weekend() -> None:
    week = synthetic_week("deadline", 1)
    days = _per_day(week)
    assert days[5] + days[6] > 500
    people = [r for r in week if r.user not in ("user03", "user07", "user11")]  # no batches
    late = sum(1 for r in people if r.arrival_s % DAY >= 18 * 3600)
    early = sum(1 for r in people if r.arrival_s % DAY < 9 * 3600)
    assert late > 3 * early


def test_an_unknown_shape_is_refused() -> None:
    with pytest.raises(UsageError, match="unknown workload shape"):
        synthetic_week("holiday")
