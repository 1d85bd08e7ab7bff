"""A room of 200 clients: every one of 100 broadcasts reaches each member exactly once, in order."""

from __future__ import annotations

import asyncio

import pytest

from .utils import picows_client, running_node

MEMBERS = 200
BROADCASTS = 100


@pytest.mark.both_loops
async def test_200_members_receive_100_broadcasts_once_in_order() -> None:
    """Each member sees seq 1..100 exactly once and in order, from two interleaved senders."""
    async with running_node() as node:
        members = [await picows_client(node, f"user{i}") for i in range(MEMBERS)]
        try:
            for m in members:
                m.send_json({"type": "join_room", "payload": {"room": "big"}})
            for m in members:
                while (msg := await m.next())["type"] != "room_joined":
                    pass
            # Drain the user_joined notices each member got for those who joined after it.
            await asyncio.sleep(0)
            senders = members[:2]
            for i in range(BROADCASTS):
                senders[i % 2].send_json(
                    {"type": "chat_message", "payload": {"room": "big", "message": f"m{i}"}}
                )
            for m in members:
                seen: list[int] = []
                texts: list[str] = []
                while len(seen) < BROADCASTS:
                    msg = await m.next(timeout=10)
                    if msg["type"] == "chat_message":
                        seen.append(msg["seq"])
                        texts.append(msg["message"])
                assert seen == list(range(1, BROADCASTS + 1))
                assert sorted(texts) == sorted(f"m{i}" for i in range(BROADCASTS))
                # Each sender's own messages keep their order.
                for parity in (0, 1):
                    mine = [int(t[1:]) for t in texts if int(t[1:]) % 2 == parity]
                    assert mine == sorted(mine)
            for m in members:
                while not m.queue.empty():
                    extra = m.queue.get_nowait()
                    assert extra["type"] != "chat_message", f"duplicate delivery {extra}"
            assert node.hub.deliveries >= MEMBERS * BROADCASTS
        finally:
            for m in members:
                assert m.transport is not None
                m.transport.disconnect()
