"""The pause policies on the synthetic weeks: GPU-hours and requests that waited for a wake.

Run it as a script: ``python tests/bench/bench_pausepolicy.py`` (not collected by pytest).
For each shape (``group``, ``deadline``) and seed, it replays the week through the real
engine under fixed leases and the adaptive policy, the adaptive policy learning from the
two weeks before (seeds ``seed + 1000`` and ``seed + 2000``, as ``gpuctl simulate
--sample`` does), and prints GPU-hours / waits per setting. Issue 12's goal: adaptive bills
no more than lease 5 and makes no more requests wait than lease 30. Figures print; they
never decide a test. ``--jobs`` runs replays in parallel processes.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpuctl.config import Config
from gpuctl.sim.replay import FleetSpec, run_replay
from gpuctl.sim.workload import WEEK, Request, synthetic_week


def history_of(shape: str, seed: int) -> list[Request]:
    """The two weeks before the judged one: other draws of the same shape."""
    return synthetic_week(shape, seed + 1000) + [
        Request(r.arrival_s + WEEK, r.user, r.model, r.service_s, r.tokens_out)
        for r in synthetic_week(shape, seed + 2000)
    ]


def one(job: tuple[str, int, str]) -> tuple[str, int, str, float, int, float, float]:
    shape, seed, setting = job
    week = synthetic_week(shape, seed)
    fleet = FleetSpec.twins(3, {r.model for r in week})
    if setting == "adaptive":
        config = Config.model_validate({"timing": {"pause_policy": "adaptive"}})
    else:
        config = Config.model_validate({"timing": {"reservation_minutes": float(setting)}})
    began = time.process_time()
    outcome = run_replay(week, config, fleet, history=history_of(shape, seed))
    return (shape, seed, setting, outcome.gpu_hours, outcome.cold_waits,
            outcome.optimum_hours, time.process_time() - began)


def main(shapes: list[str], seeds: list[int], settings: list[str], jobs: int) -> None:
    work = [(shape, seed, s) for shape in shapes for seed in seeds for s in settings]
    with ProcessPoolExecutor(jobs) as pool:
        results = list(pool.map(one, work))
    cpu = sum(r[-1] for r in results)
    slowest = max(results, key=lambda r: r[-1])
    print(f"{len(results)} replays, {cpu:.0f} s CPU (slowest: {slowest[0]} {slowest[1]} "
          f"{slowest[2]}, {slowest[-1] / 7:.1f} s CPU per day); "
          "GPU-h / requests that waited for a wake")
    head = " | ".join(f"{'lease ' + s if s != 'adaptive' else s:>13}" for s in settings)
    print(f"| {'week':<16} | {head} | {'optimum':>8} |")
    for shape in shapes:
        for seed in seeds:
            row = {r[2]: r for r in results if r[0] == shape and r[1] == seed}
            cells = " | ".join(f"{row[s][3]:>7.1f}/{row[s][4]:<5}" for s in settings)
            optimum = next(iter(row.values()))[5]
            print(f"| {shape + ' ' + str(seed):<16} | {cells} | {optimum:>8.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs="+", default=["group", "deadline"])
    parser.add_argument("--seed", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--setting", nargs="+", default=["2", "5", "10", "30", "adaptive"])
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    main(args.shape, args.seed, args.setting, args.jobs)
