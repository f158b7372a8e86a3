"""What a waiting caller is told: its place in line, and about how long until it is served.

A request that cannot be served at once may wait minutes (a resume takes 1–4 minutes), and a
client that hears nothing gives up. The engine tells each queued request its position and an
estimate when it joins and whenever its position changes, and a rejected request how long to
wait before retrying. The estimate is the queue's own pace while GPUs with the model serve,
and otherwise the wake that will supply one (``resume_left``, from the waker), plus a load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gpuctl.engine.api import Progress, ProgressCallback
from gpuctl.engine.catalog import ModelCatalog
from gpuctl.engine.clock import Clock
from gpuctl.engine.estimates import Estimator
from gpuctl.engine.fairqueue import FairQueue, Waiter

__all__ = ["Announcer", "notify"]

log = logging.getLogger(__name__)


def notify(callback: ProgressCallback, progress: Progress) -> None:
    """Call a caller's progress callback; its failure must not break the engine."""
    try:
        callback(progress)
    except Exception:
        log.exception("progress callback failed")


class Announcer:
    """Tells queued requests their place in line and an estimate; prices a retry."""

    def __init__(
        self, queue: FairQueue, catalog: ModelCatalog, estimator: Estimator, clock: Clock,
        resume_left: Callable[[str], float],
    ) -> None:
        self._queue = queue
        self._catalog = catalog
        self._estimator = estimator
        self._clock = clock
        #: Seconds until a GPU for the model is up, when none serves it now.
        self._resume_left = resume_left

    def estimate(self, model: str, position: int) -> float:
        """Seconds until the ``position``-th waiter for ``model`` is served, about."""
        estimator = self._estimator
        slots = self._catalog.serving_slots(model)
        if slots:
            return estimator.queue_wait(model, position, slots)
        left = self._resume_left(model) + estimator.load_seconds(model)
        return left + estimator.queue_wait(model, position, self._catalog.slots) - (
            estimator.service_seconds(model)
        )

    def retry_after(self, model: str) -> float:
        """Seconds a rejected request for ``model`` is told to wait before trying again.

        When the line starts moving (the first waiter is served), not when the rejected
        request would have been: a retry needs a place in line, and from then on it is
        told its own estimate. Pricing the whole line, at the default service time a cold
        fleet has not measured yet, told a cold overload 57-59 s where the queue emptied in
        about 10 (fault run 6 of issue 9).
        """
        return max(1.0, round(self.estimate(model, 1)))

    def tell_position(self, waiter: Waiter) -> None:
        if waiter.progress is None:
            return
        position = self._queue.position(waiter)
        waiter.last_position = position
        notify(
            waiter.progress,
            Progress(
                stage="queued",
                position=position,
                estimate_seconds=self.estimate(waiter.model, position),
                elapsed_seconds=self._clock.now() - waiter.enqueued_at,
                message=f"waiting for a GPU with {waiter.given_name}: number {position} in line",
            ),
        )

    def tell_positions(self, model: str) -> None:
        """Tell each waiter for ``model`` whose place in line changed since it last heard."""
        for position, waiter in enumerate(self._queue.waiters(model), 1):
            if waiter.progress is not None and waiter.last_position != position:
                self.tell_position(waiter)
