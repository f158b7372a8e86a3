"""The request log as ``gpuctl simulate`` replays it, and the fleet it was served on.

``GET /admin/requests`` (an admin's, for ``gpuctl simulate --url``) answers with a
``RequestLog``: the requests of ``[since, until)`` that reached a GPU, reduced to what a replay
needs (arrival, user, model, service seconds, tokens out), and the fleet as the store learnt it
(each GPU seen awake, its models, its successful resume times). The read is bounded: at most
``limit`` rows (``MAX_ROWS`` at most); a cut log says so (``truncated``) and ends its window
at the first request left out, so what it holds is whole.
"""

from __future__ import annotations

from pydantic import BaseModel

from gpuctl.store import Store

__all__ = ["COLUMNS", "MAX_ROWS", "FleetGpu", "RequestLog", "learned_fleet", "request_log"]

#: The most rows one answer carries (a busy week of a large group; ~10 MB of JSON).
MAX_ROWS = 200_000
#: What each row holds, in order.
COLUMNS = ("at", "user", "model", "service_s", "tokens_out")

Row = tuple[float, str, str, float, int]


class FleetGpu(BaseModel):
    """One GPU as the store knows it: its models when last seen, its successful resumes."""

    id: str
    models: list[str]
    resume_seconds: list[float]


class RequestLog(BaseModel):
    """The served requests of ``[since, until)`` (epoch seconds), oldest first."""

    since: float
    until: float
    columns: tuple[str, ...] = COLUMNS
    rows: list[Row]
    limit: int
    #: More requests arrived before the asked-for end than ``limit``: ``until`` was moved back
    #: to the first one left out, and ``asked_until`` keeps the asked-for end.
    truncated: bool = False
    asked_until: float
    fleet: list[FleetGpu]


def learned_fleet(store: Store) -> list[FleetGpu]:
    """Each GPU the store has seen awake, with its models and learnt resume times."""
    history = store.resume_history()
    return [
        FleetGpu(
            id=gpu_id,
            models=sorted(str(m.get("name") or m.get("model")) for m in models),
            resume_seconds=[s for s, ok in history.get(gpu_id, []) if ok],
        )
        for gpu_id, models in sorted(store.known_models().items())
    ]


def request_log(store: Store, *, since: float, until: float,
                limit: int = MAX_ROWS) -> RequestLog:
    """The requests of ``[since, until)`` that reached a GPU (refused ones are left out), at
    most ``limit`` of them (capped at ``MAX_ROWS``), and the learnt fleet."""
    limit = max(1, min(limit, MAX_ROWS))
    read = store.requests(since, until, limit + 1)
    truncated = len(read) > limit
    end = read[limit].at if truncated else until
    rows: list[Row] = [
        (r.at, r.user, r.model, max(0.0, r.service_s), r.tokens_out)
        for r in read[:limit] if r.outcome != "refused" and r.model and r.at < end
    ]
    return RequestLog(since=since, until=end, rows=rows, limit=limit, truncated=truncated,
                      asked_until=until, fleet=learned_fleet(store))
