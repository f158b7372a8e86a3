"""The two cloud actions, resume and pause, carried through to their end.

A resume is done when the node's Ollama answers, not when the cloud says "running"; it is
given ``startup_timeout_seconds`` for the cloud and then ``ollama_readiness_wait_seconds``
for Ollama (the old service gave up after 120 s while SURF kept resuming, weak spot 3). A
resume has failed when the cloud falls back to paused with a failed resume action, or when
the time runs out. Each action is recorded as pending in the store before the cloud is
asked, and cleared only when it ends, so an engine restarted in between adopts the action
instead of sending it twice; adopting one, it reads the workspace at once and sends a resume
the cloud never got (the previous engine died between recording and sending). A cancelled
action (engine stopping) stays pending on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Protocol

from gpuctl.cloud.base import CloudProvider, Workspace
from gpuctl.config import Config
from gpuctl.engine.clock import Clock
from gpuctl.engine.estimates import Estimator
from gpuctl.engine.fleet import ERROR_STATUSES, Flight, Gpu, WakeStage
from gpuctl.engine.ledger import Ledger
from gpuctl.engine.polling import cloud_poll_seconds, node_poll_seconds
from gpuctl.errors import (
    ActionRefused,
    ActionUncertain,
    CloudError,
    GpuctlError,
    GpuNotFound,
    NodeDown,
    WakeFailed,
)
from gpuctl.store import Store

__all__ = ["CLOUD_POLL_SECONDS", "DEAD_NODE_SECONDS", "NODE_POLL_SECONDS", "Actions", "FleetHooks"]

log = logging.getLogger(__name__)

#: Longest pause between two looks at the cloud while a pause runs (a resume's pace is
#: ``polling.cloud_poll_seconds``: a held request waits on it).
CLOUD_POLL_SECONDS = 5.0
#: Longest pause between two readiness probes of a node that is starting.
NODE_POLL_SECONDS = 2.0
#: How long a node found running (not resumed by us) may fail its probes before its GPU is
#: marked failed: a few probes' worth, so one dropped probe is not a death sentence, yet far
#: below the readiness wait a booting node gets. Any later successful probe revives it.
DEAD_NODE_SECONDS = 10.0
#: The cloud may show the old status for a while after accepting an action (up to ~60 s).
BRIDGE_SECONDS = 60.0


class FleetHooks(Protocol):
    """What an action needs from the engine while it runs."""

    def apply_workspace(self, gpu: Gpu, ws: Workspace) -> bool:
        """Take in a fresh read of the workspace; False when the GPU left the fleet."""
        ...

    async def probe(self, gpu: Gpu) -> bool:
        """Probe the node (ready, tags, ps); True when Ollama answers."""
        ...

    def stage(self, gpu: Gpu, flight: Flight, stage: WakeStage) -> None:
        """Tell everyone waiting on ``flight`` that it reached ``stage``."""
        ...

    def count(self, action: str) -> None:
        """Count one cloud action sent (for metrics)."""
        ...


class Actions:
    def __init__(
        self, config: Config, cloud: CloudProvider, clock: Clock, store: Store,
        estimator: Estimator, hooks: FleetHooks, ledger: Ledger,
    ) -> None:
        self.config = config
        self.cloud = cloud
        self.clock = clock
        self.store = store
        self.estimator = estimator
        self.hooks = hooks
        self.ledger = ledger

    async def resume(self, gpu: Gpu, flight: Flight, *, adopt: bool = False) -> float:
        """Resume ``gpu`` until its Ollama answers; returns the seconds it took.

        ``adopt``: the resume was requested earlier (by a previous engine): do not send it
        again unless the cloud plainly lost it.
        """
        timing = self.config.timing
        clock = self.clock
        with self._recorded(gpu, flight, adopt=adopt, failure=WakeFailed):
            try:
                begun = flight.started
                if gpu.pausing is not None and gpu.pausing.task is not None:
                    # SURF refuses a resume while pausing: let the pause land first, and
                    # time the resume from there (the pause is not what resumes take).
                    await asyncio.gather(asyncio.shield(gpu.pausing.task), return_exceptions=True)
                    begun = clock.now()
                resumed = await self._until_running(gpu, flight, adopt=adopt)
                self.hooks.stage(gpu, flight, "running")
                running_at = clock.now()
                # The readiness wait is for a node that is starting; one found running gets
                # a short probe (fault run 5 of issue 9: a dead node held requests 120 s).
                wait = timing.ollama_readiness_wait_seconds
                if not resumed:
                    wait = min(wait, DEAD_NODE_SECONDS)
                deadline = running_at + wait
                while not await self.hooks.probe(gpu):
                    remaining = deadline - clock.now()
                    if remaining <= 0:
                        if not resumed:
                            gpu.node_failed = True
                            raise NodeDown(
                                f"{gpu.name} is running but its Ollama did not answer for "
                                f"{wait:g} s: {gpu.last_error or 'not ready'}")
                        raise WakeFailed(
                            f"Ollama on {gpu.name} did not answer within "
                            f"{timing.ollama_readiness_wait_seconds:g} s of the GPU running "
                            "(timing.ollama_readiness_wait_seconds)"
                        )
                    await clock.sleep(
                        min(node_poll_seconds(clock.now() - running_at), remaining)
                    )
                elapsed = clock.now() - begun
                if resumed:  # a GPU found running says nothing about how long resumes take
                    self.store.record_resume(gpu.id, elapsed, ok=True, at=clock.wall())
                    self.estimator.record_resume(gpu.id, elapsed, ok=True)
                log.info("%s resumed in %.0f s", gpu.name, elapsed)
                return elapsed
            except NodeDown:
                raise  # no resume was sent: nothing to learn about resumes
            except WakeFailed as exc:
                self.ledger.action(gpu, "failed", flight.cause)
                elapsed = clock.now() - flight.started
                self.store.record_resume(
                    gpu.id, elapsed, ok=False, at=clock.wall(), reason=str(exc)
                )
                self.estimator.record_resume(gpu.id, elapsed, ok=False)
                raise

    async def _until_running(self, gpu: Gpu, flight: Flight, *, adopt: bool) -> bool:
        """Drive the cloud to "running"; True when it had to resume (it was not running)."""
        timing = self.config.timing
        clock = self.clock
        ws = gpu.ws
        asked_at: float | None = None
        if adopt:
            # Recorded before a restart: did it reach the cloud? Look now, not after a
            # startup timeout (fault run 4 of issue 9: killed between record and send).
            ws = await self._read(gpu, ws, "resuming")
            if ws.shows("resume"):
                asked_at = flight.started
            elif ws.status == "paused":
                log.info("the resume of %s recorded before the restart never reached the "
                         "cloud; sending it now", gpu.name)
                flight.started = clock.now()
        deadline = flight.started + timing.startup_timeout_seconds
        progressed = False
        resumed = ws.status != "running"
        while True:
            if not self.hooks.apply_workspace(gpu, ws):
                raise WakeFailed(f"{gpu.name} vanished from the cloud while resuming")
            status = ws.status
            if status == "running":
                if not flight.accepted.done():
                    flight.accepted.set_result(None)
                return resumed
            if ws.shows("resume"):
                progressed = True
            if status == "paused":
                failed = ws.last_action == "resume" and ws.last_action_status == "failed"
                if failed and progressed:
                    why = ws.last_action_error or "the resume action failed"
                    raise WakeFailed(f"the cloud could not resume {gpu.name}: {why}")
                lost = asked_at is None or (
                    not progressed and clock.now() - asked_at > BRIDGE_SECONDS
                )
                if lost:
                    ws = await self._ask_resume(gpu, flight, ws)
                    asked_at = clock.now()
                    if not flight.accepted.done():
                        flight.accepted.set_result(None)
                    self.hooks.stage(gpu, flight, "resuming")
                    continue
            if status in ERROR_STATUSES:
                raise WakeFailed(f"{gpu.name} is '{status}' in the cloud")
            if not flight.accepted.done():
                flight.accepted.set_result(None)
            if flight.stage != "resuming":
                self.hooks.stage(gpu, flight, "resuming")
            remaining = deadline - clock.now()
            if remaining <= 0:
                raise WakeFailed(
                    f"{gpu.name} was still '{status}' after "
                    f"{timing.startup_timeout_seconds:g} s (timing.startup_timeout_seconds)"
                )
            since = clock.now() - (flight.started if asked_at is None else asked_at)
            pace = cloud_poll_seconds(since, self.estimator.resume_seconds(gpu.id))
            await clock.sleep(min(pace, timing.poll_interval_seconds, remaining))
            ws = await self._read(gpu, ws, "resuming")

    async def _ask_resume(self, gpu: Gpu, flight: Flight, last: Workspace) -> Workspace:
        # On the ledger before it is sent: a crash after the call still says who caused it.
        self.ledger.action(gpu, "resuming", flight.cause)
        flight.recorded = True
        try:
            ws = await self.cloud.resume(gpu.id)
        except ActionRefused:
            # Usually "already resuming": look at what the cloud is doing instead.
            return await self._read(gpu, gpu.ws, "resuming")
        except GpuNotFound:
            raise WakeFailed(f"{gpu.name} vanished from the cloud while resuming") from None
        except ActionUncertain as exc:
            # It may still arrive: watch the workspace; asked again only if nothing moves
            # within the cloud's bridge time.
            self.hooks.count("resume")
            log.warning("%s; watching whether it arrives", exc)
            return last
        except CloudError as exc:
            # The provider already read back and retried: the cloud did not take it.
            text = str(exc)
            raise WakeFailed(
                text if gpu.name in text else f"the cloud failed to resume {gpu.name}: {text}"
            ) from None
        self.hooks.count("resume")
        log.info("asked the cloud to resume %s", gpu.name)
        return ws

    async def _read(self, gpu: Gpu, last: Workspace, doing: str) -> Workspace:
        try:
            return await self.cloud.get_workspace(gpu.id)
        except GpuNotFound:
            raise WakeFailed(f"{gpu.name} vanished from the cloud while {doing}") from None
        except CloudError as exc:
            log.warning("could not read %s while %s: %s", gpu.name, doing, exc)
            return last

    async def pause(self, gpu: Gpu, flight: Flight, *, adopt: bool = False) -> None:
        """Pause ``gpu`` and wait until the cloud says paused (or give up, logged)."""
        clock = self.clock
        with self._recorded(gpu, flight, adopt=adopt, failure=GpuctlError):
            ws = gpu.ws
            if ws.status not in ("paused", "pausing") and not adopt:
                self.ledger.action(gpu, "pausing", flight.cause)
                flight.recorded = True
                try:
                    ws = await self.cloud.pause(gpu.id)
                except ActionRefused as exc:
                    gpu.last_error = f"the cloud refused to pause {gpu.name}: {exc}"
                    ws = await self.cloud.get_workspace(gpu.id)
                    if ws.status not in ("paused", "pausing"):
                        raise
                self.hooks.count("pause")
                log.info("asked the cloud to pause %s", gpu.name)
            if not flight.accepted.done():
                flight.accepted.set_result(None)
            deadline = flight.started + self.config.timing.startup_timeout_seconds
            asked = ws.status != "paused"
            while self.hooks.apply_workspace(gpu, ws) and ws.status != "paused":
                remaining = deadline - clock.now()
                if remaining <= 0:
                    log.warning("%s still '%s' after asking to pause", gpu.name, ws.status)
                    break
                await clock.sleep(
                    min(CLOUD_POLL_SECONDS, self.config.timing.poll_interval_seconds, remaining)
                )
                try:
                    ws = await self._read(gpu, ws, "pausing")
                except WakeFailed:
                    break
            if asked and ws.status == "paused" and not adopt:
                # Learnt so a request can tell when a pausing GPU could be up again.
                self.estimator.record_pause(gpu.id, clock.now() - flight.started)

    @contextlib.contextmanager
    def _recorded(
        self, gpu: Gpu, flight: Flight, *, adopt: bool, failure: type[GpuctlError]
    ) -> Iterator[None]:
        """Run one action on the record, and settle its flight.

        The action is pending in the store from before the cloud is asked (an adopted one
        already is) until it ends, as a success or a ``failure``; one cut short otherwise
        (the engine stopping) stays pending for the next engine to adopt. A failure becomes
        the GPU's last error and the outcome of ``flight.accepted`` if the cloud had not yet
        accepted the action.
        """
        if not adopt:
            self.store.begin_action(gpu.id, flight.kind, self.clock.wall())
        finished = False
        try:
            yield
            finished = True
        except failure as exc:
            finished = True
            gpu.last_error = str(exc)
            if not flight.accepted.done():
                flight.accepted.set_exception(exc)
            if isinstance(exc, NodeDown):
                log.warning("%s; marked failed, its requests go to another GPU", exc)
            else:
                log.warning("%s of %s failed: %s", flight.kind, gpu.name, exc)
            raise
        finally:
            if not flight.accepted.done():
                flight.accepted.set_result(None)
            if finished:
                self.store.end_action(gpu.id)
