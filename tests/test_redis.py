"""Two fastws nodes joined through a real redis-server: rooms, seq, presence, sessions, outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastws.broker.redis import RedisBroker
from fastws.config import load_settings
from fastws.server import Node

from .rawws import OP_TEXT, build_frame, raw_connect
from .redisutil import redis_node, redis_pipe
from .utils import SECRET, TIMEOUT, client, expect_silence, recv_json, send_json, token
from .utils import join_across_nodes as join


async def until(predicate: Any, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


async def test_broadcasts_reach_every_member_on_both_nodes_once(redis_server) -> None:
    """A message posted on either node reaches every member on both, once, in one seq order."""
    async with (
        redis_node(redis_server.url, "A") as a,
        redis_node(redis_server.url, "B") as b,
        client(a, "a1") as a1,
        client(a, "a2") as a2,
        client(b, "b1") as b1,
        client(b, "b2") as b2,
    ):
        members = [a1, a2, b1, b2]
        for i, ws in enumerate(members):
            joined = await join(ws, "room")
            assert joined["members"] == i + 1
            for earlier in members[:i]:
                notice = await recv_json(earlier)
                assert notice["type"] == "user_joined" and notice["members"] == i + 1
        for i in range(20):
            sender = members[i % 4]
            await send_json(sender, "chat_message", {"room": "room", "message": f"m{i}"})
        for ws in members:
            seqs = []
            for _ in range(20):
                msg = await recv_json(ws)
                assert msg["type"] == "chat_message"
                seqs.append(msg["seq"])
            assert seqs == list(range(1, 21))
            await expect_silence(ws, 0.1)


async def test_join_leave_and_presence_agree_across_nodes(redis_server) -> None:
    """Counts, user_joined/user_left and presence see members on both nodes, users once."""
    async with (
        redis_node(redis_server.url, "A") as a,
        redis_node(redis_server.url, "B") as b,
        client(a, "alice") as alice,
        client(b, "bob") as bob,
        client(b, "alice") as alice2,
    ):
        await join(alice, "r")
        assert (await join(bob, "r"))["members"] == 2
        assert (await recv_json(alice))["username"] == "bob"
        assert (await join(alice2, "r"))["members"] == 3
        await send_json(alice, "presence", {"room": "r"})
        reply = await recv_json(alice)
        while reply["type"] != "presence":
            reply = await recv_json(alice)
        assert sorted(m["userId"] for m in reply["members"]) == ["alice", "bob"]
        await send_json(bob, "leave_room", {"room": "r"})
        left = await recv_json(alice)
        while left["type"] != "user_left":
            left = await recv_json(alice)
        assert left["username"] == "bob" and left["members"] == 2
        await send_json(alice, "typing", {"room": "r", "isTyping": True})
        typing = await recv_json(alice2)
        while typing["type"] != "typing":
            typing = await recv_json(alice2)
        assert typing["username"] == "alice"


async def test_nodes_subscribe_only_to_rooms_with_local_members(redis_server) -> None:
    """A node subscribes when its first member joins a room and unsubscribes after the last."""
    async with (
        redis_pipe(redis_server.url) as r,
        redis_node(redis_server.url, "A") as a,
        client(a, "x") as x,
    ):

        async def subscribers() -> int:
            return int((await r.call(b"PUBSUB", b"NUMSUB", b"fastws:{lobby}"))[1])

        assert await subscribers() == 0
        await join(x, "lobby")
        assert await subscribers() == 1
        await send_json(x, "leave_room", {"room": "lobby"}, id=1)
        assert (await recv_json(x))["type"] == "room_left"

        async def gone() -> bool:
            return await subscribers() == 0

        await until(gone)


async def test_session_keys_are_created_and_removed(redis_server) -> None:
    """session:<clientId> holds userId, nodeId and connect time while connected, then goes."""
    async with redis_pipe(redis_server.url) as r, redis_node(redis_server.url, "A") as a:
        async with client(a, "alice"):
            (session,) = a.sessions.values()
            key = f"session:{session.client_id}"

            async def exists() -> bool:
                return bool(await r.call(b"EXISTS", key))

            await until(exists)
            import json

            record = json.loads(await r.call(b"GET", key))
            assert record["userId"] == "alice" and record["nodeId"] == "A"
            assert isinstance(record["connectedAt"], int)
            assert 0 < await r.call(b"TTL", key) <= 60

        async def removed() -> bool:
            return not await r.call(b"EXISTS", key)

        await until(removed)


async def test_redis_outage_degrades_then_recovers_without_restart(redis_server) -> None:
    """With Redis killed, nodes keep clients, refuse honestly, report degraded; then resume."""
    async with (
        redis_node(redis_server.url, "A") as a,
        redis_node(redis_server.url, "B") as b,
        client(a, "alice") as alice,
        client(b, "bob") as bob,
    ):
        await join(alice, "r")
        await join(bob, "r")
        await recv_json(alice)
        redis_server.stop()
        await send_json(alice, "chat_message", {"room": "r", "message": "lost?"}, id="x")
        reply = await recv_json(alice, timeout=TIMEOUT)
        assert reply == {
            "type": "error",
            "error": "Service temporarily unavailable, try again",
            "code": "unavailable",
            "id": "x",
        }

        async def degraded() -> bool:
            return a.health()["status"] == "degraded" and b.health()["status"] == "degraded"

        await until(degraded)
        await send_json(alice, "ping")
        assert (await recv_json(alice))["type"] == "pong"
        await expect_silence(bob, 0.1)
        redis_server.start()

        async def healthy() -> bool:
            return a.health()["status"] == "ok" and b.health()["status"] == "ok"

        await until(healthy, TIMEOUT * 2)
        await send_json(alice, "chat_message", {"room": "r", "message": "back"})
        for ws in (alice, bob):
            msg = await recv_json(ws)
            assert msg["type"] == "chat_message" and msg["message"] == "back"
        # Presence was re-registered from what each node holds.
        await send_json(bob, "presence", {"room": "r"})
        reply = await recv_json(bob)
        assert sorted(m["userId"] for m in reply["members"]) == ["alice", "bob"]


async def test_node_starts_while_redis_is_down(redis_server) -> None:
    """A node whose Redis is down at start serves, reports degraded, and connects later."""
    redis_server.stop()
    async with redis_node(redis_server.url, "A") as a, client(a, "alice") as alice:
        assert a.health()["status"] == "degraded"
        await send_json(alice, "join_room", {"room": "r"})
        assert (await recv_json(alice))["code"] == "unavailable"
        redis_server.start()

        async def healthy() -> bool:
            return a.health()["status"] == "ok"

        await until(healthy, TIMEOUT * 2)
        assert (await join(alice, "r"))["members"] == 1


async def test_a_dead_nodes_connections_are_swept_and_announced(redis_server) -> None:
    """When a node is SIGKILLed, the others remove its members and send user_left for them."""
    from .utils import server_process

    async with redis_node(redis_server.url, "A") as a, client(a, "alice") as alice:
        await join(alice, "r")
        with server_process("--redis", redis_server.url, "--redis-node-ttl", "1") as (proc, port):
            async with client(port, "bob") as bob:
                assert (await join(bob, "r"))["members"] == 2
                assert (await recv_json(alice))["type"] == "user_joined"
                proc.kill()
                proc.wait(TIMEOUT)
        left = await recv_json(alice, timeout=TIMEOUT)
        assert left["type"] == "user_left" and left["username"] == "bob"
        assert left["members"] == 1
        await send_json(alice, "presence", {"room": "r"})
        assert [m["userId"] for m in (await recv_json(alice))["members"]] == ["alice"]


async def test_redis_cluster_with_sharded_pubsub(redis_cluster) -> None:
    """On a 3-shard Redis Cluster, rooms on different shards deliver once, in seq order."""
    url = redis_cluster.url

    @contextlib.asynccontextmanager
    async def cluster_node(name: str) -> AsyncIterator[Node]:
        settings = load_settings(
            {
                "host": "127.0.0.1",
                "port": 0,
                "jwt_secret": SECRET,
                "redis_url": url,
                "redis_cluster": True,
            },
            environ={},
        )
        node = Node(settings, SECRET, RedisBroker(url, timeout=1.0, cluster=True), node_id=name)
        await node.start()
        try:
            yield node
        finally:
            await asyncio.wait_for(node.drain(), TIMEOUT * 2)

    from fastws.broker.rediscluster import key_slot

    rooms = ["alpha", "beta", "gamma", "delta", "omega"]
    slots = {key_slot(f"fastws:{{{r}}}".encode()) * 3 // 16384 for r in rooms}
    assert len(slots) >= 2, "the rooms should spread over shards"
    async with (
        cluster_node("A") as a,
        cluster_node("B") as b,
        client(a, "ann") as ann,
        client(b, "ben") as ben,
    ):
        assert a.health()["status"] == "ok"
        for room in rooms:
            await join(ann, room)
            assert (await join(ben, room))["members"] == 2
            assert (await recv_json(ann))["type"] == "user_joined"
        for i, room in enumerate(rooms * 2):
            await send_json(
                ann if i % 2 else ben, "chat_message", {"room": room, "message": f"{room}-{i}"}
            )
        for ws in (ann, ben):
            got: dict[str, list[int]] = {}
            for _ in range(len(rooms) * 2):
                msg = await recv_json(ws)
                got.setdefault(msg["room"], []).append(msg["seq"])
            assert got == {room: [1, 2] for room in rooms}
        await send_json(ben, "presence", {"room": "gamma"})
        assert sorted(m["userId"] for m in (await recv_json(ben))["members"]) == ["ann", "ben"]


def chat_frames(count: int, room: str = "pending") -> bytes:
    """``count`` chat_messages with ids 0..count-1, as masked frames for one write."""
    return b"".join(
        build_frame(
            OP_TEXT,
            json.dumps(
                {
                    "type": "chat_message",
                    "id": str(i),
                    "payload": {"room": room, "message": f"m{i}"},
                }
            ).encode(),
        )
        for i in range(count)
    )


async def test_messages_waiting_on_the_broker_keep_their_order_up_to_rate_burst(
    redis_server,
) -> None:
    """With a remote broker a connection's messages wait while its previous one is in flight;
    up to rate_burst of them wait and then take effect in the order they were sent."""
    async with (
        redis_node(redis_server.url, "A", rate_limit=0, rate_burst=40) as node,
        await raw_connect(node.port, token("alice")) as ws,
    ):
        await ws.send_text(json.dumps({"type": "join_room", "payload": {"room": "pending"}}))
        assert json.loads(await ws.read_text())["type"] == "room_joined"
        await ws.send_raw(chat_frames(40))
        acks = []
        while len(acks) < 40:
            reply = json.loads(await ws.read_text())
            if reply["type"] == "ack":
                acks.append(reply)
        assert [a["id"] for a in acks] == [str(i) for i in range(40)]
        assert [a["seq"] for a in acks] == list(range(1, 41))


async def test_more_than_rate_burst_pending_messages_close_with_1008(redis_server) -> None:
    """One write of many messages behind an in-flight Redis call: past rate_burst waiting,
    the connection is closed with 1008 (memory per connection stays bounded)."""
    async with redis_node(redis_server.url, "A", rate_limit=0, rate_burst=5) as node:
        async with await raw_connect(node.port, token("alice")) as ws:
            await ws.send_text(json.dumps({"type": "join_room", "payload": {"room": "pending"}}))
            assert json.loads(await ws.read_text())["type"] == "room_joined"
            await ws.send_raw(chat_frames(200))
            assert await ws.expect_close(timeout=TIMEOUT) == 1008
            await ws.send_close(1008)
        async with asyncio.timeout(TIMEOUT):
            while node.sessions:
                await asyncio.sleep(0.01)


async def test_a_chat_given_up_on_is_not_applied_when_redis_wakes(redis_server) -> None:
    """Redis stopped (SIGSTOP) past the node's timeout while a chat waits: the sender is told
    ``unavailable``; when Redis runs again it reads the script, but past its deadline (in
    Redis' own clock) it applies nothing: no seq, no history, nothing delivered."""
    async with (
        redis_node(redis_server.url, "A") as a,
        redis_node(redis_server.url, "B") as b,
        client(a, "alice") as alice,
        client(b, "bob") as bob,
    ):
        await join(alice, "late")
        await join(bob, "late")
        await recv_json(alice)  # user_joined bob
        redis_server.pause()
        try:
            await send_json(alice, "chat_message", {"room": "late", "message": "late"}, id="x")
            reply = await recv_json(alice, timeout=TIMEOUT)
            assert (reply["type"], reply["code"], reply["id"]) == ("error", "unavailable", "x")
        finally:
            redis_server.resume()

        async def healthy() -> bool:
            return a.health()["status"] == "ok" and b.health()["status"] == "ok"

        await until(healthy, TIMEOUT * 2)
        async with redis_pipe(redis_server.url) as pipe:
            assert await pipe.call(b"GET", b"fastws:{late}:seq") is None
            assert await pipe.call(b"LLEN", b"fastws:{late}:history") == 0
        await expect_silence(bob, 0.2)
        await send_json(bob, "chat_message", {"room": "late", "message": "on time"})
        for ws in (alice, bob):
            msg = await recv_json(ws)
            while msg["type"] != "chat_message":
                msg = await recv_json(ws)
            assert (msg["message"], msg["seq"]) == ("on time", 1)
