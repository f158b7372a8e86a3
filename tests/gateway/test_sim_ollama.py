"""The simulated Ollama node answers in Ollama's own shapes (the gateway tests rely on it)."""

from __future__ import annotations

import httpx

from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import running


async def test_sim_node_speaks_ollamas_errors_and_root() -> None:
    node = SimOllama(["llama3.2"])
    async with running(node) as url, httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/")).text == "Ollama is running"
        missing = await c.post("/api/chat", json={"model": "nope"})
        assert missing.json() == {"error": 'model "nope" not found, try pulling it first'}
        unknown = await c.get("/api/unknown")
        assert (unknown.status_code, unknown.text) == (404, "404 page not found")
        openai_missing = await c.post("/v1/chat/completions", json={"model": "nope"})
        assert openai_missing.json()["error"]["type"] == "not_found_error"


async def test_sim_node_demands_its_token_and_can_go_down() -> None:
    node = SimOllama(token="t")
    async with running(node) as url, httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/api/tags")).status_code == 401
        ok = await c.get("/api/tags", headers={"Authorization": "Bearer t"})
        assert ok.status_code == 200
        node.up = False
        down = await c.get("/api/tags", headers={"Authorization": "Bearer t"})
        assert down.status_code == 503
        assert node.requests["/api/tags"] == 3
