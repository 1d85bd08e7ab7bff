"""Room leases on one Redis: a room whose members are all on one node is sequenced there, its
history written through to Redis before each chat is delivered; another node that joins or
publishes takes it over in seq order; a crashed holder's rooms are taken at once, a paused
holder's once its liveness lapses, and a holder that lost its lease applies nothing."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

from websockets.asyncio.client import ClientConnection

from fastws.broker.redis import RedisBroker
from fastws.publisher import Publisher
from fastws.server import Node

from .nodes import NOTICES, next_of, room_name
from .redisutil import RedisServer, redis_node, redis_pipe
from .utils import TIMEOUT, client, recv_json, send_json, server_process
from .utils import join_across_nodes as join


def broker_of(node: Node) -> RedisBroker:
    assert isinstance(node.broker, RedisBroker)
    return node.broker


async def until(check: Any, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


async def lease_of(url: str, room: str) -> bytes | None:
    """The holder ("node incarnation") the room's epoch key names, or None."""
    async with redis_pipe(url) as pipe:
        value = await pipe.call(b"GET", b"fastws:{%b}:epoch" % room.encode())
    if value is None or b" " not in value:
        return None
    return bytes(value.split(b" ", 1)[1])


async def seqs_of_chats(ws: ClientConnection, count: int) -> list[int]:
    return [(await next_of(ws, "chat_message"))["seq"] for _ in range(count)]


async def test_a_room_on_one_node_is_sequenced_there_and_its_history_is_in_redis(
    redis_server: RedisServer,
) -> None:
    room = room_name("leased")
    async with (
        redis_node(redis_server.url, "A") as a,
        client(a, "alice") as alice,
        client(a, "carol") as carol,
    ):
        await join(alice, room)
        await join(carol, room)
        holder = await lease_of(redis_server.url, room)
        assert holder is not None and holder.startswith(b"A ")
        for i in range(5):
            await send_json(alice, "chat_message", {"room": room, "message": f"m{i}"})
        assert await seqs_of_chats(carol, 5) == [1, 2, 3, 4, 5]
        assert await seqs_of_chats(alice, 5) == [1, 2, 3, 4, 5]
        health = broker_of(a).health()
        assert (health["leases"], health["leased"]) == (1, 5)
        async with redis_pipe(redis_server.url) as pipe:
            entries = await pipe.call(b"LRANGE", b"fastws:{%b}:history" % room.encode(), 0, -1)
        assert [int(e.split(b":", 1)[0]) for e in entries] == [5, 4, 3, 2, 1]
        epoch = json.loads(entries[0].split(b":", 2)[2])["epoch"]
        # A late joiner recovers from Redis, with the seq the holder keeps.
        async with client(a, "dave") as dave:
            await send_json(dave, "join_room", {"room": room, "since": {"seq": 2, "epoch": epoch}})
            joined = await next_of(dave, "room_joined")
            assert (joined["seq"], joined["recovered"]) == (5, True)
            assert await seqs_of_chats(dave, 3) == [3, 4, 5]


async def test_a_second_node_takes_the_room_over_without_a_gap_or_a_reorder(
    redis_server: RedisServer,
) -> None:
    """alice (node A, the holder) streams chats while bob joins on node B: A gives the room
    back behind its last record, and every member sees one run of seqs, in order."""
    room = room_name("handover")
    async with (
        redis_node(redis_server.url, "A") as a,
        redis_node(redis_server.url, "B") as b,
        client(a, "alice") as alice,
        client(b, "bob") as bob,
    ):
        await join(alice, room)
        assert await lease_of(redis_server.url, room) is not None
        for i in range(40):
            await send_json(alice, "chat_message", {"room": room, "message": f"a{i}"})
        joined = await join(bob, room)
        for i in range(40, 80):
            await send_json(alice, "chat_message", {"room": room, "message": f"a{i}"})
        for i in range(20):
            await send_json(bob, "chat_message", {"room": room, "message": f"b{i}"})
        assert await seqs_of_chats(alice, 100) == list(range(1, 101))
        seen = await seqs_of_chats(bob, 100 - joined["seq"])
        assert seen == list(range(joined["seq"] + 1, 101))
        assert await lease_of(redis_server.url, room) is None
        assert broker_of(a).health()["handovers"] == 1


async def test_a_publisher_into_a_leased_room_takes_it_over(redis_server: RedisServer) -> None:
    room = room_name("published")
    async with redis_node(redis_server.url, "A") as a, client(a, "alice") as alice:
        await join(alice, room)
        await send_json(alice, "chat_message", {"room": room, "message": "first"})
        assert await seqs_of_chats(alice, 1) == [1]
        publisher = Publisher.over_redis(redis_server.url)
        try:
            seq = await asyncio.wait_for(publisher.publish(room, "from the backend"), TIMEOUT)
        finally:
            await publisher.close()
        assert seq == 2
        msg = await next_of(alice, "chat_message")
        assert (msg["seq"], msg["message"]) == (2, "from the backend")
        await send_json(alice, "chat_message", {"room": room, "message": "third"})
        assert await seqs_of_chats(alice, 1) == [3]


