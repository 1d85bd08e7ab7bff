"""Clients written for the seed work unchanged: they connect to ``ws://host:port/?token=...``
(any path upgrades by default), with HS512 tokens (tests/test_auth.py), and chat."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .nodes import Backend
from .utils import TIMEOUT, client, recv_json, running_node, send_json, token


@pytest.mark.parametrize("path", ["/", "/chat", "/ws", "/any/deeper/path"])
async def test_a_seed_client_connects_on_any_path_and_chats(path: str) -> None:
    async with (
        running_node() as node,
        connect(
            f"ws://127.0.0.1:{node.port}{path}?token={token('alice')}", open_timeout=TIMEOUT
        ) as ws,
    ):
        assert (await recv_json(ws))["type"] == "connected"
        await send_json(ws, "join_room", {"room": "general"})
        assert (await recv_json(ws))["type"] == "room_joined"
        await send_json(ws, "chat_message", {"room": "general", "message": "hello"})
        assert (await recv_json(ws))["message"] == "hello"


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        return r.status, r.read()


async def test_plain_gets_still_serve_the_page_and_health() -> None:
    async with running_node() as node:
        base = f"http://127.0.0.1:{node.port}"
        status, body = await asyncio.to_thread(_get, base + "/")  # the node runs in this loop
        assert status == 200 and b"<html" in body.lower()
        assert (await asyncio.to_thread(_get, base + "/healthz"))[0] == 200


async def test_ws_paths_restricts_the_upgrade_to_the_listed_paths() -> None:
    async with running_node(ws_paths="/ws,/chat") as node:
        for path in ("/ws", "/chat"):
            async with connect(
                f"ws://127.0.0.1:{node.port}{path}?token={token('a')}", open_timeout=TIMEOUT
            ) as ws:
                assert (await recv_json(ws))["type"] == "connected"
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{node.port}/?token={token('a')}", open_timeout=TIMEOUT)
        assert refused.value.response.status_code == 404


HOSTILE = [
    "Room 1",
    "général",
    "support/team",
    "日本語",
    "a{b}c",
    "}x",
    "{",
    "~7e",
    "~",
    "x:y:z",
    "fastws:{r}:seq",
    "emoji 🎉",
    "a" * 128,
]


async def test_any_room_name_works_on_every_broker(backend: Backend) -> None:
    """Names with spaces, accents, slashes, CJK, braces, colons, the tag escape's own ``~``,
    a key of ours: each is its own room on every broker (Redis Cluster included: a name with
    braces still maps its keys and channel to one slot), with seq, since and history."""
    from .nodes import enter, next_of

    async with (
        backend.nodes(2) as nodes,
        client(nodes[0], "alice") as a,
        client(nodes[1], "bob") as b,
    ):
        for room in HOSTILE:
            await enter(a, room, nodes)
            await enter(b, room, nodes)
            await next_of(a, "user_joined")
            await send_json(a, "chat_message", {"room": room, "message": f"in {room}"})
            for ws in (a, b):
                msg = await next_of(ws, "chat_message")
                assert (msg["room"], msg["message"], msg["seq"]) == (room, f"in {room}", 1)
            await send_json(b, "history", {"room": room, "limit": 10}, id="h")
            history = await next_of(b, "history")
            assert [m["message"] for m in history["messages"]] == [f"in {room}"]
            await send_json(b, "leave_room", {"room": room}, id="l")
            await next_of(b, "room_left")
            await send_json(a, "chat_message", {"room": room, "message": "missed"})
            await next_of(a, "chat_message")
            await send_json(
                b, "join_room", {"room": room, "since": {"seq": 1, "epoch": msg["epoch"]}}
            )
            joined = await next_of(b, "room_joined")
            assert joined["recovered"] is True
            assert (await next_of(b, "chat_message"))["message"] == "missed"
            await next_of(a, "user_joined")  # b's return (its user_left was skipped above)
