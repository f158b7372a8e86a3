"""How fast ``gpuctl simulate`` replays: CPU seconds for a day of over 1,000 requests.

Run it as a script: ``python tests/bench/bench_simulate.py`` (it is not collected by pytest).
It takes the busiest day of the synthetic ``deadline`` week (about 1,600 requests) and
replays it through the real engine on virtual time over three simulated GPUs, once per
lease, timing each replay with the process's CPU time. The target of issue 12 is ≤ 10 s
per day on one core. Figures print; they never decide a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpuctl.config import Config
from gpuctl.sim.replay import FleetSpec, run_replay
from gpuctl.sim.workload import DAY, Request, synthetic_week


def busiest_day(week: list[Request]) -> list[Request]:
    day, _ = Counter(int(r.arrival_s // DAY) for r in week).most_common(1)[0]
    return [Request(r.arrival_s - day * DAY, r.user, r.model, r.service_s, r.tokens_out)
            for r in week if int(r.arrival_s // DAY) == day]


def main(leases: list[float]) -> None:
    week = synthetic_week("deadline", 1)
    day = [r for r in busiest_day(week) if r.arrival_s < DAY]
    fleet = FleetSpec.twins(3, {r.model for r in day})
    print(f"replaying {len(day)} requests (one day) on 3 GPUs, per lease:")
    for minutes in leases:
        config = Config.model_validate({"timing": {"reservation_minutes": minutes}})
        began = time.process_time()
        outcome = run_replay(day, config, fleet, window_s=DAY)
        cpu = time.process_time() - began
        print(f"  lease {minutes:g} min: {cpu:.2f} s CPU "
              f"({cpu / len(day) * 1e3:.2f} ms per request); {outcome.gpu_hours:.2f} GPU-h, "
              f"{outcome.cold_waits} waited for a wake")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lease", type=float, nargs="+", default=[2, 10, 30])
    main(parser.parse_args().lease)
