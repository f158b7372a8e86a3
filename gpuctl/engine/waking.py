"""Wake on demand and idle pause: when a GPU is resumed or paused, one flight at a time.

Resuming a GPU is where gpuctl spends money and makes callers wait minutes, so that policy
lives here, apart from the hot path of routing and slots. Waiting requests are supplied by
one task per model (``ensure_supply``): it wakes the best paused GPU for the model
(``candidates``), moves on to the next when a resume fails, wakes a GPU never seen awake to
learn its models when nobody is known to have the model, and wakes one more when the queue's
expected wait exceeds a wake. The waker also pauses GPUs left idle past their grace, carries
on with the cloud actions a previous engine left in flight, and runs the admin wake and pause.

Each resume or pause is one ``Flight`` on its GPU (``gpu.waking``/``gpu.pausing``), joined by
everyone who wants it; ``actions.Actions`` does the cloud work. The waker owns the suppliers
and the resume durations kept for metrics. It reads the roster's GPUs and refiles one whose
flight begins or ends; the queue, catalog, leases and estimates are the engine's, which also
hands in ``drain`` (give a ready GPU's free slots to waiters) and ``count`` (for metrics).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gpuctl.cloud.base import CloudProvider
from gpuctl.config import Config
from gpuctl.engine.actions import Actions
from gpuctl.engine.api import GpuState, Progress, ProgressCallback
from gpuctl.engine.background import Background
from gpuctl.engine.catalog import ModelCatalog, not_found
from gpuctl.engine.clock import Clock, wait_with_timeout
from gpuctl.engine.estimates import Estimator
from gpuctl.engine.fairqueue import FairQueue
from gpuctl.engine.fleet import Flight, Gpu, WakeStage
from gpuctl.engine.leases import LeaseBook, reservation_seconds
from gpuctl.engine.pausepolicy import PausePolicy
from gpuctl.engine.progress import notify
from gpuctl.engine.roster import Roster
from gpuctl.errors import ActionRefused, NodeDown, NotCloudManaged, Unavailable, WakeFailed
from gpuctl.store import Store

__all__ = ["METRIC_HISTORY", "RETRY_AFTER_FAILED_WAKES", "SUPPLY_RECHECK_SECONDS", "Waker"]

log = logging.getLogger(__name__)

#: How often a queued request may trigger weighing one more wake for its model.
SUPPLY_RECHECK_SECONDS = 1.0
#: Resume durations kept for ``metrics()``.
METRIC_HISTORY = 100
#: Least ``Retry-After`` once no GPU with a model could be woken (a flaky cloud recovers in
#: about this long; a cloud out of GPUs is not hammered).
RETRY_AFTER_FAILED_WAKES = 30.0


class Waker:
    """Decides when a GPU is resumed or paused, and runs each as one shared flight.

    Apart from the engine because waking is slow, costly policy (which GPU, whether one
    more is worth it, when to give up) that the hot path of routing must never wait on: the
    engine only asks it to ``ensure_supply`` a model that has waiters.
    """

    def __init__(
        self,
        config: Config,
        cloud: CloudProvider,
        *,
        clock: Clock,
        store: Store,
        roster: Roster,
        queue: FairQueue,
        catalog: ModelCatalog,
        estimator: Estimator,
        leases: LeaseBook,
        actions: Actions,
        background: Background,
        drain: Callable[[Gpu], None],
        count: Callable[[str], None],
        policy: PausePolicy | None = None,
    ) -> None:
        self._config = config
        self._cloud = cloud
        self._clock = clock
        self._store = store
        self._gpus = roster.gpus
        self._refile = roster.refile
        self._queue = queue
        self._catalog = catalog
        self._estimator = estimator
        self._leases = leases
        self._actions = actions
        self._background = background
        self._drain = drain
        self._count = count
        self._policy = policy if policy is not None else PausePolicy(config)
        self._suppliers: dict[str, asyncio.Task[None]] = {}
        self._supply_checked: dict[str, float] = {}
        #: The actions a previous engine left pending were taken over (``adopt_pending``).
        self.adopted = False
        #: The last ``METRIC_HISTORY`` resume durations, for metrics.
        self.resume_durations: list[float] = []

    def tasks(self) -> list[asyncio.Task[None]]:
        """The suppliers and the resume and pause flights, for a stop to cancel."""
        tasks = list(self._suppliers.values())
        for gpu in self._gpus.values():
            for flight in (gpu.waking, gpu.pausing):
                if flight is not None and flight.task is not None:
                    tasks.append(flight.task)
        return tasks

    # -- who could be woken ------------------------------------------------------------------

    def unknown_candidates(self) -> bool:
        """Some GPU we could wake has never been seen awake, so its models are unknown."""
        return any(
            g.models is None and g.state is not GpuState.UNAVAILABLE and (
                self._cloud.managed or g.state is GpuState.STARTING
            )
            for g in self._gpus.values()
        )

    def candidates(self, model: str, tried: set[str]) -> list[Gpu]:
        """GPUs that could be woken for ``model``, best first.

        The ones that had the model when last seen, then — only if no GPU is known to have
        it — the ones never seen awake. Within a tier: fewer recent failures, then the one
        expected up soonest (``ready_in``): a wake under way is joined when it lands first
        (joining costs nothing), and a GPU still pausing counts the pause it must finish,
        so its paused twin goes first.
        """
        known = self._catalog.known(model)
        ranked: list[tuple[tuple[int, int, float, int, str], Gpu]] = []
        for gpu in self._gpus.values():
            if gpu.id in tried or gpu.state.ready:
                continue
            if gpu.state is GpuState.UNAVAILABLE and gpu.waking is None:
                continue
            if gpu.has(model):
                tier = 0
            elif gpu.models is None and not known:
                tier = 1
            else:
                continue
            if gpu.waking is None and not self._cloud.managed:
                continue
            rank = (
                tier,
                self._estimator.recent_failures(gpu.id),
                self.ready_in(gpu),
                0 if gpu.waking is not None else 1,
                gpu.name,
            )
            ranked.append((rank, gpu))
        ranked.sort(key=lambda pair: pair[0])
        return [gpu for _, gpu in ranked]

    def waking_for(self, model: str) -> str | None:
        """The GPU being woken for the waiters of ``model``, if one is (for the ledger)."""
        for gpu_id in self._catalog.holders(model):
            gpu = self._gpus.get(gpu_id)
            if gpu is not None and gpu.waking is not None and model in gpu.waking.models:
                return gpu.id
        return None

    def ready_in(self, gpu: Gpu) -> float:
        """Seconds, about, until ``gpu`` could serve if woken now: what is left of a pause
        under way, then a resume (or what is left of the resume under way)."""
        now = self._clock.now()
        estimator = self._estimator
        pause_left = 0.0
        if gpu.pausing is not None:
            pause_left = max(0.0, estimator.pause_seconds(gpu.id) - (now - gpu.pausing.started))
        elif gpu.state is GpuState.PAUSING:  # paused by someone else: its start is unknown
            pause_left = estimator.pause_seconds(gpu.id)
        if gpu.waking is not None and not pause_left:
            return max(0.0, estimator.resume_seconds(gpu.id) - (now - gpu.waking.started))
        return pause_left + estimator.resume_seconds(gpu.id)

    def resume_left(self, model: str) -> float:
        """Seconds, about, until the wake under way (or the best one to begin) for ``model``
        has a GPU up: a queued request's estimate while no GPU serves the model."""
        for gpu_id in self._catalog.holders(model):
            gpu = self._gpus.get(gpu_id)
            if gpu is not None and gpu.waking is not None:
                elapsed = self._clock.now() - gpu.waking.started
                return max(0.0, self._estimator.resume_seconds(gpu.id) - elapsed)
        best = self.candidates(model, set())
        return self._estimator.resume_seconds(best[0].id) if best else 0.0

    # -- supplying the queue -----------------------------------------------------------------

    def ensure_supply(self, model: str, *, recheck: bool = True) -> None:
        """Make sure someone works on getting GPUs for the waiters of ``model``.

        While GPUs with the model are up, whether the queue is long enough to wake one more
        is weighed at most once per ``SUPPLY_RECHECK_SECONDS`` (and on every tick), not on
        every queued request: weighing looks at the whole fleet.
        """
        task = self._suppliers.get(model)
        if (task is not None and not task.done()) or self._background.stopping:
            return
        if not self._queue.depth(model):
            return
        now = self._clock.now()
        recent = now - self._supply_checked.get(model, -1e18) < SUPPLY_RECHECK_SECONDS
        if recent and not recheck and self._catalog.serving_slots(model):
            return
        self._supply_checked[model] = now
        self._suppliers[model] = self._background.spawn(self._supply(model))

    def resupply(self) -> None:
        """``ensure_supply`` for every model with waiters (the fleet changed under them)."""
        for model in self._queue.models():
            self.ensure_supply(model)

    def _worth_another(self, model: str) -> bool:
        """The queue's wait is longer than waking one more GPU with the model takes."""
        depth = self._queue.depth(model)
        if not depth:
            return False
        wait = self._estimator.queue_wait(model, depth, self._catalog.serving_slots(model))
        best = [g for g in self.candidates(model, set()) if g.has(model)]
        if not best:
            return False
        if best[0].waking is not None:
            return False  # one is already on its way; let it land first
        wake = self._estimator.resume_seconds(best[0].id) + self._estimator.load_seconds(model)
        return wait > wake

    async def _supply(self, model: str) -> None:
        """Wake GPUs for ``model`` until its waiters are served or no candidate is left."""
        tried: set[str] = set()
        reasons: list[str] = []
        serving_slots = self._catalog.serving_slots
        while self._queue.depth(model) and not self._background.stopping:
            if serving_slots(model) and not self._worth_another(model):
                return
            candidates = self.candidates(model, tried)
            if not candidates:
                if serving_slots(model):
                    return
                unseen = [g for g in tried if (gpu := self._gpus.get(g)) is not None
                          and gpu.models is None]
                if not self._catalog.known(model) and not unseen:
                    name = self._queue.head(model)
                    self._queue.fail(model, not_found(name.given_name if name else model))
                elif not self._cloud.managed:
                    poll = self._config.timing.poll_interval_seconds
                    self._queue.fail(model, Unavailable(
                        f"no host with {model} is answering right now", retry_after=poll,
                        hint="Static hosts are started by hand; check that Ollama runs there.",
                    ))
                else:
                    # Some GPU has the model, or may have it (one we could not wake to look):
                    # never "not found" (fault run 3 of issue 9), but try again later.
                    why = "; ".join(reasons) or "none of the GPUs with it can be resumed"
                    self._count("wake_failures")
                    error = WakeFailed(f"could not wake any GPU with {model}: {why}",
                                       retry_after=self._retry_after_failed_wakes())
                    self._queue.fail(model, error)
                return
            gpu = candidates[0]
            tried.add(gpu.id)
            flight = self._start_wake(gpu, grace=gpu.has(model),
                                      cause="gateway" if gpu.has(model) else "probe")
            flight.models.add(model)
            if flight.task is None:  # pragma: no cover - _start_wake always sets it
                return
            try:
                await asyncio.shield(flight.task)
            except WakeFailed as exc:
                reasons.append(str(exc))
            except asyncio.CancelledError:
                if self._background.stopping or not flight.task.cancelled():
                    raise
                reasons.append(f"the resume of {gpu.name} was cancelled")
            except Exception as exc:
                reasons.append(f"{gpu.name}: {exc}")

    def _retry_after_failed_wakes(self) -> float:
        """When to try again after every wake for a model failed: a poll interval, so the
        next try sees the fleet afresh, but at least ``RETRY_AFTER_FAILED_WAKES``."""
        return max(RETRY_AFTER_FAILED_WAKES, self._config.timing.poll_interval_seconds)

    # -- the flights -------------------------------------------------------------------------

    def _start_wake(
        self, gpu: Gpu, *, grace: bool, adopt: bool = False, started: float | None = None,
        cause: str = "gateway",
    ) -> Flight:
        """The one resume flight of ``gpu``: joined if under way, begun if not."""
        if gpu.waking is not None:
            gpu.waking.grace = gpu.waking.grace or grace
            return gpu.waking
        flight = Flight.begin(
            "resume", self._clock.now() if started is None else started, grace=grace,
            cause=cause, recorded=adopt,
        )
        gpu.waking = flight
        flight.task = self._background.spawn(self._wake(gpu, flight, adopt))
        self._refile(gpu)
        return flight

    async def _wake(self, gpu: Gpu, flight: Flight, adopt: bool) -> None:
        try:
            elapsed = await self._actions.resume(gpu, flight, adopt=adopt)
            self.resume_durations.append(elapsed)
            del self.resume_durations[:-METRIC_HISTORY]
            now = self._clock.now()
            gpu.grace_until = now + reservation_seconds(self._config) if flight.grace else now
            gpu.idle_since = now
        except NodeDown:
            raise  # no resume was sent, so none failed
        except WakeFailed:
            self._count("wake_failures")
            raise
        finally:
            if gpu.waking is flight:
                gpu.waking = None
            self._refile(gpu)
        self.stage(gpu, flight, "ollama_ready")
        self._drain(gpu)

    def _start_pause(self, gpu: Gpu, *, adopt: bool = False, cause: str = "gateway") -> Flight:
        """The one pause flight of ``gpu``: joined if under way, begun if not."""
        if gpu.pausing is not None:
            return gpu.pausing
        flight = Flight.begin("pause", self._clock.now(), cause=cause, recorded=adopt)
        gpu.pausing = flight
        gpu.node_ready = False
        flight.task = self._background.spawn(self._pause(gpu, flight, adopt))
        self._refile(gpu)
        return flight

    async def _pause(self, gpu: Gpu, flight: Flight, adopt: bool) -> None:
        try:
            await self._actions.pause(gpu, flight, adopt=adopt)
        finally:
            if gpu.pausing is flight:
                gpu.pausing = None
            gpu.loaded = set()
            gpu.ps = []
            self._refile(gpu)
            for model in self._queue.models():
                if gpu.has(model):
                    self.ensure_supply(model)

    def stage(self, gpu: Gpu, flight: Flight, stage: WakeStage) -> None:
        """Tell the flight's listeners, and the requests queued on it, that it reached ``stage``."""
        flight.stage = stage
        elapsed = self._clock.now() - flight.started
        left = max(0.0, self._estimator.resume_seconds(gpu.id) - elapsed)
        messages = {
            "resuming": f"waking {gpu.name}: the cloud is resuming it",
            "running": f"{gpu.name} is running; waiting for Ollama to answer",
            "ollama_ready": f"{gpu.name} is ready",
        }
        progress = Progress(
            stage=stage,
            gpu_id=gpu.id,
            gpu_name=gpu.name,
            estimate_seconds=0.0 if stage == "ollama_ready" else left,
            elapsed_seconds=elapsed,
            message=messages.get(stage, stage),
        )
        for callback in flight.listeners:
            notify(callback, progress)
        for model in flight.models:
            for waiter in self._queue.waiters(model):
                if waiter.wake_gpu is None:
                    waiter.wake_gpu = gpu.id
                if waiter.progress is not None:
                    notify(waiter.progress, progress)

    # -- idle pause and adoption -------------------------------------------------------------

    def pause_idle(self, now: float) -> None:
        """Pause every GPU the pause policy (or, without one, the leases) lets go, and wake
        the ones it wants up: pre-warm and ``[[schedule]]`` (when ``gpu.auto_pause`` is on)."""
        if self._config.gpu.auto_pause and self._cloud.managed:
            for gpu in list(self._gpus.values()):
                if self._idle(gpu, now):
                    self._start_pause(gpu)
            self._prewarm(now)

    def _idle(self, gpu: Gpu, now: float) -> bool:
        """Paused on the next tick: up, unused, nobody waiting, and then either the pause
        policy says so or (it has no opinion) no lease holds it and its grace is over."""
        if gpu.waking is not None or gpu.pausing is not None or gpu.in_use:
            return False
        if gpu.state is not GpuState.IDLE and not (
            gpu.state is GpuState.UNAVAILABLE and gpu.ws.status == "running"
        ):
            return False
        if not gpu.ws.can_pause or any(m in (gpu.models or {}) for m in self._queue.models()):
            return False
        decision = self._policy_says(gpu, now)
        if decision is not None:
            return decision
        return now >= gpu.grace_until and not self._leases.leased(gpu.id)

    def _breakeven(self, gpu: Gpu) -> float:
        """Seconds of idling that cost what a pause and a resume of ``gpu`` cost."""
        return self._estimator.resume_seconds(gpu.id) + self._estimator.pause_seconds(gpu.id)

    def _policy_says(self, gpu: Gpu, now: float) -> bool | None:
        """The pause policy's word on an idle ``gpu`` (``None``: the leases decide)."""
        if not self._policy.adaptive and not self._policy.schedules:
            return None  # the fixed policy and no schedule: skip the walk over the fleet
        key = tuple(sorted(gpu.models or ()))
        level = sum(
            1 for other in self._gpus.values()
            if other is not gpu and other.ready and tuple(sorted(other.models or ())) == key
            and (other.in_use > 0 or other.idle_since > gpu.idle_since)
        )
        wall = self._clock.wall()
        return self._policy.pause_idle(
            key=key, name=gpu.name, gpu_id=gpu.id, idle_since=wall - (now - gpu.idle_since),
            now=wall, breakeven=self._breakeven(gpu),
            resume=self._estimator.resume_seconds(gpu.id), level=level,
        )

    def _prewarm(self, now: float) -> None:
        """Wake a GPU a resume ahead of demand the policy expects, or a schedule asks for."""
        policy = self._policy
        if not policy.adaptive and not policy.schedules:
            return
        wall = self._clock.wall()
        groups: dict[tuple[str, ...], list[Gpu]] = {}
        for gpu in list(self._gpus.values()):
            if gpu.state is GpuState.PAUSED and policy.awake(
                gpu.name, gpu.id, wall + self.ready_in(gpu)
            ):
                log.info("waking %s: a schedule wants it up", gpu.name)
                self._start_wake(gpu, grace=False)
            if gpu.models:
                groups.setdefault(tuple(sorted(gpu.models)), []).append(gpu)
        if not policy.adaptive:
            return
        for key, gpus in groups.items():
            paused = sorted((g for g in gpus if g.state is GpuState.PAUSED),
                            key=lambda g: (self.ready_in(g), g.name))
            if not paused or any(g.ready or g.waking is not None for g in gpus):
                continue
            best = paused[0]
            if best.waking is None and policy.wanted(key, wall, self.ready_in(best),
                                                     self._breakeven(best)):
                log.info("pre-warming %s: requests usually come about now", best.name)
                self._start_wake(best, grace=False)

    def adopt_pending(self) -> None:
        """Carry on with the cloud actions a previous engine left in flight (never resend)."""
        self.adopted = True
        timing = self._config.timing
        wall, now = self._clock.wall(), self._clock.now()
        for action in self._store.pending_actions().values():
            gpu = self._gpus.get(action.gpu_id)
            age = wall - action.started_at
            ws = gpu.ws if gpu is not None else None
            if gpu is None or ws is None:
                self._store.end_action(action.gpu_id)
            elif action.action == "resume":
                failed = ws.last_action == "resume" and ws.last_action_status == "failed"
                under_way = ws.status in ("resuming", "running") or (
                    ws.status == "paused" and not failed
                )
                if gpu.state.ready:
                    under_way = False
                limit = timing.startup_timeout_seconds + timing.ollama_readiness_wait_seconds
                if under_way and age < limit:
                    log.info("adopting the resume of %s begun %.0f s ago", gpu.name, age)
                    self._start_wake(gpu, grace=True, adopt=True, started=now - age)
                else:
                    self._store.end_action(gpu.id)
            elif action.action == "pause" and ws.status == "pausing":
                self._start_pause(gpu, adopt=True)
            else:
                self._store.end_action(gpu.id)

    # -- by hand -----------------------------------------------------------------------------

    async def wake_by_hand(
        self, gpu: Gpu, *, wait: bool, timeout: float | None, progress: ProgressCallback | None,
        cause: str = "hand",
    ) -> str:
        """The admin ``wake``: resume ``gpu`` (single-flight); returns what to tell the admin."""
        if gpu.state.ready:
            return f"{gpu.name} is already running"
        if not self._cloud.managed:
            raise NotCloudManaged(f"{gpu.name} is a static host; gpuctl cannot start it")
        if gpu.pausing is not None:
            raise ActionRefused(
                f"{gpu.name} is pausing; resume it once it is paused",
                hint="Try again in a minute, or check `gpuctl status`.",
            )
        flight = self._start_wake(gpu, grace=True, cause=cause)
        if progress is not None:
            flight.listeners.append(progress)
        try:
            if not wait:
                await asyncio.shield(flight.accepted)
                return (f"resuming {gpu.name}; it usually takes "
                        f"{self._estimator.resume_seconds(gpu.id):.0f} s")
            if flight.task is not None:
                await wait_with_timeout(self._clock, asyncio.shield(flight.task), timeout)
        except TimeoutError:
            raise WakeFailed(
                f"{gpu.name} was not ready within {timeout:g} s; it keeps resuming",
                hint="Check it later with `gpuctl status`.",
            ) from None
        finally:
            if progress is not None and progress in flight.listeners:
                flight.listeners.remove(progress)
        return f"{gpu.name} is running and Ollama answers"

    async def pause_by_hand(self, gpu: Gpu, *, wait: bool) -> str:
        """The admin ``pause`` (single-flight); returns what to tell the admin."""
        if gpu.state is GpuState.PAUSED:
            return f"{gpu.name} is already paused"
        if not self._cloud.managed:
            raise NotCloudManaged(f"{gpu.name} is a static host; gpuctl cannot stop it")
        if gpu.waking is not None:
            raise ActionRefused(
                f"{gpu.name} is resuming; pause it once it is up",
                hint="Try again in a minute, or check `gpuctl status`.",
            )
        busy = gpu.in_use
        flight = self._start_pause(gpu, cause="hand")
        if wait and flight.task is not None:
            await asyncio.shield(flight.task)
        else:
            await asyncio.shield(flight.accepted)
        message = f"pausing {gpu.name}" if not wait else f"{gpu.name} is paused"
        if busy:
            message += f" ({busy} request{'s' if busy > 1 else ''} in flight on it will fail)"
        return message
