"""Workloads to replay: a CSV trace, or a synthetic week of a research group.

A workload is a list of ``Request``s (seconds from the start of the window, who, which model,
how long the GPU worked on it). ``read_trace`` reads the CSV form that ``gpuctl simulate
--trace`` takes, refusing what it cannot trust with the line that broke it. The synthetic
weeks exist so that ``gpuctl simulate --sample`` and the README's table can be reproduced on
any machine, and so that a pause policy can be judged on two differently shaped weeks:

``group`` (``--sample``): twelve people, two models, Monday 00:00 to Sunday 24:00 in the
group's time zone. On weekdays people work in sessions (a burst of requests with a think
time of their own between them: most of a minute or two, one person five minutes), starting
mostly 9:00–11:30 and 13:30–17:00 with a dip at lunch; Monday's sessions bunch at 9:00. One
person starts a batch evaluation (a few hundred back-to-back requests) at about 22:00 on
Tuesday and Thursday. Weekends see two short sessions a day. About 700 requests a weekday.

``deadline``: the same twelve in the week before a deadline: days start late (10:00–13:00)
and run to midnight, sessions are longer with shorter think times, three people run batches
at random hours, weekends are busy, and there is no Monday rush.

Both are drawn from a seeded generator: the same ``seed`` gives the same week, and another
seed another week of the same people (each person's think time, sessions a day and session
length are drawn once per shape), so history of other seeds is history of this group.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gpuctl.errors import UsageError
from gpuctl.store.ledger import RequestRow

__all__ = [
    "DAY",
    "MAX_TRACE_ROWS",
    "SHAPES",
    "WEEK",
    "Request",
    "from_request_log",
    "read_trace",
    "synthetic_week",
]

DAY = 86_400.0
WEEK = 7 * DAY
#: A trace longer than this is refused: a replay holds every request in memory.
MAX_TRACE_ROWS = 2_000_000
#: Longest service time a trace row may give (a request that ran longer is a stuck one).
MAX_SERVICE_SECONDS = DAY
MAX_NAME = 200
SMALL = "llama3.2:latest"
LARGE = "qwen2.5:14b"
SHAPES = ("group", "deadline")


@dataclass(frozen=True, order=True)
class Request:
    """One request to replay: ``arrival_s`` from the window's start, ``service_s`` on a GPU."""

    arrival_s: float
    user: str
    model: str
    service_s: float
    tokens_out: int = 0


def read_trace(path: Path) -> list[Request]:
    """Read a CSV trace (``arrival_s,user,model,service_s[,tokens_out]``), sorted by arrival.

    Every row is checked: a missing column, a number that is not one (or is negative, NaN,
    infinite), an empty or overlong name, or more than ``MAX_TRACE_ROWS`` rows is a
    ``UsageError`` naming the line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read trace {path}: {exc}") from None
    return parse_trace(text, str(path))


def parse_trace(text: str, origin: str = "trace") -> list[Request]:
    """``read_trace`` on text already read."""
    reader = csv.DictReader(io.StringIO(text))
    columns = set(reader.fieldnames or ())
    missing = {"arrival_s", "user", "model", "service_s"} - columns
    if missing:
        raise UsageError(
            f"{origin}: missing column(s) {', '.join(sorted(missing))}",
            hint="The header is arrival_s,user,model,service_s (tokens_out optional).",
        )
    requests: list[Request] = []
    for row in reader:
        line = reader.line_num
        if len(requests) >= MAX_TRACE_ROWS:
            raise UsageError(f"{origin}: more than {MAX_TRACE_ROWS:,} requests")
        arrival = _number(row.get("arrival_s"), origin, line, "arrival_s", 100 * 365 * DAY)
        service = _number(row.get("service_s"), origin, line, "service_s", MAX_SERVICE_SECONDS)
        tokens_raw = row.get("tokens_out") or "0"
        tokens = int(_number(tokens_raw, origin, line, "tokens_out", 1e12))
        user = _name(row.get("user"), origin, line, "user")
        model = _name(row.get("model"), origin, line, "model")
        if ":" not in model.rsplit("/", 1)[-1]:
            model += ":latest"
        requests.append(Request(arrival, user, model, service, tokens))
    if not requests:
        raise UsageError(f"{origin}: no requests in the trace")
    requests.sort()
    start = requests[0].arrival_s
    if start:
        requests = [
            Request(r.arrival_s - start, r.user, r.model, r.service_s, r.tokens_out)
            for r in requests
        ]
    return requests


def _number(raw: str | None, origin: str, line: int, column: str, limit: float) -> float:
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or value > limit:
        raise UsageError(
            f"{origin}, line {line}: {column} must be a number from 0 to {limit:g} "
            f"(got {raw!r})"
        )
    return value


def _name(raw: str | None, origin: str, line: int, column: str) -> str:
    value = (raw or "").strip()
    if not value or len(value) > MAX_NAME or any(ord(c) < 32 for c in value):
        raise UsageError(f"{origin}, line {line}: {column} must be 1-{MAX_NAME} printable "
                         f"characters (got {raw!r})")
    return value


def from_request_log(rows: Iterable[RequestRow], start: float) -> list[Request]:
    """The ledger's request rows as a workload, times relative to ``start`` (wall seconds;
    rows before it get negative times: history). Refused requests never reached a GPU and
    are left out; a request cut short (error, cancelled) counts for the time it held one."""
    return sorted(
        Request(row.at - start, row.user, row.model, max(0.0, row.service_s), row.tokens_out)
        for row in rows if row.outcome != "refused" and row.model
    )


def write_trace(requests: Iterable[Request]) -> str:
    """The CSV form of ``requests`` (what ``read_trace`` reads)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["arrival_s", "user", "model", "service_s", "tokens_out"])
    for r in requests:
        writer.writerow([f"{r.arrival_s:.3f}", r.user, r.model, f"{r.service_s:.3f}",
                         r.tokens_out])
    return out.getvalue()


