"""Routing decision time with 10, 100 and 1,000 GPUs and 10,000 queued requests.

Run it as a script: ``python tests/bench/bench_router.py`` (it is not collected by pytest).
It builds a simulated fleet on a fake clock, queues 10,000 requests for a model whose GPUs
are all busy, and then times, per decision:

- ``choose``: the router alone (the preference walk over the model's buckets);
- ``acquire``: a whole grant on the fast path (route, lease, slot, ticket) plus its
  ``release`` (slot back, lease renewed, usage summed), for many users and models;
- ``hand-off``: ``release`` of a slot on a busy GPU, which picks the fairest of the 10,000
  waiters and grants it the slot;
- a worst case for ``choose``: a user who holds a lease on every GPU (the router checks each
  of the user's leased GPUs before the buckets).

The target is ≤ 50 µs per decision at 1,000 GPUs. Figures are medians of several rounds of
the benchmark thread's CPU time (``time.thread_time_ns``), so other work on a shared machine
does not inflate them; ``--wall`` measures wall-clock time instead. They print, they never
decide a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpuctl.config import Config
from gpuctl.engine import Engine, FakeClock, Ticket
from gpuctl.sim.cloud import SimCloud
from gpuctl.store import Store

MODELS = [f"model{i}:latest" for i in range(20)]
_now = time.thread_time_ns
BUSY = "busy:latest"
SLOTS = 4


def _config(max_queue: int) -> Config:
    return Config.model_validate(
        {
            "server": {"max_queue": max_queue, "queue_timeout_seconds": 1e9},
            "gpu": {"slots": SLOTS, "auto_pause": False},
            "timing": {"poll_interval_seconds": 1e9},
        }
    )


async def _fleet(gpus: int, queued: int) -> tuple[Engine, list[asyncio.Task[Ticket]], list[Ticket]]:
    clock = FakeClock()
    cloud = SimCloud(clock, ollama_seconds=0)
    busy_gpus = max(1, gpus // 10)
    for n in range(gpus):
        models = [MODELS[(3 * n + k) % len(MODELS)] for k in range(3)]
        if n < busy_gpus:
            models = [BUSY]
        cloud.add(f"gpu-{n:04d}", status="running", models=models,
                  loaded=models[:1] if n % 2 else [])
    engine = Engine(_config(queued + 10), cloud, Store.memory(), clock=clock, nodes=cloud.node)
    await engine.start()
    holders = [await engine.acquire(BUSY, f"holder{i}") for i in range(busy_gpus * SLOTS)]
    waiting = [asyncio.ensure_future(engine.acquire(BUSY, f"user{i % 500}"))
               for i in range(queued)]
    await asyncio.sleep(0)
    assert engine.queue_depth() == queued, engine.queue_depth()
    return engine, waiting, holders


def _per_call_us(elapsed_ns: int, calls: int) -> float:
    return elapsed_ns / calls / 1_000


async def _bench(gpus: int, queued: int, rounds: int, calls: int) -> dict[str, float]:
    engine, waiting, holders = await _fleet(gpus, queued)
    index = engine._index  # the router's index, timed on its own
    leases = engine._leases
    users = [f"u{i}" for i in range(1000)]
    result: dict[str, list[float]] = {"choose": [], "acquire": [], "handoff": [],
                                      "greedy": []}
    # A greedy user holding a lease on every GPU: the router checks each of them.
    now = engine.clock.now()
    for gpu in engine.gpus():
        leases.hold(gpu.id, "greedy", now + 600, 600)

    for _ in range(rounds):
        start = _now()
        for i in range(calls):
            user = users[i % 1000]
            index.choose(MODELS[i % 20], leases.of_user(user))
        result["choose"].append(_per_call_us(_now() - start, calls))

        greedy = leases.of_user("greedy")
        start = _now()
        for i in range(calls):
            index.choose(MODELS[i % 20], greedy)
        result["greedy"].append(_per_call_us(_now() - start, calls))

        start = _now()
        for i in range(calls):
            ticket = await engine.acquire(MODELS[i % 20], users[i % 1000])
            engine.release(ticket)
        result["acquire"].append(_per_call_us(_now() - start, calls))

    # Hand-offs: each release of a busy slot grants it to the fairest of the queued waiters.
    done = 0
    spent = 0
    pending = list(waiting)
    while holders and done < min(queued, calls):
        start = _now()
        for ticket in holders:
            engine.release(ticket)
        spent += _now() - start
        done += len(holders)
        for _ in range(5):  # let the granted waiters' tasks run to the end
            await asyncio.sleep(0)
        holders = [t.result() for t in pending if t.done()]
        pending = [t for t in pending if not t.done()]
    result["handoff"].append(_per_call_us(spent, max(done, 1)))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await engine.stop()
    return {name: statistics.median(values) for name, values in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--gpus", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of CPU time")
    args = parser.parse_args()
    if args.wall:
        global _now
        _now = time.perf_counter_ns
    print(f"routing decisions, {args.queued:,} queued requests, {SLOTS} slots per GPU, "
          f"median of {args.rounds} rounds x {args.calls:,} calls, "
          f"{'wall-clock' if args.wall else 'CPU'} time")
    print(f"{'GPUs':>6} | {'choose µs':>10} | {'acquire+release µs':>19} | "
          f"{'hand-off µs':>11} | {'choose, user leasing all GPUs µs':>32}")
    print(f"{'-' * 6}-+-{'-' * 10}-+-{'-' * 19}-+-{'-' * 11}-+-{'-' * 32}")
    for gpus in args.gpus:
        figures = asyncio.run(_bench(gpus, args.queued, args.rounds, args.calls))
        print(f"{gpus:>6} | {figures['choose']:>10.2f} | {figures['acquire']:>19.2f} | "
              f"{figures['handoff']:>11.2f} | {figures['greedy']:>32.2f}")


if __name__ == "__main__":
    main()
