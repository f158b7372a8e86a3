"""The engine: one object that both faces (CLI and gateway) call, holding all fleet policy.

It ties the pieces together: the fleet records (``fleet``), the router's index (``router``),
the fair queue (``fairqueue``), leases (``leases``), estimates (``estimates``), the cloud
actions (``actions``) and the durable store. Everything runs on one event loop, so a check
and the change it allows happen with no ``await`` between them: a GPU is never paused with a
request in flight, a slot is never granted twice.

The hot path is ``acquire`` with a free slot (an index lookup, a lease, a ticket) and
``release`` (a counter, a lease, a sum in memory, and handing the slot to the next waiter).
Neither touches the disk. Everything slow — the cloud, the nodes, SQLite writes of leases and
usage — happens in the background loop every ``timing.poll_interval_seconds`` or in the
single-flight wake and pause tasks.

Waiting requests are supplied by one task per model (``_supply``): it wakes the best paused
GPU for the model, moves on to the next when a resume fails, wakes a GPU never seen awake to
learn its models when nobody is known to have the model, and wakes one more when the queue's
expected wait exceeds a wake. ``apply_workspace``, ``probe``, ``stage`` and ``count`` are the
hooks the cloud actions (``actions.Actions``) call back into; ``tick`` is one round of the
background loop's housekeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuctl.cloud.base import CloudProvider, Workspace
from gpuctl.config import Config
from gpuctl.engine.actions import Actions
from gpuctl.engine.api import (
    ActionResult,
    EngineMetrics,
    GpuState,
    GpuView,
    ModelView,
    Progress,
    ProgressCallback,
    Ticket,
    Usage,
)
from gpuctl.engine.catalog import ModelCatalog
from gpuctl.engine.clock import Clock, SystemClock, wait_with_timeout
from gpuctl.engine.estimates import Estimator
from gpuctl.engine.fairqueue import FairQueue, Waiter
from gpuctl.engine.fleet import Flight, Gpu, WakeStage, derive_state, normalize_model
from gpuctl.engine.leases import LeaseBook
from gpuctl.engine.router import Choice, RouteIndex
from gpuctl.engine.views import find_gpu, gpu_metrics, gpu_view, ps_entries, union_models
from gpuctl.errors import (
    ActionRefused,
    CloudError,
    GpuctlError,
    ModelNotFound,
    NotCloudManaged,
    Unavailable,
    WakeFailed,
)
from gpuctl.store import LeaseRecord, Store

if TYPE_CHECKING:  # gpuctl.node.base imports the engine's api: no cycle at run time
    from gpuctl.node.base import NodeProbe

__all__ = ["Engine", "NodeFactory"]

log = logging.getLogger(__name__)

NodeFactory = Callable[[Workspace], "NodeProbe"]

#: How many nodes are probed at once during a refresh.
PROBE_CONCURRENCY = 16
#: A load shorter than this was a warm hit, not a load worth learning from.
LOAD_SECONDS = 0.5
#: How often a queued request may trigger weighing one more wake for its model.
SUPPLY_RECHECK_SECONDS = 1.0
#: Resume durations kept for ``metrics()``.
METRIC_HISTORY = 100


@dataclass(eq=False)
class _Grant:
    gpu: Gpu
    user: str
    model: str
    at: float
    lease_seconds: float


def _default_nodes(config: Config) -> NodeFactory:
    """HTTP node clients over ``gpu.ollama_url``, with the node token from the environment."""
    # Imported here: gpuctl.node imports the engine's api, so a top-level import would cycle.
    from gpuctl.node.client import NodeClient

    token = os.environ.get("GPUCTL_NODE_TOKEN")
    template = config.gpu.ollama_url

    def make(ws: Workspace) -> NodeProbe:
        return NodeClient.for_workspace(ws, template, token=token)

    return make


def not_found(model: str) -> ModelNotFound:
    """Ollama's own words for a model it does not have, so clients recognise them."""
    return ModelNotFound(f'model "{model}" not found, try pulling it first')


