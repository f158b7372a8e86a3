"""Benchmark: the gateway's upstream client (``upstream.Pool``) against httpx and httpcore.

Run: ``.venv/bin/python tests/bench/bench_upstream.py [--repeats 3] [--quick]``. It prints
two tables; it asserts nothing (a timing never decides a test).

Why it exists: the project uses httpx, and ``gpuctl/gateway/upstream.py`` hand-rolls an
HTTP/1.1 client instead. design.md allows that only with figures ("where a client beats
httpx's pool, say so with figures"); this script produces them. It measures the client side
alone, no gateway: one simulated Ollama node (``SimOllama`` under granian, via
``gpuctl.sim.servers.running``) runs in a child process pinned to CPU 0, answering at once
and streaming ``--chunks`` pieces ``--interval`` seconds apart; this process, pinned to CPU 1,
drives one client variant at a time:

- ``pool.chunks``: ``Pool.request`` + ``async for ... in response.chunks()``, as ``proxy.py``
  does (responses parsed by llhttp through ``httptools``);
- ``httpx default``: ``httpx.AsyncClient()`` as it comes (100 connections, 20 kept alive,
  5 s timeouts), ``client.stream`` + ``aiter_raw``;
- ``httpx sized``: the same with ``max_connections=None, max_keepalive_connections=None``;
- ``httpx+PoolTransport``: ``httpx.AsyncClient(transport=PoolTransport(Pool()))``;
- ``httpcore``: ``httpcore.AsyncConnectionPool`` (sized for the load) used directly.

Workloads: non-streaming ``/api/chat`` at 1 and 64 concurrent requests (client CPU µs per
request, requests/s) and streaming at 64 and 512 concurrent streams (client CPU µs per
received piece, pieces/s, first-piece latency). CPU is ``time.process_time()`` of this
process around each phase (user + system, every thread). Each phase is bounded in requests
and in seconds; figures are medians over ``--repeats`` runs, the variants interleaved within
each run so that drift in the machine's load spreads over all of them.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpcore
import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import Phase, _raise_fd_limit, median_table, pct  # noqa: E402

from gpuctl.gateway.upstream import Pool, PoolTransport  # noqa: E402

MODEL = "llama3.2:latest"
NODE_CPU, CLIENT_CPU = 0, 1
BODIES = {
    stream: json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                        "stream": stream}).encode()
    for stream in (False, True)
}
JSON_HEADERS = [(b"content-type", b"application/json")]


# -- the node (child process) ------------------------------------------------------------------


def run_node(chunks: int, interval: float) -> None:
    """Serve SimOllama on 127.0.0.1 from CPU 0; print the URL; run until terminated."""
    from gpuctl.sim.ollama import SimOllama
    from gpuctl.sim.servers import running

    os.sched_setaffinity(0, {NODE_CPU})
    _raise_fd_limit()

    async def main() -> None:
        node = SimOllama([MODEL], chunks=chunks, interval=interval)
        # ``running`` listens with a 4,096 backlog: 512 streams connect at once
        async with running(node) as url:
            print(url, flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())


# -- the client variants ---------------------------------------------------------------------


class Variant(abc.ABC):
    """One client under test: ``call`` makes one request and reads its whole body."""

    name = ""

    def __init__(self, base: str) -> None:
        self.base = base
        self.url = f"{base}/api/chat"
        self.first_error = ""

    @abc.abstractmethod
    async def fetch(self, stream: bool, on_piece: Callable[[bytes], None]) -> int:
        """Send one chat request; hand every body piece to ``on_piece``; return the status."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def call(self, stream: bool, phase: Phase) -> None:
        start = time.perf_counter()
        first = True

        def on_piece(_: bytes) -> None:
            nonlocal first
            if first:
                phase.ttfts.append(time.perf_counter() - start)
                first = False
            phase.chunks += 1

        try:
            status = await self.fetch(stream, on_piece)
        except Exception as exc:
            phase.errors += 1
            self.first_error = self.first_error or type(exc).__name__
            return
        if status != 200:
            phase.errors += 1
            self.first_error = self.first_error or f"status {status}"
            return
        phase.requests += 1
        phase.latencies.append(time.perf_counter() - start)


class PoolChunks(Variant):
    name = "pool.chunks"

    def __init__(self, base: str) -> None:
        super().__init__(base)
        self.pool = Pool(connect_timeout=10)

    async def fetch(self, stream: bool, on_piece: Callable[[bytes], None]) -> int:
        response = await self.pool.request(self.base, "POST", "/api/chat", JSON_HEADERS,
                                           BODIES[stream])
        try:
            async for piece in response.chunks():
                on_piece(piece)
        finally:
            await response.aclose()
        return response.status

    async def aclose(self) -> None:
        await self.pool.aclose()


