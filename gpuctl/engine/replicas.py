"""Replicas: several gateways share one fleet through Redis, with one writer toward the cloud.

With ``store.url = "redis://…"`` each gateway's engine runs as before, plus three things:

- **Global slots** (``SharedSlotGate``): every slot the engine grants must also hold an
  entry in Redis (``store.shared.slots``), so a GPU's slot count holds across replicas. A
  freed slot keeps its entry as a spare for this replica's next request (no round trip)
  while no other replica waits for that GPU, and goes back after ``SPARE_SECONDS`` unused;
  the others' counts are synced into each GPU's ``in_use`` a few times a second
  (``Replica._sync``), so routing sees them and idle pause never takes a GPU in use.
- **Turns** (``store.shared.turns``): when another replica waits for a GPU, a slot freed
  there goes to the waiting replica that has waited longest since its last turn (this one
  included), so a flood on one replica cannot starve a request waiting on another; the
  same sync counts each user's slots on every replica, so ``server.max_slots_per_user``
  holds across them.
- **One writer** (``FencedCloud``): the engine's cloud is wrapped. On the leader (the
  replica holding ``store.shared.leader``'s lease) a resume or pause is first claimed in
  Redis, fenced by the leader's token, and sent only if the claim wins: a successor finds
  a claim in flight and watches the GPU instead of sending a second resume. On a follower,
  a resume becomes a "wanted" record for the leader (with its cause: requests or a hand),
  and the follower's engine watches the cloud just as if it had sent it; followers never
  pause.
- **The leader's duties** (``Replica._run``): renew the lease, act on wanted wakes within a
  second (``DUTY_SECONDS``), close claims the cloud has finished, and idle-pause only
  while leading.

Keys: each replica publishes its key table at start and authenticates against the shared
directory (``store.shared.keys``); ``gpuctl keys`` publishes after each change.

Leases, budgets, the ledger (request rows and the GPU timeline), known models and resume
and load history are shared too, by ``engine.sharing.SharedState``, which ``Replica._run``
steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from gpuctl.cloud.base import CloudProvider, Workspace
from gpuctl.engine.api import GpuState
from gpuctl.engine.sharing import SharedState
from gpuctl.errors import ActionRefused, CloudUnavailable, GpuctlError, Unavailable
from gpuctl.store.shared import (
    CloudActions,
    LeaderLease,
    Passed,
    ReplicaKeys,
    SharedKeys,
    SlotHolder,
    SlotTurns,
    StoreUnreachable,
)
from gpuctl.tasks import cancel_and_wait

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from gpuctl.engine.engine import Engine

__all__ = ["FencedCloud", "Replica", "SharedSlotGate", "SlotGate"]

log = logging.getLogger(__name__)

#: How often a replica re-reads the others' slot counts (and sooner when poked).
SYNC_SECONDS = 0.2
#: The causes a follower's wanted wake may give (anything else is taken as ``gateway``).
WAKE_CAUSES = frozenset({"gateway", "hand"})
#: How often the leader reads wanted wakes and closes finished actions, and a follower
#: asks again for the wakes it waits on: within a second, as the design promises.
DUTY_SECONDS = 0.5

#: A slot entry kept for a local request goes back to Redis if nobody took it this soon
#: (while no other replica waits for the GPU: then it is passed on at once). Short against
#: idle pause (minutes), long enough that a replica alone on a GPU pays no Redis call per
#: request.
SPARE_SECONDS = 2.0


class SlotGate(Protocol):
    """What the engine asks of global slots (``Engine.attach_gate``)."""

    async def take(self, gpu_id: str, limit: int) -> str | None:
        """A global slot entry on ``gpu_id``, or None when all ``limit`` are taken."""
        ...

    def put_back(self, gpu_id: str, member: str) -> bool:
        """A grant holding ``member`` ended. True: the slot is free here now. False: the
        gate asks whose turn it is; it calls back (``slot_back``) if it is this replica's."""
        ...


