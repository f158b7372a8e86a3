"""The bounded queue of requests waiting for a slot or a wake, fair between users.

Fairness is start-time fair queuing between users. Each waiter gets a tag: one more than
the later of its user's previous queued tag and the tag last served. Waiters are served in
(tag, arrival) order, so a user's requests take turns with everybody else's: a user with 100
queued requests holds tags t+1 … t+100, and another user's single request, arriving later,
gets tag t+1 and is served after at most one of them. Tags are shared across models, so this
holds when the two users want different models that one GPU serves: when a slot frees, the
head of each of the GPU's models' lines is a candidate and the lowest tag goes first.

Each model's queue is a sorted list of keys, so a waiter's position is a bisection and a
cancelled waiter leaves in one deletion, even with 10,000 queued.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from gpuctl.engine.api import ProgressCallback, Ticket
from gpuctl.store import RequestRow

__all__ = ["FairQueue", "Waiter"]

_Key = tuple[int, int]  # (fair tag, arrival sequence)


@dataclass(eq=False)
class Waiter:
    model: str
    user: str
    key: _Key
    enqueued_at: float
    future: asyncio.Future[Ticket]
    progress: ProgressCallback | None = None
    given_name: str = ""
    last_position: int | None = field(default=None)
    #: The GPU whose wake this waiter was told about (the ledger's "waited for a wake").
    wake_gpu: str | None = None
    #: The request's ledger row, filled when it leaves the queue.
    request: RequestRow | None = None

    @property
    def seq(self) -> int:
        return self.key[1]


class FairQueue:
    """Waiters per model in fair order; bounded in total by ``max_size``."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._keys: dict[str, list[_Key]] = {}
        self._waiters: dict[int, Waiter] = {}
        self._served_tag = 0
        self._user_tag: dict[str, int] = {}
        self._user_count: dict[str, int] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._waiters)

    @property
    def full(self) -> bool:
        return len(self._waiters) >= self.max_size

    def depth(self, model: str) -> int:
        return len(self._keys.get(model, ()))

    def models(self) -> list[str]:
        return list(self._keys)

    def waiters(self, model: str) -> list[Waiter]:
        """The waiters for ``model``, first in line first."""
        return [self._waiters[seq] for _, seq in self._keys.get(model, ())]

    def push(
        self, model: str, user: str, future: asyncio.Future[Ticket], now: float,
        progress: ProgressCallback | None = None, given_name: str = "",
    ) -> Waiter:
        """Queue a request; the caller checks ``full`` first."""
        tag = max(self._served_tag, self._user_tag.get(user, 0)) + 1
        self._user_tag[user] = tag
        self._user_count[user] = self._user_count.get(user, 0) + 1
        key = (tag, next(self._seq))
        bisect.insort(self._keys.setdefault(model, []), key)
        waiter = Waiter(model, user, key, now, future, progress, given_name)
        self._waiters[key[1]] = waiter
        return waiter

    def position(self, waiter: Waiter) -> int:
        """1 = next in line for its model."""
        return bisect.bisect_left(self._keys.get(waiter.model, ()), waiter.key) + 1

    def remove(self, waiter: Waiter) -> bool:
        """Take a waiter out (cancelled, timed out, failed). False if it was not queued."""
        if self._waiters.pop(waiter.seq, None) is None:
            return False
        keys = self._keys[waiter.model]
        del keys[bisect.bisect_left(keys, waiter.key)]
        if not keys:
            del self._keys[waiter.model]
        self._forget(waiter)
        return True

    def fail(self, model: str, error: BaseException) -> None:
        """Take every waiter for ``model`` out of line, each raising ``error``."""
        for waiter in self.waiters(model):
            self.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def head(self, model: str) -> Waiter | None:
        keys = self._keys.get(model)
        return self._waiters[keys[0][1]] if keys else None

    def pop_for(self, models: Collection[str],
                skip: Callable[[str], bool] | None = None) -> Waiter | None:
        """The next waiter any of ``models`` can serve: the lowest (tag, arrival) among them.

        ``skip(user)``: users who may not be served here now (at their slot cap on this GPU);
        their waiters keep their places for another GPU or a later slot.
        """
        best: Waiter | None = None
        queued = self._keys
        for model in models if len(models) <= len(queued) else list(queued):
            keys = queued.get(model)
            if keys and model in models:
                waiter = self._waiters[keys[0][1]]
                if skip is not None and skip(waiter.user):
                    found = next((w for w in (self._waiters[k[1]] for k in keys)
                                  if not skip(w.user)), None)
                    if found is None:
                        continue
                    waiter = found
                if best is None or waiter.key < best.key:
                    best = waiter
        if best is None:
            return None
        keys = self._keys[best.model]
        del keys[bisect.bisect_left(keys, best.key)]
        if not keys:
            del self._keys[best.model]
        del self._waiters[best.seq]
        self._served_tag = max(self._served_tag, best.key[0])
        self._forget(best)
        return best

    def _forget(self, waiter: Waiter) -> None:
        user = waiter.user
        left = self._user_count[user] - 1
        if left:
            self._user_count[user] = left
        else:
            del self._user_count[user]
            del self._user_tag[user]
