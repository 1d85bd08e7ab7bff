"""Room history and recovery: join_room with `since`, the `history` request, epochs, limits."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from websockets.asyncio.client import ClientConnection

from fastws.broker.ledger import HistoryPolicy
from fastws.broker.memory import MemoryBroker
from fastws.config import load_settings
from fastws.server import Node

from .redisutil import free_port, redis_node
from .utils import (
    SECRET,
    TIMEOUT,
    client,
    expect_silence,
    join,
    recv_json,
    running_node,
    send_json,
    server_process,
)


async def post(ws: ClientConnection, room: str, n: int, prefix: str = "m") -> None:
    for i in range(n):
        await send_json(ws, "chat_message", {"room": room, "message": f"{prefix}{i}"})


async def rejoin(ws: ClientConnection, room: str, seq: int, epoch: str) -> dict[str, Any]:
    await send_json(ws, "join_room", {"room": room, "since": {"seq": seq, "epoch": epoch}})
    reply = await recv_json(ws)
    assert reply["type"] == "room_joined", reply
    return reply


async def chats(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    """The next ``n`` chat_messages on ``ws`` (other events are skipped)."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        msg = await recv_json(ws)
        if msg["type"] == "chat_message":
            out.append(msg)
    return out


async def test_reconnect_with_since_gets_exactly_what_was_missed_then_live() -> None:
    """Away for 50 messages: the rejoin replays those 50 in order, then live ones, no dups."""
    async with running_node() as node, client(node, "bob") as bob:
        async with client(node, "alice") as alice:
            joined = await join(alice, "r")
            await join(bob, "r")
            await post(bob, "r", 3, "before")
            last = (await chats(alice, 3))[-1]
            assert last["epoch"] == joined["epoch"] and last["seq"] == 3
        await post(bob, "r", 50)
        async with client(node, "alice") as alice:
            again = await rejoin(alice, "r", last["seq"], last["epoch"])
            assert again["recovered"] is True and again["seq"] == 53
            replay = await chats(alice, 50)
            assert [m["seq"] for m in replay] == list(range(4, 54))
            assert [m["message"] for m in replay] == [f"m{i}" for i in range(50)]
            await post(bob, "r", 2, "live")
            live = await chats(alice, 2)
            assert [m["seq"] for m in live] == [54, 55]
            await expect_silence(alice, 0.1)


async def test_nothing_missed_is_a_complete_recovery() -> None:
    """since at the room's current seq recovers with nothing to replay."""
    async with running_node() as node, client(node, "bob") as bob:
        await join(bob, "r")
        await post(bob, "r", 2)
        msgs = await chats(bob, 2)
        async with client(node, "alice") as alice:
            again = await rejoin(alice, "r", 2, msgs[-1]["epoch"])
            assert again["recovered"] is True
            await expect_silence(alice, 0.1)


async def test_history_trimmed_reports_incomplete_recovery() -> None:
    """When history no longer reaches back, recovered is false and what is kept is replayed."""
    async with running_node(history_size=10) as node, client(node, "bob") as bob:
        first = await join(bob, "r")
        await post(bob, "r", 30)
        await chats(bob, 30)
        async with client(node, "alice") as alice:
            again = await rejoin(alice, "r", 5, first["epoch"])
            assert again["recovered"] is False
            assert [m["seq"] for m in await chats(alice, 10)] == list(range(21, 31))


async def test_wrong_epoch_or_future_seq_is_not_recovered() -> None:
    """An unknown epoch, or a seq beyond the room's, says recovered false with no replay."""
    async with running_node() as node, client(node, "bob") as bob:
        first = await join(bob, "r")
        await post(bob, "r", 2)
        await chats(bob, 2)
        async with client(node, "alice") as alice:
            assert (await rejoin(alice, "r", 1, "other"))["recovered"] is False
            await expect_silence(alice, 0.1)
        async with client(node, "alice") as alice:
            assert (await rejoin(alice, "r", 99, first["epoch"]))["recovered"] is False


async def test_history_expires_by_age() -> None:
    """Messages older than history_ttl are not replayed: the clock is injected, not slept."""
    now = [1000.0]
    settings = load_settings(
        {"host": "127.0.0.1", "port": 0, "jwt_secret": SECRET, "history_ttl": 60}, environ={}
    )
    broker = MemoryBroker(HistoryPolicy(100, 60), clock=lambda: now[0])
    node = Node(settings, SECRET, broker)
    await node.start()
    try:
        async with client(node, "bob") as bob:
            first = await join(bob, "r")
            await post(bob, "r", 3)
            await chats(bob, 3)
            now[0] += 61
            await post(bob, "r", 1, "fresh")
            await chats(bob, 1)
            async with client(node, "alice") as alice:
                again = await rejoin(alice, "r", 0, first["epoch"])
                assert again["recovered"] is False
                assert [m["seq"] for m in await chats(alice, 1)] == [4]
    finally:
        await node.drain()


