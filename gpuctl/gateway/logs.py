"""Logs that cannot flood: the same message at most a few times a minute.

Under file-descriptor exhaustion the old front server logged 235,163 tracebacks (95 MB) in
30 s. Whatever repeats (an accept error, a node refusing, a stalled client) says nothing new
the fourth time, so ``RepeatLimit`` lets each message template (logger + format string, not
its arguments) through ``BURST`` times per ``WINDOW`` seconds and then counts what it drops,
saying how many when the window turns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["BURST", "WINDOW", "RepeatLimit", "install"]

BURST = 3
WINDOW = 60.0


class RepeatLimit(logging.Filter):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        start, count, dropped = self._seen.get(key, (now, 0, 0))
        if now - start >= WINDOW:
            if dropped:
                record.msg = f"{record.msg} (and {dropped} more like it in the last minute)"
            start, count, dropped = now, 0, 0
        if count >= BURST:
            self._seen[key] = (start, count, dropped + 1)
            return False
        self._seen[key] = (start, count + 1, dropped)
        if len(self._seen) > 10_000:  # messages with unbounded templates: forget the oldest
            self._seen.pop(next(iter(self._seen)))
        return True


def install() -> RepeatLimit:
    """Log warnings and errors to stderr through a ``RepeatLimit`` (unless the root logger
    already has handlers, as under ``--debug``, where every line is wanted)."""
    root = logging.getLogger()
    limit = RepeatLimit()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(limit)
        root.addHandler(handler)
    return limit
