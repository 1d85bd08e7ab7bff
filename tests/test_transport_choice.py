"""The ``transport`` setting picks the socket layer under picows, and both carry the same
traffic: a broadcast to picows clients in order, and the `websockets` peer's chat."""

from __future__ import annotations

import asyncio

import pytest

from .utils import client, join, picows_client, recv_json, running_node, send_json

LAYERS = {"uvloop": "uvloop", "aiofastnet": "aiofastnet"}  # setting -> module of the transport


@pytest.mark.parametrize("transport", list(LAYERS))
async def test_each_transport_is_the_one_used_and_carries_a_broadcast(transport: str) -> None:
    """Each setting really selects its layer; 20 members get 100 messages each, in order."""
    async with running_node(transport=transport, rate_limit=0) as node, \
            client(node, "alice") as alice:
        members = [await picows_client(node, f"m{i}") for i in range(20)]
        try:
            for m in members:
                m.send_json({"type": "join_room", "payload": {"room": "r"}})
                assert (await m.next())["type"] == "room_joined"
            underlying = {type(s.transport.underlying_transport).__module__
                          for s in node.sessions.values()}
            assert underlying and all(u.startswith(LAYERS[transport]) for u in underlying), \
                underlying
            await join(alice, "r")
            for i in range(100):
                await send_json(alice, "chat_message", {"room": "r", "message": str(i)})
            for m in members:
                got: list[str] = []
                while len(got) < 100:
                    msg = await m.next()
                    if msg["type"] == "chat_message":
                        got.append(msg["message"])
                assert got == [str(i) for i in range(100)]
            echoes = [await recv_json(alice) for _ in range(100)]
            assert [e["seq"] for e in echoes] == list(range(1, 101))
        finally:
            for m in members:
                m.transport.disconnect()
            await asyncio.sleep(0)
