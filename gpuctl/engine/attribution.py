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
from typing import NamedTuple

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


class ShareKey(NamedTuple):
    """Who (or why) one piece of billed time went to: the unit a report groups.

    A named tuple, not a dataclass: it is hashed millions of times over a month's ledger,
    and a tuple's hash and equality run in C (a dataclass's took half the time).
    """

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
    """One GPU's sweep through time: who is in a slot, who holds a lease, and their shares.

    Shares are kept as running integrals rather than split instant by instant: ``serving``
    is the integral of 1/k over the time k requests were in slots, ``held`` that of 1/n over
    the idle time n users held leases. A party in a slot from t0 to t1 gets
    ``count × (serving(t1) - serving(t0))``, settled only when its count changes or a share
    is written out (at each hour or phase boundary). So an instant costs O(1) and a request
    O(1), whatever the number of requests in flight or users holding leases; a month of a
    busy fleet takes seconds, not minutes.
    """

    def __init__(self, result: Attribution, gpu_id: str) -> None:
        self.shares = result.shares
        self.gpu_id = gpu_id
        self.serving = 0.0  # ∫ 1/k dt, over the instants with k > 0 requests in slots
        self.held = 0.0  # ∫ 1/n dt, over the idle up instants with n > 0 lease holders
        self.in_slot = 0
        self.slots: dict[Party, int] = {}
        self.slot_mark: dict[Party, float] = {}
        self.leases: dict[str, int] = {}  # user -> leases held
        self.latest: dict[str, RequestRow] = {}  # user -> their latest request holding one
        self.lease_mark: dict[str, float] = {}
        # What was earned since the last write-out, and where it goes.
        self.earned: dict[tuple[str, Party], float] = defaultdict(float)
        self.lost: dict[str, float] = defaultdict(float)
        self.bucket = 0.0
        self.flavour = ""

    # -- marks: a slot or a lease begins or ends --------------------------------------------

    def slot(self, row: RequestRow, begins: bool) -> None:
        party = _party(row)
        count = self.slots.get(party, 0)
        if count:
            self.earned[("serving", party)] += count * (self.serving - self.slot_mark[party])
        self.slot_mark[party] = self.serving
        count += 1 if begins else -1
        if count > 0:
            self.slots[party] = count
        else:
            self.slots.pop(party, None)
            self.slot_mark.pop(party, None)
        self.in_slot += 1 if begins else -1

    def lease(self, row: RequestRow, begins: bool) -> None:
        user = row.user
        count = self.leases.get(user, 0)
        if count:
            self._settle_lease(user)
        count += 1 if begins else -1
        if count > 0:
            self.leases[user] = count
            self.lease_mark[user] = self.held
            last = self.latest.get(user)
            if begins and (last is None or (row.served_at or 0.0) >= (last.served_at or 0.0)):
                self.latest[user] = row
        else:
            self.leases.pop(user, None)
            self.latest.pop(user, None)
            self.lease_mark.pop(user, None)

    def _settle_lease(self, user: str) -> None:
        earned = self.held - self.lease_mark[user]
        if earned:
            self.earned[("held", _party(self.latest[user]))] += earned
        self.lease_mark[user] = self.held

    # -- instants ---------------------------------------------------------------------------

    def instant(self, phase: _Phase, span: float, until: float) -> None:
        """Give ``span`` seconds of ``phase`` to whoever the rules say (module docstring)."""
        if self.in_slot:
            self.serving += span / self.in_slot
        elif phase.kind == "waking":
            if not phase.ready and phase.end < until:
                self.lost["failed"] += span
            elif phase.claimants:
                if not phase.parties:
                    counts: dict[Party, int] = defaultdict(int)
                    for row in phase.claimants:
                        counts[_party(row)] += 1
                    n = len(phase.claimants)
                    phase.parties = [(p, c / n) for p, c in counts.items()]
                for party, weight in phase.parties:
                    self.earned[("waking", party)] += span * weight
            else:
                self.lost[_WAKE_REASON.get(phase.cause, "outside")] += span
        elif phase.kind == "up":
            if self.leases:
                self.held += span / len(self.leases)  # one share per user holding a lease
            else:
                self.lost[_IDLE_REASON.get(phase.cause, "outside")] += span
        else:
            self.lost[phase.kind] += span  # "pausing" or "failed"

    def write_out(self, bucket: float, flavour: str) -> None:
        """Settle every open share and write what was earned to the result, under the hour
        and flavour of the instants it came from; then collect for ``bucket``/``flavour``."""
        for party, count in self.slots.items():
            self.earned[("serving", party)] += count * (self.serving - self.slot_mark[party])
            self.slot_mark[party] = self.serving
        for user in self.leases:
            self._settle_lease(user)
        shares, gpu_id = self.shares, self.gpu_id
        for (kind, (user, key_id, model)), seconds in self.earned.items():
            if seconds:
                key = ShareKey(gpu_id, self.bucket, kind, "", user, key_id, model,
                               self.flavour)
                shares[key] = shares.get(key, 0.0) + seconds
        for reason, seconds in self.lost.items():
            key = ShareKey(gpu_id, self.bucket, "unattributed", reason, "", "", "",
                           self.flavour)
            shares[key] = shares.get(key, 0.0) + seconds
        self.earned.clear()
        self.lost.clear()
        self.bucket, self.flavour = bucket, flavour


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
    sweep = _Sweep(result, gpu_id)
    m = 0
    starts = [p.start for p in phases]
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
        bucket = (a // HOUR) * HOUR
        if bucket != sweep.bucket or phase.flavour != sweep.flavour:
            sweep.write_out(bucket, phase.flavour)
        span = b - a
        billed += span
        sweep.instant(phase, span, until)
    sweep.write_out(0.0, "")
    result.billed[gpu_id] = result.billed.get(gpu_id, 0.0) + billed
