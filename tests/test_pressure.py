"""Backpressure from the broker: while its queue is full the node reads no client at all."""

from __future__ import annotations

from .utils import client, expect_silence, join, recv_json, running_node, send_json


async def test_clients_are_not_read_while_the_broker_is_full_and_lose_nothing() -> None:
    """pressure(True) stops reading every client, those connected before and after; with
    pressure(False) what they sent meanwhile takes effect, in order."""
    async with running_node(rate_limit=0) as node, client(node, "alice") as a:
        await join(a, "r")
        node.pressure(True)
        async with client(node, "bob") as b:  # connected while paused: paused too
            await send_json(a, "chat_message", {"room": "r", "message": "one"})
            await send_json(a, "chat_message", {"room": "r", "message": "two"})
            await send_json(b, "join_room", {"room": "r"})
            await expect_silence(a, 0.3)
            await expect_silence(b, 0.1)
            assert node.counters["broker_pauses"] == 1
            node.pressure(False)
            got = [(await recv_json(a))["message"] for _ in range(2)]
            assert got == ["one", "two"]
            assert (await recv_json(b))["type"] == "room_joined"
        assert node.counters["broker_resumes"] == 1


async def test_repeated_pressure_signals_change_nothing() -> None:
    """The same signal twice is one pause (brokers may repeat themselves)."""
    async with running_node() as node:
        node.pressure(True)
        node.pressure(True)
        node.pressure(False)
        node.pressure(False)
        assert (node.counters["broker_pauses"], node.counters["broker_resumes"]) == (1, 1)
