"""Replicas: several gateways share one fleet through Redis, with one writer toward the cloud.

With ``store.url = "redis://…"`` each gateway's engine runs as before, plus three things:

- **Global slots** (``SharedSlotGate``): every slot the engine grants must also hold an
  entry in Redis (``store.shared.slots``), so a GPU's slot count holds across replicas. A
  slot freed and handed to a local waiter keeps its entry (no round trip); the others'
  counts are synced into each GPU's ``in_use`` a few times a second (``Replica._sync``),
  so routing sees them and idle pause never takes a GPU another replica is using.
- **One writer** (``FencedCloud``): the engine's cloud is wrapped. On the leader (the
  replica holding ``store.shared.leader``'s lease) a resume or pause is first claimed in
  Redis, fenced by the leader's token, and sent only if the claim wins: a successor finds
  a claim in flight and watches the GPU instead of sending a second resume. On a follower,
  a resume becomes a "wanted" record for the leader, and the follower's engine watches the
  cloud just as if it had sent it; followers never pause.
- **The leader's duties** (``Replica._run``): renew the lease, act on wanted wakes within a
  second, close claims the cloud has finished, and idle-pause only while leading.

Keys: each replica publishes its key table at start and authenticates against the shared
directory (``store.shared.keys``); ``gpuctl keys`` publishes after each change.

Leases, the ledger (request rows and the GPU timeline), known models and resume and load
history are shared too, by ``engine.sharing.SharedState``, which ``Replica._run`` steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from gpuctl.cloud.base import CloudProvider, Workspace
from gpuctl.engine.api import GpuState
from gpuctl.engine.sharing import SharedState
from gpuctl.errors import ActionRefused, CloudUnavailable, GpuctlError, Unavailable
from gpuctl.store.shared import (
    CloudActions,
    LeaderLease,
    ReplicaKeys,
    SharedKeys,
    SlotHolder,
    StoreUnreachable,
)

if TYPE_CHECKING:
    from gpuctl.engine.engine import Engine

__all__ = ["FencedCloud", "Replica", "SharedSlotGate", "SlotGate"]

log = logging.getLogger(__name__)

#: How often a replica re-reads the others' slot counts and the leader reads wanted wakes.
SYNC_SECONDS = 0.2

#: A slot entry kept for a local hand-off goes back to Redis if nobody took it this soon.
SPARE_SECONDS = 0.1


class SlotGate(Protocol):
    """What the engine asks of global slots (``Engine.attach_gate``)."""

    async def take(self, gpu_id: str, limit: int) -> str | None:
        """A global slot entry on ``gpu_id``, or None when all ``limit`` are taken."""
        ...

    def put_back(self, gpu_id: str, member: str) -> None:
        """A grant holding ``member`` ended; the entry goes to a local waiter or to Redis."""
        ...


class SharedSlotGate:
    """Global slots through ``SlotHolder``, with local hand-off of freed entries."""

    def __init__(self, holder: SlotHolder) -> None:
        self.holder = holder
        #: Freed entries kept for a local waiter: (when, member).
        self._spare: dict[str, list[tuple[float, str]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

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

    def put_back(self, gpu_id: str, member: str) -> None:
        if not self.holder.intact(member):  # never hand on an entry Redis may have lost
            self._later(self.holder.release(member))
            return
        self._spare.setdefault(gpu_id, []).append((time.monotonic(), member))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def spares(self, gpu_id: str) -> int:
        return len(self._spare.get(gpu_id, ()))

    def return_spares(self) -> None:
        """Give back to Redis, in one round trip, the entries no local waiter took within
        ``SPARE_SECONDS`` (so an idle replica's releases cost one call per sync, not one
        per request)."""
        cutoff = time.monotonic() - SPARE_SECONDS
        due: list[str] = []
        for spare in self._spare.values():
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

    async def list_workspaces(self) -> list[Workspace]:
        return await self.inner.list_workspaces()

    async def get_workspace(self, workspace_id: str) -> Workspace:
        return await self.inner.get_workspace(workspace_id)

    async def resume(self, workspace_id: str) -> Workspace:
        with _store_as_cloud():
            if not self.lease.is_leader:
                await self.actions.want(workspace_id)
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
                 actions: CloudActions, *, auto_pause: bool) -> None:
        self.engine = engine
        self.gate = gate
        self.lease = lease
        self.actions = actions
        self.auto_pause = auto_pause
        self._task: asyncio.Task[None] | None = None
        self._waking: dict[str, asyncio.Task[object]] = {}
        #: Leases, ledger rows, learnt models and history (``ReplicaSet.join`` sets it).
        self.sharing: SharedState | None = None
        engine.attach_gate(gate)
        engine.config.gpu.auto_pause = False  # until this replica leads

    async def start(self) -> None:
        await self._lead()
        self.gate.holder.start()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in self._waking.values():
            task.cancel()
        await self.gate.close()
        await self.lease.resign()

    async def _lead(self) -> None:
        leading = await self.lease.step()
        self.engine.config.gpu.auto_pause = self.auto_pause and leading

    async def _run(self) -> None:
        last_step = time.monotonic()
        while True:
            await asyncio.sleep(SYNC_SECONDS)
            try:
                if time.monotonic() - last_step >= self.lease.interval:
                    last_step = time.monotonic()
                    await self._lead()
                self.gate.return_spares()
                await self._sync()
                if self.sharing is not None:
                    await self.sharing.step()
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
        """Count the other replicas' slots into each ready GPU's ``in_use``."""
        gpus = [g for g in self.engine.gpus() if g.state.ready]
        if not gpus:
            return
        local = self.engine.local_slots()
        for view in gpus:
            used = await self.gate.holder.slots.in_use(view.id)
            mine = local.get(view.id, 0) + self.gate.spares(view.id)
            self.engine.set_foreign(view.id, max(0, used - mine))

    async def _serve_wanted(self) -> None:
        """The leader wakes what followers asked for (its own wake is single-flight)."""
        self._waking = {g: t for g, t in self._waking.items() if not t.done()}
        for gpu_id in await self.actions.wanted():
            if gpu_id in self._waking:
                continue
            try:
                view = self.engine.gpu(gpu_id)
            except GpuctlError:
                continue  # not in this replica's fleet view (yet)
            if view.state is GpuState.PAUSED:
                self._waking[gpu_id] = asyncio.ensure_future(
                    self.engine.wake(gpu_id, cause="gateway"))  # for requests, not by hand

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
        for view in self.engine.gpus():
            if view.state is GpuState.STARTING and view.cloud_status == "paused":
                await self.actions.want(view.id)


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
        self.holder = SlotHolder(GlobalSlots(self.client), replica=replica)
        self.lease = LeaderLease(self.client, self.holder.replica)
        self.actions = CloudActions(self.client)
        self.keys = SharedKeys(self.client)
        self.replica: Replica | None = None

    def cloud(self, inner: CloudProvider) -> FencedCloud:
        return FencedCloud(inner, self.lease, self.actions)

    async def share_keys(self, local: ReplicaKeys) -> None:
        """Publish this host's key table, load the shared one, and keep it in sync: the
        gateway then authenticates against every replica's keys and revocations."""
        await self.keys.publish(local.hashed())
        await self.keys.sync()
        local.attach(self.keys)
        self.keys.start()

    async def join(self, engine: Engine) -> Replica:
        self.replica = Replica(engine, SharedSlotGate(self.holder), self.lease, self.actions,
                               auto_pause=engine.config.gpu.auto_pause)
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
