"""Presence converges on Redis: a node paused past its TTL comes back into its rooms, a leave
lost in an outage is done on reconnect, and bad presence entries never stop the upkeep."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection

from fastws.broker.redis import RedisBroker
from fastws.broker.types import MemberInfo
from fastws.server import Node

from .nodes import presence_seen
from .redisutil import RedisServer, redis_node, redis_pipe
from .utils import TIMEOUT, client, recv_json, send_json, server_process
from .utils import join_across_nodes as join


async def next_matching(ws: ClientConnection, timeout: float = TIMEOUT, **fields: Any) -> dict:
    """The next message with ``fields``; anything else before it is skipped."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await recv_json(ws, timeout)
            if all(msg.get(k) == v for k, v in fields.items()):
                return msg


def broker_of(node: Node) -> RedisBroker:
    assert isinstance(node.broker, RedisBroker)
    return node.broker


async def test_a_node_paused_past_its_ttl_rejoins_its_members(redis_server: RedisServer) -> None:
    """Node 1 (a process) is stopped past its TTL: node 2 sweeps alice (user_left). Resumed,
    node 1 notices, waits for the sweep, and puts her back (user_joined); presence on both
    nodes lists both users again, and chat flows both ways."""
    with server_process("--redis", redis_server.url, "--redis-node-ttl", "1") as (proc, port):
        async with (
            redis_node(redis_server.url, "B") as b,
            client(port, "alice") as alice,
            client(b, "bob") as bob,
        ):
            await join(alice, "r")
            assert (await join(bob, "r"))["members"] == 2
            await next_matching(alice, type="user_joined", username="bob")
            proc.send_signal(signal.SIGSTOP)
            try:
                left = await next_matching(bob, TIMEOUT, type="user_left", username="alice")
                assert left["members"] == 1
            finally:
                proc.send_signal(signal.SIGCONT)
            back = await next_matching(bob, TIMEOUT, type="user_joined", username="alice")
            assert back["members"] == 2
            assert await presence_seen(bob, "r") == ["alice", "bob"]
            assert await presence_seen(alice, "r") == ["alice", "bob"]
            await send_json(alice, "chat_message", {"room": "r", "message": "from 1"})
            assert (await next_matching(bob, type="chat_message"))["message"] == "from 1"
            await send_json(bob, "chat_message", {"room": "r", "message": "from 2"})
            assert (await next_matching(alice, type="chat_message", username="bob"))[
                "message"
            ] == "from 2"


async def test_a_leave_lost_in_an_outage_is_done_on_reconnect(redis_server: RedisServer) -> None:
    """An entry Redis holds for node A that A no longer has (its leave was lost) leaves when A
    reconnects, with user_left; A's real member stays, and nobody else is touched."""
    async with (
        redis_node(redis_server.url, "A") as a,
        redis_node(redis_server.url, "B") as b,
        client(a, "alice") as alice,
        client(b, "bob") as bob,
    ):
        await join(alice, "r")
        await join(bob, "r")
        await next_matching(alice, type="user_joined", username="bob")
        ghost = MemberInfo("ghost-1", "ghost", "ghost", a.node_id)
        async with redis_pipe(redis_server.url) as pipe:
            await pipe.call(
                b"HSET", b"fastws:{r}:members", b"ghost-1", msgspec.msgpack.encode(ghost)
            )
            assert await presence_seen(bob, "r") == ["alice", "bob", "ghost"]
            await pipe.call(b"CLIENT", b"KILL", b"TYPE", b"pubsub")  # every node reconnects
        # (Its user_left goes out too, but B, reconnecting at the same moment, may not be
        # subscribed again yet: notices are best effort; presence itself must converge.)
        async with asyncio.timeout(TIMEOUT):
            while await presence_seen(bob, "r") != ["alice", "bob"]:
                await asyncio.sleep(0.05)
        assert await presence_seen(alice, "r") == ["alice", "bob"]
        assert broker_of(a).reconciled == 1 and broker_of(b).reconciled == 0


async def test_bad_presence_entries_never_stop_the_upkeep(redis_server: RedisServer) -> None:
    """A dead node whose room holds an entry that does not decode is still swept; the
    sweeper stays alive (its own TTL refreshed), and presence answers without the bad entry."""
    async with redis_node(redis_server.url, "B") as b, client(b, "bob") as bob:
        await join(bob, "r")
        dead = MemberInfo("dead-1", "carol", "carol", "dead-node")
        async with redis_pipe(redis_server.url) as pipe:
            await pipe.call(b"HSET", b"fastws:{r}:members", b"junk", b"\xc1not msgpack")
            await pipe.call(b"HSET", b"fastws:{r}:members", b"dead-1", msgspec.msgpack.encode(dead))
            await pipe.call(b"SADD", b"fastws:node:dead-node:rooms", b"r")
            await pipe.call(b"SADD", b"fastws:nodes", b"dead-node")
            left = await next_matching(bob, type="user_left", username="carol")
            assert left["members"] == 2  # bob and the junk entry's field
            assert await presence_seen(bob, "r") == ["bob"]
            assert "upkeep_error" not in broker_of(b).health()
            alive = b"fastws:node:" + b.node_id.encode()
            for _ in range(3):  # the keep-alive goes on refreshing B
                await asyncio.sleep(broker_of(b).sweep_interval)
                assert await pipe.call(b"EXISTS", alive) == 1