async def test_a_crashed_holder_is_taken_over_at_once_and_since_recovers(
    redis_server: RedisServer,
) -> None:
    """The holder is SIGKILLed (its Redis connections close with it): a node its users come
    back to takes the room at once, not after the holder's TTL, in the same epoch, and a
    client's ``since`` recovers everything the holder had delivered."""
    room = room_name("crash")
    with server_process("--redis-url", redis_server.url, "--redis-node-ttl", "30") as (proc, port):
        async with client(port, "alice") as alice:
            await join(alice, room)
            for i in range(3):
                await send_json(alice, "chat_message", {"room": room, "message": f"m{i}"})
            got = [await next_of(alice, "chat_message") for _ in range(3)]
            assert [m["seq"] for m in got] == [1, 2, 3]
            assert await lease_of(redis_server.url, room) is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait(TIMEOUT)
    async with redis_node(redis_server.url, "B") as b, client(b, "alice") as again:
        started = asyncio.get_running_loop().time()
        await send_json(
            again, "join_room", {"room": room, "since": {"seq": 1, "epoch": got[0]["epoch"]}}
        )
        joined = await next_of(again, "room_joined")
        assert asyncio.get_running_loop().time() - started < 2.0  # not the holder's 30 s TTL
        assert (joined["seq"], joined["epoch"], joined["recovered"]) == (3, got[0]["epoch"], True)
        assert [m["message"] for m in [await next_of(again, "chat_message") for _ in range(2)]] == [
            "m1",
            "m2",
        ]
        await send_json(again, "chat_message", {"room": room, "message": "after"})
        assert await seqs_of_chats(again, 1) == [4]


async def test_a_paused_holder_loses_the_room_and_applies_nothing_after(
    redis_server: RedisServer,
) -> None:
    """The holder is SIGSTOPped: node B's join waits for the holder's liveness to lapse, then
    takes the room, in the same epoch. Resumed, the old holder's chats are refused or take
    seqs after B's: no seq is ever given twice."""
    room = room_name("paused")
    with server_process("--redis-url", redis_server.url, "--redis-node-ttl", "1") as (proc, port):
        async with (
            client(port, "alice") as alice,
            redis_node(redis_server.url, "B") as b,
            client(b, "bob") as bob,
        ):
            await join(alice, room)
            await send_json(alice, "chat_message", {"room": room, "message": "before"})
            first = await next_of(alice, "chat_message")
            proc.send_signal(signal.SIGSTOP)
            try:
                joined = await asyncio.wait_for(join(bob, room), TIMEOUT)
                assert (joined["seq"], joined["epoch"]) == (1, first["epoch"])
                await send_json(bob, "chat_message", {"room": room, "message": "while paused"})
                assert await seqs_of_chats(bob, 1) == [2]
                # Written while A is stopped: A reads it first thing when it runs again.
                await send_json(
                    alice, "chat_message", {"room": room, "message": "stale"}, id="stale"
                )
            finally:
                proc.send_signal(signal.SIGCONT)
            given: dict[int, str] = {}
            while True:  # alice: the stale chat is refused, or sequenced after bob's
                msg = await recv_json(alice, TIMEOUT)
                if msg["type"] == "chat_message":
                    assert given.setdefault(msg["seq"], msg["message"]) == msg["message"]
                    if msg["message"] == "stale":
                        assert msg["seq"] > 2
                        break
                elif msg.get("id") == "stale":
                    assert msg["type"] in ("error", "ack"), msg
                    if msg["type"] == "error":
                        assert msg["code"] == "unavailable"
                        break
            await send_json(alice, "chat_message", {"room": room, "message": "later"})
            for ws in (alice, bob):
                while True:
                    # The stale chat's ack may follow its broadcast: the loop above left at
                    # whichever came first.
                    msg = await next_of(ws, "chat_message", (*NOTICES, "ack"))
                    assert given.setdefault(msg["seq"], msg["message"]) == msg["message"]
                    if msg["message"] == "later":
                        break


async def test_records_past_their_deadline_apply_nothing_and_leave_no_gap(
    redis_server: RedisServer,
) -> None:
    """Redis stopped past the node's timeout while a leased chat's record waits: the sender is
    told ``unavailable``; when Redis runs again the record is past its deadline, nothing is
    applied, and the room's next chat takes the next seq."""
    room = room_name("late-record")
    async with redis_node(redis_server.url, "A") as a, client(a, "alice") as alice:
        await join(alice, room)
        await send_json(alice, "chat_message", {"room": room, "message": "on time"})
        assert await seqs_of_chats(alice, 1) == [1]
        redis_server.pause()
        try:
            await send_json(alice, "chat_message", {"room": room, "message": "late"}, id="x")
            reply = await recv_json(alice, TIMEOUT)
            assert (reply["type"], reply["code"], reply["id"]) == ("error", "unavailable", "x")
        finally:
            redis_server.resume()

        async def healthy() -> bool:
            return a.health()["status"] == "ok"

        await until(healthy, TIMEOUT * 2)
        async with redis_pipe(redis_server.url) as pipe:
            assert await pipe.call(b"LLEN", b"fastws:{%b}:history" % room.encode()) == 1
        await send_json(alice, "chat_message", {"room": room, "message": "next"})
        msg = await next_of(alice, "chat_message")
        assert (msg["message"], msg["seq"]) == ("next", 2)
