"""The status page in a real browser: Debian's chromium, driven by Playwright, against the
demo fleet behind the real gateway (``start_demo``, real sockets, the real clock with short
timings). What a person sees is what is checked: the states a GPU goes through, who sees
whose usage, an admin's pause, a dropped stream coming back, and no console errors.
Screenshots of each state go to ``test-artifacts/ui/`` (gitignored) for a person to look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpuctl.gateway.ui import UiParts
from gpuctl.sim.waiting import eventually

from .conftest import DemoFactory, RunningDemo

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (apt-get install chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
#: Long enough for each state to be on screen for a second or more.
WATCHABLE = {"resume_scale": 0.5, "ollama_seconds": 0.5, "word_seconds": 0.05,
             "reservation_minutes": 0.05, "pause_seconds": 1.0}
STEP_MS = 15_000


class Browser:
    """Chromium with the tabs a test opened; ``close_tabs`` before the gateway stops, so no
    live stream holds its shutdown."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self.contexts: list[Any] = []

    async def open(self, name: str, **options: Any) -> Page:
        context = await self.browser.new_context(**options)
        self.contexts.append(context)
        return Page(await context.new_page(), name)

    async def close_tabs(self) -> None:
        for context in self.contexts:
            await context.close()
        self.contexts.clear()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield Browser(launched)
        finally:
            await launched.close()


@contextlib.asynccontextmanager
async def demo_with_tabs(start_demo: DemoFactory, browser: Browser,
                         **timings: Any) -> AsyncIterator[RunningDemo]:
    async with start_demo(**{**WATCHABLE, **timings}) as demo:
        try:
            yield demo
        finally:
            await browser.close_tabs()


class Page:
    """One signed-in tab, collecting console errors and taking named screenshots."""

    def __init__(self, page: Any, name: str) -> None:
        self.page = page
        self.name = name
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    async def sign_in(self, url: str, key: str) -> None:
        await self.page.goto(f"{url}/ui/")
        await self.page.fill("#key", key)
        await self.page.press("#key", "Enter")  # the keyboard way
        await self.page.wait_for_selector("#fleet-panel:not([hidden])", timeout=STEP_MS)
        await self.page.wait_for_selector("#conn[data-live='true']", timeout=STEP_MS)

    async def see(self, selector: str, shot: str | None = None) -> Any:
        found = await self.page.wait_for_selector(selector, timeout=STEP_MS)
        if shot is not None:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await self.page.screenshot(path=str(ARTIFACTS / f"{self.name}-{shot}.png"),
                                       full_page=True)
        return found


def card(gpu: str, state: str, extra: str = "") -> str:
    return f'article[data-gpu="{gpu}"][data-state="{state}"]{extra}'


async def test_a_request_wakes_a_gpu_and_the_page_shows_every_state(
    start_demo: DemoFactory, browser: Browser,
) -> None:
    async with demo_with_tabs(start_demo, browser) as demo:
        tab = await browser.open("lifecycle")
        await tab.sign_in(demo.url, demo.fleet.key)
        await tab.see(card("gpu-1", "paused"), "1-paused")

        async def ask() -> str:
            stream = await demo.ollama().chat(model="qwen2.5:7b", stream=True,
                                              messages=[{"role": "user", "content": "Hi"}])
            return "".join([part.message.content or "" async for part in stream])

        answer = asyncio.ensure_future(ask())
        try:
            waking = await tab.see(card("gpu-1", "waking"), "2-waking")
            assert "of about" in await waking.inner_text()  # the estimate is shown
            serving = await tab.see(card("gpu-1", "serving", "[data-serving-you]"),
                                    "3-serving-you")
            assert "serving you" in await serving.inner_text()
            text = await asyncio.wait_for(answer, 30)
        finally:
            answer.cancel()
        assert text.startswith("Hello! This is qwen2.5:7b on gpu-1")
        ready = await tab.see(card("gpu-1", "ready", "[data-leased-to-you]"), "4-ready-leased")
        assert "left" in await ready.inner_text()  # the lease counts down
        await tab.see(card("gpu-1", "pausing"), "5-pausing")
        await tab.see(card("gpu-1", "paused"), "6-paused")
        usage = await tab.see('#usage tr[data-user="demo"]')
        assert (await usage.inner_text()).split()[:2] == ["demo", "1"]
        assert tab.errors == []


