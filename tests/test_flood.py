"""One client floods a room as fast as it can while 100 others keep receiving.

The flooder runs on its own thread and event loop and writes 20,000 chat_messages in one
go, without waiting for anything. The rate limit
(100/s, burst 200 by default) answers the excess with `rate_limited` errors and, once
rate_burst of them came in a row, closes the flooder with 1008. Meanwhile a well-behaved
publisher posts 50 messages, each after the previous one's ack, and every one of them must
reach all 100 receivers exactly once, in order, inside one gap-free seq sequence. The test
ends on sizes (the last ack's seq, the session count), never on sleeps.

A second test proves that once closed with 1008 the flooder posts nothing more.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import picows

from fastws.server import Node

from .rawws import OP_TEXT, build_frame, raw_connect
from .utils import TIMEOUT, Collector, picows_client, running_node, token, ws_url

ROOM = "flood"
RECEIVERS = 100
FLOOD = 20_000
POSTS = 50


def chat(text: str, msg_id: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "chat_message", "payload": {"room": ROOM, "message": text}}
    if msg_id is not None:
        msg["id"] = msg_id
    return msg


async def join_room(c: Collector) -> None:
    c.send_json({"type": "join_room", "payload": {"room": ROOM}})
    while (await c.next())["type"] != "room_joined":
        pass


async def until_ack(c: Collector, msg_id: str) -> int:
    """The seq of the ack for ``msg_id``; everything else on the queue is kept aside."""
    while True:
        msg = await c.next()
        if msg["type"] == "ack" and msg["id"] == msg_id:
            return int(msg["seq"])
        if msg["type"] == "error":
            raise AssertionError(f"the publisher was refused: {msg}")


async def chats_until(c: Collector, last_seq: int) -> list[dict[str, Any]]:
    """Every chat_message ``c`` receives up to and including seq ``last_seq``."""
    got: list[dict[str, Any]] = []
    while not got or got[-1]["seq"] < last_seq:
        msg = await c.next()
        if msg["type"] == "chat_message":
            got.append(msg)
    return got


async def wait_sessions(node: Node, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while len(node.sessions) != count:
        assert time.monotonic() < deadline, f"sessions stuck at {node.stats()}, want {count}"
        await asyncio.sleep(0.01)


def flood_in_a_thread(port: int, count: int) -> tuple[int | None, list[dict[str, Any]]]:
    """The flooder, on its own thread and event loop so it writes while the node works: join,
    write ``count`` chat frames in one go, read until the server's close, answer it. Returns
    the close code and every JSON message the flooder was sent."""

    async def run() -> tuple[int | None, list[dict[str, Any]]]:
        payload = json.dumps(chat("spam")).encode()
        data = b"".join(build_frame(OP_TEXT, payload) for _ in range(count))
        async with await raw_connect(port, token("flooder")) as ws:
            await ws.send_text(json.dumps({"type": "join_room", "payload": {"room": ROOM}}))
            assert json.loads(await ws.read_text())["type"] == "room_joined"
            await ws.send_raw(data)
            code = await ws.expect_close(timeout=2 * TIMEOUT)
            await ws.send_close(code or 1000)
            return code, [json.loads(p) for op, p in ws.received if op == OP_TEXT]

    return asyncio.run(run())


async def test_flooder_is_limited_and_closed_while_the_room_gets_every_message() -> None:
    """The flooder gets rate_limited errors then 1008; every one of the publisher's 50 messages
    reaches all 100 receivers exactly once, in order, in a gap-free seq stream."""
    async with running_node() as node:
        burst = node.settings.rate_burst
        receivers = [await picows_client(node, f"r{i}") for i in range(RECEIVERS)]
        publisher = await picows_client(node, "publisher")
        try:
            for c in [*receivers, publisher]:
                await join_room(c)
            loop = asyncio.get_running_loop()
            flooding = loop.run_in_executor(None, flood_in_a_thread, node.port, FLOOD)
            # The flooder's join reaches the publisher just before its flood reaches the node.
            while (await publisher.next()).get("username") != "flooder":
                pass

            # The publisher posts at its own pace (each after the previous ack) meanwhile.
            seqs: list[int] = []
            for i in range(POSTS):
                publisher.send_json(chat(f"pub-{i}", f"p{i}"))
                seqs.append(await until_ack(publisher, f"p{i}"))
            assert seqs == sorted(seqs) and len(set(seqs)) == POSTS

            # The flooder: refused with rate_limited, then closed with 1008, then gone.
            code, flooder_got = await asyncio.wait_for(flooding, 4 * TIMEOUT)
            assert code == 1008
            limited = [m for m in flooder_got if m.get("code") == "rate_limited"]
            assert len(limited) >= burst, len(limited)
            assert {m["type"] for m in flooder_got} <= {"chat_message", "error", "user_joined"}
            await wait_sessions(node, RECEIVERS + 1)
            assert node.stats()["memberships"] == RECEIVERS + 1

            # A last post after the flooder is gone: its seq is where every stream ends.
            publisher.send_json(chat("last", "last"))
            last = await until_ack(publisher, "last")
            expected = [f"pub-{i}" for i in range(POSTS)] + ["last"]
            spam_counts = set()
            for c in receivers:
                got = await chats_until(c, last)
                assert [m["seq"] for m in got] == list(range(1, last + 1))
                mine = [m["message"] for m in got if m["userId"] == "publisher"]
                assert mine == expected
                assert [m["seq"] for m in got if m["userId"] == "publisher"] == [*seqs, last]
                spam_counts.add(sum(m["userId"] == "flooder" for m in got))
            # Everyone saw the same number of accepted spam messages: at least the burst, less
            # the token the flooder's join_room took.
            (spam,) = spam_counts
            assert spam >= burst - 1, spam
            assert node.stats().get("slow_consumers", 0) == 0
        finally:
            for c in [*receivers, publisher]:
                if c.transport is not None:
                    c.transport.disconnect()
            await wait_sessions(node, 0)


class Lingerer(Collector):
    """A client that, when the server closes, neither answers nor hangs up (yet): RFC 6455
    lets it keep sending until it sends its own close."""

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
        else:
            super().on_ws_frame(transport, frame)


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_flooder_closed_with_1008_posts_nothing_more() -> None:
    """Once closed with 1008, nothing the flooder sends is broadcast, even after its token
    bucket has refilled (time is injected: the bucket's clock is frozen, then moved 10 s)."""
    async with running_node() as node:
        burst = node.settings.rate_burst
        receiver = await picows_client(node, "receiver")
        poster = await picows_client(node, "poster")
        _, flooder = await picows.ws_connect(Lingerer, ws_url(node, "flooder"))
        try:
            assert (await flooder.next())["type"] == "connected"
            for c in (receiver, poster, flooder):
                await join_room(c)
            (session,) = [s for s in node.sessions.values() if s.principal.user_id == "flooder"]
            clock = FrozenClock()
            session.bucket.clock = clock
            session.bucket.stamp = clock.now
            # join_room took a token: burst - 1 accepted, burst refused, the next one 1008.
            for i in range(2 * burst):
                flooder.send_json(chat(f"spam-{i}"))
            deadline = time.monotonic() + TIMEOUT
            while flooder.close_code is None:
                assert time.monotonic() < deadline, "no close for the flooder"
                await asyncio.sleep(0.01)
            assert flooder.close_code == 1008
            clock.now += 10.0  # the bucket is full again
            for i in range(5):
                flooder.send_json(chat(f"after-close-{i}"))
            flooder.transport.send_close(picows.WSCloseCode.OK)
            await asyncio.wait_for(flooder.transport.wait_disconnected(), TIMEOUT)
            poster.send_json(chat("last", "last"))
            last = await until_ack(poster, "last")
            got = await chats_until(receiver, last)
            late = [m["message"] for m in got if m["message"].startswith("after-close")]
            assert late == [], f"broadcast after the 1008 close: {late}"
            assert sum(m["userId"] == "flooder" for m in got) == burst - 1
        finally:
            for c in (receiver, poster, flooder):
                if c.transport is not None:
                    c.transport.disconnect()
            await wait_sessions(node, 0)