async def test_history_request_returns_the_last_n_in_order() -> None:
    """history answers with one message holding the room's newest messages, oldest first."""
    async with running_node() as node, client(node, "bob") as bob:
        await join(bob, "r")
        await post(bob, "r", 12)
        await chats(bob, 12)
        await send_json(bob, "history", {"room": "r", "limit": 5}, id="h")
        reply = await recv_json(bob)
        assert reply["type"] == "history" and reply["id"] == "h" and reply["seq"] == 12
        assert [m["seq"] for m in reply["messages"]] == [8, 9, 10, 11, 12]
        assert all(
            m["type"] == "chat_message" and m["epoch"] == reply["epoch"] for m in reply["messages"]
        )
        await send_json(bob, "history", {"room": "r", "limit": 0}, id="bad")
        assert (await recv_json(bob))["code"] == "invalid_payload"
        async with client(node, "eve") as eve:
            await send_json(eve, "history", {"room": "r"}, id="x")
            assert (await recv_json(eve))["code"] == "not_in_room"


async def test_rooms_matching_history_off_keep_nothing() -> None:
    """history_off rooms answer history with no messages and cannot replay."""
    async with running_node(history_off="tmp-*") as node, client(node, "bob") as bob:
        first = await join(bob, "tmp-1")
        await post(bob, "tmp-1", 3)
        await chats(bob, 3)
        await send_json(bob, "history", {"room": "tmp-1"})
        assert (await recv_json(bob))["messages"] == []
        async with client(node, "alice") as alice:
            assert (await rejoin(alice, "tmp-1", 1, first["epoch"]))["recovered"] is False


async def test_empty_room_keeps_its_history_for_a_returning_client() -> None:
    """The last member leaving does not lose the room's epoch: coming back recovers."""
    async with running_node() as node:
        async with client(node, "alice") as alice:
            await join(alice, "solo")
            await post(alice, "solo", 2)
            last = (await chats(alice, 2))[-1]
        assert node.stats()["rooms"] == 0
        async with client(node, "alice") as alice:
            again = await rejoin(alice, "solo", last["seq"], last["epoch"])
            assert again["recovered"] is True and again["epoch"] == last["epoch"]


async def test_epoch_changes_when_the_in_memory_broker_restarts() -> None:
    """A restarted single node has lost its history: a new epoch, recovery says false."""
    port = free_port()
    with server_process("--port", str(port)) as (proc, _):
        async with client(port, "alice") as alice:
            first = await join(alice, "r")
            await post(alice, "r", 2)
            last = (await chats(alice, 2))[-1]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, TIMEOUT) == 0
    with server_process("--port", str(port)) as (_proc, _):
        async with client(port, "alice") as alice:
            again = await rejoin(alice, "r", last["seq"], last["epoch"])
            assert again["recovered"] is False and again["epoch"] != first["epoch"]
            assert again["seq"] == 0


# ---- across nodes -------------------------------------------------------------------------------


async def test_recovery_across_two_redis_nodes_while_traffic_continues(redis_server) -> None:
    """Back on the other node, with messages still arriving: a gapless run, each seq once."""
    async with (
        redis_node(redis_server.url, "A") as a,
        redis_node(redis_server.url, "B") as b,
        client(b, "bob") as bob,
    ):
        await join(bob, "r")
        async with client(a, "alice") as alice:
            await join(alice, "r")
            await post(bob, "r", 5)
            last = (await chats(alice, 5))[-1]
        await post(bob, "r", 50)
        async with client(b, "alice") as alice:
            flood = asyncio.create_task(post(bob, "r", 100, "during"))
            again = await rejoin(alice, "r", last["seq"], last["epoch"])
            assert again["recovered"] is True
            await flood
            got = [m["seq"] for m in await chats(alice, 150)]
            assert got == list(range(6, 156))
            await expect_silence(alice, 0.2)


async def test_recovery_after_the_clients_node_is_killed(redis_server) -> None:
    """The node a client was on dies; it reconnects to the other and recovers from Redis."""
    async with redis_node(redis_server.url, "B") as b, client(b, "bob") as bob:
        await join(bob, "r")
        with server_process("--redis", redis_server.url, "--redis-node-ttl", "1") as (proc, port):
            async with client(port, "alice") as alice:
                await join(alice, "r")
                await post(bob, "r", 3)
                last = (await chats(alice, 3))[-1]
                proc.kill()
                proc.wait(TIMEOUT)
        await post(bob, "r", 50)
        async with client(b, "alice") as alice:
            again = await rejoin(alice, "r", last["seq"], last["epoch"])
            assert again["recovered"] is True
            assert [m["seq"] for m in await chats(alice, 50)] == list(range(4, 54))


async def test_redis_history_request_and_trim(redis_server) -> None:
    """Redis keeps history_size messages per room; history and recovery read them."""
    async with redis_node(redis_server.url, "A", history_size=10) as a, client(a, "bob") as bob:
        first = await join(bob, "r")
        await post(bob, "r", 25)
        await chats(bob, 25)
        await send_json(bob, "history", {"room": "r", "limit": 100})
        reply = await recv_json(bob)
        assert [m["seq"] for m in reply["messages"]] == list(range(16, 26))
        async with client(a, "alice") as alice:
            again = await rejoin(alice, "r", 3, first["epoch"])
            assert again["recovered"] is False
            assert [m["seq"] for m in await chats(alice, 10)] == list(range(16, 26))
