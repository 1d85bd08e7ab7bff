"""Departures leave nothing behind: sessions, transports, rooms, memberships, tasks, timers."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from fastws.server import Node

from .utils import TIMEOUT, Collector, close_picows, picows_client, running_node

ROOMS = [f"r{j}" for j in range(5)]
EMPTY = {"sessions": 0, "transports": 0, "rooms": 0, "memberships": 0}


def rooms_of(i: int) -> list[str]:
    """Client ``i``'s rooms: a non-empty subset of ROOMS, different for neighbours."""
    bits = i % 31 + 1
    return [room for j, room in enumerate(ROOMS) if bits >> j & 1]


async def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` in this task (no helper task that all_tasks() would count)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise asyncio.TimeoutError
        await asyncio.sleep(0.01)


def table_sizes(node: Node) -> dict[str, int]:
    return {k: v for k, v in node.stats().items() if k in EMPTY}


async def wait_empty(node: Node) -> None:
    try:
        await wait_until(lambda: table_sizes(node) == EMPTY)
    except asyncio.TimeoutError:
        raise AssertionError(f"node tables not empty: {node.stats()}") from None


async def join(c: Collector, room: str) -> dict[str, Any]:
    """Join ``room``, skipping (and returning nothing of) other traffic queued before the reply."""
    c.send_json({"type": "join_room", "payload": {"room": room}, "id": room})
    while True:
        msg = await c.next()
        if msg["type"] == "room_joined" and msg.get("id") == room:
            return msg


async def drain(c: Collector) -> list[dict[str, Any]]:
    """Everything the server sent ``c`` so far: a ping/pong round trip marks the end."""
    c.send_json({"type": "ping", "id": "barrier"})
    got: list[dict[str, Any]] = []
    while (msg := await c.next())["type"] != "pong":
        got.append(msg)
    assert msg["id"] == "barrier"
    return got


async def close_all(clients: list[Collector]) -> None:
    await close_picows(*clients)


async def test_aborted_clients_are_announced_once_and_every_table_empties() -> None:
    """50 clients in 5 rooms; half abort: one user_left each per shared room; then all empty."""
    async with running_node() as node:
        clients = [await picows_client(node, f"u{i}") for i in range(50)]
        try:
            for i, c in enumerate(clients):
                for room in rooms_of(i):
                    await join(c, room)
            members = Counter(room for i in range(50) for room in rooms_of(i))
            assert node.stats()["memberships"] == sum(members.values())
            assert node.stats()["rooms"] == 5
            for c in clients:
                await drain(c)  # the user_joined backlog
            gone = set(range(0, 50, 2))
            for i in gone:
                transport = clients[i].transport
                assert transport is not None
                transport.disconnect(False)  # abort: RST, no close frame
            await wait_until(lambda: node.stats()["sessions"] == 25)
            for i, c in enumerate(clients):
                if i in gone:
                    continue
                left = Counter(
                    (m["room"], m["userId"]) for m in await drain(c) if m["type"] == "user_left"
                )
                expected = Counter(
                    (room, f"u{k}") for k in gone for room in set(rooms_of(k)) & set(rooms_of(i))
                )
                assert left == expected, f"client {i}"
            assert node.stats()["memberships"] == sum(
                len(rooms_of(i)) for i in range(50) if i not in gone
            )
        finally:
            await close_all(clients)
        await wait_empty(node)


@pytest.mark.both_loops
async def test_no_task_or_timer_outlives_its_connection() -> None:
    """After 20 clients connect, join and close, tasks and pending timers are back to baseline."""
    loop = asyncio.get_running_loop()

    def timers() -> int:  # only the stdlib loop exposes its timer heap
        return sum(not h.cancelled() for h in getattr(loop, "_scheduled", []))

    async with running_node(close_timeout=2.0) as node:  # heartbeat on: one timer for all
        await asyncio.sleep(0)
        tasks, pending = len(asyncio.all_tasks()), timers()
        clients = [await picows_client(node, f"u{i}") for i in range(20)]
        try:
            # The client side's picows objects make no tasks; the server makes none per
            # connection (the heartbeat is one task for the node).
            assert len(asyncio.all_tasks()) == tasks
            for i, c in enumerate(clients):
                await join(c, f"room{i % 3}")
            outlets = [s.outlet for s in node.sessions.values()]
            # Half are closed by the server (arming its close_timeout abort timer), half by
            # the client; the timer must be cancelled when the peer completes the close.
            closing = [s.outlet for s in list(node.sessions.values())[:10]]
            for outlet in closing:
                outlet.close(1000, "bye")
            assert all(o._abort_handle is not None for o in closing)  # type: ignore[attr-defined]
            if hasattr(loop, "_scheduled"):
                assert timers() >= pending + 10  # the 10 abort timers
        finally:
            await close_all(clients)
        await wait_empty(node)
        assert all(o._abort_handle is None for o in outlets)  # type: ignore[attr-defined]
        try:
            await wait_until(lambda: len(asyncio.all_tasks()) <= tasks and timers() <= pending)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"tasks {len(asyncio.all_tasks())} (baseline {tasks}), "
                f"timers {timers()} (baseline {pending})"
            ) from None


async def test_room_is_deleted_when_its_last_member_leaves_or_disconnects() -> None:
    """A room exists while it has members: leave_room and disconnect both drop the last one."""
    async with running_node() as node:
        a = await picows_client(node, "alice")
        b = await picows_client(node, "bob")
        try:
            await join(a, "by-leave")
            await join(b, "by-leave")
            await join(a, "by-disconnect")
            assert node.stats()["rooms"] == 2
            for c in (a, b):
                c.send_json({"type": "leave_room", "payload": {"room": "by-leave"}, "id": 1})
                await drain(c)
                if c is a:
                    assert "by-leave" in node.hub.rooms  # bob is still in it
            assert set(node.hub.rooms) == {"by-disconnect"}
            assert node.stats()["memberships"] == 1
            assert a.transport is not None
            a.transport.disconnect()
            await wait_until(lambda: node.stats()["sessions"] == 1)
            assert node.hub.rooms == {}
            assert node.stats()["rooms"] == 0 and node.stats()["memberships"] == 0
        finally:
            await close_all([a, b])
        await wait_empty(node)