class SharedSlotGate:
    """Global slots through ``SlotHolder``, with local hand-off of freed entries, and
    turns between replicas (``SlotTurns``) where another replica waits."""

    def __init__(self, holder: SlotHolder, turns: SlotTurns | None = None) -> None:
        self.holder = holder
        self.turns = turns
        #: Freed entries kept for a local waiter: (when, member).
        self._spare: dict[str, list[tuple[float, str]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: GPUs another replica waits for (last sync, or the channel): a slot freed there
        #: is passed on by turns, not kept.
        self.contended: set[str] = set()
        #: Entries being passed on now, per GPU (still this replica's in Redis).
        self._passing: dict[str, int] = {}
        #: Set by ``Replica``: whether requests wait here for a GPU; a held-back slot is
        #: free here after all.
        self.waiting_here: Callable[[str], bool] = lambda _gpu_id: False
        self.slot_back: Callable[[str], None] = lambda _gpu_id: None

    async def take(self, gpu_id: str, limit: int) -> str | None:
        spare = self._spare.get(gpu_id)
        while spare:
            member = spare.pop()[1]
            if self.holder.intact(member):
                return member
            # Redis failed since this entry was written: it may have come back empty, and
            # handing the entry on would count a slot nobody sees. Take a fresh one.
            await self.holder.release(member)
        return await self.holder.acquire(gpu_id, limit)

    def put_back(self, gpu_id: str, member: str) -> bool:
        if not self.holder.intact(member):  # never hand on an entry Redis may have lost
            self._later(self.holder.release(member))
            return True
        if self.turns is not None and gpu_id in self.contended:
            self._later(self._pass_on(gpu_id, member, self.waiting_here(gpu_id), back=True))
            return False
        self._spare.setdefault(gpu_id, []).append((time.monotonic(), member))
        return True

    async def _pass_on(self, gpu_id: str, member: str, waiting_here: bool, *,
                       back: bool) -> None:
        """Give ``member``'s slot to whoever's turn it is; ``back``: the engine held the
        slot back and is told when it is free here after all."""
        assert self.turns is not None
        self._passing[gpu_id] = self._passing.get(gpu_id, 0) + 1
        try:
            passed: Passed | None = await self.turns.pass_on(gpu_id, member,
                                                             waiting_here=waiting_here)
        except StoreUnreachable as exc:
            log.warning("could not pass a slot on (Redis unreachable): %s", exc)
            passed = None
        finally:
            self._passing[gpu_id] -= 1
        if passed is Passed.KEPT:
            self._spare.setdefault(gpu_id, []).append((time.monotonic(), member))
        elif passed is None:
            await self.holder.release(member)  # fails quietly: the entry expires
        else:  # freed or handed by the script: the entry is no longer this replica's
            self.holder.forget(member)
        if back and passed is not Passed.HANDED:
            self.slot_back(gpu_id)

    def passing(self, gpu_id: str) -> int:
        return self._passing.get(gpu_id, 0)

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def spares(self, gpu_id: str) -> int:
        return len(self._spare.get(gpu_id, ()))

    def return_spares(self) -> None:
        """Give back to Redis, in one round trip, the entries no local request took within
        ``SPARE_SECONDS`` (so a replica's releases cost one call per sync at most, not one
        per request), and pass on at once the spares of GPUs another replica waits for."""
        cutoff = time.monotonic() - SPARE_SECONDS
        due: list[str] = []
        for gpu_id, spare in self._spare.items():
            if gpu_id in self.contended and self.turns is not None:
                while spare:
                    member = spare.pop()[1]
                    self._later(self._pass_on(gpu_id, member, False, back=False))
            while spare and spare[0][0] <= cutoff:
                due.append(spare.pop(0)[1])
        if due:
            self._later(self.holder.release_many(due))

    async def close(self) -> None:
        for spare in self._spare.values():
            for _, member in spare:
                await self.holder.release(member)
        self._spare.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.holder.stop()


class FencedCloud:
    """The engine's cloud on a replica: the leader's actions are claimed and fenced in
    Redis first; a follower's resume becomes a wanted record, its pause is refused."""

    def __init__(self, inner: CloudProvider, lease: LeaderLease, actions: CloudActions,
                 ) -> None:
        self.inner = inner
        self.lease = lease
        self.actions = actions
        self.managed = inner.managed
        #: Why the engine wakes a GPU (``Engine.wake_cause``; set when the engine joins).
        self.cause_of: Callable[[str], str] = lambda _gpu_id: "gateway"

    async def list_workspaces(self) -> list[Workspace]:
        return await self.inner.list_workspaces()

    async def get_workspace(self, workspace_id: str) -> Workspace:
        return await self.inner.get_workspace(workspace_id)

    async def resume(self, workspace_id: str) -> Workspace:
        with _store_as_cloud():
            if not self.lease.is_leader:
                await self.actions.want(workspace_id, self.cause_of(workspace_id))
                return await self.inner.get_workspace(workspace_id)
            claimed = await self.actions.begin(self.lease.value, workspace_id, "resume",
                                               time.time(), self.lease.fence)
        if not claimed:  # in flight already (maybe a dead leader's): watch it, do not resend
            return await self.inner.get_workspace(workspace_id)
        return await self.inner.resume(workspace_id)

    async def pause(self, workspace_id: str) -> Workspace:
        if not self.lease.is_leader:
            raise ActionRefused("only the leader replica pauses GPUs; this one follows",
                                hint="Ask again; the leader pauses idle GPUs by itself.")
        with _store_as_cloud():
            claimed = await self.actions.begin(self.lease.value, workspace_id, "pause",
                                               time.time(), self.lease.fence)
        if not claimed:
            raise ActionRefused("another cloud action is in flight on this GPU")
        return await self.inner.pause(workspace_id)

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.contextmanager
def _store_as_cloud() -> Iterator[None]:
    """Redis gone while acting: the engine treats it like a cloud outage (retried)."""
    try:
        yield
    except Unavailable as exc:
        raise CloudUnavailable(str(exc)) from exc


class Replica:
    """One gateway's part in a group of replicas: its slots, its lease, its duties."""

    def __init__(self, engine: Engine, gate: SharedSlotGate, lease: LeaderLease,
                 actions: CloudActions, *, auto_pause: bool,
                 client: aioredis.Redis | None = None) -> None:
        self.engine = engine
        self.gate = gate
        self.lease = lease
        self.actions = actions
        self.auto_pause = auto_pause
        self.client = client  # for the turns channel (``_listen``)
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._waking: dict[str, asyncio.Task[object]] = {}
        #: Leases, ledger rows, learnt models and history (``ReplicaSet.join`` sets it).
        self.sharing: SharedState | None = None
        #: Set to sync now rather than at the next period (a request queued, a slot handed).
        self._poke = asyncio.Event()
        engine.attach_gate(gate)
        engine.on_queue = self._poke.set
        gate.waiting_here = lambda gpu_id: gpu_id in engine.waiting_gpus()
        gate.slot_back = engine.slot_back
        engine.config.gpu.auto_pause = False  # until this replica leads

    async def start(self) -> None:
        await self._lead()
        self.gate.holder.start()
        self._task = asyncio.ensure_future(self._run())
        if self.client is not None and self.gate.turns is not None:
            self._listener = asyncio.ensure_future(self._listen(self.client, self.gate.turns))

    async def stop(self) -> None:
        for task in (self._task, self._listener):
            await cancel_and_wait(task)
        for waking in self._waking.values():
            waking.cancel()
        await self.gate.close()
        await self.lease.resign()

    async def _lead(self) -> None:
        leading = await self.lease.step()
        self.engine.config.gpu.auto_pause = self.auto_pause and leading

    async def _run(self) -> None:
        last_step = time.monotonic()
        last_duties = float("-inf")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), SYNC_SECONDS)
            self._poke.clear()
            try:
                if time.monotonic() - last_step >= self.lease.interval:
                    last_step = time.monotonic()
                    await self._lead()
                await self._sync()
                self.gate.return_spares()
                if self.sharing is not None:
                    await self.sharing.step()
                if time.monotonic() - last_duties < DUTY_SECONDS:
                    continue
                last_duties = time.monotonic()
                if self.lease.is_leader:
                    await self._serve_wanted()
                    await self._close_finished()
                else:
                    await self._rewant()
            except (GpuctlError, *StoreUnreachable) as exc:
                log.warning("replica sync failed: %s", exc)
            except Exception:  # the loop must outlive one bad round
                log.exception("replica sync failed")

    async def _sync(self) -> None:
        """Count the other replicas' slots (overall and per user) into each ready GPU, and
        register where requests wait here for a turn; one round trip for all GPUs."""
        gpus = [g.id for g in self.engine.glance() if g.state.ready]
        if not gpus:
            return
        if self.gate.turns is None:
            local = self.engine.local_slots()
            for gpu_id in gpus:
                used = await self.gate.holder.slots.in_use(gpu_id)
                mine = local.get(gpu_id, 0) + self.gate.spares(gpu_id)
                self.engine.set_foreign(gpu_id, max(0, used - mine))
            return
        waiting = self.engine.waiting_gpus()
        turns = await self.gate.turns.sync(
            {g: (g in waiting, self.engine.held_by_user(g)) for g in gpus})
        local = self.engine.local_slots()
        self.gate.contended = {g for g, turn in turns.items() if turn.others_waiting}
        for gpu_id, turn in turns.items():
            mine = local.get(gpu_id, 0) + self.gate.spares(gpu_id) + self.gate.passing(gpu_id)
            self.engine.set_foreign(gpu_id, max(0, turn.in_use - mine - turn.handed))
            self.engine.set_user_foreign(gpu_id, turn.users)

    async def _listen(self, client: aioredis.Redis, turns: SlotTurns) -> None:
        """Hear at once when another replica starts waiting for a GPU (its slots freed here
        are passed on from now) or hands this one a slot (sync now to take it)."""
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(turns.channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    news = turns.parse(message["data"]) if message else None
                    if news is None:
                        continue
                    if news.kind == "wait" and news.replica != turns.replica:
                        self.gate.contended.add(news.gpu_id)
                        self._poke.set()
                    elif news.kind == "hand" and news.replica == turns.replica:
                        self._poke.set()
            except StoreUnreachable as exc:
                log.warning("turns channel lost (Redis unreachable): %s", exc)
                await asyncio.sleep(1.0)
            except Exception:  # keep listening: the sync still carries the news, later
                log.exception("turns channel failed")
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(*StoreUnreachable):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _serve_wanted(self) -> None:
        """The leader wakes what followers asked for (its own wake is single-flight)."""
        self._waking = {g: t for g, t in self._waking.items() if not t.done()}
        for gpu_id, cause in (await self.actions.wanted()).items():
            if gpu_id in self._waking:
                continue
            try:
                view = self.engine.gpu(gpu_id)
            except GpuctlError:
                continue  # not in this replica's fleet view (yet)
            if view.state is GpuState.PAUSED:
                # For the follower's held requests, or by hand there: its timeline says so.
                cause = cause if cause in WAKE_CAUSES else "gateway"
                self._waking[gpu_id] = asyncio.ensure_future(
                    self.engine.wake(gpu_id, cause=cause))

    async def _close_finished(self) -> None:
        """Drop claims the cloud has carried out, so the GPU can be acted on again."""
        timing = self.engine.config.timing
        limit = timing.startup_timeout_seconds + timing.ollama_readiness_wait_seconds
        for gpu_id, action in (await self.actions.in_flight()).items():
            try:
                status = self.engine.gpu(gpu_id).cloud_status
            except GpuctlError:
                status = "gone"
            done = (action.action == "resume" and status == "running") or (
                action.action == "pause" and status == "paused")
            if done or status == "gone" or time.time() - action.started_at > limit:
                await self.actions.end(self.lease.value, gpu_id)

    async def _rewant(self) -> None:
        """A follower keeps asking while its engine waits on a paused GPU, so a new leader
        (the old one died) hears of it within a second too."""
        for gpu in self.engine.glance():
            if gpu.state is GpuState.STARTING and gpu.cloud_status == "paused":
                await self.actions.want(gpu.id, self.engine.wake_cause(gpu.id))


class ReplicaSet:
    """The Redis connection and shared parts of one replica, before its engine exists.

    ``serve`` opens it, wraps its cloud with ``cloud()``, builds the engine on that cloud,
    then ``join``s the engine and starts the replica; ``close`` stops all of it.
    """

    def __init__(self, url: str, *, replica: str | None = None) -> None:
        from gpuctl.store.shared import GlobalSlots, connect

        self.client = connect(url)
        # pid@host: an operator (and a test) can tell which process holds a slot or leads.
        replica = replica or f"{os.getpid()}@{socket.gethostname()}"
        slots = GlobalSlots(self.client)
        self.holder = SlotHolder(slots, replica=replica)
        self.turns = SlotTurns(slots, self.client, replica)
        self.lease = LeaderLease(self.client, self.holder.replica)
        self.actions = CloudActions(self.client)
        self.keys = SharedKeys(self.client)
        self.replica: Replica | None = None
        self.fenced: FencedCloud | None = None

    def cloud(self, inner: CloudProvider) -> FencedCloud:
        self.fenced = FencedCloud(inner, self.lease, self.actions)
        return self.fenced

    async def share_keys(self, local: ReplicaKeys) -> None:
        """Publish this host's key table, load the shared one, and keep it in sync: the
        gateway then authenticates against every replica's keys and revocations."""
        await self.keys.publish(local.hashed())
        await self.keys.sync()
        local.attach(self.keys)
        self.keys.start()

    async def join(self, engine: Engine) -> Replica:
        if self.fenced is not None:
            self.fenced.cause_of = engine.wake_cause
        self.replica = Replica(engine, SharedSlotGate(self.holder, self.turns), self.lease,
                               self.actions, auto_pause=engine.config.gpu.auto_pause,
                               client=self.client)
        self.replica.sharing = SharedState(engine, self.client, self.lease)
        await self.replica.start()
        return self.replica

    async def close(self) -> None:
        await self.keys.stop()
        if self.replica is not None:
            if self.replica.sharing is not None:  # the last rows out before the lead goes
                await self.replica.sharing.close()
            await self.replica.stop()
        await self.client.aclose()
