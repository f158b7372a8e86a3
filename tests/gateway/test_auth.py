"""No key, no service: 401 for missing, bad and revoked keys, 403 for a user on admin routes."""

from __future__ import annotations

import ollama
import pytest

from gpuctl.store.keys import KeyStore

from .world import WorldFactory


@pytest.mark.parametrize("path", ["/api/tags", "/api/version", "/v1/models", "/gpu/discover",
                                  "/metrics"])
async def test_request_without_key_gets_401(make_world: WorldFactory, path: str) -> None:
    async with make_world() as world, world.client() as c:
        r = await c.get(path, headers={"Authorization": ""})
        assert r.status_code == 401
        assert "error" in r.json()


async def test_inference_without_key_gets_401_and_never_reaches_a_node(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world, world.client() as c:
        r = await c.post("/api/chat", json={"model": "llama3.2"},
                         headers={"Authorization": ""})
        assert r.status_code == 401
        assert r.json() == {"error": "missing API key: send 'Authorization: Bearer <key>'"}
        assert world.nodes["gpu-1"].requests["/api/chat"] == 0


async def test_bad_key_gets_401_in_each_api_shape(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client("sk-not-a-real-key") as c:
        native = await c.post("/api/generate", json={"model": "llama3.2"})
        assert native.status_code == 401
        assert native.json() == {"error": "invalid or revoked API key"}
        openai_shape = await c.post("/v1/chat/completions", json={"model": "llama3.2"})
        assert openai_shape.status_code == 401
        assert openai_shape.json()["error"]["type"] == "authentication_error"


async def test_the_ollama_client_sees_401_for_a_bad_key(make_world: WorldFactory) -> None:
    async with make_world() as world:
        with pytest.raises(ollama.ResponseError) as caught:
            await world.ollama("sk-wrong").list()
        assert caught.value.status_code == 401


async def test_key_revoked_by_another_process_fails_on_the_next_request(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world, world.client() as c:
        assert (await c.get("/api/tags")).status_code == 200
        # `gpuctl keys revoke` runs in another process: another connection to the same file.
        cli_keys = KeyStore.open(world.store.path.parent)
        try:
            (alice,) = [k for k in cli_keys.all() if k.name == "alice"]
            cli_keys.revoke(alice.id)
        finally:
            cli_keys.close()
        r = await c.get("/api/tags")
        assert r.status_code == 401


async def test_key_created_by_another_process_works_on_the_next_request(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world:
        cli_keys = KeyStore.open(world.store.path.parent)
        try:
            _, secret = cli_keys.create("bob")
        finally:
            cli_keys.close()
        async with world.client(secret) as c:
            assert (await c.get("/api/tags")).status_code == 200


async def test_user_key_on_pause_gets_403_and_pauses_nothing(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        r = await c.post("/gpu/gpu-1/pause")
        assert r.status_code == 403
        assert r.json() == {"error": "this endpoint needs an admin key"}
        assert world.cloud.total_pauses == 0


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
    ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("POST", "/gpu/gpu-1/resume"),
    ("HEAD", "/api/blobs/sha256:00"),
])
async def test_user_key_on_node_changing_routes_gets_403(
    make_world: WorldFactory, method: str, path: str,
) -> None:
    async with make_world() as world, world.client() as c:
        r = await c.request(method, path, json={"model": "x"} if method != "HEAD" else None)
        assert r.status_code == 403


async def test_root_and_health_need_no_key(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        root = await c.get("/", headers={"Authorization": ""})
        assert (root.status_code, root.text) == (200, "Ollama is running")
        head = await c.head("/", headers={"Authorization": ""})
        assert head.status_code == 200
        health = await c.get("/health", headers={"Authorization": ""})
        assert health.json() == {"status": "healthy", "service": "gpuctl"}


async def test_a_used_key_records_last_used(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        await c.get("/api/tags")
        world.keys.flush()
        (alice,) = [k for k in world.keys.all() if k.name == "alice"]
        assert alice.last_used is not None
