"""History is capped in bytes per process: clients churning through rooms cannot grow it,
the least recently used empty rooms go first, and the cap holds over real sockets."""

from __future__ import annotations

from fastws.broker.ledger import ENTRY_COST, Ledger
from fastws.broker.types import HistoryPolicy, MemberInfo

from .utils import client, join, recv_json, running_node, send_json

HEAD = b'{"type":"chat_message","room":"r","message":"' + b"x" * 1000 + b'","seq":'
ALICE = MemberInfo("c1", "alice", "alice")


def churn(ledger: Ledger, rooms: int, messages: int) -> None:
    """What the fault report did: join a new room, post, leave; over and over."""
    for r in range(rooms):
        name = f"room-{r}"
        ledger.join(name, ALICE, None)
        for _ in range(messages):
            ledger.publish_seq(name, HEAD)
        ledger.leave(name, ALICE.clientId)


def test_churning_rooms_stays_under_the_cap_and_evicts_the_oldest_empty_rooms() -> None:
    cap = 1_000_000
    ledger = Ledger(HistoryPolicy(size=100, ttl=3600, max_bytes=cap))
    churn(ledger, rooms=200, messages=100)  # about 23 MB of history without the cap
    assert ledger.bytes <= cap
    assert ledger.bytes == sum(r.bytes for r in ledger.rooms.values())
    assert ledger.evicted_rooms > 150
    assert "room-0" not in ledger.rooms  # least recently used: gone, a new epoch next time
    seq, _, kept = ledger.history("room-199", 100)
    assert seq == 100 and len(kept) == 100  # the newest room is whole


def test_rooms_with_members_lose_their_oldest_messages_only_when_nothing_else_is_left() -> None:
    ledger = Ledger(HistoryPolicy(size=100, ttl=3600, max_bytes=50 * (len(HEAD) + 60)))
    ledger.join("busy", ALICE, None)
    for _ in range(100):
        ledger.publish_seq("busy", HEAD)
    seq, _, kept = ledger.history("busy", 100)
    assert seq == 100 and 40 <= len(kept) < 50
    assert ledger.bytes <= ledger.max_bytes
    # Recovery from before what is kept says so: not recovered.
    assert (
        ledger.join(
            "busy", MemberInfo("c2", "bob", "bob"), (1, ledger.rooms["busy"].epoch)
        ).recovered
        is False
    )


def test_expiry_and_the_size_per_room_give_their_bytes_back() -> None:
    now = [0.0]
    ledger = Ledger(HistoryPolicy(size=10, ttl=60, max_bytes=10**9), clock=lambda: now[0])
    for _ in range(25):
        ledger.publish_seq("r", HEAD)
    kept = ledger.history("r", 10)[2]
    assert len(kept) == 10  # the size per room pushed 15 out, and their bytes with them
    assert ledger.bytes == ledger.rooms["r"].bytes == sum(len(m) + ENTRY_COST for m in kept)
    now[0] = 120.0
    assert ledger.history("r", 10)[2] == []
    assert ledger.bytes == 0
    ledger.sweep()
    assert ledger.rooms == {} and ledger.bytes == 0


async def test_the_cap_holds_over_real_sockets() -> None:
    """One node with a 400 kB cap; a client joins 30 rooms in turn, posts 40 messages of
    1,000 characters in each and leaves: the node keeps under the cap, the newest room whole."""
    async with (
        running_node(history_max_bytes=400_000, rate_limit=0) as node,
        client(node, "alice") as alice,
    ):
        for r in range(30):
            room = f"churn-{r}"
            await join(alice, room)
            for i in range(40):
                await send_json(
                    alice, "chat_message", {"room": room, "message": "y" * 1000}, id=f"{r}-{i}"
                )
            acks = 0
            while acks < 40:
                msg = await recv_json(alice)
                acks += msg["type"] == "ack"
            await send_json(alice, "leave_room", {"room": room}, id=f"left-{r}")
            assert (await recv_json(alice))["type"] == "room_left"
        ledger = node.broker.ledger  # type: ignore[attr-defined]
        assert 300_000 < ledger.bytes <= 400_000
        assert ledger.evicted_rooms >= 20
        assert (await join(alice, "churn-29"))["seq"] == 40
        await send_json(alice, "history", {"room": "churn-29", "limit": 100}, id="h")
        reply = await recv_json(alice)
        assert reply["type"] == "history" and len(reply["messages"]) == 40
        # The least recently used empty room was dropped whole: it starts over.
        assert (await join(alice, "churn-0"))["seq"] == 0


async def test_expired_empty_rooms_are_swept_on_a_timer_without_any_chat() -> None:
    """In-process broker and the local bus server: rooms whose history expired go by
    themselves, with no chat to trigger a sweep."""
    import asyncio
    import shutil
    import tempfile

    from fastws.broker.bus import BusServer
    from fastws.broker.memory import MemoryBroker

    policy = HistoryPolicy(size=10, ttl=0.2)
    memory = MemoryBroker(policy)
    memory.attach("n", lambda *_: None)
    await memory.start()
    directory = tempfile.mkdtemp(prefix="fastws-", dir="/tmp")
    bus = BusServer(directory, policy)
    await bus.start()
    try:
        for ledger in (memory.ledger, bus.ledger):
            ledger.join("r", ALICE, None)
            ledger.publish_seq("r", HEAD)
            ledger.leave("r", ALICE.clientId)
            assert "r" in ledger.rooms  # kept for its history, for now
        await asyncio.sleep(0.5)  # the ttl, then a sweep interval (ttl / 4)
        assert memory.ledger.rooms == {} and bus.ledger.rooms == {}
        assert memory.ledger.bytes == 0 and bus.ledger.bytes == 0
    finally:
        await memory.close()
        await bus.close()
        shutil.rmtree(directory, ignore_errors=True)
