"""``engine.requestlog``: the request log as ``gpuctl simulate --url`` replays it."""

from __future__ import annotations

from gpuctl.engine.requestlog import request_log
from gpuctl.store import RequestRow, Store


def _row(at: float, **kw: object) -> RequestRow:
    return RequestRow(at=at, key_id="key_alice", user="alice", route="/api/chat",
                      model="llama3:latest", **kw)  # type: ignore[arg-type]


def test_the_replay_log_is_cut_between_instants_and_leaves_refusals_out() -> None:
    store = Store.memory()
    for at in (10.0, 20.0, 20.0, 30.0):
        store.ledger.add_request(_row(at, service_s=2.0, tokens_out=3))
    store.ledger.add_request(_row(15.0, outcome="refused"))
    whole = request_log(store, since=0, until=100)
    assert [r[0] for r in whole.rows] == [10.0, 20.0, 20.0, 30.0] and not whole.truncated
    assert whole.rows[0] == (10.0, "alice", "llama3:latest", 2.0, 3)
    # Three rows read (a refusal among them); the cut falls inside the 20.0 instant, so the
    # window ends there and keeps only what it holds whole.
    cut = request_log(store, since=0, until=100, limit=3)
    assert cut.truncated and cut.until == 20.0 and cut.asked_until == 100
    assert [r[0] for r in cut.rows] == [10.0]