class HttpxClient(Variant):
    name = "httpx default"

    def __init__(self, base: str) -> None:
        super().__init__(base)
        self.client = self.make_client()

    def make_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient()

    async def fetch(self, stream: bool, on_piece: Callable[[bytes], None]) -> int:
        async with self.client.stream("POST", self.url, content=BODIES[stream],
                                      headers={"content-type": "application/json"}) as r:
            async for piece in r.aiter_raw():
                on_piece(piece)
            return r.status_code

    async def aclose(self) -> None:
        await self.client.aclose()


class HttpxSized(HttpxClient):
    name = "httpx sized"

    def make_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        return httpx.AsyncClient(limits=limits, timeout=30)


class HttpxPoolTransport(HttpxClient):
    name = "httpx+PoolTransport"

    def make_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=PoolTransport(Pool(connect_timeout=10)), timeout=30)


class HttpcoreDirect(Variant):
    name = "httpcore"

    def __init__(self, base: str) -> None:
        super().__init__(base)
        self.pool = httpcore.AsyncConnectionPool(max_connections=4096,
                                                 max_keepalive_connections=4096)

    async def fetch(self, stream: bool, on_piece: Callable[[bytes], None]) -> int:
        async with self.pool.stream("POST", self.url, headers=JSON_HEADERS,
                                    content=BODIES[stream]) as r:
            async for piece in r.aiter_stream():
                on_piece(piece)
            return r.status

    async def aclose(self) -> None:
        await self.pool.aclose()


VARIANTS: list[type[Variant]] = [PoolChunks, HttpxClient, HttpxSized,
                                 HttpxPoolTransport, HttpcoreDirect]


# -- phases ----------------------------------------------------------------------------------


async def run_phase(variant: Variant, concurrency: int, *, stream: bool, per_client: int,
                    time_limit: float) -> Phase:
    """``concurrency`` workers, each making up to ``per_client`` requests in ``time_limit``."""
    phase = Phase()
    deadline = time.perf_counter() + time_limit

    async def worker() -> None:
        for _ in range(per_client):
            if time.perf_counter() > deadline:
                return
            await variant.call(stream, phase)

    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.seconds = time.perf_counter() - t0
    phase.cpu = time.process_time() - cpu0
    return phase


Figures = dict[str, float]


async def measure(cls: type[Variant], base: str, quick: bool) -> tuple[Figures, str]:
    variant = cls(base)
    out: Figures = {}
    try:
        await run_phase(variant, 8, stream=False, per_client=5, time_limit=5)  # warm-up
        for conc in (1, 64):
            n = (300 if quick else 1000) if conc == 1 else (15 if quick else 40)
            ph = await run_phase(variant, conc, stream=False, per_client=n,
                                 time_limit=4 if quick else 8)
            out[f"ns{conc}_us_req"] = ph.cpu / max(1, ph.requests) * 1e6
            out[f"ns{conc}_rps"] = ph.requests / ph.seconds
            out[f"ns{conc}_p50_ms"] = pct(ph.latencies, 0.5) * 1e3
            out[f"ns{conc}_err"] = ph.errors
        for conc in (64, 512):
            rounds = 1 if quick or conc == 512 else 2
            ph = await run_phase(variant, conc, stream=True, per_client=rounds, time_limit=20)
            out[f"s{conc}_us_chunk"] = ph.cpu / max(1, ph.chunks) * 1e6
            out[f"s{conc}_chunks_s"] = ph.chunks / ph.seconds
            out[f"s{conc}_per_stream"] = ph.chunks / max(1, ph.requests + ph.errors)
            out[f"s{conc}_ttft_p50_ms"] = pct(ph.ttfts, 0.5) * 1e3
            out[f"s{conc}_ttft_p99_ms"] = pct(ph.ttfts, 0.99) * 1e3
            out[f"s{conc}_err"] = ph.errors
    finally:
        await variant.aclose()
    return out, variant.first_error


async def wait_up(base: str, timeout: float = 20.0) -> None:
    variant = PoolChunks(base)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            phase = Phase()
            await variant.call(False, phase)
            if phase.requests:
                return
            await asyncio.sleep(0.2)
    finally:
        await variant.aclose()
    raise SystemExit(f"node {base} did not come up")


