"""gpuctl.store: durable state in SQLite (leases, known models, resume history, usage)."""

from gpuctl.store.ledger import RequestRow, TimelineEvent
from gpuctl.store.store import LeaseRecord, NotTheWriter, PendingAction, Store, UsageTotals

__all__ = ["LeaseRecord", "NotTheWriter", "PendingAction", "RequestRow", "Store", "TimelineEvent",
           "UsageTotals"]
