"""Presence diffs, on every broker and across nodes: a member that joins with
``"presence": "diff"`` gets the room's presence changes as a few presence_diff messages (each
user once, net of the interval; counts only in big rooms), while seed clients keep their
user_joined/user_left."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from websockets.asyncio.client import ClientConnection

from .nodes import Backend, enter, next_of, room_name, settle
from .utils import client, expect_silence, recv_json, send_json

USERS = 20


async def diffs_until(ws: ClientConnection, done: Any) -> list[dict[str, Any]]:
    """presence_diff messages until ``done(diffs)``; a user_joined/user_left fails the test."""
    got: list[dict[str, Any]] = []
    while not done(got):
        msg = await recv_json(ws)
        assert msg["type"] == "presence_diff", msg
        got.append(msg)
    return got


def joined(diffs: list[dict[str, Any]]) -> set[str]:
    return {m["userId"] for d in diffs for m in d.get("joins", [])}


def left(diffs: list[dict[str, Any]]) -> set[str]:
    return {m["userId"] for d in diffs for m in d.get("leaves", [])}


async def test_a_join_storm_reaches_a_diff_member_as_a_few_diffs(backend: Backend) -> None:
    room = room_name("diff")
    async with (
        backend.nodes(2) as nodes,
        client(nodes[0], "alice") as alice,
        client(nodes[0], "bob") as bob,
        contextlib.AsyncExitStack() as stack,
    ):
        assert (await enter(alice, room, nodes, presence="diff"))["members"] == 1
        await enter(bob, room, nodes)  # a seed client: one user_joined per join
        others = [await stack.enter_async_context(client(nodes[1], f"u{i}")) for i in range(USERS)]
        await asyncio.gather(*(enter(ws, room, nodes) for ws in others))
        # Her own join is in the first diff too (the room's changes are the same for all).
        users = {f"u{i}" for i in range(USERS)} | {"bob", "alice"}
        diffs = await diffs_until(alice, lambda d: joined(d) >= users)
        assert len(diffs) < USERS // 2
        assert joined(diffs) == users and not left(diffs)
        assert diffs[-1]["members"] == USERS + 2
        assert sum(d["joined"] for d in diffs) == USERS + 2
        seen = {(await next_of(bob, "user_joined"))["userId"] for _ in range(USERS)}
        assert seen == {f"u{i}" for i in range(USERS)}
        # They leave: the same, the other way.
        for ws in others:  # dropped (their unread notices would hold up a close handshake)
            ws.transport.abort()
        gone = users - {"bob", "alice"}
        diffs = await diffs_until(alice, lambda d: left(d) >= gone)
        assert left(diffs) == gone and diffs[-1]["members"] == 2


async def test_a_big_room_gets_counts_not_names(backend: Backend) -> None:
    room = room_name("diff-count")
    async with (
        backend.nodes(2, presence_diff_names=3) as nodes,
        client(nodes[0], "alice") as alice,
        contextlib.AsyncExitStack() as stack,
    ):
        await enter(alice, room, nodes, presence="diff")
        others = [await stack.enter_async_context(client(nodes[1], f"c{i}")) for i in range(6)]
        await asyncio.gather(*(enter(ws, room, nodes) for ws in others))
        diffs = await diffs_until(alice, lambda d: sum(x["joined"] for x in d) >= 7)
        assert sum(d["joined"] for d in diffs) == 7  # hers and theirs
        assert diffs[-1]["members"] == 7
        assert "joins" not in diffs[-1]  # 7 members > 3: counts only


async def test_a_join_and_leave_within_one_interval_cancel(backend: Backend) -> None:
    room = room_name("diff-cancel")
    async with (
        backend.nodes(2, presence_diff_interval=1.0) as nodes,
        client(nodes[0], "alice") as alice,
    ):
        await enter(alice, room, nodes, presence="diff")
        own = await recv_json(alice)  # her own join, the interval's only change
        assert (own["type"], own["joined"]) == ("presence_diff", 1)
        async with client(nodes[1], "carol") as carol:
            await enter(carol, room, nodes)
        await settle(nodes)
        await expect_silence(alice, 1.5)


async def test_an_unknown_presence_mode_is_refused(backend: Backend) -> None:
    room = room_name("diff-bad")
    async with backend.nodes(1) as nodes, client(nodes[0], "alice") as alice:
        await send_json(alice, "join_room", {"room": room, "presence": "sometimes"}, id="j")
        reply = await recv_json(alice)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "invalid_payload", "j")