async def bench(args: argparse.Namespace) -> None:
    _raise_fd_limit()
    os.sched_setaffinity(0, {CLIENT_CPU})
    chosen = [cls for cls in VARIANTS if not args.only or cls.name in args.only]
    cmd = [sys.executable, __file__, "--role", "node", "--chunks", str(args.chunks),
           "--interval", str(args.interval)]
    node = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        assert node.stdout is not None
        base = (await asyncio.wait_for(node.stdout.readline(), 30)).decode().strip()
        if not base.startswith("http://"):
            raise SystemExit("the node did not start")
        await wait_up(base)
        runs: dict[str, list[Figures]] = {cls.name: [] for cls in chosen}
        errors: dict[str, str] = {}
        load0 = os.getloadavg()[0]
        started = time.perf_counter()
        for i in range(args.repeats):
            order = chosen[i % len(chosen):] + chosen[:i % len(chosen)]
            for cls in order:
                print(f"run {i + 1}/{args.repeats}: {cls.name}", file=sys.stderr, flush=True)
                figures, error = await measure(cls, base, args.quick)
                runs[cls.name].append(figures)
                if error:
                    errors.setdefault(cls.name, error)
        elapsed = time.perf_counter() - started
        report({name: median_table(r) for name, r in runs.items()}, errors, args,
               (load0, os.getloadavg()[0]), elapsed)
    finally:
        node.terminate()
        try:
            await asyncio.wait_for(node.wait(), 10)
        except asyncio.TimeoutError:
            node.kill()
            await node.wait()


def report(medians: dict[str, Figures], errors: dict[str, str], args: argparse.Namespace,
           load: tuple[float, float], elapsed: float) -> None:
    print(f"\n# upstream client benchmark: medians of {args.repeats}"
          f"{' (quick)' if args.quick else ''}; node on CPU {NODE_CPU}, client on CPU "
          f"{CLIENT_CPU}; {args.chunks} chunks {args.interval * 1e3:.0f} ms apart; "
          f"load average {load[0]:.2f} -> {load[1]:.2f}; {elapsed:.0f} s")
    print("\n## non-streaming /api/chat (client CPU µs per request, requests/s, p50 ms)")
    print(f"{'variant':22} {'c1 µs/req':>10} {'c1 req/s':>9} {'c1 p50':>7} "
          f"{'c64 µs/req':>11} {'c64 req/s':>10} {'c64 p50':>8} {'errors':>7}")
    for name, f in medians.items():
        print(f"{name:22} {f['ns1_us_req']:10.0f} {f['ns1_rps']:9.0f} {f['ns1_p50_ms']:7.2f} "
              f"{f['ns64_us_req']:11.0f} {f['ns64_rps']:10.0f} {f['ns64_p50_ms']:8.2f} "
              f"{f['ns1_err'] + f['ns64_err']:7.0f}")
    for conc in (64, 512):
        print(f"\n## streaming at {conc} concurrent streams (client CPU µs per received piece, "
              "pieces/s, first-piece latency)")
        print(f"{'variant':22} {'µs/piece':>9} {'pieces/s':>9} {'pcs/stream':>10} "
              f"{'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'errors':>7}")
        for name, f in medians.items():
            k = f"s{conc}_"
            print(f"{name:22} {f[k + 'us_chunk']:9.1f} {f[k + 'chunks_s']:9.0f} "
                  f"{f[k + 'per_stream']:10.1f} {f[k + 'ttft_p50_ms']:12.1f} "
                  f"{f[k + 'ttft_p99_ms']:12.1f} {f[k + 'err']:7.0f}")
    for name, error in errors.items():
        print(f"first error of {name}: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Client-side CPU of gpuctl's upstream Pool vs httpx/httpcore against a "
                    "simulated Ollama node (node on CPU 0, client on CPU 1).")
    parser.add_argument("--role", choices=["bench", "node"], default="bench",
                        help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="runs to take medians of")
    parser.add_argument("--quick", action="store_true", help="fewer requests per phase")
    parser.add_argument("--chunks", type=int, default=32, help="pieces per stream")
    parser.add_argument("--interval", type=float, default=0.05,
                        help="seconds between streamed pieces")
    parser.add_argument("--only", nargs="*", metavar="VARIANT",
                        help=f"run only these: {', '.join(c.name for c in VARIANTS)}")
    args = parser.parse_args()
    if args.role == "node":
        run_node(args.chunks, args.interval)
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
