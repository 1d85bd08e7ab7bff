"""Two real nodes sharing one host's BusServer: chat, presence and outages across workers;
and bare LocalBusBrokers on a BusServer: batching, pressure, slow workers, reconnection."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from websockets.asyncio.client import ClientConnection

from fastws import protocol as p
from fastws.broker.bus import BusServer, _Link
from fastws.broker.buswire import Framer, Resync, Subscribe
from fastws.broker.localbus import LocalBusBroker
from fastws.broker.types import MemberInfo, chat_payload
from fastws.config import load_settings
from fastws.errors import BrokerUnavailable
from fastws.server import Node

from .utils import SECRET, TIMEOUT, client, expect_silence, join, recv_json, send_json

DRAIN = 2.0


@contextlib.asynccontextmanager
async def cluster(timeout: float = TIMEOUT) -> AsyncIterator[tuple[BusServer, Node, Node]]:
    """A BusServer in a short /tmp directory and two nodes, "w1" and "w2", on its bus."""
    directory = tempfile.mkdtemp(prefix="fastws-", dir="/tmp")
    bus = BusServer(directory)
    await bus.start()
    nodes: list[Node] = []
    try:
        for node_id in ("w1", "w2"):
            settings = load_settings(
                {"host": "127.0.0.1", "port": 0, "jwt_secret": SECRET, "drain_timeout": DRAIN},
                environ={},
            )
            broker = LocalBusBroker(bus.path, timeout=timeout)
            node = Node(settings, SECRET, broker=broker, node_id=node_id)
            await node.start()
            nodes.append(node)
        yield bus, nodes[0], nodes[1]
    finally:
        try:
            for node in nodes:
                await asyncio.wait_for(node.drain(), TIMEOUT + DRAIN)
        finally:
            await asyncio.wait_for(bus.close(), TIMEOUT)
            shutil.rmtree(directory, ignore_errors=True)


def received(node: Node) -> dict[str, int]:
    """Publications the node's bus broker has read off its bus connection, per room."""
    assert isinstance(node.broker, LocalBusBroker)
    return dict(node.broker.received)


async def settle(*nodes: Node) -> None:
    """Wait until the bus answered every request of ``nodes`` and each has what it published.

    A node answers room_joined before its user_joined is on the bus, so a client that joins
    next could otherwise be shown that earlier notice: tests settle between joins.
    """

    async def run() -> None:
        while any(node.broker.health()["pending"] for node in nodes):
            await asyncio.sleep(0.002)
        for node in nodes:
            assert isinstance(node.broker, LocalBusBroker)
            await node.broker.flush()

    await asyncio.wait_for(run(), TIMEOUT)


async def enter(ws: ClientConnection, room: str, *nodes: Node) -> dict[str, Any]:
    """join_room, then settle ``nodes`` so the next join cannot overtake this one's notice."""
    reply = await join(ws, room)
    await settle(*nodes)
    return reply


async def expect(ws: ClientConnection, type_: str, **fields: Any) -> dict[str, Any]:
    """The next message: of ``type_``, with ``fields`` as given."""
    msg = await recv_json(ws)
    assert msg["type"] == type_, msg
    for key, value in fields.items():
        assert msg[key] == value, (key, msg)
    return msg


