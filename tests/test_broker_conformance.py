"""The broker contract (broker/types.py), proved the same way on every broker: the in-process
one, the local bus of ``--workers``, Redis and a 3-shard Redis Cluster.

Each test runs real nodes from ``tests/nodes.py`` and real WebSocket clients; clients are
spread over the nodes (``nodes[i % 2]``), so on every broker but the in-process one a room
spans two nodes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.client import ClientConnection

from fastws.broker.types import MemberInfo, chat_payload
from fastws.server import Node

from .nodes import Backend, alice_and_bob, chats, enter, next_of, room_name, settle
from .utils import TIMEOUT, client, expect_silence, recv_json, send_json


async def test_seq_is_one_order_for_every_member_on_every_node(backend: Backend) -> None:
    """Messages posted on two nodes reach every member once, with seq 1..N in one order and
    one epoch, the sender included."""
    room = room_name("order")
    async with alice_and_bob(backend, room) as (_, a, b):
        for i in range(10):
            await send_json(a, "chat_message", {"room": room, "message": f"a{i}"})
            await send_json(b, "chat_message", {"room": room, "message": f"b{i}"})
        got_a, got_b = await chats(a, 20), await chats(b, 20)
        assert [m["seq"] for m in got_a] == list(range(1, 21))
        assert [(m["seq"], m["message"], m["epoch"]) for m in got_a] == [
            (m["seq"], m["message"], m["epoch"]) for m in got_b
        ]
        assert len({m["epoch"] for m in got_a}) == 1
        for sender in ("a", "b"):  # each sender's own messages in the order it sent them
            assert [m["message"] for m in got_a if m["message"][0] == sender] == [
                f"{sender}{i}" for i in range(10)
            ]
        await expect_silence(a, 0.1)


async def test_acks_carry_the_seq_in_the_order_sent(backend: Backend) -> None:
    """A connection's chats with ids are acked in the order sent, each with its seq."""
    room = room_name("acks")
    async with backend.nodes(1) as nodes, client(nodes[0]) as ws:
        await enter(ws, room, nodes)
        for i in range(30):
            await send_json(ws, "chat_message", {"room": room, "message": f"m{i}"}, id=f"c{i}")
        acks = [await next_of(ws, "ack", ("chat_message",)) for _ in range(30)]
        assert [(a["id"], a["seq"]) for a in acks] == [(f"c{i}", i + 1) for i in range(30)]


async def test_join_since_replays_exactly_what_was_missed(backend: Backend) -> None:
    """A member that left comes back with since: room_joined recovered, then the messages it
    missed, then live traffic, each once."""
    room = room_name("since")
    async with backend.nodes(2) as nodes, client(nodes[1], "bob") as bob:
        await enter(bob, room, nodes)
        async with client(nodes[0], "alice") as alice:
            await enter(alice, room, nodes)
            await send_json(bob, "chat_message", {"room": room, "message": "seen"})
            seen = (await chats(alice, 1))[0]
        for i in range(5):
            await send_json(bob, "chat_message", {"room": room, "message": f"missed{i}"})
        await chats(bob, 6)
        async with client(nodes[0], "alice") as alice:
            since = {"seq": seen["seq"], "epoch": seen["epoch"]}
            joined = await enter(alice, room, nodes, since=since)
            assert joined["recovered"] is True and joined["seq"] == 6, joined
            replay = await chats(alice, 5)
            assert [m["message"] for m in replay] == [f"missed{i}" for i in range(5)]
            await send_json(bob, "chat_message", {"room": room, "message": "live"})
            assert [m["message"] for m in await chats(alice, 1)] == ["live"]
            await expect_silence(alice, 0.1)


async def test_since_from_another_epoch_or_the_future_is_not_recovered(backend: Backend) -> None:
    """A since the room cannot vouch for is answered recovered false, with no replay."""
    room = room_name("epoch")
    async with backend.nodes(1) as nodes, client(nodes[0]) as ws:
        await enter(ws, room, nodes)
        await send_json(ws, "chat_message", {"room": room, "message": "one"})
        first = (await chats(ws, 1))[0]
        async with client(nodes[0], "bob") as bob:
            joined = await enter(bob, room, nodes, since={"seq": 0, "epoch": "other"})
            assert joined["recovered"] is False and joined["epoch"] == first["epoch"]
            joined = await enter(bob, room, nodes, since={"seq": 99, "epoch": first["epoch"]})
            assert joined["recovered"] is False
            await expect_silence(bob, 0.1)


