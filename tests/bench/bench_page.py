"""Benchmark: how soon the status page shows a change, in a real browser.

Run: ``.venv/bin/python tests/bench/bench_page.py [--rounds 20]``. It prints figures; it
asserts nothing. Needs Debian's chromium (``/usr/bin/chromium``) and Playwright.

The demo fleet behind the real gateway; one signed-in chromium tab. Each round resumes or
pauses a GPU through the engine and measures, on one clock, from the engine's change to the
moment the page's DOM shows it (a ``MutationObserver`` stamps it with ``performance.now()``
mapped to the epoch). The page promises "within a second"; the watcher looks every 0.25 s,
so the figure is that wait plus the push, the parse and the render.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpuctl.config import Config
from gpuctl.gateway.app import create_app
from gpuctl.gateway.server import running_gateway
from gpuctl.sim.demo import DemoTimings, demo_fleet

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMINGS = DemoTimings(resume_scale=0.5, pause_seconds=0.5, ollama_seconds=0.0,
                      poll_interval_seconds=0.05, word_seconds=0.0, watch_seconds=0.5)
WATCH = """([gpu, state]) => new Promise((resolve) => {
  const seen = () => document.querySelector(
    `article[data-gpu="${gpu}"][data-state="${state}"]`);
  if (seen()) return resolve(performance.timeOrigin + performance.now());
  new MutationObserver((_, observer) => {
    if (seen()) { observer.disconnect(); resolve(performance.timeOrigin + performance.now()); }
  }).observe(document.body, {subtree: true, childList: true, attributes: true});
})"""


async def main(rounds: int) -> None:
    from playwright.async_api import async_playwright

    latencies: list[float] = []
    with tempfile.TemporaryDirectory():
        async with demo_fleet(Config(), timings=TIMINGS) as fleet:
            app = create_app(fleet.config, fleet.engine, fleet.keys)
            async with running_gateway(app) as url, async_playwright() as playwright:
                browser = await playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", args=ARGS)
                page = await browser.new_page()
                await page.goto(f"{url}/ui/")
                await page.fill("#key", fleet.key)
                await page.press("#key", "Enter")
                await page.wait_for_selector('article[data-gpu="gpu-2"][data-state="paused"]')
                for i in range(rounds):
                    want = "waking" if i % 2 == 0 else "paused"
                    shown = asyncio.ensure_future(page.evaluate(WATCH, ["gpu-2", want]))
                    await asyncio.sleep(0.05)  # the observer is in place
                    if want == "waking":
                        await fleet.engine.wake("gpu-2")
                    else:
                        await fleet.engine.pause("gpu-2", wait=True)
                    changed = time.time() * 1000
                    at = await asyncio.wait_for(shown, 10)
                    latencies.append(max(0.0, at - changed))
                    if want == "waking":  # let the wake finish before pausing again
                        await fleet.engine.wake("gpu-2", wait=True)
                await browser.close()
    ordered = sorted(latencies)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    print(f"page update latency over {len(ordered)} changes (ms): "
          f"p50 {statistics.median(ordered):.0f}, p95 {p95:.0f}, max {ordered[-1]:.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    asyncio.run(main(parser.parse_args().rounds))
