"""The ledger's tables: rows batched in memory, a typed reader, retention into roll-ups."""

from __future__ import annotations

from pathlib import Path

from gpuctl.store import RequestRow, Store, TimelineEvent
from gpuctl.store.ledger import PENDING_MAX, DailyRollup


def _row(at: float, user: str = "alice", **kw: object) -> RequestRow:
    return RequestRow(at=at, key_id="key_" + user, user=user, route="/api/chat",
                      model="llama3:latest", **kw)  # type: ignore[arg-type]


def test_request_rows_wait_in_memory_until_flush(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    before = store.conn.total_changes
    for i in range(50):
        store.ledger.add_request(_row(100.0 + i, gpu_id="ws-1", service_s=1.5, tokens_out=7))
    assert store.conn.total_changes == before  # no disk write per request
    assert len(store.requests(0, 1e12)) == 50  # the reader sees unflushed rows
    store.flush()
    store.close()
    again = Store.open(tmp_path)
    rows = again.requests(110.0, 120.0)
    assert [r.at for r in rows] == [110.0 + i for i in range(10)]
    assert rows[0] == _row(110.0, gpu_id="ws-1", service_s=1.5, tokens_out=7)


def test_a_bounded_read_keeps_the_oldest_flushed_or_not(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    for i in range(5):
        store.ledger.add_request(_row(100.0 + 2 * i))
    store.flush()
    for i in range(5):
        store.ledger.add_request(_row(101.0 + 2 * i))  # pending, interleaved in time
    assert [r.at for r in store.requests(0, 1e12, limit=4)] == [100.0, 101.0, 102.0, 103.0]
    assert store.requests(0, 1e12, limit=0) == []
    assert len(store.requests(0, 1e12)) == 10
    store.close()


def test_a_flood_of_rows_is_bounded_and_counted() -> None:
    store = Store.memory()
    for i in range(PENDING_MAX + 25):
        store.ledger.add_request(_row(float(i)))
    assert store.ledger.dropped == 25
    assert store.ledger.flush() == PENDING_MAX


def test_timeline_events_are_written_at_once_and_the_last_one_is_found(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.ledger.add_event(TimelineEvent("ws-1", 10.0, "resuming", "gateway", "A10"))
    store.ledger.add_event(TimelineEvent("ws-1", 90.0, "running", "observed", "A10"))
    store.ledger.add_event(TimelineEvent("ws-2", 50.0, "running", "outside"))
    # No flush, no close: a crash here keeps them.
    other = Store.open(tmp_path)
    assert other.ledger.last_events()["ws-1"].status == "running"
    assert other.ledger.last_event("ws-2") == TimelineEvent("ws-2", 50.0, "running", "outside")
    assert [e.at for e in other.ledger.timeline(until=60.0)] == [10.0, 50.0]


def test_retire_keeps_rollups_and_deletes_old_rows_atomically() -> None:
    store = Store.memory()
    for at in (10.0, 20.0, 200_000.0):
        store.ledger.add_request(_row(at))
    store.flush()
    rollup = DailyRollup("1970-01-01", "user", "alice", requests=2, serving=3.0)
    assert store.ledger.retire(100_000.0, [rollup]) == 2
    assert store.ledger.retire(100_000.0, [rollup]) == 0
    assert [r.at for r in store.requests(0, 1e12)] == [200_000.0]
    assert store.ledger.rollups("1970-01-01", "1970-01-02")[0].requests == 4
