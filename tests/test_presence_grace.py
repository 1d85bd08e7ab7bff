"""The presence grace, on every broker and across nodes: a user whose connection drops and who
joins again within ``presence_grace`` seconds makes the room hear nothing; past it, the room
hears ``user_left`` once; an explicit ``leave_room`` is heard at once."""

from __future__ import annotations

import asyncio
import time

from .nodes import Backend, enter, next_of, presence_seen, room_name, settle
from .utils import client, expect_silence, recv_json, send_json

GRACE = 1.0


async def test_a_user_back_within_the_grace_is_neither_left_nor_joined(backend: Backend) -> None:
    room = room_name("grace")
    async with backend.nodes(2, presence_grace=GRACE) as nodes, client(nodes[1], "bob") as bob:
        async with client(nodes[0], "alice") as alice:
            await enter(alice, room, nodes)
            await enter(bob, room, nodes)
            assert (await next_of(alice, "user_joined"))["username"] == "bob"
        # alice's connection dropped; she comes back through the other node.
        async with client(nodes[1], "alice") as again:
            joined = await enter(again, room, nodes)
            assert joined["members"] == 2  # her new connection took the old one's place
            await expect_silence(bob, GRACE * 1.5)  # no user_left, no user_joined
            assert await presence_seen(bob, room) == ["alice", "bob"]
            await send_json(again, "chat_message", {"room": room, "message": "back"})
            assert (await next_of(bob, "chat_message"))["message"] == "back"


async def test_past_the_grace_the_room_hears_user_left_once(backend: Backend) -> None:
    room = room_name("grace-over")
    async with backend.nodes(2, presence_grace=GRACE) as nodes, client(nodes[1], "bob") as bob:
        async with client(nodes[0], "alice") as alice:
            await enter(alice, room, nodes)
            await enter(bob, room, nodes)
        dropped = time.monotonic()
        assert await presence_seen(bob, room) == ["alice", "bob"]  # still there, in grace
        left = await next_of(bob, "user_left")
        assert time.monotonic() - dropped >= GRACE * 0.9
        assert (left["username"], left["members"]) == ("alice", 1)
        await settle(nodes)
        await expect_silence(bob, 0.3)
        assert await presence_seen(bob, room) == ["bob"]
        # She comes back after it: a plain join, heard as one.
        async with client(nodes[0], "alice") as again:
            await enter(again, room, nodes)
            assert (await next_of(bob, "user_joined"))["username"] == "alice"


async def test_leave_room_is_heard_at_once(backend: Backend) -> None:
    room = room_name("grace-leave")
    async with (
        backend.nodes(2, presence_grace=30) as nodes,
        client(nodes[0], "alice") as alice,
        client(nodes[1], "bob") as bob,
    ):
        await enter(alice, room, nodes)
        await enter(bob, room, nodes)
        await send_json(alice, "leave_room", {"room": room}, id="bye")
        while (await recv_json(alice)).get("id") != "bye":
            pass
        left = await asyncio.wait_for(next_of(bob, "user_left"), 2.0)
        assert left["username"] == "alice"