class Engine:
    """Fleet state, routing, slots, the fair queue, leases, wake on demand and idle pause."""

    def __init__(
        self,
        config: Config,
        cloud: CloudProvider,
        store: Store,
        *,
        clock: Clock | None = None,
        nodes: NodeFactory | None = None,
    ) -> None:
        self.config = config
        self.cloud = cloud
        self.store = store
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._nodes = nodes if nodes is not None else _default_nodes(config)
        self._slots = config.gpu.slots
        self._gpus: dict[str, Gpu] = {}
        self._index = RouteIndex(self._slots)
        self._leases = LeaseBook()
        self._saved_leases = -1
        self._queue = FairQueue(config.server.max_queue)
        self._estimator = Estimator(store.resume_history(), store.load_history())
        self._actions = Actions(config, cloud, self.clock, store, self._estimator, self)
        self._known = store.known_models()
        self._catalog = ModelCatalog()
        self._grants: dict[int, _Grant] = {}
        self._ticket_ids = itertools.count(1)
        self._suppliers: dict[str, asyncio.Task[None]] = {}
        self._supply_checked: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._adopted = False
        self._empty_before = False
        self._counters = {"resume": 0, "pause": 0, "wake_failures": 0, "granted": 0,
                          "rejected": 0}
        self._resume_durations: list[float] = []
        self._loads: list[tuple[str, float, float]] = []  # written by the next tick

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore leases, discover the fleet, adopt cloud actions in flight, start the loop."""
        now, wall = self.clock.now(), self.clock.wall()
        for record in self.store.load_leases(wall):
            seconds = record.seconds or self.config.timing.reservation_minutes * 60
            self._leases.hold(record.gpu_id, record.user, now + record.expires_at - wall, seconds)
        self._saved_leases = self._leases.version
        try:
            await self.refresh()
        except CloudError as exc:
            # A cloud outage at start is survivable: the loop keeps trying (and adopts the
            # pending actions once it sees the fleet). A rejected token (CredentialsError)
            # is not, and propagates.
            log.warning("fleet discovery failed at start; retrying every poll: %s", exc)
        else:
            self._adopt_pending()
        self._loop_task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop the loop and actions in flight (they stay pending for the next start)."""
        self._stopping = True
        tasks: list[asyncio.Task[Any]] = []
        if self._loop_task is not None:
            tasks.append(self._loop_task)
        tasks += list(self._suppliers.values())
        for gpu in self._gpus.values():
            for flight in (gpu.waking, gpu.pausing):
                if flight is not None and flight.task is not None:
                    tasks.append(flight.task)
        tasks += list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for model in self._queue.models():
            self._fail_waiters(model, Unavailable("gpuctl is shutting down", retry_after=10))
        self._persist()
        for gpu in self._gpus.values():
            await self._close_probe(gpu.probe)

    async def _run(self) -> None:
        while True:
            await self.clock.sleep(self.config.timing.poll_interval_seconds)
            try:
                await self.refresh()
                if not self._adopted:
                    self._adopt_pending()
            except GpuctlError as exc:
                log.warning("fleet refresh failed: %s", exc)
            except Exception:  # the loop must outlive any one bad poll
                log.exception("fleet refresh failed")
            try:
                self.tick()
            except Exception:
                log.exception("engine tick failed")

    def tick(self) -> None:
        """Periodic housekeeping: leases, idle pause, queue news, wakes, persistence."""
        now = self.clock.now()
        self._expire(now)
        if self.config.gpu.auto_pause and self.cloud.managed:
            for gpu in list(self._gpus.values()):
                if self._idle(gpu, now):
                    self._start_pause(gpu)
        for model in self._queue.models():
            self._tell_positions(model)
            self._ensure_supply(model)
        self._persist()

    def _persist(self) -> None:
        if self._leases.version != self._saved_leases:
            now, wall = self.clock.now(), self.clock.wall()
            self.store.save_leases(
                LeaseRecord(lease.gpu_id, lease.user, wall + lease.expires - now, lease.seconds)
                for lease in self._leases
            )
            self._saved_leases = self._leases.version
        loads, self._loads = self._loads, []
        for model, seconds, at in loads:
            self.store.record_load(model, seconds, at)
        self.store.flush()

    # -- discovery and probes ----------------------------------------------------------------

    async def refresh(self, *, probe: bool = True) -> None:
        """Re-discover the fleet (every page) and, unless ``probe=False``, probe the nodes."""
        workspaces = await self.cloud.list_workspaces()
        if not workspaces and self._gpus and not self._empty_before:
            # A cloud API glitch can list nothing; believe it only when it says so twice.
            self._empty_before = True
            log.warning("the cloud listed no workspaces; keeping the fleet until it agrees")
            return
        self._empty_before = not workspaces
        seen: set[str] = set()
        for ws in workspaces:
            seen.add(ws.id)
            gpu = self._gpus.get(ws.id)
            if gpu is None:
                self._add(ws)
            else:
                self.apply_workspace(gpu, ws)
        for gpu_id in [g for g in self._gpus if g not in seen]:
            self._drop(self._gpus[gpu_id], "vanished from the cloud")
        if probe:
            limit = asyncio.Semaphore(PROBE_CONCURRENCY)

            async def one(gpu: Gpu) -> None:
                async with limit:
                    await self.probe(gpu)

            await asyncio.gather(
                *(one(g) for g in list(self._gpus.values()) if g.ws.status == "running")
            )
        for gpu in list(self._gpus.values()):
            self._refile(gpu)
            self._drain(gpu)

    def _add(self, ws: Workspace) -> Gpu:
        gpu = Gpu(ws=ws, slots=self._slots)
        known = self._known.get(ws.id)
        if known is not None:
            self._catalog.set_models(gpu, [ModelView.model_validate(m) for m in known])
        self._gpus[ws.id] = gpu
        self.apply_workspace(gpu, ws)
        return gpu

    def _drop(self, gpu: Gpu, reason: str) -> None:
        log.warning("%s %s", gpu.name, reason)
        del self._gpus[gpu.id]
        gpu.last_error = reason
        gpu.node_ready = False
        self._index.remove(gpu.id)
        self._catalog.forget(gpu)
        self._leases.drop_gpu(gpu.id)
        self._spawn(self._close_probe(gpu.probe))
        for model in self._queue.models():
            self._ensure_supply(model)

    def apply_workspace(self, gpu: Gpu, ws: Workspace) -> bool:
        """Take in a fresh read of ``ws``; False when the GPU is no longer in the fleet."""
        if self._gpus.get(gpu.id) is not gpu:
            return False
        old = gpu.ws
        gpu.ws = ws
        address = (ws.ip, ws.fqdn, ws.host_name, ws.node_url)
        if gpu.probe is None or address != (old.ip, old.fqdn, old.host_name, old.node_url):
            if gpu.probe is not None:
                self._spawn(self._close_probe(gpu.probe))
                gpu.probe = None
            if any(address):
                try:
                    gpu.probe = self._nodes(ws)
                except GpuctlError as exc:  # e.g. the URL template needs a field not set yet
                    gpu.last_error = str(exc)
        now = self.clock.now()
        if ws.status == "running":
            if gpu.running_since is None:
                gpu.running_since = now
                if gpu.waking is None:
                    # Resumed outside the engine (by hand, or before we started): grace.
                    gpu.grace_until = max(gpu.grace_until, now + self._lease_seconds())
        else:
            gpu.running_since = None
            gpu.node_ready = False
        self._refile(gpu)
        return True

    async def probe(self, gpu: Gpu) -> bool:
        """Ask the node whether Ollama answers, and what it has; True when ready."""
        node = gpu.probe
        ok = False
        tags: list[ModelView] = []
        ps: list[dict[str, Any]] = []
        if node is not None and gpu.ws.status == "running":
            try:
                ok = await node.ready()
                if ok:
                    tags = await node.tags()
                    ps = await node.ps()
            except GpuctlError as exc:
                ok = False
                gpu.last_error = str(exc)
            except Exception as exc:  # a probe must never take the engine down
                ok = False
                gpu.last_error = f"probe failed: {exc}"
        if self._gpus.get(gpu.id) is not gpu or gpu.pausing is not None:
            return False
        if ok:
            if self._catalog.set_models(gpu, tags):
                self._save_models(gpu)
            gpu.ps = ps
            gpu.loaded = {normalize_model(str(p.get("name") or p.get("model") or "")) for p in ps}
            if gpu.last_error and gpu.waking is None:
                gpu.last_error = None
        gpu.node_ready = ok
        self._refile(gpu)
        self._drain(gpu)
        return ok

    def _save_models(self, gpu: Gpu) -> None:
        dumped = [v.model_dump() for v in (gpu.models or {}).values()]
        self._known[gpu.id] = dumped
        self.store.save_models(gpu.id, dumped, self.clock.wall())

    def _schedule_probe(self, gpu: Gpu) -> None:
        if gpu.probing is None or gpu.probing.done():

            async def run() -> None:
                await self.probe(gpu)

            gpu.probing = self._spawn(run())

    # -- state bookkeeping -------------------------------------------------------------------

    def _refile(self, gpu: Gpu) -> None:
        """Recompute the GPU's state and put it where the router will (or won't) find it."""
        if self._gpus.get(gpu.id) is not gpu:
            return
        wait = self.config.timing.ollama_readiness_wait_seconds
        gpu.state = state = derive_state(gpu, self.clock.now(), wait)
        gpu.ready = ready = state is GpuState.IDLE or state is GpuState.ACTIVE or (
            state is GpuState.BUSY
        )
        self._index.update(gpu, self._leases.leased(gpu.id))
        self._catalog.set_ready(gpu, ready)

    def _drain(self, gpu: Gpu) -> None:
        """Hand free slots on ``gpu`` to the fairest waiters it can serve.

        Not while a wake of ``gpu`` is still finishing: the wake first tells its waiters the
        GPU is ready, then hands it on.
        """
        if not len(self._queue) or not gpu.ready or not gpu.models or gpu.waking:
            return
        while gpu.in_use < gpu.slots and gpu.ready:
            waiter = self._queue.pop_for(gpu.models)
            if waiter is None:
                return
            if waiter.future.done():
                continue
            waited = self.clock.now() - waiter.enqueued_at
            loaded = "model loaded" if waiter.model in gpu.loaded else "model on disk"
            reason = (
                f"first in line after {waited:.0f} s, {loaded}, "
                f"{gpu.in_use}/{gpu.slots} slots in use"
            )
            ticket = self._grant(Choice(gpu, reason), waiter.model, waiter.user,
                                 waiter.given_name or waiter.model, waited)
            waiter.future.set_result(ticket)

    def _expire(self, now: float) -> None:
        next_expiry = self._leases.next_expiry()
        if next_expiry is None or next_expiry > now:
            return
        for gpu_id in self._leases.expire(now):
            gpu = self._gpus.get(gpu_id)
            if gpu is not None:
                self._refile(gpu)

    def _lease_seconds(self) -> float:
        return self.config.timing.reservation_minutes * 60.0

    def _idle(self, gpu: Gpu, now: float) -> bool:
        """Paused on the next tick: up, unused, unleased, past its grace, nobody waiting."""
        if gpu.waking is not None or gpu.pausing is not None or gpu.in_use:
            return False
        if gpu.state is not GpuState.IDLE and not (
            gpu.state is GpuState.UNAVAILABLE and gpu.ws.status == "running"
        ):
            return False
        if now < gpu.grace_until or self._leases.leased(gpu.id) or not gpu.ws.can_pause:
            return False
        return not any(m in (gpu.models or {}) for m in self._queue.models())

    # -- routing, slots and the queue ----------------------------------------------------------

    async def acquire(
        self, model: str, user: str, *, progress: ProgressCallback | None = None
    ) -> Ticket:
        """A slot on the best GPU for ``model``: at once, after queueing, or after a wake."""
        if self._stopping:
            raise Unavailable("gpuctl is shutting down", retry_after=10)
        name = normalize_model(model)
        now = self.clock.now()
        self._expire(now)
        if not self._queue.depth(name):
            choice = self._index.choose(name, user, self._leases.of_user(user))
            if choice is not None:
                return self._grant(choice, name, user, model, 0.0)
        if not self._catalog.known(name) and not self._unknown_candidates():
            raise not_found(model)
        if self._queue.full:
            self._counters["rejected"] += 1
            raise Unavailable(
                f"the queue is full ({self._queue.max_size} requests waiting); try again later",
                retry_after=self._retry_after(name),
            )
        future: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        waiter = self._queue.push(name, user, future, now, progress, model)
        choice = self._index.choose(name, user, self._leases.of_user(user))
        if choice is not None:  # a free slot nobody handed on yet: hand it on now
            self._drain(choice.gpu)
        if not future.done():
            self._tell_position(waiter)
            self._ensure_supply(name, recheck=False)
        timing = self.config.timing
        limit = self.config.server.queue_timeout_seconds
        if not self._catalog.ready_gpus(name):
            wake = timing.startup_timeout_seconds + timing.ollama_readiness_wait_seconds
            limit = max(limit, wake)
        try:
            return await self._await(future, limit)
        except TimeoutError:
            self._queue.remove(waiter)
            self._counters["rejected"] += 1
            raise Unavailable(
                f"no GPU with {model} had a free slot within {limit:g} s",
                retry_after=self._retry_after(name),
                hint="The GPUs are busy; try again later.",
            ) from None
        except asyncio.CancelledError:
            granted = future.done() and not future.cancelled() and future.exception() is None
            if not self._queue.remove(waiter) and granted:
                self.release(future.result())  # granted as we were cancelled: give it back
            raise

    async def _await(self, future: asyncio.Future[Ticket], limit: float) -> Ticket:
        timer: asyncio.Future[Any] = asyncio.ensure_future(self.clock.sleep(limit))
        waiting: set[asyncio.Future[Any]] = {future, timer}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        if future.done():
            return future.result()
        raise TimeoutError

    def _grant(self, choice: Choice, model: str, user: str, given: str, waited: float) -> Ticket:
        gpu = choice.gpu
        now = self.clock.now()
        held = self._leases.holders(gpu.id).get(user)
        if held is not None:
            seconds = held.seconds
        elif self._leases.leased(gpu.id):
            seconds = self.config.timing.fallback_reservation_minutes * 60.0
        else:
            seconds = self._lease_seconds()
        self._leases.hold(gpu.id, user, now + seconds, seconds)
        gpu.in_use += 1
        self._refile(gpu)
        ticket_id = next(self._ticket_ids)
        self._grants[ticket_id] = _Grant(gpu, user, model, now, seconds)
        self._counters["granted"] += 1
        return Ticket(
            id=ticket_id,
            gpu_id=gpu.id,
            gpu_name=gpu.name,
            base_url=gpu.probe.base_url if gpu.probe is not None else "",
            model=given,
            user=user,
            reason=choice.reason,
            waited_seconds=waited,
        )

    def release(
        self, ticket: Ticket, usage: Usage | None = None, *, failed: str | None = None
    ) -> None:
        """Free the slot, renew the user's lease, record usage; hand the slot on."""
        grant = self._grants.pop(ticket.id, None)
        if grant is None:
            return  # released twice: the first release counted
        now = self.clock.now()
        held = now - grant.at
        self.store.record_usage(
            grant.user,
            tokens_in=usage.tokens_in if usage else 0,
            tokens_out=usage.tokens_out if usage else 0,
            gpu_seconds=held,
            at=self.clock.wall(),
        )
        gpu = grant.gpu
        gpu.in_use -= 1
        if self._gpus.get(gpu.id) is not gpu:
            return  # the GPU left the fleet while this request ran
        self._leases.hold(gpu.id, grant.user, now + grant.lease_seconds, grant.lease_seconds)
        if failed is None:
            self._estimator.record_service(grant.model, held)
            if usage is not None and usage.load_seconds and usage.load_seconds >= LOAD_SECONDS:
                self._estimator.record_load(grant.model, usage.load_seconds)
                self._loads.append((grant.model, usage.load_seconds, self.clock.wall()))
            if grant.model not in gpu.loaded:
                # Ollama keeps a model it just served in memory: route the next one here
                # before the next probe says so.
                gpu.loaded.add(grant.model)
        else:
            gpu.last_error = failed
            gpu.node_ready = False
            self._schedule_probe(gpu)
        self._refile(gpu)
        self._drain(gpu)

    def queue_depth(self) -> int:
        return len(self._queue)

    def _serving_slots(self, model: str) -> int:
        return self._catalog.ready_gpus(model) * self._slots

    def _estimate(self, model: str, position: int) -> float:
        """Seconds until the ``position``-th waiter for ``model`` is served, about."""
        slots = self._serving_slots(model)
        if slots:
            return self._estimator.queue_wait(model, position, slots)
        flight = self._wake_for(model)
        if flight is not None:
            gpu, started = flight
            left = max(0.0, self._estimator.resume_seconds(gpu.id) - (self.clock.now() - started))
        else:
            best = self._candidates(model, set())
            left = self._estimator.resume_seconds(best[0].id) if best else 0.0
        left += self._estimator.load_seconds(model)
        return left + self._estimator.queue_wait(model, position, self._slots) - (
            self._estimator.service_seconds(model)
        )

    def _retry_after(self, model: str) -> float:
        return max(1.0, round(self._estimate(model, self._queue.depth(model) + 1)))

    def _tell_position(self, waiter: Waiter) -> None:
        if waiter.progress is None:
            return
        position = self._queue.position(waiter)
        waiter.last_position = position
        self._notify(
            waiter.progress,
            Progress(
                stage="queued",
                position=position,
                estimate_seconds=self._estimate(waiter.model, position),
                elapsed_seconds=self.clock.now() - waiter.enqueued_at,
                message=f"waiting for a GPU with {waiter.given_name}: number {position} in line",
            ),
        )

    def _tell_positions(self, model: str) -> None:
        for position, waiter in enumerate(self._queue.waiters(model), 1):
            if waiter.progress is not None and waiter.last_position != position:
                self._tell_position(waiter)

    @staticmethod
    def _notify(callback: ProgressCallback, progress: Progress) -> None:
        try:
            callback(progress)
        except Exception:  # a caller's callback must not break the engine
            log.exception("progress callback failed")

    def _fail_waiters(self, model: str, error: GpuctlError) -> None:
        for waiter in self._queue.waiters(model):
            self._queue.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(error)

    # -- wake on demand ----------------------------------------------------------------------

    def _unknown_candidates(self) -> bool:
        """Some GPU we could wake has never been seen awake, so its models are unknown."""
        return any(
            g.models is None and g.state is not GpuState.UNAVAILABLE and (
                self.cloud.managed or g.state is GpuState.STARTING
            )
            for g in self._gpus.values()
        )

    def _candidates(self, model: str, tried: set[str]) -> list[Gpu]:
        """GPUs that could be woken for ``model``, best first.

        Ones already waking first (joining costs nothing), then the ones that had the model
        when last seen, then — only if no GPU is known to have it — the ones never seen awake.
        Within a tier: fewer recent failures, then the fastest past resumer.
        """
        known = self._catalog.known(model)
        ranked: list[tuple[tuple[int, int, int, float, str], Gpu]] = []
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
            if gpu.waking is None and not self.cloud.managed:
                continue
            rank = (
                tier,
                0 if gpu.waking is not None else 1,
                self._estimator.recent_failures(gpu.id),
                self._estimator.resume_seconds(gpu.id),
                gpu.name,
            )
            ranked.append((rank, gpu))
        ranked.sort(key=lambda pair: pair[0])
        return [gpu for _, gpu in ranked]

    def _wake_for(self, model: str) -> tuple[Gpu, float] | None:
        for gpu_id in self._catalog.holders(model):
            gpu = self._gpus.get(gpu_id)
            if gpu is not None and gpu.waking is not None:
                return gpu, gpu.waking.started
        return None

    def _ensure_supply(self, model: str, *, recheck: bool = True) -> None:
        """Make sure someone works on getting GPUs for the waiters of ``model``.

        While GPUs with the model are up, whether the queue is long enough to wake one more
        is weighed at most once per ``SUPPLY_RECHECK_SECONDS`` (and on every tick), not on
        every queued request: weighing looks at the whole fleet.
        """
        task = self._suppliers.get(model)
        if (task is not None and not task.done()) or self._stopping:
            return
        if not self._queue.depth(model):
            return
        now = self.clock.now()
        recent = now - self._supply_checked.get(model, -1e18) < SUPPLY_RECHECK_SECONDS
        if recent and not recheck and self._serving_slots(model):
            return
        self._supply_checked[model] = now
        self._suppliers[model] = self._spawn(self._supply(model))

    def _worth_another(self, model: str) -> bool:
        """The queue's wait is longer than waking one more GPU with the model takes."""
        depth = self._queue.depth(model)
        if not depth:
            return False
        wait = self._estimator.queue_wait(model, depth, self._serving_slots(model))
        best = [g for g in self._candidates(model, set()) if g.has(model)]
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
        while self._queue.depth(model) and not self._stopping:
            if self._serving_slots(model) and not self._worth_another(model):
                return
            candidates = self._candidates(model, tried)
            if not candidates:
                if self._serving_slots(model):
                    return
                if not self._catalog.known(model):
                    name = self._queue.head(model)
                    self._fail_waiters(model, not_found(name.given_name if name else model))
                elif not self.cloud.managed:
                    poll = self.config.timing.poll_interval_seconds
                    self._fail_waiters(model, Unavailable(
                        f"no host with {model} is answering right now", retry_after=poll,
                        hint="Static hosts are started by hand; check that Ollama runs there.",
                    ))
                else:
                    why = "; ".join(reasons) or "none of the GPUs with it can be resumed"
                    self._counters["wake_failures"] += 1
                    error = WakeFailed(f"no GPU with {model} could be woken: {why}")
                    self._fail_waiters(model, error)
                return
            gpu = candidates[0]
            tried.add(gpu.id)
            flight = self._start_wake(gpu, grace=gpu.has(model))
            flight.models.add(model)
            if flight.task is None:  # pragma: no cover - _start_wake always sets it
                return
            try:
                await asyncio.shield(flight.task)
            except WakeFailed as exc:
                reasons.append(str(exc))
            except asyncio.CancelledError:
                if self._stopping or not flight.task.cancelled():
                    raise
                reasons.append(f"the resume of {gpu.name} was cancelled")
            except Exception as exc:
                reasons.append(f"{gpu.name}: {exc}")

    def _start_wake(
        self, gpu: Gpu, *, grace: bool, adopt: bool = False, started: float | None = None
    ) -> Flight:
        """The one resume flight of ``gpu``: joined if under way, begun if not."""
        if gpu.waking is not None:
            gpu.waking.grace = gpu.waking.grace or grace
            return gpu.waking
        loop = asyncio.get_running_loop()
        flight = Flight(
            kind="resume",
            started=self.clock.now() if started is None else started,
            accepted=loop.create_future(),
            grace=grace,
        )
        flight.accepted.add_done_callback(_consume)
        gpu.waking = flight
        flight.task = self._spawn(self._wake(gpu, flight, adopt))
        self._refile(gpu)
        return flight

    async def _wake(self, gpu: Gpu, flight: Flight, adopt: bool) -> None:
        try:
            elapsed = await self._actions.resume(gpu, flight, adopt=adopt)
            self._resume_durations.append(elapsed)
            del self._resume_durations[:-METRIC_HISTORY]
            now = self.clock.now()
            gpu.grace_until = now + self._lease_seconds() if flight.grace else now
        except WakeFailed:
            self._counters["wake_failures"] += 1
            raise
        finally:
            if gpu.waking is flight:
                gpu.waking = None
            self._refile(gpu)
        self.stage(gpu, flight, "ollama_ready")
        self._drain(gpu)

    def _start_pause(self, gpu: Gpu, *, adopt: bool = False) -> Flight:
        if gpu.pausing is not None:
            return gpu.pausing
        flight = Flight(
            kind="pause",
            started=self.clock.now(),
            accepted=asyncio.get_running_loop().create_future(),
        )
        flight.accepted.add_done_callback(_consume)
        gpu.pausing = flight
        gpu.node_ready = False
        flight.task = self._spawn(self._pause(gpu, flight, adopt))
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
                    self._ensure_supply(model)

    def _adopt_pending(self) -> None:
        """Carry on with the cloud actions a previous engine left in flight (never resend)."""
        self._adopted = True
        timing = self.config.timing
        wall, now = self.clock.wall(), self.clock.now()
        for action in self.store.pending_actions().values():
            gpu = self._gpus.get(action.gpu_id)
            age = wall - action.started_at
            ws = gpu.ws if gpu is not None else None
            if gpu is None or ws is None:
                self.store.end_action(action.gpu_id)
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
                    self.store.end_action(gpu.id)
            elif action.action == "pause" and ws.status == "pausing":
                self._start_pause(gpu, adopt=True)
            else:
                self.store.end_action(gpu.id)

    # -- FleetHooks for the actions ----------------------------------------------------------

    def stage(self, gpu: Gpu, flight: Flight, stage: WakeStage) -> None:
        flight.stage = stage
        elapsed = self.clock.now() - flight.started
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
            self._notify(callback, progress)
        for model in flight.models:
            for waiter in self._queue.waiters(model):
                if waiter.progress is not None:
                    self._notify(waiter.progress, progress)

    def count(self, action: str) -> None:
        self._counters[action] = self._counters.get(action, 0) + 1

    # -- admin actions -----------------------------------------------------------------------

    async def wake(
        self, ref: str, *, wait: bool = False, timeout: float | None = None,
        progress: ProgressCallback | None = None,
    ) -> ActionResult:
        """Resume a GPU by hand (single-flight); with ``wait``, until its Ollama answers."""
        gpu = self._find(ref)
        started = self.clock.now()
        if gpu.state.ready:
            return self._result(gpu, f"{gpu.name} is already running", started)
        if not self.cloud.managed:
            raise NotCloudManaged(f"{gpu.name} is a static host; gpuctl cannot start it")
        if gpu.pausing is not None:
            raise ActionRefused(
                f"{gpu.name} is pausing; resume it once it is paused",
                hint="Try again in a minute, or check `gpuctl status`.",
            )
        flight = self._start_wake(gpu, grace=True)
        if progress is not None:
            flight.listeners.append(progress)
        try:
            if not wait:
                await asyncio.shield(flight.accepted)
                return self._result(
                    gpu, f"resuming {gpu.name}; it usually takes "
                    f"{self._estimator.resume_seconds(gpu.id):.0f} s", started,
                )
            if flight.task is not None:
                await wait_with_timeout(self.clock, asyncio.shield(flight.task), timeout)
        except TimeoutError:
            raise WakeFailed(
                f"{gpu.name} was not ready within {timeout:g} s; it keeps resuming",
                hint="Check it later with `gpuctl status`.",
            ) from None
        finally:
            if progress is not None and progress in flight.listeners:
                flight.listeners.remove(progress)
        return self._result(gpu, f"{gpu.name} is running and Ollama answers", started)

    async def pause(self, ref: str, *, wait: bool = False) -> ActionResult:
        """Pause a GPU by hand (single-flight). Requests in flight on it will fail: said so."""
        gpu = self._find(ref)
        started = self.clock.now()
        if gpu.state is GpuState.PAUSED:
            return self._result(gpu, f"{gpu.name} is already paused", started)
        if not self.cloud.managed:
            raise NotCloudManaged(f"{gpu.name} is a static host; gpuctl cannot stop it")
        if gpu.waking is not None:
            raise ActionRefused(
                f"{gpu.name} is resuming; pause it once it is up",
                hint="Try again in a minute, or check `gpuctl status`.",
            )
        busy = gpu.in_use
        flight = self._start_pause(gpu)
        if wait and flight.task is not None:
            await asyncio.shield(flight.task)
        else:
            await asyncio.shield(flight.accepted)
        message = f"pausing {gpu.name}" if not wait else f"{gpu.name} is paused"
        if busy:
            message += f" ({busy} request{'s' if busy > 1 else ''} in flight on it will fail)"
        return self._result(gpu, message, started)

    def _result(self, gpu: Gpu, message: str, started: float) -> ActionResult:
        return ActionResult(
            success=True, message=message, gpu=self._view(gpu),
            elapsed_seconds=self.clock.now() - started,
        )

    # -- views -------------------------------------------------------------------------------

    def gpus(self) -> list[GpuView]:
        self._expire(self.clock.now())
        return [self._view(g) for g in sorted(self._gpus.values(), key=lambda g: g.name)]

    def gpu(self, ref: str) -> GpuView:
        """One GPU by id, exact name or unique name prefix (``GpuNotFound``, ``UsageError``)."""
        return self._view(self._find(ref))

    def _find(self, ref: str) -> Gpu:
        return find_gpu(self._gpus, ref)

    def _view(self, gpu: Gpu) -> GpuView:
        return gpu_view(gpu, now=self.clock.now(), leases=self._leases, queue=self._queue,
                        estimator=self._estimator)

    def models(self) -> list[ModelView]:
        """Every model any GPU has (or had when last seen); never wakes a GPU."""
        return union_models(self._gpus.values())

    def loaded(self) -> list[dict[str, Any]]:
        """``/api/ps`` entries of the ready GPUs; never wakes a GPU."""
        return ps_entries(self._gpus.values())

    def gpus_with_model(self, model: str) -> list[GpuView]:
        holders = self._catalog.holders(normalize_model(model))
        return [self._view(self._gpus[g]) for g in sorted(holders) if g in self._gpus]

    def metrics(self) -> EngineMetrics:
        return EngineMetrics(
            wakes=self._counters["resume"],
            wake_failures=self._counters["wake_failures"],
            pauses=self._counters["pause"],
            resume_durations=list(self._resume_durations),
            requests_granted=self._counters["granted"],
            requests_rejected=self._counters["rejected"],
            queue_depth=len(self._queue),
            gpus=[
                gpu_metrics(g, leases=self._leases, queue=self._queue)
                for g in sorted(self._gpus.values(), key=lambda g: g.name)
            ],
        )

    # -- helpers -----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, GpuctlError):
                log.error("engine task failed", exc_info=exc)

    @staticmethod
    async def _close_probe(probe: NodeProbe | None) -> None:
        close = getattr(probe, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def _consume(future: asyncio.Future[None]) -> None:
    """Mark a flight's outcome as seen, so asyncio does not warn when nobody awaited it."""
    if not future.cancelled():
        future.exception()
