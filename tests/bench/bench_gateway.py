"""Benchmark: a simulated Ollama node direct vs through ``gpuctl serve``'s gateway.

Run: ``.venv/bin/python tests/bench/bench_gateway.py [--repeats 3] [--quick]``. It prints
figures; it asserts nothing (a timing never decides a test).

Setup, as the gateway issue asks: one simulated node that answers non-streamed requests at
once and streams 32 chunks 50 ms apart; the load generator and the node share CPU 0, the
gateway process runs alone on CPU 1 (``taskset``). The gateway is the real one: the real
engine over a ``static`` provider pointing at the node, keys in SQLite, served by granian as
``gpuctl serve`` serves it. The load generator is a lean raw-socket HTTP/1.1 client (the
gateway's own ``upstream.Pool``), so it leaves the node as much of CPU 0 as possible.

Figures (medians of ``--repeats`` runs): non-streaming chat at 1 and 64 connections
(requests/s, p50/p99 latency); streaming at 1, 8, 64, 512 concurrent streams (time to first
chunk p50/p99, chunks/s); gateway CPU per request and per relayed chunk (from
``/proc/<pid>/task/*/schedstat``, ns resolution; "net" figures subtract the gateway's idle
CPU rate measured just before); gateway peak RSS at 512 and 1,000 concurrent streams. Every
phase is bounded in requests and in seconds. ``GPUCTL_BENCH_PROFILE=FILE`` writes a cProfile
of the gateway process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gpuctl.gateway.upstream import Pool  # noqa: E402

CHUNKS = 32
INTERVAL = 0.05
MODEL = "llama3.2:latest"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the two server roles (run in child processes) -------------------------------------------


def run_node(port: int) -> None:
    from gpuctl.sim.ollama import SimOllama
    from gpuctl.sim.servers import bind_loopback, serve_until

    _raise_fd_limit()
    node = SimOllama([MODEL], chunks=CHUNKS, interval=INTERVAL)
    sock = bind_loopback(port=port)

    async def main() -> None:
        await serve_until(node, sock, asyncio.Event())

    asyncio.run(main())


def run_gateway(port: int, node_url: str, home: str) -> None:
    from gpuctl.cli.serve import run_gateway as serve_gateway
    from gpuctl.cloud.static import StaticProvider
    from gpuctl.config import Config
    from gpuctl.engine.engine import Engine
    from gpuctl.gateway.app import create_app
    from gpuctl.store import Store
    from gpuctl.store.keys import KeyStore

    _raise_fd_limit()
    config = Config.model_validate({
        # One load generator on loopback is one address: no per-address share here.
        "server": {"max_queue": 4096, "port": port, "max_connections_per_client": 0},
        "cloud_api": {"provider": "static", "hosts": [node_url]},
        "gpu": {"slots": 4096},
    })
    store = Store.memory()
    keys = KeyStore.open(Path(home))
    engine = Engine(config, StaticProvider([node_url]), store)
    app = create_app(config, engine, keys)
    sock = socket.create_server(("127.0.0.1", port), backlog=4096)

    async def main() -> None:
        await serve_gateway(app, sock)

    profile_to = os.environ.get("GPUCTL_BENCH_PROFILE")
    if not profile_to:
        asyncio.run(main())
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        asyncio.run(main())
    finally:
        profiler.disable()
        profiler.dump_stats(profile_to)


# -- measurement -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid``, in ns resolution (``schedstat``), not 10 ms ticks."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue
    return total / 1e9


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1e6


@dataclass
class Phase:
    requests: int = 0
    chunks: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu: float = 0.0
    peak_rss: float = 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Load:
    def __init__(self, base: str, key: str | None) -> None:
        self.base = base
        self.pool = Pool(connect_timeout=10)
        self.headers = [(b"content-type", b"application/json")]
        if key:
            self.headers.append((b"authorization", f"Bearer {key}".encode()))

    async def chat(self, stream: bool, phase: Phase) -> None:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "stream": stream}).encode()
        start = time.perf_counter()
        try:
            response = await self.pool.request(self.base, "POST", "/api/chat", self.headers, body)
            first = True
            async for _ in response.chunks():
                if first and stream:
                    phase.ttfts.append(time.perf_counter() - start)
                    first = False
                phase.chunks += 1
            if response.status != 200:
                phase.errors += 1
        except Exception:
            phase.errors += 1
            return
        phase.requests += 1
        phase.latencies.append(time.perf_counter() - start)


async def run_phase(load: Load, pid: int | None, concurrency: int, *, stream: bool,
                    per_client: int, time_limit: float,
                    sample_rss: bool = False) -> Phase:
    phase = Phase()
    deadline = time.perf_counter() + time_limit

    async def client() -> None:
        for _ in range(per_client):
            if time.perf_counter() > deadline:
                return
            await load.chat(stream, phase)

    async def sampler() -> None:
        while pid is not None:
            phase.peak_rss = max(phase.peak_rss, rss_mb(pid))
            await asyncio.sleep(0.05)

    cpu0 = cpu_seconds(pid) if pid else 0.0
    t0 = time.perf_counter()
    watch = asyncio.ensure_future(sampler()) if sample_rss else None
    await asyncio.gather(*(client() for _ in range(concurrency)))
    phase.seconds = time.perf_counter() - t0
    if watch is not None:
        watch.cancel()
    phase.cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
    return phase


async def wait_up(url: str, key: str | None, timeout: float = 20.0) -> None:
    load = Load(url, key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        phase = Phase()
        await load.chat(False, phase)
        if phase.requests and not phase.errors:
            await load.pool.aclose()
            return
        await asyncio.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


Figures = dict[str, float]


async def measure(base: str, key: str | None, pid: int | None, quick: bool) -> Figures:
    out: Figures = {}
    load = Load(base, key)
    # warm up connections and the engine's route
    await run_phase(load, None, 64, stream=False, per_client=5, time_limit=5)
    idle = 0.0
    if pid:
        # The gateway's background CPU (engine poll loop, timers): subtracted in the "net"
        # figures, so a phase with few chunks is not charged for the idle process.
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(2.0)
        idle = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
        out["idle_cpu_ms_per_s"] = idle * 1e3
    for conc in (1, 64):
        n = (300 if quick else 1500) if conc == 1 else (40 if quick else 120)
        ph = await run_phase(load, pid, conc, stream=False, per_client=n, time_limit=8)
        out[f"nonstream_c{conc}_rps"] = ph.requests / ph.seconds
        out[f"nonstream_c{conc}_p50_ms"] = pct(ph.latencies, 0.5) * 1e3
        out[f"nonstream_c{conc}_p99_ms"] = pct(ph.latencies, 0.99) * 1e3
        out[f"nonstream_c{conc}_errors"] = ph.errors
        if pid:
            out[f"nonstream_c{conc}_cpu_us_per_req"] = ph.cpu / max(1, ph.requests) * 1e6
            net = ph.cpu - idle * ph.seconds
            out[f"nonstream_c{conc}_net_cpu_us_per_req"] = net / max(1, ph.requests) * 1e6
    for conc in (1, 8, 64, 512):
        rounds = 1 if quick else (3 if conc <= 8 else 2)
        ph = await run_phase(load, pid, conc, stream=True, per_client=rounds, time_limit=15,
                             sample_rss=conc == 512)
        out[f"stream_c{conc}_ttft_p50_ms"] = pct(ph.ttfts, 0.5) * 1e3
        out[f"stream_c{conc}_ttft_p99_ms"] = pct(ph.ttfts, 0.99) * 1e3
        out[f"stream_c{conc}_chunks_per_s"] = ph.chunks / ph.seconds
        out[f"stream_c{conc}_errors"] = ph.errors
        if pid:
            out[f"stream_c{conc}_cpu_us_per_chunk"] = ph.cpu / max(1, ph.chunks) * 1e6
            net = ph.cpu - idle * ph.seconds
            out[f"stream_c{conc}_net_cpu_us_per_chunk"] = net / max(1, ph.chunks) * 1e6
            if conc == 512:
                out["rss_peak_mb_512"] = ph.peak_rss
    if pid:
        ph = await run_phase(load, pid, 1000, stream=True, per_client=1, time_limit=20,
                             sample_rss=True)
        out["rss_peak_mb_1000"] = ph.peak_rss
        out["stream_c1000_errors"] = ph.errors
        out["stream_c1000_chunks_per_s"] = ph.chunks / ph.seconds
    await load.pool.aclose()
    return out


def median_table(runs: list[Figures]) -> Figures:
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs if k in r) for k in keys}


def spawn(cpu: int, *args: str) -> subprocess.Popen[bytes]:
    cmd = ["taskset", "-c", str(cpu), sys.executable, __file__, *args]
    return subprocess.Popen(cmd, cwd=ROOT)


async def bench(repeats: int, quick: bool) -> None:
    _raise_fd_limit()
    os.sched_setaffinity(0, {0})
    home = tempfile.mkdtemp(prefix="gpuctl-bench-")
    from gpuctl.store.keys import KeyStore

    store = KeyStore.open(Path(home))
    _, key = store.create("bench")
    store.close()

    node_port, gw_port = _free_port(), _free_port()
    node_url = f"http://127.0.0.1:{node_port}"
    gw_url = f"http://127.0.0.1:{gw_port}"
    procs = [spawn(0, "--role", "node", "--port", str(node_port))]
    try:
        await wait_up(node_url, None)
        procs.append(spawn(1, "--role", "gateway", "--port", str(gw_port), "--node", node_url,
                           "--home", home))
        await wait_up(gw_url, key)
        gw_pid = procs[1].pid
        direct_runs: list[Figures] = []
        gw_runs: list[Figures] = []
        for i in range(repeats):
            print(f"run {i + 1}/{repeats}: direct", file=sys.stderr, flush=True)
            direct_runs.append(await measure(node_url, None, None, quick))
            print(f"run {i + 1}/{repeats}: gateway", file=sys.stderr, flush=True)
            gw_runs.append(await measure(gw_url, key, gw_pid, quick))
        report(median_table(direct_runs), median_table(gw_runs), repeats)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def report(direct: Figures, gw: Figures, repeats: int) -> None:
    print(f"\n# gateway benchmark (medians of {repeats}; node+load on CPU 0, gateway on CPU 1)")
    print(f"{'figure':40} {'direct':>12} {'gateway':>12}")
    for key in gw:
        d = direct.get(key)
        shown_d = f"{d:12.2f}" if d is not None else f"{'':>12}"
        print(f"{key:40} {shown_d} {gw[key]:12.2f}")
    for conc in (1, 8, 64):
        k = f"stream_c{conc}_ttft_p50_ms"
        print(f"TTFT overhead at {conc} streams: {gw[k] - direct[k]:+.2f} ms")
    k = "stream_c512_chunks_per_s"
    print(f"chunks/s at 512 streams, gateway/direct: {gw[k] / direct[k]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--role", choices=["bench", "node", "gateway"], default="bench")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--node", default="")
    parser.add_argument("--home", default="")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer requests per phase")
    args = parser.parse_args()
    runners: dict[str, Callable[[], Awaitable[None] | None]] = {
        "node": lambda: run_node(args.port),
        "gateway": lambda: run_gateway(args.port, args.node, args.home),
    }
    if args.role == "bench":
        asyncio.run(bench(args.repeats, args.quick))
    else:
        runners[args.role]()


if __name__ == "__main__":
    main()
