"""The always-on figure counts each GPU only while the ledger knew it."""

from __future__ import annotations

import pytest

from gpuctl.config import CostConfig
from gpuctl.engine.attribution import attribute
from gpuctl.engine.usage import _managed, build_report
from gpuctl.store import TimelineEvent

HOUR = 3600.0


def _always_on(events: list[TimelineEvent], since: float, until: float) -> float:
    attribution = attribute(events, [], since, until)
    managed = _managed(events, since, until)
    report = build_report(attribution, [], managed, by="user", cost=CostConfig())
    return report.always_on_gpu_seconds


def test_a_gpu_counts_from_when_it_was_first_seen_until_it_left() -> None:
    events = [
        TimelineEvent("a", -10 * HOUR, "paused", "outside"),  # known before the window
        TimelineEvent("b", 2 * HOUR, "paused", "outside"),  # appears two hours in
        TimelineEvent("a", 3 * HOUR, "gone", "outside"),  # leaves three hours in
        TimelineEvent("c", 5 * HOUR, "paused", "outside"),  # after the window: not counted
    ]
    # a: 0-3 h, b: 2-4 h, c: none.
    assert _always_on(events, 0.0, 4 * HOUR) == pytest.approx(5 * HOUR)


def test_a_gpu_that_leaves_and_comes_back_counts_both_stretches() -> None:
    events = [
        TimelineEvent("a", 0.0, "running", "outside"),
        TimelineEvent("a", HOUR, "gone", "outside"),
        TimelineEvent("a", 2 * HOUR, "paused", "outside"),
    ]
    assert _always_on(events, 0.0, 3 * HOUR) == pytest.approx(2 * HOUR)


def test_a_gpu_gone_before_the_window_counts_nothing() -> None:
    events = [TimelineEvent("a", -2 * HOUR, "paused", "outside"),
              TimelineEvent("a", -HOUR, "gone", "outside")]
    assert _always_on(events, 0.0, HOUR) == 0.0
