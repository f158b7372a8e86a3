"""Benchmark: what wait notices add to every proxied request.

Run: ``.venv/bin/python tests/bench/bench_notices.py``. It prints figures; it asserts nothing.

Per request the proxy now does two things it did not before: ``notifier()`` picks the form
of the notices (a few comparisons), and ``strip_history()`` looks for the ``[gpuctl] ``
marker in the body (one ``bytes`` scan) before it would parse and re-encode anything. Only a
body that carries the marker (a chat UI sending our notices back) pays for a re-encode.
The figures are per call, best of five runs, next to the ~350 µs of CPU the whole gateway
spends on a request (README "Performance").
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpuctl.gateway.notices import MARKER, notifier, strip_history


def _chat(turns: int, words: int, *, marked: bool) -> tuple[dict[str, object], bytes]:
    messages: list[dict[str, str]] = []
    for i in range(turns):
        messages.append({"role": "user", "content": " ".join(["word"] * words)})
        answer = {"role": "assistant", "content": " ".join(["reply"] * words)}
        if marked and i == 0:
            answer["thinking"] = f"{MARKER}waking gpu-1, about 70 s\n"
        messages.append(answer)
    request: dict[str, object] = {"model": "llama3.2", "messages": messages, "stream": True}
    return request, json.dumps(request).encode()


def _per_call_us(stmt: object, number: int) -> float:
    best = min(timeit.repeat(stmt, number=number, repeat=5))  # type: ignore[arg-type]
    return best / number * 1e6


def main() -> None:
    print(f"{'case':<52} {'body':>9} {'µs/call':>9}")
    pick = _per_call_us(lambda: notifier("thinking", "/api/chat", "m", stream=True), 100_000)
    print(f"{'notifier() for a streaming /api/chat':<52} {'-':>9} {pick:>9.2f}")
    for turns, words, marked in ((1, 20, False), (20, 50, False), (200, 100, False),
                                 (20, 50, True)):
        request, body = _chat(turns, words, marked=marked)
        label = (f"strip_history, {turns} turns, "
                 f"{'marker: parse + re-encode' if marked else 'no marker: byte scan'}")
        number = 20_000 if not marked else 2_000

        def run(request: dict[str, object] = request, body: bytes = body,
                marked: bool = marked) -> None:
            strip_history(json.loads(body) if marked else request, body)

        print(f"{label:<52} {len(body):>9,} {_per_call_us(run, number):>9.2f}")
    print("(the marked case includes json.loads of the body, which the proxy has done anyway)")
    _, big = _chat(200, 100, marked=False)
    parse = _per_call_us(lambda: json.loads(big), 200)
    print(f"{'for scale: json.loads of the 200-turn body (done anyway)':<52} {len(big):>9,} "
          f"{parse:>9.2f}")


if __name__ == "__main__":
    main()
