"""Attribution: every billed GPU-second goes to a user or to a named reason.

A pure function of the ledger (the GPU timeline and the request log) and a window, so it can
be property-tested on its own and recomputed at any time; nothing here reads a clock.

A GPU bills while it is not paused (nor gone from the cloud). The timeline is read as
*phases*: ``waking`` (from a resume until Ollama answers), ``up`` (Ollama answered),
``pausing``, ``failed`` (a resume that gave up, until the GPU is paused), each with the cause
of the resume that began it (``gateway``, ``probe``, ``hand``, ``outside``). Every instant of
a billed phase is split, in this order of precedence:

1. **serving**: k requests hold a slot on the GPU → 1/k to each request's user (in any phase:
   a request in flight is what the GPU is for);
2. **waking**: a resume that reached ``ready`` → split evenly between the requests that
   waited for it (their wait overlaps the window and the engine told them of this wake);
   after a ``probe`` resume only those it then served; a wake nobody waited for is
   ``unclaimed`` (its waiters left before it began, or their rows were lost in a crash);
3. **held**: an idle ``up`` instant under leases → split evenly between the users holding a
   lease (from a request's slot to its end plus the lease it left);
4. else **unattributed** under a reason: ``pausing``; ``failed`` (a resume that never became
   ready); ``grace`` (a GPU resumed by hand); ``outside`` (a change gpuctl did not cause);
   ``probe`` (woken to learn its models); ``idle`` (up after a wake for requests, no lease
   left: the tail until the next poll pauses it, or ``gpu.auto_pause = false``).

Conservation holds by construction and is tested: per GPU and per window,
attributed + unattributed = billed. Instants are cut at every hour boundary (UTC), so each
share falls in one hour and reports can group by hour or day without re-splitting.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gpuctl.store import RequestRow, TimelineEvent

__all__ = ["KINDS", "REASONS", "Attribution", "ShareKey", "attribute"]

KINDS = ("serving", "waking", "held")
REASONS = ("pausing", "failed", "grace", "outside", "probe", "idle", "unclaimed")
_OFF = frozenset({"paused", "gone"})
_CAUSED = frozenset({"gateway", "probe", "hand"})
_IDLE_REASON = {"gateway": "idle", "probe": "probe", "hand": "grace", "outside": "outside",
                "failed": "failed"}
_WAKE_REASON = {"gateway": "unclaimed", "probe": "probe", "hand": "grace",
                "outside": "outside"}
HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class ShareKey:
    """Who (or why) one piece of billed time went to: the unit a report groups."""

    gpu_id: str
    hour: float  # the UTC hour the piece lies in (epoch seconds of its start)
    kind: str  # "serving", "waking", "held" or "unattributed"
    reason: str  # unattributed only
    user: str
    key_id: str
    model: str
    flavour: str


@dataclass
class Attribution:
    """The billed seconds per GPU in ``[since, until)`` and where every one of them went."""

    since: float
    until: float
    billed: dict[str, float] = field(default_factory=dict)
    shares: dict[ShareKey, float] = field(default_factory=dict)

    def attributed(self, gpu_id: str | None = None) -> float:
        return sum(s for k, s in self.shares.items()
                   if k.kind != "unattributed" and (gpu_id is None or k.gpu_id == gpu_id))

    def unattributed(self, gpu_id: str | None = None) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for k, s in self.shares.items():
            if k.kind == "unattributed" and (gpu_id is None or k.gpu_id == gpu_id):
                out[k.reason] += s
        return dict(out)


@dataclass(slots=True)
class _Phase:
    start: float
    end: float
    kind: str  # "waking", "up", "pausing", "failed"
    cause: str
    flavour: str
    ready: bool = False  # waking only: it reached "ready"
    claimants: list[RequestRow] = field(default_factory=list)
    #: The claimants as (party, weight), computed once.
    parties: list[tuple[tuple[str, str, str], float]] = field(default_factory=list)


def _phases(events: Sequence[TimelineEvent], until: float) -> list[_Phase]:
    """The billed phases of one GPU's events (sorted), the last one open until ``until``."""
    phases: list[_Phase] = []
    current: _Phase | None = None
    up_cause = "outside"  # the cause of the last up phase, for one a failed pause resumes

    def close(at: float) -> None:
        nonlocal current
        if current is not None:
            current.end = at
            if current.end > current.start:
                phases.append(current)
        current = None

    def begin(at: float, kind: str, cause: str, flavour: str) -> None:
        nonlocal current, up_cause
        close(at)
        current = _Phase(at, at, kind, cause, flavour)
        if kind == "up":
            up_cause = cause

    for e in events:
        status, cause = e.status, e.cause
        if status in _OFF:
            close(e.at)
        elif status == "failed":
            if current is not None and current.kind == "failed":
                continue
            begin(e.at, "failed", "failed", e.flavour)
        elif status == "pausing":
            if current is None or current.kind != "pausing":
                begin(e.at, "pausing", cause, e.flavour)
        elif status == "resuming" and cause in _CAUSED:
            if current is None or current.kind != "waking" or current.cause != cause:
                begin(e.at, "waking", cause, e.flavour)
        elif status == "ready":
            if current is None:
                begin(e.at, "up", "outside", e.flavour)
            elif current.kind == "waking":
                current.ready = True
                cause = current.cause
                begin(e.at, "up", cause, e.flavour)
            elif current.kind == "failed":
                begin(e.at, "up", "failed", e.flavour)
            elif current.kind == "pausing":
                begin(e.at, "up", up_cause, e.flavour)  # the pause failed: still up
        elif current is None:
            # Billing began without an action of ours (the portal, or first seen running).
            first = cause if cause in _CAUSED else "outside"
            begin(e.at, "waking", first, e.flavour)
    close(until)
    if current is not None:  # pragma: no cover - close() clears it
        phases.append(current)
    return phases


def attribute(
    events: Iterable[TimelineEvent], requests: Iterable[RequestRow], since: float,
    until: float,
) -> Attribution:
    """Split every billed GPU-second of ``[since, until)`` (see the module's rules).

    ``events``: the whole timeline before ``until`` (the phase at ``since`` depends on the
    past). ``requests``: every row whose wait, slot or lease may reach into the window.
    """
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


Party = tuple[str, str, str]  # (user, key id, model): whom a share is booked to


def _party(row: RequestRow) -> Party:
    return (row.user, row.key_id, row.model)


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

    def slot(self, row: RequestRow, begins: bool) -> None:
        party = _party(row)
        count = self.slots.get(party, 0) + (1 if begins else -1)
        if count > 0:
            self.slots[party] = count
        else:
            self.slots.pop(party, None)
        self.in_slot += 1 if begins else -1

    def lease(self, row: RequestRow, begins: bool) -> None:
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
    if sweep.in_slot:
        total = sweep.in_slot
        return "serving", "", [(p, n / total) for p, n in sweep.slots.items()]
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
        if sweep.latest:
            weight = 1.0 / len(sweep.latest)
            return "held", "", [(_party(row), weight) for row in sweep.latest.values()]
        return "unattributed", _IDLE_REASON.get(phase.cause, "outside"), []
    return "unattributed", phase.kind, []  # "pausing" or "failed"
