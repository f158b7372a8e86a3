"""The engine's SQLite store: what must survive a restart, and a cheap hot path."""

from __future__ import annotations

from pathlib import Path

from gpuctl.store import LeaseRecord, Store
from gpuctl.store.store import HISTORY_KEEP


def test_usage_sums_in_memory_and_survives_a_reopen(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.record_usage("alice", tokens_in=5, tokens_out=7, gpu_seconds=1.5, at=10.0)
    store.record_usage("alice", tokens_in=1, tokens_out=1, gpu_seconds=0.5, at=20.0)
    assert store.usage()["alice"].requests == 2  # unflushed sums are included
    store.flush()
    store.record_usage("alice", tokens_out=2)
    totals = store.usage()["alice"]
    assert (totals.requests, totals.tokens_in, totals.tokens_out) == (3, 6, 10)
    assert totals.gpu_seconds == 2.0
    store.close()  # flushes
    again = Store.open(tmp_path).usage()["alice"]
    assert (again.requests, again.tokens_out, again.last_at) == (3, 10, 20.0)


def test_record_usage_does_not_touch_the_disk(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    before = store.conn.total_changes
    for _ in range(100):
        store.record_usage("bob", tokens_in=1)
    assert store.conn.total_changes == before
    store.close()


def test_leases_round_trip_and_expired_ones_are_dropped(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.save_leases([LeaseRecord("g1", "alice", 500.0, 600.0),
                       LeaseRecord("g1", "bob", 50.0, 180.0)])
    assert store.load_leases(100.0) == [LeaseRecord("g1", "alice", 500.0, 600.0)]
    store.save_leases([])
    assert store.load_leases(0.0) == []
    store.close()


def test_pending_actions_are_remembered_until_ended(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.begin_action("g1", "resume", 42.0)
    store.close()
    store = Store.open(tmp_path)
    [action] = store.pending_actions().values()
    assert (action.gpu_id, action.action, action.started_at) == ("g1", "resume", 42.0)
    store.end_action("g1")
    assert store.pending_actions() == {}
    store.close()


def test_known_models_and_resume_history_persist(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.save_models("g1", [{"name": "qwen3:8b", "model": "qwen3:8b"}], 1.0)
    for n in range(HISTORY_KEEP + 5):
        store.record_resume("g1", 100.0 + n, ok=True, at=float(n))
    store.record_load("qwen3:8b", 12.0, 1.0)
    store.close()
    store = Store.open(tmp_path)
    assert store.known_models() == {"g1": [{"name": "qwen3:8b", "model": "qwen3:8b"}]}
    history = store.resume_history()["g1"]
    assert len(history) == HISTORY_KEEP
    assert history[-1] == (100.0 + HISTORY_KEEP + 4, True)
    assert store.load_history() == {"qwen3:8b": [12.0]}
    store.close()


def test_load_history_keeps_only_the_newest_loads_per_model(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    for n in range(HISTORY_KEEP + 5):
        store.record_load("qwen3:8b", 10.0 + n, float(n))
    store.record_load("llama3.2:latest", 3.0, 0.0)
    rows = store.conn.execute("SELECT COUNT(*) FROM load_history").fetchone()[0]
    assert rows == HISTORY_KEEP + 1  # pruned on disk, not only when read
    assert store.load_history()["qwen3:8b"] == [10.0 + n for n in range(5, HISTORY_KEEP + 5)]
    assert store.load_history()["llama3.2:latest"] == [3.0]
    store.close()


def test_the_database_runs_in_wal_mode(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.path == tmp_path / "gpuctl.db"
    store.close()


def test_a_reader_store_reads_leases_and_refuses_to_write_leases_or_usage(
    tmp_path: Path,
) -> None:
    import pytest

    from gpuctl.store import NotTheWriter

    writer = Store.open(tmp_path)
    writer.save_leases([LeaseRecord("g1", "alice", 500.0, 600.0)])
    reader = Store.open(tmp_path, reader=True)
    assert reader.load_leases(100.0) == [LeaseRecord("g1", "alice", 500.0, 600.0)]
    with pytest.raises(NotTheWriter):
        reader.save_leases([])
    with pytest.raises(NotTheWriter):
        reader.record_usage("alice", tokens_in=1)
    reader.close()
    assert writer.load_leases(100.0) == [LeaseRecord("g1", "alice", 500.0, 600.0)]
    writer.close()
