"""``GET /admin/requests`` and ``gpuctl simulate --url``: a running gateway's request log and
learnt fleet, replayed by the CLI; admins only, bounded, refused and gone said plainly."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import httpx
from typer.testing import CliRunner, Result

from gpuctl.cli.context import AppContext
from gpuctl.cli.main import app

from .world import GpuSpec, World, WorldFactory


def gpuctl(*args: str, env: dict[str, str]) -> Result:
    ctx = AppContext(env={**os.environ, **env})
    return CliRunner().invoke(app, list(args), obj=ctx, env=env, prog_name="gpuctl")


async def _serve(world: World, *, per_user: int = 2) -> None:
    """alice and bob each ask ``per_user`` times, a second apart, a minute between rounds."""
    _, bob_key = world.keys.create("bob")
    for _ in range(per_user):
        for key in (world.user_key, bob_key):
            async with world.client(key) as c:
                ok = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
                assert ok.status_code == 200
            await world.clock.advance(1)
        await world.clock.advance(60)


async def test_simulate_url_replays_the_gateways_request_log(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1")) as world:
        await _serve(world)
        env = {"GPUCTL_GATEWAY_URL": world.url}
        result = await asyncio.to_thread(
            gpuctl, "simulate", "--key", world.admin_key, "--since", "1h",
            "--set", "timing.reservation_minutes=2,5", "--json", env=env)
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["requests"] == 4  # the four served above, and no local state dir
        assert data["source"] == f"request log of {world.url} since 1h"
        assert data["gpus"] == 1
        assert any("the gateway knows" in note for note in data["notes"])
        assert [s["label"] for s in data["settings"]] == ["current config", "lease 2 min",
                                                          "lease 5 min"]
        assert world.admin_key not in result.output
        # The table too, with the key from the environment.
        table = await asyncio.to_thread(
            gpuctl, "simulate", "--since", "1h",
            env={**env, "GPUCTL_GATEWAY_KEY": world.admin_key})
        assert table.exit_code == 0, table.output
        assert "recommended" in table.stdout and world.url in table.stdout


async def test_the_request_log_is_for_admins_and_bounded(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1")) as world:
        await _serve(world)
        async with httpx.AsyncClient(base_url=world.url) as anonymous:
            assert (await anonymous.get("/admin/requests")).status_code == 401
        async with world.client(world.user_key) as user:
            assert (await user.get("/admin/requests")).status_code == 403
        async with world.client(world.admin_key) as admin:
            whole = (await admin.get("/admin/requests", params={"since": "1h"})).json()
            cut = (await admin.get("/admin/requests",
                                   params={"since": "1h", "limit": "3"})).json()
            huge = await admin.get("/admin/requests", params={"limit": "10000000"})
            garbage = await admin.get("/admin/requests", params={"since": "last tuesday"})
        assert whole["columns"] == ["at", "user", "model", "service_s", "tokens_out"]
        assert [row[1] for row in whole["rows"]] == ["alice", "bob", "alice", "bob"]
        assert all(len(row) == 5 and row[3] >= 0 for row in whole["rows"])
        assert whole["truncated"] is False and whole["until"] == whole["asked_until"]
        assert [gpu["id"] for gpu in whole["fleet"]] and whole["fleet"][0]["models"]
        # Cut at three: the window ends at the first request left out, and says so.
        assert len(cut["rows"]) == 3 and cut["truncated"] is True and cut["limit"] == 3
        assert cut["until"] == whole["rows"][3][0] < cut["asked_until"]
        assert huge.status_code == 200 and huge.json()["limit"] == 200_000
        assert garbage.status_code == 400 and "last tuesday" in garbage.json()["error"]


async def test_a_user_key_is_refused_and_a_gone_gateway_is_one_line(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1")) as world:
        await _serve(world, per_user=1)
        refused = await asyncio.to_thread(
            gpuctl, "simulate", "--url", world.url, "--key", world.user_key, "--since", "1h",
            env={})
        assert refused.exit_code == 4, refused.output
        assert "refused the key (HTTP 403)" in refused.output
        assert world.user_key not in refused.output
        no_key = await asyncio.to_thread(gpuctl, "simulate", "--url", world.url, env={})
        assert no_key.exit_code == 4 and "needs a gateway key" in no_key.output
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        gone_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    gone = await asyncio.to_thread(gpuctl, "simulate", "--url", gone_url, "--key", "sk-x",
                                   "--since", "1h", env={})
    assert gone.exit_code == 1
    first, *rest = gone.stderr.strip().splitlines()
    assert first.startswith("Error: ") and f"gateway at {gone_url} does not answer" in first
    assert all(line.startswith("Hint: ") for line in rest) and "Traceback" not in gone.output


def test_since_garbage_is_a_usage_error_before_any_network() -> None:
    for since in ("yesterday-ish", "1e400d", "7 parsecs"):
        result = gpuctl("simulate", "--url", "http://127.0.0.1:9", "--key", "sk-x",
                        "--since", since, env={})
        assert result.exit_code == 2, result.output
        assert repr(since) in result.stderr and "does not answer" not in result.output
