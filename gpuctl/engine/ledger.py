"""The engine's pen for the ledger: GPU status changes as they happen, requests as they end.

What it writes is what ``attribution`` turns into GPU-seconds per user and per reason, so the
rule for each is about money:

- A status change the engine *causes* (a resume, a pause) is written by ``action`` before the
  cloud is asked, with its cause (``gateway``, ``probe``, ``hand``). A gateway killed right
  after asking still leaves the reason the GPU was billed.
- Every other change is *observed*: ``observe`` runs on each refile of a GPU (a cheap
  comparison with the last status written) and writes a change as ``observed`` when it follows
  an action of ours in flight, or ``outside`` when nobody in gpuctl caused it (the portal, a
  resume from a laptop with another state dir, a GPU found running at start).
- Before writing, the last stored event of the GPU is read: when another process sharing the
  state dir (``gpuctl resume`` on the gateway's host) already wrote the same status, the
  engine takes it as is, so the laptop's ``hand`` is not overwritten by ``outside``.
- Request rows are handed to the store's in-memory batch (``request``); ``Store.flush`` in the
  background loop writes them.

An engine made for one CLI command (``observe_fleet=False``) writes only the actions it
takes: it does not watch the fleet, and one writer (the gateway) keeps the record of what was
observed.

Replicas (``store.url``) keep one timeline for the group: only the leader writes it (its
observations and the actions it sends to the cloud; ``leading``), and the others fold the
leader's events in from Redis (``store.shared.journal``). A follower writes nothing, so no
change is counted twice; a replica that takes the lead first re-reads the last event of
each GPU (``resync``), which the old leader's journal brought in.
"""

from __future__ import annotations

from collections.abc import Callable

from gpuctl.engine.clock import Clock
from gpuctl.engine.fleet import Gpu
from gpuctl.store import RequestRow, Store, TimelineEvent

__all__ = ["Ledger", "timeline_status"]


def timeline_status(gpu: Gpu) -> str | None:
    """The status the timeline should show for ``gpu`` now; None while it cannot tell.

    ``ready`` is "running and Ollama answers". While a resume of ours is recorded but the
    cloud still shows the old status, the timeline shows the action (``resuming`` /
    ``pausing``), not the stale status; before the action is recorded there is no news.
    """
    status = gpu.ws.status
    pausing = gpu.pausing
    if pausing is not None and status != "paused":
        return "pausing" if pausing.recorded else None
    if status == "running":
        return "ready" if gpu.node_ready else "running"
    waking = gpu.waking
    if waking is not None and status == "paused":
        return "resuming" if waking.recorded else None
    return status


class Ledger:
    """Writes the GPU timeline and collects request rows for the store's next flush."""

    def __init__(self, store: Store, clock: Clock, *, observe_fleet: bool = True) -> None:
        self._rows = store.ledger
        self._clock = clock
        self._observe = observe_fleet
        #: Replicas: whether this engine writes the timeline now (the leader does).
        self.leading: Callable[[], bool] | None = None
        self._last: dict[str, str] = {}
        self.resync()

    def resync(self) -> None:
        """Take the last stored event of each GPU as what was written last (at start, and
        on a replica that takes the lead: the old leader's events were folded in)."""
        self._last = {
            gpu_id: event.status for gpu_id, event in self._rows.last_events().items()
        }

    def observe(self, gpu: Gpu) -> None:
        """Write ``gpu``'s status if it changed since the last event (O(1) when it did not)."""
        if self.leading is not None and not self.leading():
            return
        status = timeline_status(gpu)
        if status is None or self._last.get(gpu.id) == status:
            return
        if not self._observe:
            self._last[gpu.id] = status
            return
        cause = "observed" if gpu.waking is not None or gpu.pausing is not None else "outside"
        stored = self._rows.last_event(gpu.id)
        if stored is not None and stored.status == status:
            self._last[gpu.id] = status  # another process sharing the store wrote it
            return
        self._write(gpu, status, cause)

    def action(self, gpu: Gpu, status: str, cause: str) -> None:
        """Write an action of ours (``resuming``, ``pausing``, ``failed``) before it is sent.

        A follower replica sends no action to the cloud (its resume is a wish the leader
        acts on, and records), so it writes none."""
        if self.leading is not None and not self.leading():
            return
        self._write(gpu, status, cause)

    def gone(self, gpu: Gpu) -> None:
        """``gpu`` left the cloud's list: it bills no more."""
        if self.leading is not None and not self.leading():
            return
        if self._observe and self._last.get(gpu.id) not in (None, "gone"):
            self._write(gpu, "gone", "outside")

    def request(self, row: RequestRow) -> None:
        """Keep one finished request's row for the next flush (O(1), no disk)."""
        self._rows.add_request(row)

    def _write(self, gpu: Gpu, status: str, cause: str) -> None:
        self._last[gpu.id] = status
        self._rows.add_event(TimelineEvent(
            gpu.id, self._clock.wall(), status, cause, gpu.ws.flavor or "",
        ))
