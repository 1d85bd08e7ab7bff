"""The demo page in a real headless Chromium (Debian's, driven by playwright): two users chat.

alice and bob open the page served by a `fastws serve` subprocess, join one room, chat both
ways, see each other typing and in the member list; the server is killed and restarted on the
same port, the reconnect banner comes and goes, and chat works again. A screenshot is saved to
test-artifacts/demo.png. Chromium and playwright are required: missing, the test fails.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from .utils import server_process, token

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT = 15_000  # ms, for anything the page must show
RECONNECT_WAIT = 30_000  # ms: backoff with jitter after a restart


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is required (apt-get install chromium)"
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_as(
    browser: Browser, port: int, user: str, errors: list[str], sockets: list[str]
) -> Page:
    page = await browser.new_page(viewport={"width": 1100, "height": 640})
    page.set_default_timeout(WAIT)
    page.on("pageerror", lambda exc: errors.append(f"{user}: {exc}"))
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(f"http://127.0.0.1:{port}/#token={token(user)}")
    await expect(page.get_by_test_id("status")).to_have_attribute("data-state", "open")
    return page


async def join(page: Page, room: str) -> None:
    await page.get_by_test_id("room-input").fill(room)
    await page.get_by_test_id("join").click()
    await expect(page.locator(f'[data-testid=rooms] li[data-room="{room}"]')).to_have_attribute(
        "data-joined", "true"
    )


async def say(page: Page, text: str) -> None:
    await page.get_by_test_id("message-input").press_sequentially(text)
    await page.get_by_test_id("message-input").press("Enter")


def message(page: Page, user: str, text: str) -> Locator:
    return page.locator(f'[data-testid=message][data-user="{user}"]').filter(has_text=text)


async def sees_member(page: Page, user: str) -> None:
    await expect(page.locator(f'[data-testid=members] li[data-user="{user}"]')).to_have_count(1)


@pytest.mark.timeout(120)
async def test_two_browsers_chat_and_survive_a_server_restart() -> None:
    """alice and bob chat both ways, see typing and presence, and recover from a restart."""
    errors: list[str] = []
    sockets: list[str] = []
    async with chromium() as browser:
        with server_process() as (_, port):
            alice = await open_as(browser, port, "alice", errors, sockets)
            bob = await open_as(browser, port, "bob", errors, sockets)
            # The page loaded the client from the server; the token went as a subprotocol (a
            # browser can send it nowhere else but the URL, and the URL has none).
            kind = "fetch('/fastws.js').then(r => r.headers.get('content-type'))"
            assert await alice.evaluate(kind) == "text/javascript; charset=utf-8"
            assert sockets and all(url.endswith("/ws") for url in sockets), sockets
            await join(alice, "general")
            await join(bob, "general")
            for page in (alice, bob):
                await sees_member(page, "alice")
                await sees_member(page, "bob")

            await alice.get_by_test_id("message-input").press_sequentially("hello b")
            await expect(bob.get_by_test_id("typing")).to_have_text("alice is typing…")
            await alice.get_by_test_id("message-input").press_sequentially("ob")
            await alice.get_by_test_id("message-input").press("Enter")
            await expect(message(bob, "alice", "hello bob")).to_have_count(1)
            await expect(message(alice, "alice", "hello bob")).to_have_count(1)
            await expect(bob.get_by_test_id("typing")).to_have_text("")

            await say(bob, "hi alice")
            await expect(alice.get_by_test_id("typing")).to_have_text("")
            await expect(message(alice, "bob", "hi alice")).to_have_count(1)

        # The server is gone (killed): both pages say they are reconnecting.
        for page in (alice, bob):
            await expect(page.get_by_test_id("reconnect-banner")).to_be_visible()
            status = page.get_by_test_id("status")
            await expect(status).to_have_attribute("data-state", "reconnecting")

        with server_process("--port", str(port)):
            for page in (alice, bob):
                await expect(page.get_by_test_id("reconnect-banner")).to_be_hidden(
                    timeout=RECONNECT_WAIT
                )
                await expect(page.get_by_test_id("status")).to_have_attribute("data-state", "open")
                await expect(
                    page.locator('[data-testid=rooms] li[data-room="general"]')
                ).to_have_attribute("data-joined", "true")
            for page in (alice, bob):
                await sees_member(page, "alice")
                await sees_member(page, "bob")
            await say(alice, "back again")
            await expect(message(bob, "alice", "back again")).to_have_count(1)
            await say(bob, "welcome back")
            await expect(message(alice, "bob", "welcome back")).to_have_count(1)
            # Nothing shown twice across the restart.
            await expect(alice.locator("[data-testid=message]")).to_have_count(4)
            await expect(bob.locator("[data-testid=message]")).to_have_count(4)

            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "demo.png"
            shot.unlink(missing_ok=True)
            await alice.screenshot(path=str(shot), full_page=True)
            await bob.screenshot(path=str(ARTIFACTS / "demo-bob.png"), full_page=True)
    assert shot.is_file() and shot.stat().st_size > 1000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errors == []


@pytest.mark.timeout(60)
async def test_refused_token_asks_for_another_and_a_pasted_one_connects() -> None:
    """A bad token opens the token panel saying so; pasting a good one connects."""
    errors: list[str] = []
    async with chromium() as browser:
        with server_process() as (_, port):
            page = await browser.new_page()
            page.set_default_timeout(WAIT)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"http://127.0.0.1:{port}/?token={token('alice', ttl=-3600)}")
            await expect(page.get_by_test_id("token-panel")).to_be_visible()
            await expect(page.locator("#token-note")).to_contain_text("invalid or expired")
            await expect(page.get_by_test_id("status")).to_have_attribute("data-state", "closed")
            await page.locator("#token-input").fill(token("carol"))
            await page.locator("#connect-btn").click()
            await expect(page.get_by_test_id("status")).to_have_attribute("data-state", "open")
            await expect(page.get_by_test_id("status")).to_have_text("connected as carol")
            await expect(page.get_by_test_id("token-panel")).to_be_hidden()
    assert errors == []
