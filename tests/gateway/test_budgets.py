"""Budgets: past its budget a key is served by warm GPUs, but wakes nothing (429)."""

from __future__ import annotations

import asyncio
import json
import os

import ollama
import openai
import pytest
from typer.testing import CliRunner, Result

from gpuctl.cli.context import AppContext
from gpuctl.cli.main import app

from .world import GpuSpec, World, WorldFactory

WARM = GpuSpec("gpu-1", models=("llama3.2:latest",))
COLD = GpuSpec("gpu-2", status="paused", models=("qwen3:8b",))
KNOWN = {"gpu-2": ["qwen3:8b"]}
HELLO = [{"role": "user", "content": "hi"}]


def gpuctl(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), obj=AppContext(env=dict(os.environ)),
                              prog_name="gpuctl")


def _key_id(world: World, name: str) -> str:
    return next(k.id for k in world.keys.all() if k.name == name)


async def _spend(world: World, budget_seconds: float) -> str:
    """Give alice a budget, let her use a warm GPU past it; returns her key id."""
    alice = _key_id(world, "alice")
    world.store.ledger.set_budget(alice, budget_seconds, "day")
    await world.ollama().chat(model="llama3.2", messages=HELLO)
    await world.clock.advance(120, step=10)  # her lease holds gpu-1: held seconds, refreshed
    return alice


async def test_past_its_budget_a_key_is_served_warm_but_refused_a_wake(
    make_world: WorldFactory,
) -> None:
    async with make_world(WARM, COLD, known=KNOWN) as world:
        await _spend(world, 60.0)
        # A warm GPU still serves her, and says what is left.
        async with world.client() as c:
            warm = await c.post("/api/chat", json={"model": "llama3.2", "stream": False})
        assert warm.status_code == 200
        assert warm.headers["x-gpuctl-budget-remaining"] == "0"
        # The ollama client: a model only a paused GPU has needs a wake: 429.
        with pytest.raises(ollama.ResponseError) as refused:
            await world.ollama().chat(model="qwen3:8b", messages=HELLO)
        assert refused.value.status_code == 429
        assert "budget of 0.0166667 GPU-hours per day" in refused.value.error
        assert "resets at" in refused.value.error
        # The openai client (no retries: Retry-After is hours away) gets a RateLimitError.
        with pytest.raises(openai.RateLimitError) as limited:
            await world.openai(max_retries=0).chat.completions.create(
                model="qwen3:8b", messages=HELLO)  # type: ignore[arg-type]
        retry_after = int(limited.value.response.headers["retry-after"])
        assert 0 < retry_after <= 86_400
        assert limited.value.response.headers["x-gpuctl-budget-remaining"] == "0"
        assert world.cloud.total_resumes == 0


async def test_a_key_without_a_budget_wakes_and_sees_no_budget_header(
    make_world: WorldFactory,
) -> None:
    async with make_world(WARM, COLD, known=KNOWN) as world:
        await _spend(world, 60.0)
        _, bob_key = world.keys.create("bob")
        ask = asyncio.ensure_future(world.ollama(bob_key).chat(model="qwen3:8b",
                                                               messages=HELLO))
        world.tasks.append(ask)
        await world.until(lambda: ask.done(), step=5)
        assert (await ask).message.content
        assert world.cloud.total_resumes == 1
        async with world.client(bob_key) as c:
            answer = await c.post("/api/chat", json={"model": "llama3.2", "stream": False})
        assert "x-gpuctl-budget-remaining" not in answer.headers


async def test_a_key_within_its_budget_wakes_and_sees_what_is_left(
    make_world: WorldFactory,
) -> None:
    async with make_world(WARM, COLD, known=KNOWN) as world:
        await _spend(world, 3600.0)
        ask = asyncio.ensure_future(world.openai(max_retries=0).chat.completions
                                    .with_raw_response.create(model="qwen3:8b",
                                                              messages=HELLO))  # type: ignore[arg-type]
        world.tasks.append(ask)
        await world.until(lambda: ask.done(), step=5)
        remaining = float((await ask).headers["x-gpuctl-budget-remaining"])
        assert 0 < remaining < 3600 - 100  # she used her held minutes on gpu-1
        assert world.cloud.total_resumes == 1


def test_keys_budget_sets_shows_and_removes_a_budget() -> None:
    user = gpuctl("keys", "create", "--name", "carol", "--json")
    key_id = json.loads(user.stdout)["id"]
    assert gpuctl("keys", "budget", key_id, "--gpu-hours", "2", "--per", "week").exit_code == 0
    listed = json.loads(gpuctl("keys", "list", "--json").stdout)
    assert listed[0]["budget"]["gpu_hours"] == 2 and listed[0]["budget"]["per"] == "week"
    assert listed[0]["budget"]["used_gpu_hours"] == 0
    assert "0.00/2 h per week" in gpuctl("keys", "list").stdout
    assert gpuctl("keys", "budget", key_id, "--none").exit_code == 0
    assert json.loads(gpuctl("keys", "list", "--json").stdout)[0]["budget"] is None


def test_keys_budget_refuses_bad_input_and_admin_keys() -> None:
    admin = json.loads(
        gpuctl("keys", "create", "--name", "root", "--admin", "--json").stdout)["id"]
    refused = gpuctl("keys", "budget", admin, "--gpu-hours", "1")
    assert refused.exit_code == 2 and "admin keys have no budget" in refused.output
    assert gpuctl("keys", "budget", admin).exit_code == 2  # neither --gpu-hours nor --none
    assert gpuctl("keys", "budget", admin, "--gpu-hours", "1", "--per", "year").exit_code == 2
    assert gpuctl("keys", "budget", admin, "--gpu-hours", "-1").exit_code == 2
    for bad in ("nan", "inf"):
        result = gpuctl("keys", "budget", admin, "--gpu-hours", bad)
        assert result.exit_code == 2 and "gpu-hours" in result.output
    assert gpuctl("keys", "budget", "key_nope", "--gpu-hours", "1").exit_code == 1