async def test_a_user_sees_only_their_usage_and_an_admin_pauses_from_the_page(
    start_demo: DemoFactory, browser: Browser,
) -> None:
    # A lease that outlasts the test: the pause is the admin's, not the lease running out.
    async with demo_with_tabs(start_demo, browser, reservation_minutes=5) as demo:
        _, bob_key = demo.fleet.keys.create("bob")
        answer = await demo.ollama().chat(model="mistral", stream=False,
                                          messages=[{"role": "user", "content": "Hi"}])
        assert answer.message.content
        bob = await browser.open("user", viewport={"width": 390, "height": 844})
        await bob.sign_in(demo.url, bob_key)
        await bob.see(card("gpu-3", "ready", "[data-leased]"), "phone-user")
        await bob.see("#usage-title:has-text('Your usage today')")
        assert await bob.page.query_selector('#usage tr[data-user="demo"]') is None
        assert "No requests yet." in await bob.page.inner_text("#usage")
        assert "No requests today." in await bob.page.inner_text("#requests")
        assert await bob.page.is_hidden("#chart-panel")  # the chart shows every user: admins
        assert await bob.page.query_selector("button[data-action]") is None
        assert await bob.page.is_hidden("#timeline-panel")

        admin = await browser.open("admin")
        await admin.sign_in(demo.url, demo.fleet.key)
        await admin.see('#usage tr[data-user="demo"]')
        request = await admin.see('#requests tr:has(td:has-text("mistral"))')
        await admin.see('#requests td:has-text("gpu-3")')  # the GPU by name, not by id
        assert "woke a GPU" in await request.inner_text()
        bar = await admin.see('#chart rect[data-user="demo"]', "admin-chart")
        assert await bar.get_attribute("data-day") == time.strftime("%Y-%m-%d", time.gmtime())
        pause = await admin.see('button[data-action="pause"][data-target="gpu-3"]:not([disabled])')
        await pause.focus()
        await admin.page.keyboard.press("Enter")
        await admin.see(card("gpu-3", "pausing"), "admin-pausing")
        await admin.see(card("gpu-3", "paused"), "admin-paused")
        await bob.see(card("gpu-3", "paused"))  # every open page follows
        timeline = await admin.page.inner_text("#timeline")
        assert "gpu-3: pausing → paused" in timeline
        assert bob.errors == [] and admin.errors == []


async def test_the_page_catches_up_after_its_stream_drops(
    start_demo: DemoFactory, browser: Browser,
) -> None:
    async with demo_with_tabs(start_demo, browser) as demo:
        tab = await browser.open("reconnect")
        await tab.sign_in(demo.url, demo.fleet.key)
        await tab.see(card("gpu-2", "paused"))
        assert demo.gateway is not None
        parts: UiParts = demo.gateway.quart.config["GPUCTL_UI"]
        parts.watch.drop_streams()  # as when a proxy or the network cuts the stream
        await demo.fleet.engine.wake("gpu-2")  # a change while the page is cut off
        await tab.see(card("gpu-2", "waking"))
        await tab.see("#conn[data-live='true']", "reconnected")
        await eventually(lambda: parts.watch.streams == 1)
        assert tab.errors == []


async def test_a_wrong_key_is_refused_and_signing_out_ends_the_session(
    start_demo: DemoFactory, browser: Browser,
) -> None:
    async with demo_with_tabs(start_demo, browser) as demo:
        tab = await browser.open("signin")
        await tab.page.goto(f"{demo.url}/ui/")
        await tab.page.fill("#key", "sk-not-a-key")
        await tab.page.click("button[type=submit]")
        error = await tab.see("#signin-error:has-text('invalid')", "refused")
        assert "invalid or revoked" in await error.inner_text()
        tab.errors.clear()  # the 401 of the refused sign-in is logged by the browser
        await tab.sign_in(demo.url, demo.fleet.key)
        cookies = await tab.page.context.cookies()
        assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
            ("gpuctl_session", True, "Strict")]
        assert demo.fleet.key not in cookies[0]["value"]
        assert await tab.page.evaluate("document.cookie") == ""
        assert await tab.page.evaluate("JSON.stringify(localStorage)") == "{}"
        await tab.page.click("#signout")
        await tab.see("#signin-panel:not([hidden])")
        await tab.page.reload()
        await tab.see("#signin-panel:not([hidden])")
        assert tab.errors == []


#: WCAG contrast of each text element against the background it sits on (enabled controls
#: and text only: disabled buttons are exempt).
CONTRAST = """() => {
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const worst = [];
  for (const el of document.querySelectorAll(
      "h1, h2, h3, .badge, .detail, dt, dd, th, td, button:not([disabled]), .conn, #me")) {
    if (!el.offsetParent && el.tagName !== "H1") continue;
    const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const what = `${el.tagName}.${el.className}: ${el.textContent.trim().slice(0, 30)}`;
    worst.push([ratio, what]);
  }
  worst.sort((x, y) => x[0] - y[0]);
  return worst.slice(0, 3);
}"""


async def test_the_page_has_enough_contrast_in_every_state(
    start_demo: DemoFactory, browser: Browser,
) -> None:
    async with demo_with_tabs(start_demo, browser, reservation_minutes=5) as demo:
        tab = await browser.open("contrast")
        await tab.sign_in(demo.url, demo.fleet.key)
        await demo.fleet.engine.wake("gpu-2")
        await demo.ollama().chat(model="mistral", messages=[{"role": "user", "content": "Hi"}])
        await tab.see(card("gpu-3", "ready"))
        await tab.see(card("gpu-2", "ready"))
        await demo.fleet.engine.pause("gpu-2")
        await tab.see(card("gpu-2", "pausing"))
        worst = await tab.page.evaluate(CONTRAST)
        assert worst[0][0] >= 4.5, worst  # WCAG AA for normal text