async def test_history_is_the_newest_messages_oldest_first(backend: Backend) -> None:
    """history returns the last ``limit`` chat payloads as published, with seq and epoch."""
    room = room_name("history")
    async with backend.nodes(2) as nodes, client(nodes[0]) as a, client(nodes[1], "bob") as b:
        await enter(a, room, nodes)
        for i in range(8):
            await send_json(a, "chat_message", {"room": room, "message": f"h{i}"})
        published = await chats(a, 8)
        await enter(b, room, nodes)
        await send_json(b, "history", {"room": room, "limit": 3}, id="h")
        reply = await next_of(b, "history")
        assert reply["seq"] == 8 and reply["epoch"] == published[0]["epoch"]
        assert reply["messages"] == published[-3:]


async def test_presence_and_counts_span_the_nodes(backend: Backend) -> None:
    """room_joined counts every connection on every node; presence lists each user once;
    user_joined and user_left reach the others with the count after the change."""
    room = room_name("presence")
    async with (
        backend.nodes(2) as nodes,
        client(nodes[0], "alice") as a,
        client(nodes[1], "bob") as b,
    ):
        assert (await enter(a, room, nodes))["members"] == 1
        assert (await enter(b, room, nodes))["members"] == 2
        joined = await next_of(a, "user_joined")
        assert (joined["userId"], joined["members"]) == ("bob", 2)
        async with client(nodes[1], "alice") as a2:  # alice's second connection
            assert (await enter(a2, room, nodes))["members"] == 3
            await send_json(b, "presence", {"room": room}, id="p")
            users = sorted(m["userId"] for m in (await next_of(b, "presence"))["members"])
            assert users == ["alice", "bob"]
        left = await next_of(b, "user_left")
        assert (left["userId"], left["members"]) == ("alice", 2)


async def test_a_disconnect_leaves_every_room(backend: Backend) -> None:
    """A client that disconnects leaves each of its rooms: the others get user_left and
    presence no longer lists it, wherever they are connected."""
    rooms = [room_name("gone"), room_name("gone")]
    async with backend.nodes(2) as nodes, client(nodes[1], "bob") as bob:
        for room in rooms:
            await enter(bob, room, nodes)
        async with client(nodes[0], "carol") as carol:
            for room in rooms:
                await enter(carol, room, nodes)
        gone = [await next_of(bob, "user_left") for _ in rooms]
        assert sorted((m["room"], m["userId"]) for m in gone) == [
            (r, "carol") for r in sorted(rooms)
        ]
        for room in rooms:
            await send_json(bob, "presence", {"room": room}, id="p")
            reply = await next_of(bob, "presence")
            assert [m["userId"] for m in reply["members"]] == ["bob"]


async def test_typing_reaches_the_others_not_the_sender(backend: Backend) -> None:
    """typing is published to every member but the one typing."""
    room = room_name("typing")
    async with alice_and_bob(backend, room) as (_, a, b):
        await next_of(a, "user_joined")
        await send_json(a, "typing", {"room": room, "isTyping": True})
        msg = await recv_json(b)
        assert (msg["type"], msg["userId"], msg["isTyping"]) == ("typing", "alice", True)
        await expect_silence(a, 0.2)


async def test_a_room_whose_name_prefixes_another_gets_only_its_own(backend: Backend) -> None:
    """Publications to "r1" never reach members of "r10" (topics and channels are exact)."""
    base = room_name("prefix")
    async with (
        backend.nodes(2) as nodes,
        client(nodes[0], "alice") as a,
        client(nodes[1], "bob") as b,
    ):
        await enter(a, base + "1", nodes)
        await enter(b, base + "10", nodes)
        await send_json(a, "chat_message", {"room": base + "1", "message": "x"})
        assert (await chats(a, 1))[0]["room"] == base + "1"
        await settle(nodes)
        await expect_silence(b, 0.2)


async def test_leaving_the_last_member_stops_the_room_here(backend: Backend) -> None:
    """Once a node's last member of a room leaves, the node gets none of its traffic."""
    room = room_name("unsub")
    async with alice_and_bob(backend, room) as (nodes, a, b):
        await send_json(b, "leave_room", {"room": room}, id="l")
        await next_of(b, "room_left")
        await settle(nodes)
        before = nodes[1].messages_out
        await send_json(a, "chat_message", {"room": room, "message": "after"})
        await chats(a, 1)
        await settle(nodes)
        if backend.spans_nodes:
            assert nodes[1].messages_out == before
        await expect_silence(b, 0.1)