async def chats(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The next ``count`` messages, all of which must be chat_message."""
    got = [await recv_json(ws) for _ in range(count)]
    assert all(m["type"] == "chat_message" for m in got), got
    return got


@pytest.mark.both_loops
async def test_chat_reaches_members_on_both_nodes_once_in_seq_order() -> None:
    """A chat posted on w1 reaches members on w1 and w2 once each, seq 1, 2, 3 everywhere."""
    async with (
        cluster() as (_, n1, n2),
        client(n1, "alice") as a,
        client(n2, "bob") as b,
        client(n1, "carol") as c,
    ):
        await enter(a, "r", n1, n2)
        await enter(b, "r", n1, n2)
        await expect(a, "user_joined", username="bob")
        await enter(c, "r", n1, n2)
        await expect(a, "user_joined", username="carol")
        await expect(b, "user_joined", username="carol")
        for i in range(1, 4):
            await send_json(a, "chat_message", {"room": "r", "message": f"m{i}"}, id=i)
            mine = {m["type"]: m for m in [await recv_json(a), await recv_json(a)]}
            assert mine["ack"] == {"type": "ack", "id": i, "seq": i}
            for msg in (mine["chat_message"], await recv_json(b), await recv_json(c)):
                assert msg["type"] == "chat_message" and msg["message"] == f"m{i}", msg
                assert msg["seq"] == i and msg["username"] == "alice" and msg["room"] == "r"
        for ws in (a, b, c):
            await expect_silence(ws)


async def test_joined_and_left_counts_span_both_nodes() -> None:
    """room_joined.members, user_joined and user_left count connections on every node."""
    async with (
        cluster() as (_, n1, n2),
        client(n1, "alice") as a,
        client(n2, "bob") as b,
        client(n1, "carol") as c,
    ):
        first = await enter(a, "r", n1, n2)
        epoch = first.pop("epoch")
        assert isinstance(epoch, str) and epoch
        assert first == {"type": "room_joined", "room": "r", "members": 1, "seq": 0}
        assert (await enter(b, "r", n1, n2))["members"] == 2
        await expect(a, "user_joined", username="bob", members=2)
        await send_json(a, "chat_message", {"room": "r", "message": "hi"})
        await expect(a, "chat_message", seq=1)
        await expect(b, "chat_message", seq=1)
        third = await enter(c, "r", n1, n2)
        assert third.pop("epoch") == epoch
        assert third == {"type": "room_joined", "room": "r", "members": 3, "seq": 1}
        for ws in (a, b):
            await expect(ws, "user_joined", username="carol", members=3)
        await send_json(b, "leave_room", {"room": "r"}, id="l")
        await expect(b, "room_left", id="l")
        for ws in (a, c):
            await expect(ws, "user_left", username="bob", members=2)
        for ws in (a, b, c):
            await expect_silence(ws)


async def test_presence_goes_and_seq_stays_with_history_when_the_room_empties() -> None:
    """An emptied room loses its presence but keeps seq and epoch while it has history."""
    async with cluster() as (bus, n1, n2), client(n1, "alice") as a, client(n2, "bob") as b:
        await enter(a, "r", n1, n2)
        await enter(b, "r", n1, n2)
        await expect(a, "user_joined")
        for _ in range(2):
            await send_json(b, "chat_message", {"room": "r", "message": "x"})
        await chats(a, 2)
        await chats(b, 2)
        assert bus.stats()["seq"] == {"r": 2} and bus.stats()["rooms"] == {"r": 2}
        await send_json(a, "leave_room", {"room": "r"}, id=1)
        await expect(a, "room_left")
        await expect(b, "user_left", members=1)
        await send_json(b, "leave_room", {"room": "r"}, id=2)
        await expect(b, "room_left")
        assert bus.stats()["seq"] == {"r": 2} and bus.stats()["rooms"] == {}
        again = await join(a, "r")
        assert again["members"] == 1 and again["seq"] == 2


async def test_presence_lists_users_from_both_nodes_once() -> None:
    """presence answers from the bus: every user on any node, once however many connections."""
    async with (
        cluster() as (_, n1, n2),
        client(n1, "alice") as a1,
        client(n2, "alice") as a2,
        client(n2, "bob") as b,
    ):
        for ws in (a1, a2, b):
            await enter(ws, "r", n1, n2)
        await expect(a1, "user_joined", members=2)
        await expect(a1, "user_joined", members=3)
        await send_json(a1, "presence", {"room": "r"}, id="p")
        reply = await expect(a1, "presence", id="p")
        assert sorted(m["userId"] for m in reply["members"]) == ["alice", "bob"]


async def test_typing_reaches_others_on_both_nodes_not_the_sender() -> None:
    """typing goes to the other members on w1 and w2, never back to the sender."""
    async with (
        cluster() as (_, n1, n2),
        client(n1, "alice") as a,
        client(n1, "carol") as c,
        client(n2, "bob") as b,
    ):
        await enter(a, "r", n1, n2)
        await enter(c, "r", n1, n2)
        await enter(b, "r", n1, n2)
        await expect(a, "user_joined", username="carol")
        await expect(a, "user_joined", username="bob")
        await expect(c, "user_joined", username="bob")
        await send_json(a, "typing", {"room": "r", "isTyping": True})
        want = {
            "type": "typing",
            "room": "r",
            "username": "alice",
            "isTyping": True,
            "userId": "alice",
        }
        assert await recv_json(b) == want
        assert await recv_json(c) == want
        await expect_silence(a)


async def test_node_stops_receiving_a_room_once_its_last_member_leaves() -> None:
    """A worker takes a room's publications only while it has members there."""
    async with cluster() as (_, n1, n2), client(n1, "alice") as a, client(n2, "bob") as b:
        for room in ("r", "other"):
            await enter(a, room, n1, n2)
            await enter(b, room, n1, n2)
            await expect(a, "user_joined", room=room)
        await send_json(a, "chat_message", {"room": "r", "message": "seen"})
        await expect(b, "chat_message", message="seen")
        await expect(a, "chat_message", message="seen")
        assert received(n2)["r"] == 2  # bob's own user_joined (not shown to him), the chat
        await send_json(b, "leave_room", {"room": "r"}, id=1)
        await expect(b, "room_left")
        await expect(a, "user_left", members=1)
        deliveries = n2.hub.deliveries
        for i in range(3):
            await send_json(a, "chat_message", {"room": "r", "message": f"unseen {i}"})
        await chats(a, 3)
        # The bus publishes in one order: once this arrives at w2, any "r" message would have.
        await send_json(a, "chat_message", {"room": "other", "message": "barrier"})
        await expect(b, "chat_message", room="other", message="barrier")
        assert "r" not in received(n2)  # its count went with the subscription; none since
        assert n2.hub.deliveries == deliveries + 1  # the barrier, to bob
        await expect_silence(b)


async def test_room_topic_is_not_a_prefix_of_a_longer_room() -> None:
    """A worker subscribed to "room1" does not receive "room10"'s publications."""
    async with cluster() as (_, n1, n2), client(n1, "alice") as a, client(n2, "bob") as b:
        await enter(a, "room10", n1, n2)
        await enter(a, "room1", n1, n2)
        await enter(b, "room1", n1, n2)
        await expect(a, "user_joined", room="room1")
        await send_json(a, "chat_message", {"room": "room10", "message": "not for w2"})
        await expect(a, "chat_message", room="room10")
        await send_json(a, "chat_message", {"room": "room1", "message": "for w2"})
        await expect(b, "chat_message", room="room1")
        assert "room10" not in received(n2)
        # Alice's own user_joined (not shown to her) came over the bus; her chat did not:
        # room10's one subscriber is n1, which sequences it under the lease.
        assert received(n1)["room10"] == 1
        assert isinstance(n1.broker, LocalBusBroker) and n1.broker.leased == 1
        await expect_silence(b)


async def test_forget_node_tells_survivors_and_drops_its_presence() -> None:
    """forget_node("w2") sends user_left for each w2 connection and drops them from presence."""
    async with (
        cluster() as (bus, n1, n2),
        client(n1, "alice") as a,
        client(n2, "bob") as b,
        client(n2, "carol") as c,
    ):
        for ws in (a, b, c):
            await enter(ws, "r", n1, n2)
        await expect(a, "user_joined", username="bob", members=2)
        await expect(a, "user_joined", username="carol", members=3)
        assert bus.stats()["nodes"] == ["w1", "w2"]
        bus.forget_node("w2")
        await expect(a, "user_left", username="bob", userId="bob", members=2)
        await expect(a, "user_left", username="carol", userId="carol", members=1)
        await send_json(a, "presence", {"room": "r"}, id="p")
        reply = await expect(a, "presence", id="p")
        assert reply["members"] == [{"userId": "alice", "username": "alice"}]
        assert bus.stats()["rooms"] == {"r": 1} and bus.stats()["nodes"] == ["w1"]
        await send_json(b, "join_room", {"room": "late"}, id="j")  # a dead node's stray join
        while (msg := await recv_json(b))["type"] in ("user_joined", "user_left"):
            pass
        assert msg == {
            "type": "error",
            "error": "Service temporarily unavailable, try again",
            "code": "unavailable",
            "id": "j",
        }
        assert "late" not in bus.stats()["rooms"]
        await expect_silence(a)


@pytest.mark.both_loops
async def test_bus_down_answers_unavailable_and_the_node_keeps_serving() -> None:
    """With the bus gone, chat and join get "unavailable" within the timeout; ping still works."""
    async with cluster(timeout=0.5) as (bus, n1, _), client(n1, "alice") as a:
        await join(a, "r")
        assert n1.health()["status"] == "ok"
        await bus.close()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await send_json(a, "chat_message", {"room": "r", "message": "lost"}, id="c")
        error = await recv_json(a, timeout=2.0)
        assert error == {
            "type": "error",
            "error": "Service temporarily unavailable, try again",
            "code": "unavailable",
            "id": "c",
        }
        assert loop.time() - started < 1.5
        await send_json(a, "ping", id="ping")
        await expect(a, "pong", id="ping")
        health = n1.health()
        assert health["status"] == "degraded" and health["broker"]["state"] == "down"
        await send_json(a, "join_room", {"room": "new"}, id="j")
        await expect(a, "error", code="unavailable", id="j")
        assert n1.stats()["rooms"] == 1


@pytest.mark.both_loops
async def test_hundred_messages_from_two_nodes_arrive_once_in_one_order() -> None:
    """100 chats from senders on w1 and w2 reach all four members once, seq 1..100, same order."""
    async with (
        cluster() as (_, n1, n2),
        client(n1, "alice") as a,
        client(n2, "bob") as b,
        client(n1, "carol") as c,
        client(n2, "dave") as d,
    ):
        members = (a, b, c, d)
        for i, ws in enumerate(members):
            await enter(ws, "r", n1, n2)
            for earlier in members[:i]:
                await expect(earlier, "user_joined")
        for i in range(50):
            await send_json(a, "chat_message", {"room": "r", "message": f"a{i}"})
            await send_json(b, "chat_message", {"room": "r", "message": f"b{i}"})
        streams = [[(m["seq"], m["message"]) for m in await chats(ws, 100)] for ws in members]
        first = streams[0]
        assert [seq for seq, _ in first] == list(range(1, 101))
        assert sorted(text for _, text in first) == sorted(
            [f"a{i}" for i in range(50)] + [f"b{i}" for i in range(50)]
        )
        for sender in "ab":
            assert [t for _, t in first if t[0] == sender] == [f"{sender}{i}" for i in range(50)]
        for other in streams[1:]:
            assert other == first
        for ws in members:
            await expect_silence(ws)


def test_socket_path_length_is_checked() -> None:
    """A run directory too long for a Unix socket path is refused up front."""
    with pytest.raises(ValueError, match="socket path too long"):
        BusServer("/tmp/" + "x" * 120)


# ---- bare brokers: the transport itself ----------------------------------------------------------

HEAD = p.chat_head("r", "alice", "hi", "alice")


class Bare:
    """A LocalBusBroker without a node: what it delivered and the pressure it signalled."""

    def __init__(self, bus: BusServer, node_id: str, **options: Any) -> None:
        self.broker = LocalBusBroker(bus.path, **options)
        self.delivered: list[tuple[str, str, bytes, int]] = []
        self.pressure: list[bool] = []
        self.broker.attach(node_id, lambda *pub: self.delivered.append(pub), self.pressure.append)


@contextlib.asynccontextmanager
async def bare_bus(*node_ids: str, **options: Any) -> AsyncIterator[tuple[BusServer, list[Bare]]]:
    """A BusServer (``max_buffer`` from options) and one started Bare per node id."""
    directory = tempfile.mkdtemp(prefix="fastws-", dir="/tmp")
    bus = BusServer(directory, max_buffer=options.pop("max_buffer", 64 * 1024 * 1024))
    await bus.start()
    bares = [Bare(bus, node_id, **options) for node_id in node_ids]
    try:
        for bare in bares:
            await asyncio.wait_for(bare.broker.start(), TIMEOUT)
        yield bus, bares
    finally:
        for bare in bares:
            await asyncio.wait_for(bare.broker.close(), TIMEOUT)
        await asyncio.wait_for(bus.close(), TIMEOUT)
        shutil.rmtree(directory, ignore_errors=True)


async def until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(poll(), timeout)


def link_of(bus: BusServer, node_id: str) -> _Link:
    """The server's end of ``node_id``'s connection (known from its resync)."""
    return next(link for link in bus.links if link.node == node_id)


async def test_one_turns_requests_are_one_frame_each_way() -> None:
    """100 chats issued in one loop turn leave in one write, are served from one frame, and
    their replies and publications come back in one frame, delivered in one call."""
    async with bare_bus("w1", "w2") as (bus, [one, two]):
        await one.broker.subscribe("r")
        await two.broker.subscribe("r")  # two subscribers: no lease, the bus sequences
        await one.broker.flush()
        assert one.broker.health()["leases"] == 0
        writes, frames = one.broker.writes, one.broker.frames
        served, replied = bus.stats()["frames"], bus.stats()["writes"]
        seqs: list[int] = []
        for _ in range(100):
            one.broker.publish_seq_nowait("r", HEAD, seqs.append)
        assert one.broker.health()["pending"] == 100
        await until(lambda: len(seqs) == 100)
        assert seqs == list(range(1, 101))
        assert [seq for *_, seq in one.delivered] == seqs
        assert one.broker.writes - writes == 1
        assert bus.stats()["frames"] - served == 1
        assert bus.stats()["writes"] - replied == 2  # w1's replies, w2's publications
        assert one.broker.frames - frames == 1
        await until(lambda: len(two.delivered) == 100)


async def test_a_room_with_one_subscribed_worker_is_sequenced_there() -> None:
    """The one subscriber holds the room's lease: 100 chats in one turn are one frame of
    records, answered by no frame at all, delivered in seq order and kept in history."""
    async with bare_bus("w1") as (bus, [one]):
        await one.broker.subscribe("r")
        await until(lambda: one.broker.health()["leases"] == 1)
        writes, frames = one.broker.writes, one.broker.frames
        replied = bus.stats()["writes"]
        seqs: list[int] = []
        for _ in range(100):
            one.broker.publish_seq_nowait("r", HEAD, seqs.append)
        await until(lambda: len(seqs) == 100)
        assert seqs == list(range(1, 101))
        assert [seq for *_, seq in one.delivered] == seqs
        assert one.broker.writes - writes == 1
        await until(lambda: bus.stats()["records"] == 100)
        assert bus.stats()["writes"] == replied and one.broker.frames == frames
        seq, epoch, kept = bus.ledger.history("r", 100)
        assert seq == 100 and kept == [payload for _, _, payload, _ in one.delivered]
        assert kept[0] == chat_payload(HEAD, 1, epoch)


async def test_a_second_subscriber_takes_the_seq_back_and_it_goes_on() -> None:
    """w1 holds the lease; w2 subscribes and posts at once, while w1 goes on posting: w2's
    chat waits for w1's release, every seq is allocated once, both see one order, and the
    lease returns to w1 once w2 leaves."""
    async with bare_bus("w1", "w2") as (bus, [one, two]):
        await one.broker.subscribe("r")
        await until(lambda: one.broker.health()["leases"] == 1)
        mine: list[int] = []
        for _ in range(5):
            one.broker.publish_seq_nowait("r", HEAD, mine.append)
        await two.broker.subscribe("r")
        theirs: list[int] = []
        two.broker.publish_seq_nowait("r", HEAD, theirs.append)
        for _ in range(5):
            one.broker.publish_seq_nowait("r", HEAD, mine.append)
        await until(lambda: len(mine) == 10 and len(theirs) == 1)
        assert sorted(mine + theirs) == list(range(1, 12))
        assert mine == sorted(mine)
        await one.broker.flush()
        await two.broker.flush()
        assert [seq for *_, seq in one.delivered] == list(range(1, 12))
        # w2 sees everything after its subscription, in order, its own chat included.
        seen = [seq for *_, seq in two.delivered]
        assert seen == list(range(seen[0], 12)) and theirs[0] in seen
        assert bus.stats()["revokes"] == 1 and one.broker.health()["leases"] == 0
        await two.broker.unsubscribe("r")
        await until(lambda: one.broker.health()["leases"] == 1)
        assert await one.broker.publish_seq("r", HEAD) == 12
        assert bus.ledger.history("r", 100)[0] == 12


async def test_a_lessee_that_dies_leaves_every_chat_it_delivered_on_the_bus() -> None:
    """A worker gone with its connection (a crash): every chat it delivered is in the bus's
    history, and the room goes on in the same epoch."""
    async with bare_bus("w1", "w2") as (bus, [one, two]):
        await one.broker.subscribe("r")
        await until(lambda: one.broker.health()["leases"] == 1)
        epoch = bus.ledger.history("r", 0)[1]
        seqs: list[int] = []
        for _ in range(50):
            one.broker.publish_seq_nowait("r", HEAD, seqs.append)
        await until(lambda: len(seqs) == 50)
        transport = one.broker._transport
        assert transport is not None
        transport.abort()  # what a dead process leaves: what it wrote is in the socket
        await until(lambda: bus.stats()["leases"] == 0)
        assert bus.ledger.history("r", 100)[:2] == (50, epoch)
        assert await two.broker.publish_seq("r", HEAD) == 51


async def test_a_lessee_that_does_not_release_is_cut_off_with_a_new_epoch() -> None:
    """w1 holds the lease and stops reading: w2's chat waits at most lease_timeout, then w1 is
    cut off and the room starts a new epoch (w1 may have delivered chats the bus lacks)."""
    async with bare_bus("w1", "w2") as (bus, [one, two]):
        bus.lease_timeout = 0.3
        await one.broker.subscribe("r")
        await until(lambda: one.broker.health()["leases"] == 1)
        epoch = bus.ledger.history("r", 0)[1]
        transport = one.broker._transport
        assert transport is not None
        transport.pause_reading()  # never reads the revoke
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await two.broker.publish_seq("r", HEAD) == 1
        assert 0.3 <= loop.time() - started < 1.5
        assert bus.stats()["leases_cut"] == 1
        assert bus.ledger.history("r", 0)[1] != epoch


async def test_corking_survives_the_bus() -> None:
    """Fifty chats published on w1 in one turn reach bob on w2 in one socket write."""
    async with cluster() as (_, n1, n2), client(n1, "alice") as a, client(n2, "bob") as b:
        await enter(a, "r", n1, n2)
        await enter(b, "r", n1, n2)
        await expect(a, "user_joined", username="bob")
        writes = n2.hub.outbox.writes
        seqs: list[int] = []
        for i in range(50):
            n1.broker.publish_seq_nowait(
                "r", p.chat_head("r", "alice", f"m{i}", "alice"), seqs.append
            )
        assert [m["seq"] for m in await chats(b, 50)] == list(range(1, 51))
        assert n2.hub.outbox.writes - writes == 1
        assert seqs == list(range(1, 51))


async def test_pressure_is_signalled_past_max_pending_and_released() -> None:
    """A bus that stops reading: past max_pending the node is told to pause, and once the
    replies come back, to resume; every request is answered."""
    async with bare_bus("w1", max_pending=8) as (bus, [one]):
        await one.broker.flush()
        server_side = link_of(bus, "w1").transport
        assert server_side is not None
        server_side.pause_reading()
        seqs: list[int] = []
        for _ in range(20):
            one.broker.publish_seq_nowait("r", HEAD, seqs.append)
        assert one.pressure == [True]
        await asyncio.sleep(0.05)
        server_side.resume_reading()
        await until(lambda: len(seqs) == 20)
        assert seqs == list(range(1, 21))
        assert one.pressure == [True, False]
        assert one.broker.health()["state"] == "ok"


async def test_no_reply_within_the_timeout_fails_pending_and_reconnects() -> None:
    """A bus that stops answering: pending chats get done(0) after about the timeout, health
    goes down, and a fresh connection serves again."""
    async with bare_bus("w1", timeout=0.3) as (bus, [one]):
        await one.broker.flush()
        stuck = link_of(bus, "w1")
        assert stuck.transport is not None
        stuck.transport.pause_reading()
        loop = asyncio.get_running_loop()
        started = loop.time()
        seqs: list[int] = []
        one.broker.publish_seq_nowait("r", HEAD, seqs.append)
        await until(lambda: bool(seqs), timeout=2.0)
        assert seqs == [0]
        assert 0.3 <= loop.time() - started < 1.0
        await until(lambda: one.broker.health()["state"] == "ok")
        assert one.broker.health()["reconnects"] == 1
        stuck.transport.resume_reading()  # only now can it read the worker's close
        await until(lambda: len(bus.links) == 1)
        assert await one.broker.publish_seq("r", HEAD) >= 1


async def test_a_slow_worker_is_dropped_and_the_others_keep_receiving() -> None:
    """A worker that stops reading is cut off once its buffer passes max_buffer; the bus goes
    on serving the others, every publication delivered."""
    async with bare_bus("w1", max_buffer=256 * 1024) as (bus, [fast]):
        await fast.broker.subscribe("r")
        loop = asyncio.get_running_loop()
        slow_transport, _ = await loop.create_unix_connection(asyncio.Protocol, bus.path)
        slow = cast(asyncio.Transport, slow_transport)
        try:
            slow.pause_reading()  # never reads: its socket, then the bus's buffer, fill up
            slow.write(Framer().frame([Resync("slow", []), Subscribe("r")]))
            await until(lambda: len(bus.links) == 2)
            payload = b'{"type":"typing","room":"r","pad":"' + b"x" * 32 * 1024 + b'"}'
            for _ in range(200):  # one at a time: a turn's output stays below max_buffer
                await asyncio.wait_for(fast.broker.publish("r", payload), TIMEOUT)
            await fast.broker.flush()
            assert bus.stats()["slow_drops"] == 1
            assert bus.stats()["links"] == 1 and link_of(bus, "w1")
            assert len(fast.delivered) == 200
            assert fast.broker.health()["state"] == "ok"
        finally:
            slow.abort()


async def test_a_dropped_connection_recovers_subscriptions_and_presence() -> None:
    """When the bus drops a worker's connection, the worker reconnects, re-subscribes its
    rooms and re-states its members; a member the bus had but the worker has not is gone."""
    async with cluster() as (bus, n1, n2), client(n1, "alice") as a, client(n2, "bob") as b:
        await enter(a, "r", n1, n2)
        await enter(b, "r", n1, n2)
        await expect(a, "user_joined", username="bob")
        # A ghost: on the bus under w2, but not one of w2's members (its leave was lost).
        bus.ledger.join("r", MemberInfo("ghost-1", "ghost", "ghost", "w2"), None)
        link_of(bus, "w2").close()
        await until(
            lambda: n2.broker.health()["reconnects"] == 1 and n2.broker.health()["state"] == "ok"
        )
        await expect(a, "user_left", username="ghost", members=2)
        await settle(n1, n2)
        await send_json(a, "chat_message", {"room": "r", "message": "after"})
        await expect(b, "chat_message", message="after")
        await expect(a, "chat_message", message="after")
        await send_json(b, "presence", {"room": "r"}, id="p")
        reply = await expect(b, "presence", id="p")
        assert sorted(m["userId"] for m in reply["members"]) == ["alice", "bob"]
        assert bus.stats()["rooms"] == {"r": 2}


class _SubscribeFails(LocalBusBroker):
    """The real bus broker, whose ``subscribe`` of room "flaky" waits for ``gate`` and then
    fails as a timed-out one would (the injected fault; everything else is the real bus)."""

    gate: asyncio.Event

    async def subscribe(self, room: str) -> None:
        if room != "flaky":
            return await super().subscribe(room)
        await self.gate.wait()
        raise BrokerUnavailable()


async def test_joiners_waiting_on_a_failed_subscribe_are_all_told() -> None:
    """Two local joiners of one room while its subscription is in flight: when it fails, both
    get ``unavailable`` and neither is left in a room this node does not receive."""
    directory = tempfile.mkdtemp(prefix="fastws-", dir="/tmp")
    bus = BusServer(directory)
    await bus.start()
    broker = _SubscribeFails(bus.path, timeout=TIMEOUT)
    broker.gate = asyncio.Event()
    settings = load_settings(
        {"host": "127.0.0.1", "port": 0, "jwt_secret": SECRET, "drain_timeout": DRAIN}, environ={}
    )
    node = Node(settings, SECRET, broker=broker, node_id="w1")
    await node.start()
    try:
        async with client(node, "alice") as a, client(node, "bob") as b:
            await send_json(a, "join_room", {"room": "flaky"}, id="a")
            await asyncio.sleep(0.05)  # alice's subscription is now in flight
            await send_json(b, "join_room", {"room": "flaky"}, id="b")
            await expect_silence(b, 0.1)  # bob waits for the same subscription
            broker.gate.set()
            for ws, msg_id in ((a, "a"), (b, "b")):
                error = await recv_json(ws)
                assert (error["type"], error["code"], error["id"]) == (
                    "error",
                    "unavailable",
                    msg_id,
                )
            assert "flaky" not in node.hub.rooms
            assert node.stats()["memberships"] == 0
    finally:
        await asyncio.wait_for(node.drain(), TIMEOUT + DRAIN)
        await asyncio.wait_for(bus.close(), TIMEOUT)
        shutil.rmtree(directory, ignore_errors=True)


async def test_chats_missed_while_a_worker_was_cut_off_are_replayed_in_order() -> None:
    """The bus drops w2's connection (as it does a slow worker); w1 posts while w2 is away.
    Re-subscribing, w2 is given what it missed from the bus's history, before anything
    newer: every chat delivered once, in seq order."""
    async with bare_bus("w1", "w2") as (bus, [one, two]):
        await one.broker.subscribe("r")
        await two.broker.subscribe("r")
        await two.broker.join("r", MemberInfo("b1", "bob", "bob", "w2"))
        for _ in range(3):
            await one.broker.publish_seq("r", HEAD)
        await until(lambda: len(two.delivered) == 3)
        link_of(bus, "w2").close()
        await until(lambda: two.broker.health()["state"] == "down")
        for _ in range(5):  # w2 is away: these reach only the bus's history
            await one.broker.publish_seq("r", HEAD)
        await until(lambda: two.broker.health()["state"] == "ok")
        await one.broker.publish_seq("r", HEAD)
        await until(lambda: len(two.delivered) == 9)
        assert [seq for *_, seq in two.delivered] == list(range(1, 10))
        assert two.broker.recovered == 5


async def test_a_chat_the_worker_gave_up_on_is_never_applied_later() -> None:
    """The bus stops reading w1 past w1's timeout: w1 answers its chat ``unavailable`` and
    reconnects. When the bus reads the old frame at last, it refuses the chat (past its
    deadline) instead of applying it: not in history, not delivered to w2."""
    async with bare_bus("w1", "w2", timeout=0.3) as (bus, [one, two]):
        await two.broker.subscribe("r")
        await one.broker.flush()
        stuck = link_of(bus, "w1")
        assert stuck.transport is not None
        stuck.transport.pause_reading()
        seqs: list[int] = []
        one.broker.publish_seq_nowait("r", HEAD, seqs.append)
        await until(lambda: seqs == [0], timeout=2.0)  # given up on: unavailable
        stuck.transport.resume_reading()  # the bus reads the late frame now
        await until(lambda: bus.stats()["expired"] == 1)
        await two.broker.flush()
        assert bus.ledger.history("r", 10)[0] == 0 and two.delivered == []
        await until(lambda: one.broker.health()["state"] == "ok")
        assert await one.broker.publish_seq("r", HEAD) == 1


async def test_garbage_from_the_bus_makes_the_worker_reconnect_not_crash() -> None:
    """A peer on the bus socket that answers with bytes that are no frame: the worker drops
    the connection with the cause, reports down, and keeps trying; its node goes on serving."""
    directory = tempfile.mkdtemp(prefix="fastws-", dir="/tmp")
    path = f"{directory}/bus.sock"
    connections = 0

    async def rogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read(1)  # whatever the worker says first
        writer.write(b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1")  # a frame that is no msgpack
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_unix_server(rogue, path)
    broker = LocalBusBroker(path, timeout=TIMEOUT)
    settings = load_settings(
        {"host": "127.0.0.1", "port": 0, "jwt_secret": SECRET, "drain_timeout": DRAIN}, environ={}
    )
    node = Node(settings, SECRET, broker=broker, node_id="w1")
    await node.start()
    try:
        await until(lambda: "broken stream" in broker.health().get("cause", ""))
        assert node.health()["status"] == "degraded"
        await until(lambda: connections >= 2)  # it came back for more: the loop lives
        async with client(node, "alice") as a:
            await send_json(a, "ping")
            assert (await recv_json(a))["type"] == "pong"
    finally:
        await asyncio.wait_for(node.drain(), TIMEOUT + DRAIN)
        server.close()
        shutil.rmtree(directory, ignore_errors=True)