# -- synthetic weeks ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Person:
    name: str
    think_s: float  # median seconds between one answer and the next question
    sessions: float  # mean sessions per working day
    session_len: float  # mean requests per session
    large_share: float  # share of requests for the large model


def _group(rng: random.Random, deadline: bool) -> list[_Person]:
    people = []
    for n in range(12):
        think = 300.0 if n == 4 else rng.uniform(40, 150)
        if deadline:
            think *= 0.6
        people.append(_Person(
            name=f"user{n + 1:02d}", think_s=think,
            sessions=rng.uniform(2.5, 4.5),
            session_len=rng.uniform(8, 16) * (1.2 if deadline else 1.0),
            large_share=rng.uniform(0.1, 0.5),
        ))
    return people


def _service(rng: random.Random, model: str) -> float:
    median = 25.0 if model == LARGE else 8.0
    return min(600.0, rng.lognormvariate(math.log(median), 0.6))


def _session(rng: random.Random, person: _Person, start: float, out: list[Request]) -> None:
    count = max(1, int(rng.expovariate(1 / person.session_len)) + 1)
    t = start
    model = LARGE if rng.random() < person.large_share else SMALL
    for _ in range(count):
        if rng.random() < 0.15:  # now and then switch model within a session
            model = SMALL if model == LARGE else LARGE
        service = _service(rng, model)
        tokens = int(service * rng.uniform(20, 60))
        out.append(Request(t, person.name, model, service, tokens))
        t += service + rng.lognormvariate(math.log(person.think_s), 0.7)


def _batch(rng: random.Random, user: str, start: float, out: list[Request]) -> None:
    t = start
    for _ in range(rng.randint(150, 350)):
        service = _service(rng, SMALL) * 0.8
        out.append(Request(t, user, SMALL, service, int(service * 40)))
        t += service + rng.uniform(0.1, 1.0)


def _workday_start(rng: random.Random, monday: bool) -> float:
    """Seconds after midnight a weekday session of the ``group`` week starts."""
    if monday and rng.random() < 0.35:
        return 9 * 3600 + rng.expovariate(1 / 900)  # the Monday 9:00 rush
    if rng.random() < 0.45:
        return rng.uniform(9 * 3600, 11.5 * 3600)
    if rng.random() < 0.1:
        return rng.uniform(12 * 3600, 13.5 * 3600)
    return rng.uniform(13.5 * 3600, 17 * 3600)


def synthetic_week(shape: str = "group", seed: int = 1) -> list[Request]:
    """A week of requests of the ``shape`` named in the module docstring, sorted."""
    if shape not in SHAPES:
        raise UsageError(f"unknown workload shape {shape!r}; known: {', '.join(SHAPES)}")
    rng = random.Random(f"{shape}:{seed}")
    deadline = shape == "deadline"
    # The people are the same every week (what a policy learns of them holds); their weeks
    # differ by seed.
    people = _group(random.Random(f"{shape}:people"), deadline)
    out: list[Request] = []
    for day in range(7):
        base = day * DAY
        weekend = day >= 5
        for person in people:
            sessions = person.sessions
            if weekend:
                sessions = 0.8 if deadline else 0.17
            for _ in range(_poisson(rng, sessions)):
                if deadline:
                    start = rng.uniform(10 * 3600, 13 * 3600) + rng.uniform(0, 10 * 3600)
                elif weekend:
                    start = rng.uniform(10 * 3600, 18 * 3600)
                else:
                    start = _workday_start(rng, day == 0)
                _session(rng, person, base + start, out)
        if deadline:
            for user in ("user03", "user07", "user11"):
                if rng.random() < 0.5:
                    _batch(rng, user, base + rng.uniform(0, DAY - 3 * 3600), out)
        elif day in (1, 3):
            _batch(rng, "user09", base + 22 * 3600 + rng.uniform(-900, 900), out)
    return sorted(r for r in out if r.arrival_s < WEEK)


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth's method: means here are small)."""
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1
