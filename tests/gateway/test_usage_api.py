"""``GET /admin/usage`` and ``gpuctl usage --url``: admins see everyone, users themselves."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
from typer.testing import CliRunner, Result

from gpuctl.cli.context import AppContext
from gpuctl.cli.main import app

from .world import GpuSpec, World, WorldFactory


def gpuctl(*args: str, env: dict[str, str]) -> Result:
    ctx = AppContext(env={**os.environ, **env})
    return CliRunner().invoke(app, list(args), obj=ctx, env=env, prog_name="gpuctl")


async def _two_users(world: World) -> str:
    """alice and bob each ask once; returns bob's key."""
    _, bob_key = world.keys.create("bob")
    for key in (world.user_key, bob_key):
        async with world.client(key) as c:
            ok = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
            assert ok.status_code == 200
    await world.clock.advance(60)
    return bob_key


async def test_an_admin_sees_every_user_and_a_user_only_themselves(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1")) as world:
        bob_key = await _two_users(world)
        async with world.client(world.admin_key) as admin, world.client(bob_key) as bob:
            everyone = (await admin.get("/admin/usage", params={"since": "1h"})).json()
            mine = (await bob.get("/admin/usage", params={"since": "1h"})).json()
            by_gpu = (await admin.get("/admin/usage", params={"since": "1h", "by": "gpu"}))
        assert {row["key"] for row in everyone["rows"]} == {"alice", "bob"}
        assert [row["key"] for row in mine["rows"]] == ["bob"]
        # The fleet's totals are the same for both: what the group pays.
        for total in ("billed_gpu_seconds", "always_on_gpu_seconds", "unattributed"):
            assert mine[total] == everyone[total]
        assert everyone["billed_gpu_seconds"] > 0
        assert [row["key"] for row in by_gpu.json()["rows"]] == ["gpu-1"]


async def test_usage_needs_a_key_and_rejects_nonsense(make_world: WorldFactory) -> None:
    async with make_world() as world:
        async with httpx.AsyncClient(base_url=world.url) as anonymous:
            assert (await anonymous.get("/admin/usage")).status_code == 401
        async with world.client() as c:
            bad_by = await c.get("/admin/usage", params={"by": "planet"})
            bad_since = await c.get("/admin/usage", params={"since": "last tuesday"})
        assert bad_by.status_code == 400 and "planet" in bad_by.json()["error"]
        assert bad_since.status_code == 400 and "last tuesday" in bad_since.json()["error"]


async def test_gpuctl_usage_url_reads_the_gateway_with_the_key_from_the_environment(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1")) as world:
        await _two_users(world)
        env = {"GPUCTL_GATEWAY_URL": world.url, "GPUCTL_GATEWAY_KEY": world.admin_key}
        result = await asyncio.to_thread(gpuctl, "usage", "--since", "1h", "--json", env=env)
        assert result.exit_code == 0, result.output
        assert {row["key"] for row in json.loads(result.stdout)["rows"]} == {"alice", "bob"}
        assert world.admin_key not in result.output
        wrong = await asyncio.to_thread(gpuctl, "usage", "--key", "sk-nope",
                                        env={"GPUCTL_GATEWAY_URL": world.url})
        assert wrong.exit_code == 4
        assert "refused the key" in wrong.output


async def test_a_window_of_millennia_is_answered_from_what_happened(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1")) as world:
        await _two_users(world)
        async with world.client() as c:
            huge = await c.get("/admin/usage", params={"since": "99999999999d", "by": "hour"})
            absurd = await c.get("/admin/usage", params={"since": "1e400d"})
        assert huge.status_code == 200
        assert absurd.status_code == 400 and "1e400d" in absurd.json()["error"]
        body = huge.json()
        assert body["since"].startswith("1970-01-01")
        assert [row["key"][:13] for row in body["rows"]] == ["2027-01-15T08"]  # one hour
