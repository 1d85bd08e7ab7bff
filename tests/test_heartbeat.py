"""The heartbeat: an idle peer is pinged, a silent one is closed and cleaned up, 0 turns it off."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import picows
import pytest

from fastws.server import Node

from .utils import TIMEOUT, Collector, close_picows, picows_client, running_node, ws_url

FAST = {"ping_interval": 0.3, "ping_timeout": 0.2}


class PingRecorder(Collector):
    """A Collector that also counts protocol PING frames (seen only with auto-pong off)."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.PING:
            self.pings += 1
        super().on_ws_frame(transport, frame)


class ManualPonger(PingRecorder):
    """Auto-pong off, but answers each PING itself, so the pings it survives can be counted."""

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        super().on_ws_frame(transport, frame)
        if frame.msg_type == picows.WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())


class JsonPonger(Collector):
    """A Collector that answers every JSON ping with {"type":"pong"} at once."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        super().on_ws_frame(transport, frame)
        if (
            frame.msg_type == picows.WSMsgType.TEXT
            and json.loads(frame.get_payload_as_bytes())["type"] == "ping"
        ):
            self.pings += 1
            self.send_json({"type": "pong"})


async def connect(node: Node, user: str, factory: type[Collector] = Collector, **kw: Any) -> Any:
    """A picows client of class ``factory`` past its `connected` message."""
    _, listener = await asyncio.wait_for(
        picows.ws_connect(factory, ws_url(node, user), **kw), TIMEOUT
    )
    assert (await listener.next())["type"] == "connected"
    return listener


async def join(c: Collector, room: str) -> None:
    c.send_json({"type": "join_room", "payload": {"room": room}})
    while (await c.next())["type"] != "room_joined":
        pass


async def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def next_of_type(c: Collector, type_: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (msg := await c.next(max(0.0, deadline - loop.time())))["type"] != type_:
        pass
    return msg


close = close_picows


async def test_peer_that_never_pongs_is_closed_1001_and_cleaned_up() -> None:
    """No pong within ping_timeout of an idle ping: closed with 1001, its rooms left."""
    async with running_node(**FAST) as node:
        mute = await connect(node, "mute", PingRecorder, enable_auto_pong=False)
        watcher = await picows_client(node, "watcher")
        try:
            await join(mute, "r")
            await join(watcher, "r")
            await join(mute, "solo")
            assert node.stats()["sessions"] == 2 and node.stats()["rooms"] == 2
            assert mute.transport is not None
            await asyncio.wait_for(mute.transport.wait_disconnected(), 2.0)
            assert mute.pings >= 1
            assert mute.close_code == 1001
            left = await next_of_type(watcher, "user_left")
            assert left["username"] == "mute" and left["room"] == "r" and left["members"] == 1
            await wait_until(lambda: node.stats()["sessions"] == 1)
            assert node.stats()["rooms"] == 1 and node.stats()["memberships"] == 1
        finally:
            await close(mute, watcher)
        await wait_until(lambda: node.stats()["sessions"] == 0 and node.stats()["transports"] == 0)


async def test_idle_peer_that_answers_pings_stays_connected() -> None:
    """Peers that answer pings (auto-pong, or by hand) survive several idle intervals."""
    async with running_node(**FAST) as node:
        auto = await picows_client(node, "auto")
        manual = await connect(node, "manual", ManualPonger, enable_auto_pong=False)
        try:
            await asyncio.sleep(1.2)  # four idle intervals: the behaviour under test is time
            assert manual.pings >= 3  # the server did ping during the wait
            for c in (auto, manual):
                assert c.transport is not None and not c.transport.is_disconnected
                assert c.close_code is None
                c.send_json({"type": "ping", "id": 1})
                pong = await c.next()
                assert pong["type"] == "pong" and pong["id"] == 1
            assert node.stats()["sessions"] == 2
        finally:
            await close(auto, manual)


async def test_json_ping_answered_keeps_the_peer_unanswered_closes_it() -> None:
    """json_ping: {"type":"ping","timestamp"} is sent; {"type":"pong"} keeps a peer, silence not."""
    async with running_node(json_ping=True, **FAST) as node:
        ponger = await connect(node, "ponger", JsonPonger)
        mute = await connect(node, "mute", PingRecorder, enable_auto_pong=False)
        try:
            ping = await next_of_type(mute, "ping", 1.0)
            assert set(ping) == {"type", "timestamp"} and isinstance(ping["timestamp"], int)
            assert mute.pings == 0  # JSON pings replace protocol pings
            assert mute.transport is not None
            await asyncio.wait_for(mute.transport.wait_disconnected(), 2.0)
            assert mute.close_code == 1001
            await wait_until(lambda: ponger.pings >= 4, 2.0)  # several intervals answered
            assert ponger.transport is not None and not ponger.transport.is_disconnected
            assert ponger.close_code is None
            assert [s.principal.username for s in node.sessions.values()] == ["ponger"]
        finally:
            await close(ponger, mute)


@pytest.mark.parametrize("json_ping", [False, True])
async def test_ping_interval_zero_disables_the_heartbeat(json_ping: bool) -> None:
    """ping_interval=0: no protocol or JSON ping arrives, and a mute idle peer is kept."""
    async with running_node(ping_interval=0, ping_timeout=0.2, json_ping=json_ping) as node:
        c = await connect(node, "idle", PingRecorder, enable_auto_pong=False)
        try:
            with pytest.raises(asyncio.TimeoutError):
                msg = await c.next(0.5)
                raise AssertionError(f"unexpected message {msg!r}")
            assert c.pings == 0
            assert c.transport is not None and not c.transport.is_disconnected
            assert node.stats()["sessions"] == 1
        finally:
            await close(c)
