"""The status page's server side over real sockets: sessions, cookies, CSRF, who sees what,
the live stream and its limits, and ``/gpu/overview`` for ``gpuctl top``. The browser itself
is in ``tests/demo/test_page_browser.py``."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from gpuctl.gateway.sessions import COOKIE, Sessions
from gpuctl.gateway.ui import MAX_SIGN_IN_BYTES, UiParts
from gpuctl.sim.waiting import eventually
from gpuctl.store.keys import KeyStore

from .world import GpuSpec, World, WorldFactory


def parts(world: World) -> UiParts:
    ui: UiParts = world.app.quart.config["GPUCTL_UI"]
    return ui


async def signed_in(world: World, key: str) -> tuple[httpx.AsyncClient, str]:
    """A client holding a session cookie for ``key``, and the session's CSRF token."""
    client = httpx.AsyncClient(base_url=world.url, timeout=10)
    world.closers.append(client.aclose)
    r = await client.post("/ui/session", json={"key": key})
    assert r.status_code == 200, r.text
    return client, r.json()["csrf"]


async def test_the_page_is_served_and_the_root_still_says_ollama_is_running(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world, httpx.AsyncClient(base_url=world.url) as c:
        assert (await c.get("/")).text == "Ollama is running"
        page = await c.get("/ui/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert (await c.get("/ui")).headers["location"].endswith("/ui/")
        script = await c.get("/ui/static/app.js")
        assert script.status_code == 200 and "EventSource" in script.text
        assert (await c.get("/ui/static/..%2Fui.py")).status_code == 404
        assert (await c.get("/ui/static/secret.txt")).status_code == 404


async def test_signing_in_sets_an_opaque_httponly_strict_cookie(make_world: WorldFactory) -> None:
    async with make_world() as world, httpx.AsyncClient(base_url=world.url) as c:
        r = await c.post("/ui/session", json={"key": world.user_key})
        assert r.status_code == 200
        assert r.json()["name"] == "alice" and r.json()["admin"] is False
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/ui"} <= attributes
        assert "secure" not in attributes  # plain HTTP here; Secure under TLS
        assert world.user_key not in cookie
        assert world.user_key not in r.text


@pytest.mark.parametrize(("body", "status"), [
    (json.dumps({"key": "sk-wrong"}).encode(), 401),
    (b"not json", 400),
    (b'{"key": 5}', 400),
    (b"[]", 400),
    (json.dumps({"key": "x" * (MAX_SIGN_IN_BYTES + 1)}).encode(), 400),
])
async def test_a_bad_sign_in_sets_no_cookie(make_world: WorldFactory, body: bytes,
                                            status: int) -> None:
    async with make_world() as world, httpx.AsyncClient(base_url=world.url) as c:
        r = await c.post("/ui/session", content=body,
                         headers={"content-type": "application/json"})
        assert r.status_code == status
        assert "set-cookie" not in r.headers


async def test_without_a_session_the_page_data_is_refused(make_world: WorldFactory) -> None:
    async with make_world() as world, httpx.AsyncClient(base_url=world.url) as c:
        assert (await c.get("/ui/session")).json() == {"signed_in": False}
        assert (await c.get("/ui/state")).status_code == 401
        assert (await c.get("/ui/events")).status_code == 401
        # A bearer key is not a session: the page's routes take only the cookie.
        assert (await c.get("/ui/state", headers=world.headers())).status_code == 401
        forged = await c.get("/ui/state", headers={"cookie": f"{COOKIE}=forged-token"})
        assert forged.status_code == 401


async def test_admin_actions_need_an_admin_session_and_its_csrf_token(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world:
        user, user_csrf = await signed_in(world, world.user_key)
        r = await user.post("/ui/gpu/gpu-1/pause", headers={"X-CSRF-Token": user_csrf})
        assert r.status_code == 403
        admin, csrf = await signed_in(world, world.admin_key)
        assert (await admin.post("/ui/gpu/gpu-1/pause")).status_code == 403
        wrong = await admin.post("/ui/gpu/gpu-1/pause", headers={"X-CSRF-Token": user_csrf})
        assert wrong.status_code == 403
        assert world.gpu("gpu-1").state.value == "idle"
        done = await admin.post("/ui/gpu/gpu-1/pause", headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200, done.text
        assert done.json()["state"] == "pausing"
        await world.until(lambda: world.gpu("gpu-1").state.value == "paused")
        again = await admin.post("/ui/gpu/gpu-1/resume", headers={"X-CSRF-Token": csrf})
        assert again.json()["state"] == "starting"


async def test_a_user_sees_only_their_own_usage_and_queue_places(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=1)) as world:
        _, bob_key = world.keys.create("bob")
        for key in (world.user_key, bob_key, world.admin_key):
            async with world.client(key) as c:
                r = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
                assert r.status_code == 200
        bob, _ = await signed_in(world, bob_key)
        state = (await bob.get("/ui/state")).json()
        assert [u["user"] for u in state["usage"]] == ["bob"]
        assert state["usage"][0]["requests"] == 1
        assert "timeline" not in state
        admin, _ = await signed_in(world, world.admin_key)
        everyone = (await admin.get("/ui/state")).json()
        assert [u["user"] for u in everyone["usage"]] == ["admin", "alice", "bob"]
        assert "timeline" in everyone
        # ``gpuctl top`` reads the same view with a bearer key.
        async with world.client(bob_key) as c:
            top = (await c.get("/gpu/overview")).json()
        assert [u["user"] for u in top["usage"]] == ["bob"]
        async with httpx.AsyncClient(base_url=world.url) as anonymous:
            assert (await anonymous.get("/gpu/overview")).status_code == 401


async def test_revoking_a_key_or_signing_out_ends_the_session_at_once(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world:
        _, bob_key = world.keys.create("bob")
        bob_id = world.keys.authenticate(bob_key)
        assert bob_id is not None
        bob, _ = await signed_in(world, bob_key)
        assert (await bob.get("/ui/state")).status_code == 200
        world.keys.revoke(bob_id.id)
        assert (await bob.get("/ui/state")).status_code == 401
        alice, csrf = await signed_in(world, world.user_key)
        token = alice.cookies[COOKIE]
        assert (await alice.delete("/ui/session")).status_code == 403  # no CSRF token
        assert (await alice.delete("/ui/session",
                                   headers={"X-CSRF-Token": csrf})).status_code == 200
        replay = await alice.get("/ui/state", headers={"cookie": f"{COOKIE}={token}"})
        assert replay.status_code == 401  # the old cookie is dead on the server too


async def test_the_stream_sends_the_state_then_each_change(make_world: WorldFactory) -> None:
    async with make_world() as world:
        admin, csrf = await signed_in(world, world.admin_key)
        events: list[dict[str, object]] = []
        async with admin.stream("GET", "/ui/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()
            assert await lines.__anext__() == "retry: 1000"

            async def next_state() -> dict[str, object]:
                async for line in lines:
                    if line.startswith("data: "):
                        state: dict[str, object] = json.loads(line[6:])
                        events.append(state)
                        return state
                raise AssertionError("the stream ended")

            first = await asyncio.wait_for(next_state(), 5)
            assert first["fleet"]["gpus"][0]["state"] == "idle"  # type: ignore[index]
            await admin.post("/ui/gpu/gpu-1/pause", headers={"X-CSRF-Token": csrf})
            second = await asyncio.wait_for(next_state(), 5)
            assert second["fleet"]["gpus"][0]["state"] == "pausing"  # type: ignore[index]
            assert second["version"] > first["version"]  # type: ignore[operator]


async def test_open_streams_are_capped(make_world: WorldFactory) -> None:
    async with make_world() as world:
        watch = parts(world).watch
        watch.max_streams = 2
        admin, _ = await signed_in(world, world.admin_key)
        async with admin.stream("GET", "/ui/events") as one, \
                admin.stream("GET", "/ui/events") as two:
            assert one.status_code == two.status_code == 200
            refused = await admin.get("/ui/events")
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "5"
        await eventually(lambda: watch.streams == 0)


async def test_lease_and_wake_times_are_instants_that_hold_while_the_clock_moves(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=1), GpuSpec("gpu-2", status="paused")) \
            as world, world.client() as c:
        await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
        before = world.engine.overview()
        lease = before.gpus[0].leases[0]
        assert lease.user == "alice"
        assert lease.expires_at == pytest.approx(world.clock.wall() + 600, abs=0.2)
        await world.engine.wake("gpu-2")
        await world.clock.advance(30)
        after = world.engine.overview()
        assert after.at == pytest.approx(before.at + 30, abs=0.2)
        assert after.gpus[0].leases[0].expires_at == lease.expires_at  # same instant
        action = after.gpus[1].action
        assert action is not None and action.kind == "resume"
        assert action.started_at == pytest.approx(after.at - 30, abs=0.2)
        await world.clock.advance(600)
        assert world.engine.overview().gpus[0].leases == []


def test_sessions_are_bounded_and_expire(tmp_path: object) -> None:
    from pathlib import Path

    keys = KeyStore.open(Path(str(tmp_path)))
    _, secret = keys.create("alice")
    now = [0.0]
    sessions = Sessions(keys, clock=lambda: now[0], max_sessions=2, ttl=60)
    first = sessions.sign_in(secret)
    second = sessions.sign_in(secret)
    third = sessions.sign_in(secret)
    assert first and second and third
    assert len(sessions) == 2
    assert sessions.lookup(first[0]) is None  # the least recently used went first
    assert sessions.lookup(third[0]) is not None
    now[0] = 61
    assert sessions.lookup(third[0]) is None  # idle past its time
    assert sessions.sign_in("sk-wrong") is None
    keys.close()


async def test_the_usage_panels_show_a_user_only_their_rows_and_requests(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=1)) as world:
        _, bob_key = world.keys.create("bob")
        for key in (world.user_key, bob_key, bob_key):
            async with world.client(key) as c:
                r = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
                assert r.status_code == 200
        await world.clock.advance(1)  # "today" ends now: let the requests lie in it
        bob, _ = await signed_in(world, bob_key)
        mine = (await bob.get("/ui/usage")).json()
        assert [(r["user"], r["requests"]) for r in mine["today"]["rows"]] == [("bob", 2)]
        assert [q["user"] for q in mine["requests"]] == ["bob", "bob"]
        assert "days" not in mine  # the chart shows everyone: admins only
        admin, _ = await signed_in(world, world.admin_key)
        everyone = (await admin.get("/ui/usage")).json()
        assert sorted(r["user"] for r in everyone["today"]["rows"]) == ["alice", "bob"]
        assert len(everyone["days"]) == 14
        today = everyone["days"][-1]
        assert set(today["users"]) == {"alice", "bob"}
        assert today["always_on_hours"] >= today["billed_hours"]
        async with httpx.AsyncClient(base_url=world.url) as anonymous:
            assert (await anonymous.get("/ui/usage")).status_code == 401
