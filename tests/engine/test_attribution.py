"""Attribution: the rules on hand-made ledgers, and conservation as a property."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuctl.engine.attribution import HOUR, Attribution, attribute
from gpuctl.store import RequestRow, TimelineEvent

from .reference_attribution import attribute_reference

T0 = 1_800_000_000.0 - 1_800_000_000.0 % HOUR  # an hour boundary


def ev(at: float, status: str, cause: str = "observed", gpu: str = "g1") -> TimelineEvent:
    return TimelineEvent(gpu, T0 + at, status, cause, "A10")


def req(user: str, at: float, *, served: float | None = None, service: float = 0.0,
        lease: float = 0.0, queued: float = 0.0, wake: str | None = None, gpu: str = "g1",
        model: str = "m") -> RequestRow:
    return RequestRow(at=T0 + at, key_id="key_" + user, user=user, route="/api/chat",
                      model=model, gpu_id=gpu if served is not None else None,
                      served_at=None if served is None else T0 + served, service_s=service,
                      lease_s=lease, queued_s=queued, wake_gpu=wake)


def by_user(result: Attribution, kind: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, seconds in result.shares.items():
        if key.kind == kind:
            out[key.user] = out.get(key.user, 0.0) + seconds
    return {u: round(s, 6) for u, s in out.items()}


def conserved(result: Attribution) -> None:
    for gpu_id, billed in result.billed.items():
        shared = sum(s for k, s in result.shares.items() if k.gpu_id == gpu_id)
        assert shared == pytest.approx(billed, abs=1e-3), gpu_id


def test_a_wake_goes_to_its_waiters_serving_splits_and_leases_hold() -> None:
    events = [ev(0, "paused"), ev(100, "resuming", "gateway"), ev(160, "running"),
              ev(220, "ready"), ev(1000, "pausing", "gateway"), ev(1060, "paused")]
    requests = [
        req("ann", 90, queued=130, wake="g1", served=220, service=20, lease=300),
        req("bob", 150, queued=70, wake="g1", served=220, service=40, lease=300),
    ]
    result = attribute(events, requests, T0, T0 + 2000)
    assert result.billed == {"g1": pytest.approx(960)}
    # Waking 100→220 split between the two waiters.
    assert by_user(result, "waking") == {"ann": 60, "bob": 60}
    # 220→240 both in a slot, 240→260 bob alone.
    assert by_user(result, "serving") == {"ann": 10, "bob": 30}
    # Held: ann's lease to 540, bob's to 560; idle from 260: 260→540 split, 540→560 bob.
    assert by_user(result, "held") == {"ann": 140, "bob": 160}
    assert result.unattributed() == {"idle": pytest.approx(440), "pausing": pytest.approx(60)}
    conserved(result)


@pytest.mark.parametrize(("cause", "reason"), [
    ("hand", "grace"), ("outside", "outside"), ("probe", "probe"), ("gateway", "unclaimed"),
])
def test_a_wake_nobody_waited_for_is_unattributed_by_its_cause(cause: str, reason: str) -> None:
    first = "resuming" if cause != "outside" else "running"
    events = [ev(0, "paused"), ev(10, first, cause), ev(70, "ready"), ev(100, "paused")]
    result = attribute(events, [], T0, T0 + 200)
    assert result.billed["g1"] == pytest.approx(90)
    # Up after a wake for requests with no lease left is "idle"; otherwise the cause's reason.
    expected = {reason: pytest.approx(60), "idle": pytest.approx(30)} if cause == "gateway" \
        else {reason: pytest.approx(90)}
    assert result.unattributed() == expected
    conserved(result)


def test_a_failed_resume_is_unattributed_even_with_waiters() -> None:
    events = [ev(0, "paused"), ev(10, "resuming", "gateway"), ev(610, "failed", "gateway"),
              ev(640, "paused")]
    waiter = req("ann", 5, queued=605, wake="g1")
    result = attribute(events, [waiter], T0, T0 + 700)
    assert result.unattributed() == {"failed": pytest.approx(630)}
    assert by_user(result, "waking") == {}


def test_a_probe_wake_goes_to_the_waiters_it_then_served() -> None:
    events = [ev(0, "resuming", "probe"), ev(60, "ready"), ev(200, "paused")]
    served = req("ann", 0, queued=60, wake="g1", served=60, service=10, lease=0)
    typo = req("bob", 0, queued=60, wake="g1")  # its model was not there: 404
    result = attribute(events, [served, typo], T0, T0 + 300)
    assert by_user(result, "waking") == {"ann": 60}
    assert result.unattributed() == {"probe": pytest.approx(130)}


def test_a_window_cuts_at_its_edges_and_at_every_hour() -> None:
    events = [ev(-HOUR, "resuming", "hand"), ev(-HOUR + 60, "ready")]
    result = attribute(events, [], T0 + 1800, T0 + 2 * HOUR)
    assert result.billed["g1"] == pytest.approx(HOUR * 1.5)
    hours = sorted({key.hour for key in result.shares})
    assert hours == [T0, T0 + HOUR]
    conserved(result)


def test_a_pause_that_failed_leaves_the_gpu_up_under_its_old_cause() -> None:
    events = [ev(0, "resuming", "hand"), ev(10, "ready"), ev(20, "pausing", "hand"),
              ev(25, "ready", "outside"), ev(100, "paused")]
    result = attribute(events, [], T0, T0 + 200)
    assert result.unattributed() == {"grace": pytest.approx(95), "pausing": pytest.approx(5)}


def test_nothing_bills_while_paused_or_gone() -> None:
    events = [ev(0, "ready", "outside"), ev(50, "gone", "outside"), ev(80, "paused")]
    result = attribute(events, [], T0, T0 + 100)
    assert result.billed["g1"] == pytest.approx(50)


statuses = st.sampled_from(["paused", "resuming", "running", "ready", "pausing", "failed",
                            "gone", "starting"])
causes = st.sampled_from(["gateway", "probe", "hand", "outside", "observed"])
users = st.sampled_from(["ann", "bob", "cy"])
gpus = st.sampled_from(["g1", "g2"])
times = st.floats(0, 20_000, allow_nan=False)


@st.composite
def ledgers(draw: st.DrawFn) -> tuple[list[TimelineEvent], list[RequestRow], float, float]:
    events = [TimelineEvent(draw(gpus), T0 + draw(times), draw(statuses), draw(causes))
              for _ in range(draw(st.integers(0, 30)))]
    requests = []
    for _ in range(draw(st.integers(0, 40))):
        at = draw(times)
        served = draw(st.one_of(st.none(), st.floats(at, at + 2000)))
        requests.append(req(
            draw(users), at, served=served, service=draw(st.floats(0, 900)),
            lease=draw(st.sampled_from([0.0, 180.0, 600.0])), queued=draw(st.floats(0, 900)),
            wake=draw(st.one_of(st.none(), gpus)), gpu=draw(gpus)))
    since = T0 + draw(times)
    until = since + draw(st.floats(1, 30_000))
    return events, requests, since, until


@settings(max_examples=300, deadline=None)
@given(ledgers())
def test_every_billed_second_is_attributed_or_has_a_reason(
    ledger: tuple[list[TimelineEvent], list[RequestRow], float, float],
) -> None:
    events, requests, since, until = ledger
    result = attribute(events, requests, since, until)
    conserved(result)
    assert all(seconds >= 0 for seconds in result.shares.values())
    assert all(0 <= b <= until - since + 1e-6 for b in result.billed.values())
    # Splitting the window in two splits every figure in two.
    middle = (since + until) / 2
    left, right = attribute(events, requests, since, middle), attribute(
        events, requests, middle, until)
    for gpu_id, billed in result.billed.items():
        assert left.billed.get(gpu_id, 0) + right.billed.get(gpu_id, 0) == pytest.approx(
            billed, abs=1e-3)


@settings(max_examples=300, deadline=None)
@given(ledgers())
def test_the_running_integrals_give_the_shares_of_the_instant_by_instant_rules(
    ledger: tuple[list[TimelineEvent], list[RequestRow], float, float],
) -> None:
    events, requests, since, until = ledger
    fast = attribute(events, requests, since, until)
    slow = attribute_reference(events, requests, since, until)
    assert fast.billed == pytest.approx(slow.billed, abs=1e-6)
    for key in set(fast.shares) | set(slow.shares):
        assert fast.shares.get(key, 0.0) == pytest.approx(slow.shares.get(key, 0.0),
                                                          abs=1e-6), key
