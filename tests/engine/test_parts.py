"""The engine's parts on their own: fair queue, router index, leases, estimates, names."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuctl.cloud.base import Workspace
from gpuctl.engine.api import GpuState, ModelView, Ticket
from gpuctl.engine.estimates import DEFAULT_RESUME_SECONDS, Estimator
from gpuctl.engine.fairqueue import FairQueue
from gpuctl.engine.fleet import Gpu, normalize_model
from gpuctl.engine.leases import LeaseBook
from gpuctl.engine.router import RouteIndex


def _future() -> asyncio.Future[Ticket]:
    return asyncio.get_running_loop().create_future()


async def test_fair_queue_alternates_between_users() -> None:
    queue = FairQueue(100)
    for _ in range(3):
        queue.push("m", "heavy", _future(), 0.0)
    queue.push("m", "light", _future(), 0.0)
    order = [queue.pop_for({"m"}) for _ in range(4)]
    assert [w.user for w in order if w] == ["heavy", "light", "heavy", "heavy"]


async def test_fair_queue_positions_follow_turns_not_arrival() -> None:
    queue = FairQueue(100)
    heavy = [queue.push("m", "heavy", _future(), 0.0) for _ in range(5)]
    light = queue.push("m", "light", _future(), 0.0)
    assert queue.position(heavy[0]) == 1
    assert queue.position(light) == 2
    assert queue.position(heavy[4]) == 6


async def test_fair_queue_removal_frees_the_place() -> None:
    queue = FairQueue(2)
    first = queue.push("m", "a", _future(), 0.0)
    queue.push("m", "b", _future(), 0.0)
    assert queue.full
    assert queue.remove(first)
    assert not queue.remove(first)
    assert not queue.full and len(queue) == 1


async def test_fair_queue_serves_only_models_the_gpu_has_oldest_first() -> None:
    queue = FairQueue(10)
    queue.push("other", "a", _future(), 0.0)
    older = queue.push("m1", "b", _future(), 0.0)
    queue.push("m2", "c", _future(), 0.0)
    assert queue.pop_for({"m1", "m2"}) is older
    assert queue.pop_for({"nothing"}) is None
    assert queue.depth("other") == 1


async def test_fair_queue_takes_turns_across_models_a_gpu_shares() -> None:
    queue = FairQueue(200)
    for _ in range(100):
        queue.push("big", "heavy", _future(), 0.0)
    light = queue.push("small", "light", _future(), 0.0)
    first = queue.pop_for({"big", "small"})
    second = queue.pop_for({"big", "small"})
    assert first is not None and first.user == "heavy"
    assert second is light


async def test_a_returning_user_does_not_bank_turns() -> None:
    queue = FairQueue(100)
    for _ in range(3):
        queue.push("m", "a", _future(), 0.0)
    for _ in range(3):
        queue.pop_for({"m"})
    queue.push("m", "b", _future(), 0.0)
    late = queue.push("m", "a", _future(), 0.0)
    assert queue.position(late) == 2  # "a" gets no credit for having waited before


def _gpu(name: str, models: list[str], *, in_use: int = 0, loaded: set[str] | None = None,
         state: GpuState = GpuState.IDLE) -> Gpu:
    gpu = Gpu(ws=Workspace(id=name, name=name, status="running"), slots=4)
    gpu.models = {m: ModelView(name=m, model=m) for m in models}
    gpu.loaded = loaded or set()
    gpu.in_use = in_use
    gpu.state = state
    gpu.ready = state.ready
    return gpu


def test_router_prefers_the_users_lease_then_loaded_then_unleased_then_least_used() -> None:
    index = RouteIndex(4)
    busy_loaded = _gpu("busy-loaded", ["m"], in_use=2, loaded={"m"})
    idle_loaded_leased = _gpu("idle-loaded-leased", ["m"], loaded={"m"})
    idle_disk = _gpu("idle-disk", ["m"])
    index.update(busy_loaded, leased=False)
    index.update(idle_loaded_leased, leased=True)
    index.update(idle_disk, leased=False)

    mine = index.choose("m", {"idle-disk": object()})
    assert mine is not None and mine.gpu is idle_disk and mine.reason.startswith("leased to you")
    best = index.choose("m", {})
    assert best is not None and best.gpu is busy_loaded
    assert best.reason == "model loaded, not leased, 2/4 slots in use"


def test_router_skips_full_and_unready_gpus_and_forgets_removed_ones() -> None:
    index = RouteIndex(4)
    full = _gpu("full", ["m"], in_use=4)
    starting = _gpu("starting", ["m"], state=GpuState.STARTING)
    ok = _gpu("ok", ["m"])
    for gpu in (full, starting, ok):
        index.update(gpu, leased=False)
    choice = index.choose("m", {})
    assert choice is not None and choice.gpu is ok
    index.remove("ok")
    assert index.choose("m", {}) is None
    assert not index.has_free("m")


def test_router_moves_a_gpu_between_buckets_as_slots_fill() -> None:
    index = RouteIndex(4)
    a, b = _gpu("a", ["m"]), _gpu("b", ["m"])
    index.update(a, leased=False)
    index.update(b, leased=False)
    a.in_use = 1
    index.update(a, leased=False)
    choice = index.choose("m", {})
    assert choice is not None and choice.gpu is b


def test_leases_expire_in_order_and_renewal_postpones() -> None:
    book = LeaseBook()
    book.hold("g1", "a", 100.0, 60)
    book.hold("g1", "b", 50.0, 60)
    book.hold("g1", "a", 200.0, 60)  # renewed
    assert book.expire(60.0) == {"g1"}
    assert set(book.holders("g1")) == {"a"}
    assert book.expire(150.0) == set()
    assert book.expire(200.0) == {"g1"}
    assert not book.leased("g1") and book.of_user("a") == {}


def test_leased_to_other_sees_only_other_users() -> None:
    book = LeaseBook()
    book.hold("g", "a", 10.0, 10)
    assert not book.leased_to_other("g", "a")
    assert book.leased_to_other("g", "b")


def test_estimates_learn_from_history_and_fall_back_to_surf_norms() -> None:
    est = Estimator({"g1": [(100.0, True), (140.0, True), (600.0, False)]})
    assert est.resume_seconds("g1") == 120
    assert est.resume_seconds("g2") == 120  # fleet-wide mean for a GPU never resumed
    assert Estimator().resume_seconds("g") == DEFAULT_RESUME_SECONDS
    assert est.recent_failures("g1") == 1
    est.record_service("m", 10)
    assert est.queue_wait("m", position=5, serving_slots=4) == 20


@pytest.mark.parametrize(
    ("given", "normal"),
    [("llama3.2", "llama3.2:latest"), ("llama3.2:latest", "llama3.2:latest"),
     ("qwen3:8b", "qwen3:8b"), ("registry.io:5000/ns/model", "registry.io:5000/ns/model:latest")],
)
def test_model_names_are_normalised_like_ollama(given: str, normal: str) -> None:
    assert normalize_model(given) == normal


_gpu_specs = st.lists(
    st.tuples(st.booleans(), st.booleans(), st.booleans(), st.integers(0, 4), st.booleans()),
    min_size=0, max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_gpu_specs)
def test_router_choice_matches_the_preference_order(specs: list[tuple[bool, ...]]) -> None:
    """Whatever the fleet, the router's pick ranks as well as the best GPU by brute force."""
    index = RouteIndex(4)
    mine: dict[str, object] = {}
    ranks: dict[str, tuple[int, int, int, int]] = {}
    for n, (loaded, by_me, by_other, in_use, ready) in enumerate(specs):
        gpu = _gpu(f"g{n}", ["m"], in_use=in_use, loaded={"m"} if loaded else set(),
                   state=GpuState.ACTIVE if ready else GpuState.STARTING)
        index.update(gpu, leased=by_me or by_other)
        if by_me:
            mine[gpu.id] = object()
        if ready and in_use < 4:
            ranks[gpu.id] = (not by_me, not loaded, by_me or by_other, in_use)
    choice = index.choose("m", mine)
    if not ranks:
        assert choice is None
    else:
        assert choice is not None
        assert ranks[choice.gpu.id] == min(ranks.values())
