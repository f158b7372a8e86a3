"""What sharing leases and the ledger costs a replica, in its background loop.

Run: ``.venv/bin/python tests/bench/bench_sharing.py [--rows 20000] [--gpus 10]``. It starts
its own ``redis-server`` on a free loopback port (persistence off) and measures, with the
benchmark thread's CPU (``time.thread_time_ns``) and wall time:

- ``publish``: this store's new request rows sent to the journal and stamped, per row;
- ``fold``: the other store taking them in (``INSERT OR IGNORE`` on the origin), per row;
- ``lease sync``: one round of ``SharedState.sync_leases`` (publish when changed; read every
  GPU's leases when any replica's changed, merge) with ``--gpus`` GPUs and two leases each,
  per round, with nothing changed and with a lease renewed each round; the replica runs one
  a second.

And Redis's memory per request row in the journal. None of it is on a request's path
(``Engine.acquire``/``release`` make no call to Redis for any of this). It prints; it
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gpuctl.config import Config  # noqa: E402
from gpuctl.engine import Engine, FakeClock  # noqa: E402
from gpuctl.engine.sharing import SharedState  # noqa: E402
from gpuctl.sim.cloud import SimCloud  # noqa: E402
from gpuctl.store import LeaseRecord, RequestRow, Store  # noqa: E402
from gpuctl.store.shared import LeaderLease, connect  # noqa: E402
from gpuctl.store.shared.journal import Journal  # noqa: E402
from gpuctl.store.shared.ledger import LedgerShare  # noqa: E402
from tests.replicas.redis_server import RedisServer  # noqa: E402


def _row(i: int) -> RequestRow:
    at = 1_800_000_000.0 + i
    return RequestRow(at=at, key_id="key_ann", user=f"user{i % 50}", route="/api/chat",
                      model="llama3.2:latest", gpu_id=f"ws-{i % 10:04d}", status=200,
                      queued_s=0.1, ttfb_s=0.2, duration_s=3.0, served_at=at + 0.1,
                      service_s=2.9, lease_s=600.0, tokens_in=120, tokens_out=480)


async def _ledger(url: str, rows: int, tmp: Path) -> None:
    client = connect(url)
    try:
        before = int((await client.info("memory"))["used_memory"])
        a = LedgerShare(Store.open(tmp / "a"), Journal(client))
        b = LedgerShare(Store.open(tmp / "b"), Journal(client))
        for i in range(rows):
            a.store.ledger.add_request(_row(i))
        a.store.flush()
        cpu, wall = time.thread_time_ns(), time.perf_counter()
        while await a.publish():
            pass
        pub_cpu, pub_wall = time.thread_time_ns() - cpu, time.perf_counter() - wall
        after = int((await client.info("memory"))["used_memory"])
        cpu, wall = time.thread_time_ns(), time.perf_counter()
        await b.fold()
        while b.behind:
            await b.fold()
        fold_cpu, fold_wall = time.thread_time_ns() - cpu, time.perf_counter() - wall
        assert len(b.store.requests(0, float("inf"))) == rows
        print(f"| publish | {pub_cpu / rows / 1000:.1f} | {pub_wall / rows * 1e6:.1f} |")
        print(f"| fold | {fold_cpu / rows / 1000:.1f} | {fold_wall / rows * 1e6:.1f} |")
        print(f"\nRedis memory per request row: {(after - before) / rows:.0f} bytes")
        a.store.close()
        b.store.close()
    finally:
        await client.aclose()


async def _leases(url: str, gpus: int, rounds: int, tmp: Path) -> None:
    clock = FakeClock()
    cloud = SimCloud(clock, ollama_seconds=0)
    ids = [cloud.add(f"gpu-{n:02d}", status="running", models=["m:latest"]).id
           for n in range(gpus)]
    store = Store.open(tmp / "leases")
    config = Config.model_validate({"gpu": {"slots": 4, "auto_pause": False},
                                    "timing": {"poll_interval_seconds": 1e9}})
    engine = Engine(config, cloud, store, clock=clock, nodes=cloud.node)
    await engine.start()
    client = connect(url)
    try:
        sharing = SharedState(engine, client, LeaderLease(client, "bench"))
        wall = clock.wall()  # two users hold each GPU
        engine.merge_leases([LeaseRecord(g, u, wall + 300, 600.0) for g in ids
                             for u in ("ann", "bob")])
        leases = len(engine.lease_records())
        for label, renew in (("nothing changed", False), ("a lease renewed", True)):
            await sharing.sync_leases()
            cpu, wall = time.thread_time_ns(), time.perf_counter()
            for n in range(rounds):
                if renew:  # a request here: publish, and everyone's read back
                    engine.merge_leases([LeaseRecord(ids[0], "ann", clock.wall() + 301 + n,
                                                     600.0)])
                await sharing.sync_leases()
            per_cpu = (time.thread_time_ns() - cpu) / rounds / 1000
            per_wall = (time.perf_counter() - wall) / rounds * 1e6
            print(f"| lease sync, {gpus} GPUs, {leases} leases, {label} (per round) "
                  f"| {per_cpu:.0f} | {per_wall:.0f} |")
        print("\nOne round a second (``LEASE_SYNC_SECONDS``).")
    finally:
        await client.aclose()
        await engine.stop()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--gpus", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            print("| what | CPU µs | wall µs |\n|---|---|---|")
            asyncio.run(_ledger(server.url, args.rows, Path(tmp)))
            print("\n| what | CPU µs | wall µs |\n|---|---|---|")
            asyncio.run(_leases(server.url, args.gpus, args.rounds, Path(tmp)))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
