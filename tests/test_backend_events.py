"""Backend events against a real HTTP receiver: connect, disconnect, join and leave, each once
per deployment (every broker, two nodes), signed, batched; retried through a receiver that is
down, slow or failing with 500; dropped and counted past the queue's bound or when refused."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from fastws.events import signature

from .nodes import Backend, enter, room_name
from .utils import TIMEOUT, client, running_node, send_json

SECRET = "events-secret"


class Receiver:
    """An aiohttp app that checks each POST's signature and keeps the events by id.
    ``script`` is a list of what the next posts get: a status, or "slow" (no answer in time)."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.posts = 0
        self.bad_signatures = 0
        self.script: list[Any] = []
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts += 1
        stamp = request.headers.get("X-Fastws-Timestamp", "")
        if request.headers.get("X-Fastws-Signature") != signature(SECRET, stamp, body):
            self.bad_signatures += 1
            return web.Response(status=401)
        step = self.script.pop(0) if self.script else 200
        if step == "slow":
            await asyncio.sleep(2.0)
            return web.Response(status=200)
        if step == 200:
            for event in json.loads(body)["events"]:
                self.events[event["id"]] = event
        return web.Response(status=step)

    async def start(self, port: int = 0) -> int:
        app = web.Application()
        app.router.add_post("/events", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def kinds(self) -> collections.Counter[tuple[str, str]]:
        return collections.Counter((e["type"], e["username"]) for e in self.events.values())


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    port = await r.start()
    try:
        yield r, f"http://127.0.0.1:{port}/events"
    finally:
        await r.stop()


async def until(check: Any, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def events_settings(url: str, **more: Any) -> dict[str, Any]:
    return {"events_url": url, "events_secret": SECRET, "events_interval": 0.05, **more}


async def test_each_event_is_posted_once_per_deployment(backend: Backend) -> None:
    room = room_name("events")
    async with receiver() as (rec, url), backend.nodes(2, **events_settings(url)) as nodes:
        async with client(nodes[0], "alice") as alice, client(nodes[1], "bob") as bob:
            await enter(alice, room, nodes)
            await enter(bob, room, nodes)
            await send_json(alice, "leave_room", {"room": room}, id="l")
            await until(lambda: rec.kinds()[("leave", "alice")] == 1)
        want = {
            ("connect", "alice"): 1,
            ("connect", "bob"): 1,
            ("join", "alice"): 1,
            ("join", "bob"): 1,
            ("leave", "alice"): 1,
            ("leave", "bob"): 1,
            ("disconnect", "alice"): 1,
            ("disconnect", "bob"): 1,
        }
        await until(lambda: rec.kinds() == want)
        await asyncio.sleep(0.3)
        assert rec.kinds() == want  # nothing twice: not once per node
        assert rec.bad_signatures == 0
        rooms = {e["room"] for e in rec.events.values() if e["type"] in ("join", "leave")}
        assert rooms == {room}


async def test_a_user_back_within_the_grace_posts_no_leave_and_no_second_join(
    backend: Backend,
) -> None:
    room = room_name("events-grace")
    async with (
        receiver() as (rec, url),
        backend.nodes(2, presence_grace=1.0, **events_settings(url)) as nodes,
    ):
        async with client(nodes[0], "alice") as alice:
            await enter(alice, room, nodes)
        async with client(nodes[1], "alice") as again:
            await enter(again, room, nodes)
            await asyncio.sleep(1.5)  # past the first connection's grace
            kinds = rec.kinds()
            assert kinds[("join", "alice")] == 1 and kinds[("leave", "alice")] == 0
            assert kinds[("connect", "alice")] == 2
            assert kinds[("disconnect", "alice")] == 1


async def test_a_failing_or_slow_receiver_gets_everything_once_it_answers() -> None:
    async with receiver() as (rec, url):
        rec.script = [500, "slow", 503, 500]
        async with running_node(**events_settings(url)) as node:
            node.events.timeout = 0.5
            for i in range(5):
                async with client(node, f"u{i}"):
                    pass
            await until(lambda: len(rec.events) == 10, TIMEOUT * 3)
            assert node.events.failures >= 4 and node.events.dropped == 0
            assert rec.kinds() == {
                **{("connect", f"u{i}"): 1 for i in range(5)},
                **{("disconnect", f"u{i}"): 1 for i in range(5)},
            }


async def test_a_receiver_down_gets_the_queue_once_up_bounded_and_counted() -> None:
    with socket.socket() as s:  # a free port nothing listens on, yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/events"
    async with running_node(**events_settings(url, events_queue=6)) as node:
        for i in range(5):  # 10 events into a queue of 6: the 4 oldest go
            async with client(node, f"u{i}"):
                pass
        await until(lambda: node.events.failures >= 1)
        assert node.events.dropped == 4
        rec = Receiver()
        await rec.start(port)
        try:
            await until(lambda: len(rec.events) == 6, TIMEOUT * 3)
            assert node.events.delivered == 6
            kinds = rec.kinds()
            assert kinds[("connect", "u0")] == 0 and kinds[("disconnect", "u4")] == 1
        finally:
            await rec.stop()


async def test_a_refused_batch_is_dropped_and_counted() -> None:
    async with receiver() as (rec, url):
        rec.script = [400]
        async with running_node(**events_settings(url)) as node:
            async with client(node, "alice"):
                await until(lambda: rec.posts >= 1)
            await until(lambda: len(rec.events) == 1)  # the disconnect, in the next batch
            assert node.events.dropped == 1 and rec.kinds() == {("disconnect", "alice"): 1}
