"""The cold path: how long after a woken GPU's Ollama could answer is the held request granted?

Run it as a script: ``python tests/bench/bench_coldpath.py`` (it is not collected by pytest).

Each trial builds a one-GPU simulated fleet on a fake clock, with a learnt resume time of
``--estimate`` seconds, and sends one request while the GPU is paused. The cloud's resume
takes a random time around the estimate (a quarter of the trials overrun it by up to half
again), and Ollama starts a random 1–6 s (``--ollama``) after the cloud says running. The
figure is the grant time minus the moment the simulated node first could answer (the
cloud's "running" plus Ollama's start), on the fake clock, so it measures only the engine's
polling; alongside it, how many cloud reads and node probes each wake cost. The goal of
issue 12: p50 ≤ 1 s, p99 ≤ 2 s. Figures print; they never decide a test.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpuctl.cloud.base import Workspace
from gpuctl.config import Config
from gpuctl.engine import Engine, FakeClock
from gpuctl.sim.cloud import SimCloud
from gpuctl.store import Store


class _CountingCloud(SimCloud):
    """A ``SimCloud`` that counts the single-workspace reads a wake makes."""

    reads = 0

    async def get_workspace(self, workspace_id: str) -> Workspace:
        self.reads += 1
        return await super().get_workspace(workspace_id)


async def _trial(
    rng: random.Random, estimate: float, ollama_range: tuple[float, float], home: Path
) -> tuple[float, int, int]:
    clock = FakeClock()
    resume = estimate * rng.uniform(0.8, 1.0)
    if rng.random() < 0.25:
        resume = estimate * rng.uniform(1.0, 1.5)
    ollama = rng.uniform(*ollama_range)
    cloud = _CountingCloud(clock, resume_seconds=resume - ollama, ollama_seconds=ollama)
    machine = cloud.add("gpu-a")
    store = Store.open(home)
    store.save_models(machine.id, [{"name": "llama3.2:latest", "model": "llama3.2:latest"}], 0)
    for _ in range(5):
        store.record_resume(machine.id, estimate, ok=True, at=0)
    config = Config.model_validate({"timing": {"poll_interval_seconds": 10}})
    engine = Engine(config, cloud, store, clock=clock, nodes=cloud.node)
    await engine.start()
    granted: list[float] = []
    task = asyncio.ensure_future(engine.acquire("llama3.2", "alice"))
    task.add_done_callback(lambda _: granted.append(clock.now()))
    while not granted:
        await clock.advance(60)
    assert machine.running_since is not None
    node_ready = machine.running_since + machine.ollama_seconds
    probes = sum(getattr(g.probe, "probes", 0) for g in engine._gpus.values())
    await engine.stop()
    store.close()
    return granted[0] - node_ready, cloud.reads, probes


async def main(
    trials: int, estimate: float, ollama_range: tuple[float, float], seed: int
) -> None:
    rng = random.Random(seed)
    lags: list[float] = []
    reads: list[int] = []
    probes: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(trials):
            lag, read, probe = await _trial(rng, estimate, ollama_range, Path(tmp) / str(n))
            lags.append(lag)
            reads.append(read)
            probes.append(probe)
    lags.sort()
    q = statistics.quantiles(lags, n=100, method="inclusive")
    low, high = ollama_range
    print(f"cold path, {trials} wakes, learnt resume {estimate:.0f} s, Ollama up "
          f"{low:g}–{high:g} s after running (fake clock)")
    print(f"grant − node ready (s): p50 {q[49]:.2f}  p90 {q[89]:.2f}  p99 {q[98]:.2f}  "
          f"max {lags[-1]:.2f}")
    print(f"per wake: cloud reads mean {statistics.mean(reads):.1f}, "
          f"node probes mean {statistics.mean(probes):.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--estimate", type=float, default=120.0)
    parser.add_argument("--ollama", type=float, nargs=2, default=(1.0, 6.0),
                        metavar=("MIN", "MAX"), help="Ollama's start after running, seconds")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    asyncio.run(main(args.trials, args.estimate, tuple(args.ollama), args.seed))
