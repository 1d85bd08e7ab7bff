"""fastws.Publisher: over a node's admin API, and straight into Redis with no node in between."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastws import Publisher, PublishError
from fastws.publisher import Member

from .redisutil import free_port, redis_node
from .utils import client, join, recv_json, running_node, send_json

KEY = "publisher-test-key-0123456789"


async def next_chat(ws: Any) -> dict[str, Any]:
    while (msg := await recv_json(ws))["type"] != "chat_message":
        assert msg["type"] in ("user_joined", "user_left"), msg
    return msg


async def test_http_publisher_publishes_and_reads_presence() -> None:
    """Publisher(url, key) posts into a room (the members get it with the returned seq) and
    lists the room's members."""
    async with (
        running_node(admin_port=0, api_key=KEY) as node,
        client(node, "alice") as alice,
        client(node, "bob") as bob,
    ):
        await join(alice, "ops")
        await join(bob, "ops")
        assert node.admin is not None
        async with Publisher(f"http://127.0.0.1:{node.admin.port}/", KEY) as pub:
            assert await pub.publish("ops", "deploying") == 1
            assert await pub.publish("ops", "done", username="CI", user_id="ci") == 2
            for ws in (alice, bob):
                first, second = await next_chat(ws), await next_chat(ws)
                assert (first["message"], first["seq"], first["userId"]) == (
                    "deploying",
                    1,
                    "system",
                )
                assert (second["username"], second["userId"], second["seq"]) == ("CI", "ci", 2)
            members = await pub.presence("ops")
            assert sorted(members, key=lambda m: m.userId) == [
                Member("alice", "alice"),
                Member("bob", "bob"),
            ]
            await join(alice, "team#1:@ops")  # '#' and ':' are room characters, not URL syntax
            assert await pub.publish("team#1:@ops", "hash") == 1
            assert (await next_chat(alice))["room"] == "team#1:@ops"
            assert await pub.presence("team#1:@ops") == [Member("alice", "alice")]


async def test_http_publisher_raises_typed_errors() -> None:
    """A wrong key, a bad room, a too long text and an unreachable node each raise
    PublishError with their status and code."""
    async with running_node(admin_port=0, api_key=KEY) as node:
        assert node.admin is not None
        url = f"http://127.0.0.1:{node.admin.port}"
        async with Publisher(url, "wrong") as pub:
            with pytest.raises(PublishError) as err:
                await pub.publish("ops", "x")
            assert (err.value.status, err.value.code) == (401, "unauthorized")
        async with Publisher(url, KEY) as pub:
            with pytest.raises(PublishError) as err:
                await pub.publish("no\ncontrol", "x")
            assert (err.value.status, err.value.code) == (422, "invalid_room")
            with pytest.raises(PublishError) as err:
                await pub.publish("ops", "x" * 1001)
            assert (err.value.status, err.value.code) == (422, "message_too_long")
    async with Publisher(f"http://127.0.0.1:{free_port()}", KEY, timeout=2) as pub:
        with pytest.raises(PublishError) as err:
            await pub.presence("ops")
        assert (err.value.status, err.value.code) == (503, "unreachable")


async def test_redis_publisher_reaches_nodes_and_history(redis_server: Any) -> None:
    """Publisher.over_redis posts with the nodes' Lua script: members on two nodes get it
    with the next seq, history keeps it, and presence spans both nodes."""
    async with (
        redis_node(redis_server.url, "n1") as n1,
        redis_node(redis_server.url, "n2") as n2,
        client(n1, "alice") as alice,
        client(n2, "bob") as bob,
    ):
        await join(alice, "news")
        await join(bob, "news")
        await send_json(alice, "chat_message", {"room": "news", "message": "hi"})
        assert (await next_chat(alice))["seq"] == (await next_chat(bob))["seq"] == 1
        async with Publisher.over_redis(redis_server.url) as pub:
            assert await pub.publish("news", "from the backend", username="Bot") == 2
            for ws in (alice, bob):
                msg = await next_chat(ws)
                assert (msg["message"], msg["seq"], msg["username"]) == (
                    "from the backend",
                    2,
                    "Bot",
                )
            members = await pub.presence("news")
            assert sorted(m.userId for m in members) == ["alice", "bob"]
            with pytest.raises(PublishError) as err:
                await pub.publish("news", "   ")
            assert (err.value.status, err.value.code) == (422, "empty_message")
        await send_json(bob, "history", {"room": "news", "limit": 5}, id="h")
        while (reply := await recv_json(bob))["type"] != "history":
            pass
        assert [m["message"] for m in reply["messages"]] == ["hi", "from the backend"]
        assert reply["messages"][1]["epoch"] == reply["epoch"]


async def test_redis_publisher_without_redis_is_503(redis_server: Any) -> None:
    """With Redis gone, over_redis raises PublishError 503 unavailable; it works again once
    Redis is back, without a new Publisher."""
    async with Publisher.over_redis(redis_server.url, timeout=0.5) as pub:
        assert await pub.publish("r", "one") == 1
        redis_server.stop()
        with pytest.raises(PublishError) as err:
            await pub.publish("r", "two")
        assert (err.value.status, err.value.code) == (503, "unavailable")
        redis_server.start()
        # A fresh Redis without persistence: the room starts a new epoch at seq 1.
        assert await pub.publish("r", "three") == 1


async def test_http_publisher_times_out() -> None:
    """An admin listener that accepts but never answers costs ``timeout``, then 503."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Publisher(f"http://127.0.0.1:{port}", KEY, timeout=0.3) as pub:
            with pytest.raises(PublishError) as err:
                await asyncio.wait_for(pub.publish("ops", "x"), 5)
            assert (err.value.status, err.value.code) == (503, "unreachable")
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
