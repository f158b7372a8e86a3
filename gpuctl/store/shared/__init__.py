"""State shared between gateway replicas through Redis (``store.url = "redis://…"``).

Each module holds one kind of shared state and says in its docstring what it guarantees:

- ``slots``: global slot counts per GPU, per-request entries with a TTL (never exceeded).
- ``leader``: the leader lease with a fencing token (one writer toward the cloud).
- ``actions``: cloud actions in flight and "wanted" wakes (fenced by the leader's token).
- ``turns``: whose turn a freed slot is across replicas, and per-user counts (fairness).
- ``keys``: API keys and revocations, reaching every replica within a second.
- ``budgets``: the keys' budgets, set on any host and enforced by every replica.
- ``leases``: every replica's leases per GPU (a later end wins).
- ``journal``: one stream of ledger rows and learnt facts that every replica reads.
- ``ledger``: a store's side of it: publish its own rows, fold in the others' once each.

All of it uses the maintained ``redis`` package's asyncio client. Time that decides who
holds what comes from the Redis server (``TIME`` inside the scripts), never from a
replica's clock, so replicas with skewed clocks still agree.
"""

from gpuctl.store.shared.actions import CloudActions, SharedAction
from gpuctl.store.shared.connect import StoreUnreachable, connect, unreachable
from gpuctl.store.shared.keys import ReplicaKeys, SharedKeys
from gpuctl.store.shared.leader import LeaderLease
from gpuctl.store.shared.slots import GlobalSlots, SlotHolder
from gpuctl.store.shared.turns import GpuTurn, Passed, SlotTurns, TurnNews

__all__ = [
    "CloudActions",
    "GlobalSlots",
    "GpuTurn",
    "LeaderLease",
    "Passed",
    "ReplicaKeys",
    "SharedAction",
    "SharedKeys",
    "SlotHolder",
    "SlotTurns",
    "StoreUnreachable",
    "TurnNews",
    "connect",
    "unreachable",
]
