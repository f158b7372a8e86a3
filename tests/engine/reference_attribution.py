"""A reference attribution for the tests: the rules applied instant by instant.

``gpuctl.engine.attribution`` keeps running integrals so that a month of a busy fleet takes
seconds; this is the plain way (every instant split between the rows sharing it), slow and
easy to check by eye. ``test_attribution`` asserts both give the same shares.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Iterable

from gpuctl.engine.attribution import (
    _IDLE_REASON,
    _WAKE_REASON,
    HOUR,
    Attribution,
    Party,
    ShareKey,
    _party,
    _Phase,
    _phases,
)
from gpuctl.store import RequestRow, TimelineEvent


def attribute_reference(
    events: Iterable[TimelineEvent], requests: Iterable[RequestRow], since: float,
    until: float,
) -> Attribution:
    result = Attribution(since, until)
    by_gpu: dict[str, list[TimelineEvent]] = defaultdict(list)
    for e in events:
        if e.at < until:
            by_gpu[e.gpu_id].append(e)
    served: dict[str, list[RequestRow]] = defaultdict(list)
    waited: dict[str, list[RequestRow]] = defaultdict(list)
    for r in requests:
        if r.gpu_id is not None and r.served_at is not None:
            served[r.gpu_id].append(r)
        if r.wake_gpu is not None:
            waited[r.wake_gpu].append(r)
    for gpu_id, gpu_events in by_gpu.items():
        gpu_events.sort(key=lambda e: e.at)
        _attribute_gpu(result, gpu_id, _phases(gpu_events, until), served[gpu_id],
                       waited[gpu_id])
    return result


class _Sweep:
    """Who is in a slot and who holds a lease at the current instant of one GPU's sweep.

    Kept as counts per party, so an instant costs O(parties), not O(requests in flight): at
    512 concurrent streams of one user an instant is one share, not 512.
    """

    def __init__(self) -> None:
        self.slots: dict[Party, int] = {}
        self.in_slot = 0
        self.leases: dict[str, int] = {}  # user -> leases held
        self.latest: dict[str, RequestRow] = {}  # user -> their latest request holding one
        #: Bumped on every change, so the parties of an unchanged instant are reused.
        self.version = 0
        self._parts: tuple[int, list[tuple[Party, float]], list[tuple[Party, float]]] = (
            -1, [], [])

    def parts(self) -> tuple[list[tuple[Party, float]], list[tuple[Party, float]]]:
        """(serving parties and weights, lease-holding parties and weights), cached."""
        if self._parts[0] != self.version:
            total = self.in_slot
            serving = [(p, n / total) for p, n in self.slots.items()] if total else []
            weight = 1.0 / len(self.latest) if self.latest else 0.0
            held = [(_party(row), weight) for row in self.latest.values()]
            self._parts = (self.version, serving, held)
        return self._parts[1], self._parts[2]

    def slot(self, row: RequestRow, begins: bool) -> None:
        self.version += 1
        party = _party(row)
        count = self.slots.get(party, 0) + (1 if begins else -1)
        if count > 0:
            self.slots[party] = count
        else:
            self.slots.pop(party, None)
        self.in_slot += 1 if begins else -1

    def lease(self, row: RequestRow, begins: bool) -> None:
        self.version += 1
        user = row.user
        count = self.leases.get(user, 0) + (1 if begins else -1)
        if count > 0:
            self.leases[user] = count
            last = self.latest.get(user)
            if begins and (last is None or (row.served_at or 0.0) >= (last.served_at or 0.0)):
                self.latest[user] = row
        else:
            self.leases.pop(user, None)
            self.latest.pop(user, None)


def _attribute_gpu(result: Attribution, gpu_id: str, phases: list[_Phase],
                   served: list[RequestRow], waited: list[RequestRow]) -> None:
    since, until = result.since, result.until
    phases = [p for p in phases if p.end > since and p.start < until]
    if not phases:
        return
    for phase in phases:
        if phase.kind == "waking":
            phase.claimants = [
                r for r in waited
                if r.at <= phase.end and r.at + r.queued_s >= phase.start
                and (phase.cause != "probe" or r.gpu_id == gpu_id)
            ]
    # Boundaries: (time, order, kind, row). order: ends (0) before starts (1) at one instant.
    marks: list[tuple[float, int, int, int]] = []
    for i, r in enumerate(served):
        start = r.served_at if r.served_at is not None else 0.0
        slot_end = start + r.service_s
        if slot_end > start:
            marks.append((start, 1, 0, i))
            marks.append((slot_end, 0, 0, i))
        lease_end = slot_end + r.lease_s
        if lease_end > start:
            marks.append((start, 1, 1, i))
            marks.append((lease_end, 0, 1, i))
    marks.sort()
    cuts: set[float] = {since, until}
    for p in phases:
        cuts.add(p.start)
        cuts.add(p.end)
    cuts.update(m[0] for m in marks)
    # Hours are cut only where the GPU billed: a window of years over a GPU that ran an
    # hour costs one cut, not 8,760 a year.
    for p in phases:
        hour = (max(since, p.start) // HOUR + 1) * HOUR
        while hour < min(until, p.end):
            cuts.add(hour)
            hour += HOUR
    times = sorted(t for t in cuts if since <= t <= until)
    sweep = _Sweep()
    m = 0
    starts = [p.start for p in phases]
    shares = result.shares
    billed = 0.0
    for a, b in itertools.pairwise(times):
        while m < len(marks) and marks[m][0] <= a:
            _, order, mark, i = marks[m]
            if mark == 0:
                sweep.slot(served[i], order == 1)
            else:
                sweep.lease(served[i], order == 1)
            m += 1
        if b <= a:
            continue
        at = bisect.bisect_right(starts, a) - 1
        if at < 0 or phases[at].end <= a:
            continue  # paused: not billed
        phase = phases[at]
        span = b - a
        billed += span
        kind, reason, parts = _split(phase, sweep, until)
        bucket = (a // HOUR) * HOUR
        if not parts:
            key = ShareKey(gpu_id, bucket, "unattributed", reason, "", "", "", phase.flavour)
            shares[key] = shares.get(key, 0.0) + span
            continue
        for (user, key_id, model), weight in parts:
            key = ShareKey(gpu_id, bucket, kind, "", user, key_id, model, phase.flavour)
            shares[key] = shares.get(key, 0.0) + span * weight
    result.billed[gpu_id] = result.billed.get(gpu_id, 0.0) + billed


def _split(phase: _Phase, sweep: _Sweep, until: float
           ) -> tuple[str, str, list[tuple[Party, float]]]:
    """Who gets an instant of ``phase``: (kind, reason when nobody, parties and weights)."""
    serving, held = sweep.parts()
    if serving:
        return "serving", "", serving
    if phase.kind == "waking":
        if not phase.ready and phase.end < until:
            return "unattributed", "failed", []
        if phase.claimants:
            if not phase.parties:
                counts: dict[Party, int] = defaultdict(int)
                for row in phase.claimants:
                    counts[_party(row)] += 1
                n = len(phase.claimants)
                phase.parties = [(p, c / n) for p, c in counts.items()]
            return "waking", "", phase.parties
        return "unattributed", _WAKE_REASON.get(phase.cause, "outside"), []
    if phase.kind == "up":
        # One share per user holding a lease, booked to their latest request on this GPU.
        if held:
            return "held", "", held
        return "unattributed", _IDLE_REASON.get(phase.cause, "outside"), []
    return "unattributed", phase.kind, []  # "pausing" or "failed"