async def test_concurrent_joins_and_posts_have_no_errors_and_lose_nothing(backend: Backend) -> None:
    """200 clients over two nodes join 16 rooms and one common room at once, then all post at
    once: every join succeeds, every member gets every message of its rooms exactly once."""
    common = room_name("common")
    rooms = [room_name(f"r{i}") for i in range(16)]
    count = 200
    async with backend.nodes(2) as nodes:
        async with asyncio.timeout(TIMEOUT * 6):
            sockets = await asyncio.gather(*[_connect(nodes[i % 2], f"u{i}") for i in range(count)])
            try:
                for ws, i in zip(sockets, range(count), strict=True):
                    await send_json(ws, "join_room", {"room": rooms[i % 16]}, id="j1")
                    await send_json(ws, "join_room", {"room": common}, id="j2")
                for ws in sockets:
                    replies = [await next_of(ws, "room_joined") for _ in range(2)]
                    assert {r["id"] for r in replies} == {"j1", "j2"}
                await settle(nodes)
                for i, ws in enumerate(sockets):
                    await send_json(ws, "chat_message", {"room": rooms[i % 16], "message": f"{i}"})
                for i, ws in enumerate(sockets):
                    got = await chats(ws, count // 16 + (1 if i % 16 < count % 16 else 0))
                    senders = sorted(int(m["message"]) for m in got)
                    assert senders == [j for j in range(count) if j % 16 == i % 16]
                    assert len({m["seq"] for m in got}) == len(got)
            finally:
                await asyncio.gather(*[ws.close() for ws in sockets])


async def _connect(node: Node, user: str) -> ClientConnection:
    from websockets.asyncio.client import connect

    from .utils import ws_url

    ws = await connect(ws_url(node, user), open_timeout=TIMEOUT * 2, close_timeout=1)
    assert (await recv_json(ws))["type"] == "connected"
    return ws


async def test_publish_seq_nowait_allocates_in_the_order_called(backend: Backend) -> None:
    """Chats handed to the broker in one loop turn get consecutive seqs in that order, and
    the payload published is ``types.chat_payload`` byte for byte."""
    room = room_name("nowait")
    delivered: list[bytes] = []
    async with backend.nodes(1) as nodes:
        node = nodes[0]
        broker = node.broker
        original = node.hub.broadcast

        def spy(
            name: str, payload: bytes, exclude: Any = None, seq: int = 0, origin: str = ""
        ) -> int:
            if name == room:
                delivered.append(payload)
            return original(name, payload, exclude, seq, origin)

        node.hub.broadcast = spy  # type: ignore[method-assign]
        member = MemberInfo("c1", "u1", "user", node.node_id)
        await broker.subscribe(room)
        joined = await broker.join(room, member)
        seqs: list[int] = []
        for i in range(50):
            broker.publish_seq_nowait(room, b'{"n":%d,"seq":' % i, seqs.append)
        async with asyncio.timeout(TIMEOUT):
            while len(seqs) < 50:
                await asyncio.sleep(0.005)
        assert seqs == list(range(joined.seq + 1, joined.seq + 51))
        await broker.flush()
        _, epoch, _ = await broker.history(room, 1)
        assert delivered == [
            chat_payload(b'{"n":%d,"seq":' % i, joined.seq + 1 + i, epoch) for i in range(50)
        ]
        await broker.leave(room, "c1")
        await broker.unsubscribe(room)


async def test_every_member_counts_a_join_storm_exactly(backend: Backend) -> None:
    """120 clients over two nodes join one room at once: each one's room_joined count plus
    the user_joined it is sent after it adds up to 120, so no notice is stale (already in its
    count) or lost (about a later joiner)."""
    room = room_name("storm")
    count = 120
    async with backend.nodes(2) as nodes, asyncio.timeout(TIMEOUT * 6):
        sockets = await asyncio.gather(*[_connect(nodes[i % 2], f"u{i}") for i in range(count)])
        try:
            await asyncio.gather(*[send_json(ws, "join_room", {"room": room}) for ws in sockets])
            views = []
            for ws in sockets:
                joined = await next_of(ws, "room_joined", ("user_joined",))
                views.append([joined["members"]])
            await settle(nodes)
            await settle(nodes)  # notices published after the first barrier's joins
            for ws, view in zip(sockets, views, strict=True):
                while view[0] + len(view) - 1 < count:
                    msg = await next_of(ws, "user_joined", ())
                    view.append(msg["userId"])
                await expect_silence(ws, 0.05)
            assert all(view[0] + len(view) - 1 == count for view in views)
        finally:
            await asyncio.gather(*[ws.close() for ws in sockets])
