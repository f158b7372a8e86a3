"""The engine: one object that both faces (CLI and gateway) call, holding all fleet policy.

It is a facade over parts with one job each: the GPU records (``fleet``) and the roster that
keeps them filed (``roster``), discovery and node probes (``discovery``), the router's index
(``router``), the fair queue (``fairqueue``) and what waiters are told (``progress``), leases
(``leases``), estimates (``estimates``), wake on demand and idle pause (``waking``, which
drives the cloud ``actions``), the GPUs of management calls and the ``/api/show`` memory
(``management``), background tasks (``background``) and the durable store. The
engine itself owns slots and tickets: ``acquire``, ``release``, and handing freed slots to
waiters (``_drain``, which it lends to the parts that make a GPU ready). Everything runs on
one event loop, so a check and the change it allows happen with no ``await`` between them:
a GPU is never paused with a request in flight, a slot is never granted twice.

The hot path is ``acquire`` with a free slot (an index lookup, a lease, a ticket) and
``release`` (a counter, a lease, a sum in memory, and handing the slot to the next waiter).
Neither touches the disk. Everything slow — the cloud, the nodes, SQLite writes of leases and
usage — happens in the background loop every ``timing.poll_interval_seconds`` or in the
single-flight wake and pause tasks.

``apply_workspace``, ``probe``, ``stage`` and ``count`` are the hooks the cloud actions
(``actions.Actions``) call back into; ``tick`` is one round of the background loop's
housekeeping.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gpuctl.cloud.base import CloudProvider, Workspace
from gpuctl.config import Config
from gpuctl.engine.actions import Actions
from gpuctl.engine.api import (
    ActionResult,
    EngineMetrics,
    GpuGlance,
    GpuView,
    ModelView,
    ProgressCallback,
    Ticket,
    Usage,
)
from gpuctl.engine.background import Background
from gpuctl.engine.budgets import Budgets
from gpuctl.engine.catalog import ModelCatalog, not_found
from gpuctl.engine.clock import Clock, SystemClock, wait_with_timeout
from gpuctl.engine.discovery import Discovery, NodeFactory, default_nodes
from gpuctl.engine.estimates import Estimator
from gpuctl.engine.fairqueue import FairQueue
from gpuctl.engine.fleet import Flight, Gpu, WakeStage, normalize_model
from gpuctl.engine.leases import LeaseBook, reservation_seconds
from gpuctl.engine.ledger import Ledger
from gpuctl.engine.management import Management, route_again
from gpuctl.engine.meter import CostMeter, CostTotals
from gpuctl.engine.overview import FleetOverview, overview
from gpuctl.engine.pausepolicy import PausePolicy
from gpuctl.engine.progress import Announcer
from gpuctl.engine.replicas import SlotGate
from gpuctl.engine.requestlog import MAX_ROWS, RequestLog, request_log
from gpuctl.engine.retention import retire_old_rows
from gpuctl.engine.roster import Roster
from gpuctl.engine.router import Choice, RouteIndex
from gpuctl.engine.usage import UsageReport, parse_when, usage_report
from gpuctl.engine.views import find_gpu, gpu_metrics, gpu_view, ps_entries, union_models
from gpuctl.engine.waking import Waker
from gpuctl.errors import CloudError, GpuctlError, Unavailable
from gpuctl.store import LeaseRecord, RequestRow, Store
from gpuctl.store.store import UsageTotals

__all__ = ["RESTARTING", "RESTART_SECONDS", "Engine", "NodeFactory"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: How often the background loop rolls up request rows past ``ledger.keep_days``.
RETENTION_EVERY_SECONDS = 3600.0
#: How far back the request log feeds the adaptive pause policy at start.
POLICY_HISTORY_SECONDS = 28 * 86_400.0
#: A load shorter than this was a warm hit, not a load worth learning from.
LOAD_SECONDS = 0.5
#: A load longer than this is a node's nonsense, not a figure to plan wakes by.
MAX_LOAD_SECONDS = 3600.0
#: What a request still waiting when the gateway restarts is told (``turn_away``).
RESTARTING = "gateway restarting"
#: Least ``Retry-After`` for it: about how long a restart takes.
RESTART_SECONDS = 5.0


@dataclass(eq=False)
class _Grant:
    gpu: Gpu
    user: str
    model: str
    at: float
    lease_seconds: float
    request: RequestRow | None = None
    member: str | None = None  # replicas: the global slot entry this grant holds


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
        observe_fleet: bool = True,
        cost_meter: bool = True,
        node_token: str | None = None,
    ) -> None:
        """``observe_fleet=False``: an engine for one CLI command, which records on the
        ledger only the actions it takes (the gateway keeps the record of the fleet).
        ``cost_meter=False``: no running cost counters (a replay, which reads its costs
        from the simulated cloud and would spend most of its time attributing)."""
        self.config = config
        self.cloud = cloud
        self.store = store
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._index = RouteIndex(config.gpu.slots)
        self._leases = LeaseBook()
        self._restore_leases()
        self._queue = FairQueue(config.server.max_queue)
        self._estimator = Estimator(store.resume_history(), store.load_history())
        self._catalog = ModelCatalog(config.gpu.slots)
        self.ledger = Ledger(store, self.clock, observe_fleet=observe_fleet)
        self._observe_fleet = observe_fleet
        self._reporting = asyncio.Lock()
        self._retired_at = float("-inf")
        timing = config.timing
        self._cost_meter = cost_meter
        self._meter = CostMeter(store, self.clock, wake_seconds=(
            timing.startup_timeout_seconds + timing.ollama_readiness_wait_seconds))
        self._budgets = Budgets(store, self.clock, self._meter)
        self._roster = Roster(config, self.clock, index=self._index, catalog=self._catalog,
                              leases=self._leases, ledger=self.ledger)
        #: The roster's GPUs by workspace id: read here, added and dropped by discovery.
        self._gpus = self._roster.gpus
        self._background = Background()
        self._grants: dict[int, _Grant] = {}
        #: user -> GPU id -> slots held, for the per-user cap (``server.max_slots_per_user``,
        #: default half a GPU's slots): one user's stuck clients cannot take a whole GPU.
        self._held: dict[str, dict[str, int]] = {}
        self._user_cap = config.server.max_slots_per_user or max(1, config.gpu.slots // 2)
        #: Replicas (``store.url``): the global slots every grant must also hold.
        self._gate: SlotGate | None = None
        #: Slots other replicas hold, per GPU, as counted at the last sync (in ``in_use``).
        self._foreign: dict[str, int] = {}
        #: GPU id -> user -> slots other replicas hold for that user (the per-user cap is
        #: global across replicas: synced by ``Replica``).
        self._foreign_held: dict[str, dict[str, int]] = {}
        #: Replicas: called when a request starts waiting here, so the replica tells the
        #: others at once that it waits for a turn.
        self.on_queue: Callable[[], None] | None = None
        self._ticket_ids = itertools.count(1)
        self._loop_task: asyncio.Task[None] | None = None
        self._refresh_error: str | None = None
        self._counters = {"resume": 0, "pause": 0, "wake_failures": 0, "granted": 0,
                          "rejected": 0, "restarting": 0}
        #: Set by ``turn_away``: the gateway is restarting; new requests are told so.
        self._closing: str | None = None
        #: The cloud listed the fleet once: before that, no model is "not found".
        self._discovered = False
        self._loads: list[tuple[str, float, float]] = []  # written by the next tick
        self._policy = PausePolicy(config)
        self._waker = Waker(
            config, cloud, clock=self.clock, store=store, roster=self._roster, queue=self._queue,
            catalog=self._catalog, estimator=self._estimator, leases=self._leases,
            actions=Actions(config, cloud, self.clock, store, self._estimator, self,
                            self.ledger),
            background=self._background, drain=self._drain, count=self.count,
            policy=self._policy,
        )
        self._discovery = Discovery(
            config, cloud, clock=self.clock, store=store, roster=self._roster,
            nodes=nodes if nodes is not None else default_nodes(config, node_token),
            catalog=self._catalog, background=self._background, drain=self._drain,
            resupply=self._waker.resupply,
        )
        self._announcer = Announcer(
            self._queue, self._catalog, self._estimator, self.clock, self._waker.resume_left
        )
        self._management = Management(self._gpus, self._catalog, self._wake_to_manage)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Discover the fleet, adopt cloud actions in flight, start the loop."""
        wall = self.clock.wall()
        if self._policy.adaptive:
            # The request log is the pause policy's memory across restarts.
            self.learn_from(
                (row.model, start, start + row.service_s, row.user)
                for row in self.store.requests(wall - POLICY_HISTORY_SECONDS, wall)
                if row.outcome != "refused" and row.service_s > 0
                for start in (row.served_at or row.at,)
            )
        self._meter.start()
        self._budgets.refresh(force=True)
        try:
            await self.refresh()
        except CloudError as exc:
            # A cloud outage at start is survivable: the loop keeps trying (and adopts the
            # pending actions once it sees the fleet). A rejected token (CredentialsError)
            # is not, and propagates.
            log.warning("fleet discovery failed at start; retrying every poll: %s", exc)
        else:
            self._waker.adopt_pending()
        self._loop_task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop the loop and actions in flight (they stay pending for the next start)."""
        self._background.stopping = True
        tasks: list[asyncio.Task[Any]] = []
        if self._loop_task is not None:
            tasks.append(self._loop_task)
        tasks += self._waker.tasks()
        tasks += self._background.running()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for model in self._queue.models():
            self._queue.fail(model, Unavailable("gpuctl is shutting down", retry_after=10))
        self._persist()
        await self._discovery.close()

    async def _run(self) -> None:
        while True:
            await self.clock.sleep(self.config.timing.poll_interval_seconds)
            try:
                await self.refresh()
                if not self._waker.adopted:
                    self._waker.adopt_pending()
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
        self._roster.expire(now)
        self._waker.pause_idle(now)
        for model in self._queue.models():
            self._announcer.tell_positions(model)
            self._waker.ensure_supply(model)
        self._persist()
        if self._cost_meter:
            self._meter.advance(self._oldest_open())
        self._budgets.refresh()
        if self._observe_fleet and now - self._retired_at >= RETENTION_EVERY_SECONDS:
            self._retired_at = now
            retire_old_rows(self.store, keep_days=self.config.ledger.keep_days,
                            cost=self.config.cost, now=self.clock.wall())

    def _restore_leases(self) -> None:
        """Take in the stored leases: the gateway's own from before a restart, or, in a
        laptop command's engine (a reader store), the live gateway's, to show them."""
        now, wall = self.clock.now(), self.clock.wall()
        for record in self.store.load_leases(wall):
            seconds = record.seconds or reservation_seconds(self.config)
            self._leases.hold(record.gpu_id, record.user, now + record.expires_at - wall, seconds)
        #: The lease-book version last written (or loaded): nothing new, nothing to write.
        self._saved_leases = self._leases.version

    def _persist(self) -> None:
        """Write what changed since the last time. A reader store's engine (a laptop
        command, not the gateway) writes no leases: it never owned them (store.py: one
        writer per piece of state)."""
        if self._leases.version != self._saved_leases and not self.store.reader:
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

    # -- discovery, and the hooks for the cloud actions ---------------------------------------

    async def refresh(self, *, probe: bool = True) -> None:
        """Re-discover the fleet (every page) and, unless ``probe=False``, probe the nodes."""
        try:
            await self._discovery.refresh(probe=probe)
        except CloudError as exc:
            self._refresh_error = str(exc)
            raise
        self._refresh_error = None
        self._discovered = True

    def refresh_error(self) -> str | None:
        """Why the last fleet refresh failed (the fleet view may be stale), None if it worked."""
        return self._refresh_error

    def apply_workspace(self, gpu: Gpu, ws: Workspace) -> bool:
        """Take in a fresh read of ``ws``; False when the GPU is no longer in the fleet."""
        return self._discovery.apply_workspace(gpu, ws)

    async def probe(self, gpu: Gpu) -> bool:
        """Ask the node whether Ollama answers, and what it has; True when ready."""
        return await self._discovery.probe(gpu)

    def stage(self, gpu: Gpu, flight: Flight, stage: WakeStage) -> None:
        """Tell everyone waiting on ``flight`` that it reached ``stage``."""
        self._waker.stage(gpu, flight, stage)

    def count(self, action: str) -> None:
        self._counters[action] = self._counters.get(action, 0) + 1

    def _drain(self, gpu: Gpu) -> None:
        """Hand free slots on ``gpu`` to the fairest waiters it can serve.

        Not while a wake of ``gpu`` is still finishing: the wake first tells its waiters the
        GPU is ready, then hands it on.
        """
        if not len(self._queue) or not gpu.ready or not gpu.models or gpu.waking:
            return
        cap = self._user_cap

        def capped(user: str) -> bool:
            return self._holds(user, gpu.id) >= cap

        while gpu.in_use < gpu.slots and gpu.ready:
            waiter = self._queue.pop_for(gpu.models, skip=capped)
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
                                 waiter.given_name or waiter.model, waited, waiter.request)
            waiter.future.set_result(ticket)

    # -- routing, slots and the queue ----------------------------------------------------------

    async def acquire(
        self, model: str, user: str, *, progress: ProgressCallback | None = None,
        request: RequestRow | None = None,
    ) -> Ticket:
        """A slot on the best GPU for ``model``: at once, after queueing, or after a wake.

        ``request`` (from ``begin_request``) is the ledger row the engine fills: how long the
        request queued, whether it waited for a wake, where and how long it was served.
        """
        ticket = await self._acquire(model, user, progress=progress, request=request)
        if self._gate is None:
            return ticket
        return await self._admit(ticket, model, user, progress, request)

    # -- replicas: global slots ---------------------------------------------------------------

    def attach_gate(self, gate: SlotGate) -> None:
        """Make this engine a replica: every slot it grants must also be free globally."""
        self._gate = gate

    async def _admit(self, ticket: Ticket, model: str, user: str,
                     progress: ProgressCallback | None, request: RequestRow | None) -> Ticket:
        """Hold the global slot behind a local grant, or count it as another replica's.

        The local grant was made on this replica's view (its own slots plus the others' as
        last synced). If the global entry cannot be taken, another replica got there first:
        the slot is counted as theirs (``in_use`` stays, so nothing here grants it again)
        and the request goes back through the queue, where the next sync's count or a
        release frees it. The Lua script in Redis is the judge, so the limit holds.
        """
        assert self._gate is not None
        while True:
            grant = self._grants.get(ticket.id)
            if grant is None:  # released while we asked (cannot happen without a bug)
                raise Unavailable("the slot was lost before it was used", retry_after=1)
            try:
                member = await self._gate.take(grant.gpu.id, grant.gpu.slots)
            except BaseException:
                self.release(ticket, failed=None, unused=True)
                raise
            if member is not None:
                grant.member = member
                return ticket
            self._grants.pop(ticket.id, None)
            self._unhold(grant.user, grant.gpu.id)
            self._counters["granted"] -= 1
            self._foreign[grant.gpu.id] = self._foreign.get(grant.gpu.id, 0) + 1
            ticket = await self._acquire(model, user, progress=progress, request=request)

    def local_slots(self) -> dict[str, int]:
        """Slots this replica's own grants hold, per GPU id."""
        counts: dict[str, int] = {}
        for grant in self._grants.values():
            counts[grant.gpu.id] = counts.get(grant.gpu.id, 0) + 1
        return counts

    def slot_back(self, gpu_id: str) -> None:
        """A slot the gate held back at release (``put_back`` returned False) is free here
        after all: it was this replica's turn, or nobody waited."""
        gpu = self._gpus.get(gpu_id)
        old = self._foreign.get(gpu_id, 0)
        if gpu is None or old <= 0:
            return  # a sync already counted it anew
        self._foreign[gpu_id] = old - 1
        gpu.in_use = max(0, gpu.in_use - 1)
        if not gpu.in_use:
            gpu.idle_since = self.clock.now()
        self._roster.refile(gpu)
        self._drain(gpu)

    def set_user_foreign(self, gpu_id: str, counts: dict[str, int]) -> None:
        """Other replicas hold ``counts`` slots per user on ``gpu_id`` (the per-user cap is
        global); a user who now holds fewer may be served from the queue."""
        old = self._foreign_held.get(gpu_id, {})
        if counts == old:
            return
        if counts:
            self._foreign_held[gpu_id] = counts
        else:
            self._foreign_held.pop(gpu_id, None)
        gpu = self._gpus.get(gpu_id)
        if gpu is not None and any(counts.get(u, 0) < n for u, n in old.items()):
            self._drain(gpu)

    def waiting_gpus(self) -> set[str]:
        """Ready GPUs that could serve a request queued here (replicas register a turn)."""
        if not len(self._queue):
            return set()
        models = {m for m in self._queue.models() if self._queue.depth(m)}
        return {gpu.id for gpu in self._gpus.values()
                if gpu.ready and gpu.models and not models.isdisjoint(gpu.models)}

    def held_by_user(self, gpu_id: str) -> dict[str, int]:
        """Slots each user holds on ``gpu_id`` through this replica's grants."""
        return {user: held[gpu_id] for user, held in self._held.items() if gpu_id in held}

    def set_foreign(self, gpu_id: str, count: int) -> None:
        """Other replicas hold ``count`` slots on ``gpu_id`` (from the shared count)."""
        gpu = self._gpus.get(gpu_id)
        old = self._foreign.get(gpu_id, 0)
        if gpu is None or count == old:
            return
        self._foreign[gpu_id] = count
        gpu.in_use = max(0, gpu.in_use + count - old)
        self._roster.refile(gpu)
        if count < old:
            self._drain(gpu)

    # -- replicas: shared leases, learnt models and history -------------------------------

    @property
    def lease_version(self) -> int:
        """Bumped on every change of the leases (a replica publishes only when it moved)."""
        return self._leases.version

    def lease_records(self) -> list[LeaseRecord]:
        """Every lease this engine knows, with wall-clock ends (for other replicas)."""
        now, wall = self.clock.now(), self.clock.wall()
        return [LeaseRecord(lease.gpu_id, lease.user, wall + lease.expires - now, lease.seconds)
                for lease in self._leases]

    def merge_leases(self, records: Iterable[LeaseRecord]) -> int:
        """Take in other replicas' leases: a lease that ends later than ours wins (leases
        only grow), so routing affinity and idle pause see every replica's users. Returns
        how many changed."""
        now, wall = self.clock.now(), self.clock.wall()
        longest = reservation_seconds(self.config)
        changed: set[str] = set()
        for record in records:
            gpu = self._gpus.get(record.gpu_id)
            # No lease here lasts longer than a full one from now: a replica's clock ahead,
            # or a bad record, cannot keep a GPU up for longer.
            seconds = min(record.seconds or longest, longest)
            expires = min(now + record.expires_at - wall, now + seconds)
            if gpu is None or expires <= now:
                continue
            held = self._leases.holders(record.gpu_id).get(record.user)
            if held is not None and held.expires >= expires - 1e-3:
                continue  # ours ends as late (a millisecond of clock noise is no news)
            self._leases.hold(record.gpu_id, record.user, expires, seconds)
            changed.add(record.gpu_id)
        for gpu_id in changed:
            self._roster.refile(self._gpus[gpu_id])
        return len(changed)

    def learn_models(self, gpu_id: str, models: Sequence[dict[str, Any]]) -> None:
        """Another replica saw ``gpu_id`` awake with ``models`` (already in the store)."""
        self._discovery.learn(gpu_id, models)

    def learn_resume(self, gpu_id: str, seconds: float, *, ok: bool) -> None:
        """Another replica's resume of ``gpu_id`` (already in the store): for estimates."""
        self._estimator.record_resume(gpu_id, seconds, ok=ok)

    def learn_load(self, model: str, seconds: float) -> None:
        """Another replica's load time of ``model`` (already in the store): for estimates."""
        self._estimator.record_load(model, seconds)

    def learn_request(self, row: RequestRow) -> None:
        """Another replica's finished request: the running cost counters count it too."""
        self._meter.add(row)

    def wake_cause(self, gpu_id: str) -> str:
        """Why this engine is waking ``gpu_id`` (``gateway``, ``hand``): a follower replica
        passes it on with the wake it asks of the leader, whose timeline records it."""
        gpu = self._gpus.get(gpu_id)
        flight = gpu.waking if gpu is not None else None
        return flight.cause if flight is not None else "gateway"

    def reload_budgets(self) -> None:
        """The store's budgets changed (another replica's host set one): read them now,
        not at the next ``budgets.REFRESH_SECONDS``."""
        self._budgets.refresh(force=True)

    def lag_meter(self, seconds: float) -> None:
        """Let the running cost counters close time only ``seconds`` behind now, so rows
        that other replicas' journal brings late still count (``learn_request``)."""
        self._meter.lag = seconds

    async def _acquire(
        self, model: str, user: str, *, progress: ProgressCallback | None = None,
        request: RequestRow | None = None,
    ) -> Ticket:
        if self._background.stopping:
            raise Unavailable("gpuctl is shutting down", retry_after=10)
        if self._closing is not None:
            self._counters["restarting"] += 1
            raise Unavailable(self._closing, retry_after=RESTART_SECONDS)
        name = normalize_model(model)
        now = self.clock.now()
        self._roster.expire(now)
        if not self._queue.depth(name):
            choice = self._index.choose(name, self._leases.of_user(user), self._full(user))
            if choice is not None:
                return self._grant(choice, name, user, model, 0.0, request)
        if not self._catalog.known(name) and not self._waker.unknown_candidates():
            if not self._discovered:  # an empty fleet because the cloud did not answer yet
                raise Unavailable(
                    "the GPU fleet is not known yet: the cloud API has not answered",
                    retry_after=self.config.timing.poll_interval_seconds)
            raise not_found(model)
        if request is not None and self._needs_wake(name) and self._budgets.remaining(
                request.key_id) is not None:
            # A budget stops wakes, not warm GPUs: decide on figures brought up to now.
            self._meter.advance(self._oldest_open())
            self._budgets.check_wake(request.key_id)
        if self._queue.full:
            self._counters["rejected"] += 1
            raise Unavailable(
                f"the queue is full ({self._queue.max_size} requests waiting); try again later",
                retry_after=self._announcer.retry_after(name),
            )
        future: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        waiter = self._queue.push(name, user, future, now, progress, model)
        waiter.request = request
        if request is not None:
            waiter.wake_gpu = self._waker.waking_for(name)  # joins a wake under way
        choice = self._index.choose(name, self._leases.of_user(user), self._full(user))
        if choice is not None:  # a free slot nobody handed on yet: hand it on now
            self._drain(choice.gpu)
        if not future.done():
            self._announcer.tell_position(waiter)
            self._waker.ensure_supply(name, recheck=False)
            if self.on_queue is not None:
                self.on_queue()
        timing = self.config.timing
        limit = self.config.server.queue_timeout_seconds
        if not self._catalog.ready_gpus(name):
            wake = timing.startup_timeout_seconds + timing.ollama_readiness_wait_seconds
            limit = max(limit, wake)
        try:
            return await wait_with_timeout(self.clock, future, limit)
        except TimeoutError:
            self._queue.remove(waiter)
            self._counters["rejected"] += 1
            raise Unavailable(
                f"no GPU with {model} had a free slot within {limit:g} s",
                retry_after=self._announcer.retry_after(name),
                hint="The GPUs are busy; try again later.",
            ) from None
        except asyncio.CancelledError:
            granted = future.done() and not future.cancelled() and future.exception() is None
            if not self._queue.remove(waiter) and granted:
                self.release(future.result())  # granted as we were cancelled: give it back
            raise
        finally:
            if request is not None:
                request.queued_s = self.clock.now() - waiter.enqueued_at
                request.wake_gpu = waiter.wake_gpu

    def _needs_wake(self, model: str) -> bool:
        """No GPU with ``model`` is ready or already waking: serving it means a wake."""
        if self._catalog.ready_gpus(model):
            return False
        for gpu_id in self._catalog.holders(model):
            gpu = self._gpus.get(gpu_id)
            if gpu is not None and gpu.waking is not None:
                return False
        return True

    def _oldest_open(self) -> float | None:
        """Wall time of the oldest request still in a slot or in the queue (for the meter)."""
        now, wall = self.clock.now(), self.clock.wall()
        oldest: float | None = None
        for grant in self._grants.values():
            at = grant.request.at if grant.request is not None else wall - (now - grant.at)
            oldest = at if oldest is None else min(oldest, at)
        for model in self._queue.models():
            for waiter in self._queue.waiters(model):
                at = wall - (now - waiter.enqueued_at)
                oldest = at if oldest is None else min(oldest, at)
        return oldest

    def cost_metrics(self) -> CostTotals:
        """Billed, attributed and unattributed seconds since start, closed pieces only."""
        totals = self._meter.totals
        named = CostTotals()
        for gpu_id, seconds in totals.billed.items():
            gpu = self._gpus.get(gpu_id)
            named.billed[gpu.name if gpu is not None else gpu_id] += seconds
        named.users.update(totals.users)
        named.unattributed.update(totals.unattributed)
        return named

    def budget_remaining(self, key_id: str) -> float | None:
        """GPU-seconds left in ``key_id``'s budget this period; None without a budget. O(1)."""
        return self._budgets.remaining(key_id)

    def _full(self, user: str) -> list[str]:
        """The GPUs on which ``user`` holds as many slots as one user may (on any replica)."""
        held = self._held.get(user)
        if self._foreign_held:
            gpus = set(held or ()) | {g for g, users in self._foreign_held.items()
                                      if user in users}
            return [g for g in gpus if self._holds(user, g) >= self._user_cap]
        if not held:
            return []
        return [gpu_id for gpu_id, count in held.items() if count >= self._user_cap]

    def _holds(self, user: str, gpu_id: str) -> int:
        """Slots ``user`` holds on ``gpu_id``, here and (replicas) on the others."""
        here = self._held.get(user, {}).get(gpu_id, 0)
        if not self._foreign_held:
            return here
        return here + self._foreign_held.get(gpu_id, {}).get(user, 0)

    def _grant(self, choice: Choice, model: str, user: str, given: str, waited: float,
               request: RequestRow | None = None) -> Ticket:
        gpu = choice.gpu
        now = self.clock.now()
        seconds = self._lease_seconds(gpu, user)
        self._leases.hold(gpu.id, user, now + seconds, seconds)
        gpu.in_use += 1
        held_here = self._held.setdefault(user, {})
        held_here[gpu.id] = held_here.get(gpu.id, 0) + 1
        self._roster.refile(gpu)
        ticket_id = next(self._ticket_ids)
        self._grants[ticket_id] = _Grant(gpu, user, model, now, seconds, request)
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

    def _lease_seconds(self, gpu: Gpu, user: str) -> float:
        """How long ``user``'s lease on ``gpu`` lasts after this request.

        A newcomer to a GPU someone else holds gets the fallback lease, and keeps what it
        has while they do; once nobody else holds the GPU it is a full lease again. Weighed
        at every grant and release, so a fallback lease never sticks.
        """
        if not self._leases.leased_to_other(gpu.id, user):
            return reservation_seconds(self.config)
        held = self._leases.holders(gpu.id).get(user)
        if held is not None:
            return held.seconds
        return self.config.timing.fallback_reservation_minutes * 60.0

    def release(
        self, ticket: Ticket, usage: Usage | None = None, *, failed: str | None = None,
        unused: bool = False,
    ) -> None:
        """Free the slot, renew the user's lease, record usage; hand the slot on.

        ``unused``: the grant was never served (replicas: no global slot behind it); it is
        only handed back, with nothing recorded.
        """
        grant = self._grants.pop(ticket.id, None)
        if grant is None:
            return  # released twice: the first release counted
        held_back = False  # replicas: the gate asks Redis whose turn the slot is
        if self._gate is not None and grant.member is not None:
            held_back = not self._gate.put_back(grant.gpu.id, grant.member)
        if held_back:  # in use still, as another replica's until ``slot_back`` or a sync
            self._foreign[grant.gpu.id] = self._foreign.get(grant.gpu.id, 0) + 1
        if unused:
            if not held_back:
                grant.gpu.in_use -= 1
            self._unhold(grant.user, grant.gpu.id)
            self._counters["granted"] -= 1
            self._roster.refile(grant.gpu)
            self._drain(grant.gpu)
            return
        now = self.clock.now()
        held = now - grant.at
        request = grant.request
        if request is not None:
            wall = self.clock.wall()
            request.gpu_id = grant.gpu.id
            request.served_at = wall - held
            request.service_s = held
            request.lease_s = grant.lease_seconds
            if usage is not None:
                request.tokens_in, request.tokens_out = usage.tokens_in, usage.tokens_out
            if failed is not None:
                request.outcome = "error"
        self.store.record_usage(
            grant.user,
            tokens_in=usage.tokens_in if usage else 0,
            tokens_out=usage.tokens_out if usage else 0,
            gpu_seconds=held,
            at=self.clock.wall(),
        )
        gpu = grant.gpu
        if not held_back:
            gpu.in_use -= 1
        if not gpu.in_use:
            gpu.idle_since = now
        self._unhold(grant.user, gpu.id)
        if self._gpus.get(gpu.id) is not gpu:
            return  # the GPU left the fleet while this request ran
        seconds = self._lease_seconds(gpu, grant.user)
        self._leases.hold(gpu.id, grant.user, now + seconds, seconds)
        if failed is None:
            if self._policy.adaptive:
                wall = self.clock.wall()
                self._policy.observe(grant.model, wall - held, wall, grant.user)
            self._estimator.record_service(grant.model, held)
            load = usage.load_seconds if usage is not None else None
            if load is not None and LOAD_SECONDS <= load <= MAX_LOAD_SECONDS:
                self._estimator.record_load(grant.model, load)
                self._loads.append((grant.model, load, self.clock.wall()))
            if grant.model not in gpu.loaded:
                # Ollama keeps a model it just served in memory: route the next one here
                # before the next probe says so.
                gpu.loaded.add(grant.model)
        else:
            gpu.last_error = failed
            gpu.node_ready = False
            self._discovery.schedule_probe(gpu)
        self._roster.refile(gpu)
        self._drain(gpu)

    def learn_from(self, requests: Iterable[tuple[str, float, float, str]]) -> None:
        """History for the pause policy: (model, start, end, user) of past requests, wall
        seconds (the request log at start; a replay's week before)."""
        for model, start, end, user in requests:
            self._policy.observe(model, start, end, user)

    def _unhold(self, user: str, gpu_id: str) -> None:
        held = self._held.get(user)
        if held is None:
            return
        left = held.get(gpu_id, 0) - 1
        if left > 0:
            held[gpu_id] = left
        else:
            held.pop(gpu_id, None)
            if not held:
                del self._held[user]

    def queue_depth(self) -> int:
        return len(self._queue)

    # -- the request log ---------------------------------------------------------------------

    def begin_request(self, key_id: str, user: str, route: str, model: str = "") -> RequestRow:
        """A ledger row for a request arriving now; pass it to ``acquire``, then ``end_request``."""
        return RequestRow(at=self.clock.wall(), key_id=key_id, user=user, route=route,
                          model=model)

    def end_request(self, request: RequestRow, status: int) -> None:
        """The request is answered (or its client left): log its row for the next flush.

        The outcome follows from what happened: ``cancelled`` when the client left (499),
        ``refused`` when it was answered with an error without reaching a GPU, ``error`` for
        any other error or a node that failed, else ``ok``.
        """
        request.status = status
        if status == 499:
            request.outcome = "cancelled"
        elif status >= 400 and request.gpu_id is None:
            request.outcome = "refused"
        elif status >= 400:
            request.outcome = "error"
        self.ledger.request(request)
        self._meter.add(request)

    # -- a restart ---------------------------------------------------------------------------

    def in_flight(self) -> int:
        """Requests holding a slot now."""
        return len(self._grants)

    def turn_away(self, message: str = RESTARTING, *, unless_within: float = 0.0) -> int:
        """Answer the requests waiting for a GPU or a slot with ``Unavailable(message)``,
        and every new request from now on; returns how many waiting ones were answered.

        For a gateway about to stop (``gateway/drain.py``): a waiter expected to be served
        within ``unless_within`` seconds keeps its place (call again to answer it too). Each
        is told to retry after its own estimate (at least ``RESTART_SECONDS``): a resume in
        flight goes on in the cloud, stays recorded, and the next start adopts it.
        """
        self._closing = message
        answered = 0
        for model in self._queue.models():
            for position, waiter in enumerate(self._queue.waiters(model), 1):
                estimate = self._announcer.estimate(model, position)
                if waiter.future.done() or estimate <= unless_within:
                    continue
                self._queue.remove(waiter)
                waiter.future.set_exception(
                    Unavailable(message, retry_after=max(RESTART_SECONDS, estimate)))
                answered += 1
        self._counters["restarting"] += answered
        return answered

    def turned_away(self) -> int:
        """Requests answered ``turn_away``'s message so far, waiting or new."""
        return self._counters["restarting"]

    # -- admin actions -----------------------------------------------------------------------

    async def wake(
        self, ref: str, *, wait: bool = False, timeout: float | None = None,
        progress: ProgressCallback | None = None, cause: str = "hand",
    ) -> ActionResult:
        """Resume a GPU by hand (single-flight); with ``wait``, until its Ollama answers.

        ``cause`` is what the timeline records: ``gateway`` when a leader replica wakes a
        GPU for another replica's requests."""
        gpu = self._find(ref)
        started = self.clock.now()
        message = await self._waker.wake_by_hand(gpu, wait=wait, timeout=timeout,
                                                 progress=progress, cause=cause)
        return self._result(gpu, message, started)

    async def pause(self, ref: str, *, wait: bool = False) -> ActionResult:
        """Pause a GPU by hand (single-flight). Requests in flight on it will fail: said so."""
        gpu = self._find(ref)
        started = self.clock.now()
        return self._result(gpu, await self._waker.pause_by_hand(gpu, wait=wait), started)

    def _result(self, gpu: Gpu, message: str, started: float) -> ActionResult:
        return ActionResult(
            success=True, message=message, gpu=self._view(gpu),
            elapsed_seconds=self.clock.now() - started,
        )

    # -- management calls (pull, push, create, copy, delete, blobs, show) ----------------------

    async def management_targets(
        self, model: str | None = None, names: Sequence[str] = ()
    ) -> list[GpuView]:
        """The GPUs a management call on ``model`` goes to: the ``names`` given (woken
        together if asleep), else every ready GPU, narrowed to those with ``model`` if any.
        Each has its ``base_url``. ``Unavailable`` when no GPU runs and none is named."""
        return [self._view(g) for g in await self._management.targets(model, names)]

    async def _wake_to_manage(self, gpu: Gpu) -> None:
        await self._waker.wake_by_hand(gpu, wait=True, timeout=None, progress=None)

    def route_again(self, attempt: int, *, answered: bool) -> bool:
        """A node failed inference attempt number ``attempt`` (from 1); ``answered`` when
        bytes of its answer had arrived. True: release it as failed and acquire again."""
        return route_again(attempt, answered=answered)

    def remember_show(self, model: str, body: bytes) -> None:
        """Keep a node's ``/api/show`` answer, so a sleeping fleet can still describe it."""
        self._management.remember_show(model, body)

    def shown(self, model: str) -> bytes | None:
        """An ``/api/show`` answer for ``model`` without asking a node; None: unknown model."""
        return self._management.shown(model)

    # -- views -------------------------------------------------------------------------------

    def gpus(self) -> list[GpuView]:
        self._roster.expire(self.clock.now())
        return [self._view(g) for g in sorted(self._gpus.values(), key=lambda g: g.name)]

    def glance(self) -> list[GpuGlance]:
        """Every GPU's id, state and cloud status, cheaply (no views built, no order)."""
        return [GpuGlance(g.id, g.state, g.ws.status) for g in self._gpus.values()]

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

    def overview(self) -> FleetOverview:
        """The fleet at a glance for the status page and ``gpuctl top``; never wakes a GPU."""
        now = self.clock.now()
        self._roster.expire(now)
        serving: dict[str, list[str]] = {}
        for grant in self._grants.values():
            serving.setdefault(grant.gpu.id, []).append(grant.user)
        estimate = {m: self._announcer.estimate(m, self._queue.depth(m))
                    for m in self._queue.models()}
        return overview(self._gpus.values(), now=now, wall=self.clock.wall(),
                        leases=self._leases, queue=self._queue, estimator=self._estimator,
                        serving=serving, estimate=estimate)

    def requests(self, since: float, until: float) -> list[RequestRow]:
        """The ledger's requests that arrived in ``[since, until)`` (wall-clock seconds)."""
        return self.store.requests(since, until)

    def usage_totals(self) -> dict[str, UsageTotals]:
        """Each user's requests, tokens and GPU time, summed since the store began."""
        return self.store.usage()

    async def usage(self, *, since: str = "7d", until: str | None = None, by: str = "user",
                    user: str | None = None) -> UsageReport:
        """The usage report of ``[since, until)`` (``gpuctl usage`` syntax); ``user`` limits
        the rows to that user's (a user key), the fleet totals stay whole.

        A month of a busy fleet takes seconds to attribute, so it runs off the event loop
        (see ``_read_store``): the gateway goes on serving meanwhile.
        """
        start, end = self._window(since, until)
        names = {g.id: g.name for g in self._gpus.values()}
        cost = self.config.cost
        return await self._read_store(lambda store: usage_report(
            store, since=start, until=end, by=by, cost=cost, user=user, names=names))

    async def request_log(self, *, since: str = "7d", until: str | None = None,
                          limit: int = MAX_ROWS) -> RequestLog:
        """The served requests of ``[since, until)`` (``gpuctl usage`` syntax), at most
        ``limit``, and the learnt fleet: what ``gpuctl simulate --url`` replays. Read off the
        event loop, as ``usage`` is."""
        start, end = self._window(since, until)
        return await self._read_store(
            lambda store: request_log(store, since=start, until=end, limit=limit))

    def _window(self, since: str, until: str | None) -> tuple[float, float]:
        now = self.clock.wall()
        return parse_when(since, now), parse_when(until, now) if until else now

    async def _read_store(self, read: Callable[[Store], _T]) -> _T:
        """``read(store)`` in a thread on its own connection (after a flush, so it sees every
        row), one such read at a time. A throw-away in-memory store is read in place."""
        if str(self.store.path) == ":memory:":
            return read(self.store)
        self.store.flush()
        state = self.store.path.parent

        def run() -> _T:
            store = Store.open(state)
            try:
                return read(store)
            finally:
                store.close()

        async with self._reporting:
            return await asyncio.to_thread(run)

    def metrics(self) -> EngineMetrics:
        return EngineMetrics(
            wakes=self._counters["resume"],
            wake_failures=self._counters["wake_failures"],
            pauses=self._counters["pause"],
            resume_durations=list(self._waker.resume_durations),
            requests_granted=self._counters["granted"],
            requests_rejected=self._counters["rejected"],
            queue_depth=len(self._queue),
            gpus=[
                gpu_metrics(g, leases=self._leases, queue=self._queue)
                for g in sorted(self._gpus.values(), key=lambda g: g.name)
            ],
        )
