"""gpuctl.store: durable state in SQLite (leases, known models, resume history, usage)."""

from gpuctl.store.store import LeaseRecord, PendingAction, Store, UsageTotals

__all__ = ["LeaseRecord", "PendingAction", "Store", "UsageTotals"]
