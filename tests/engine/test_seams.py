"""The small pieces the engine is built from, each on its own (no engine, no clock)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gpuctl.cloud.base import Workspace
from gpuctl.engine.api import ModelView, Ticket
from gpuctl.engine.background import Background
from gpuctl.engine.catalog import ModelCatalog
from gpuctl.engine.fairqueue import FairQueue
from gpuctl.engine.fleet import Flight, Gpu
from gpuctl.errors import Unavailable, WakeFailed


def _future() -> asyncio.Future[Ticket]:
    return asyncio.get_running_loop().create_future()


def _gpu(name: str) -> Gpu:
    return Gpu(ws=Workspace(id=name, name=name, status="running"), slots=4)


async def test_failing_a_model_fails_its_waiters_and_leaves_other_models_queued() -> None:
    queue = FairQueue(10)
    mine = [queue.push("m", user, _future(), 0.0) for user in ("a", "b")]
    other = queue.push("other", "a", _future(), 0.0)
    error = Unavailable("no GPU", retry_after=5)

    queue.fail("m", error)

    assert queue.depth("m") == 0 and queue.depth("other") == 1
    assert all(w.future.exception() is error for w in mine)
    assert not other.future.done()


async def test_failing_a_model_skips_a_waiter_already_granted() -> None:
    queue = FairQueue(10)
    granted = queue.push("m", "a", _future(), 0.0)
    ticket = Ticket(id=1, gpu_id="g", gpu_name="g", base_url="", model="m", user="a",
                    reason="", waited_seconds=0.0)
    granted.future.set_result(ticket)

    queue.fail("m", Unavailable("no GPU", retry_after=5))

    assert granted.future.result() is ticket and len(queue) == 0


def test_serving_slots_counts_only_ready_gpus_with_the_model() -> None:
    catalog = ModelCatalog(slots=4)
    up, down = _gpu("up"), _gpu("down")
    catalog.set_models(up, [ModelView(name="m:latest", model="m:latest")])
    catalog.set_models(down, [ModelView(name="m:latest", model="m:latest")])

    catalog.set_ready(up, True)

    assert catalog.serving_slots("m:latest") == 4
    assert catalog.serving_slots("absent:latest") == 0
    catalog.set_ready(up, False)
    assert catalog.serving_slots("m:latest") == 0


async def test_a_new_flight_failing_unawaited_is_not_reported_as_lost() -> None:
    seen: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        flight = Flight.begin("resume", 12.0, grace=False)
        flight.accepted.set_exception(WakeFailed("the cloud said no"))
        del flight  # nobody ever awaits it
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)

    assert seen == []


async def test_background_forgets_finished_tasks_and_logs_only_unexpected_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    background = Background()

    async def fail(exc: Exception) -> None:
        raise exc

    expected = background.spawn(fail(WakeFailed("known")))
    unexpected = background.spawn(fail(RuntimeError("a bug")))
    with caplog.at_level(logging.ERROR, logger="gpuctl.engine.background"):
        await asyncio.gather(expected, unexpected, return_exceptions=True)
        await asyncio.sleep(0)

    assert background.running() == []
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [unexpected.exception()]
