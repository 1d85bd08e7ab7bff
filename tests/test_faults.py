"""Faults of a real deployment, run on every broker the fault applies to (the conformance
suite's fixtures: in-process, local bus, Redis, Redis Cluster).

Each test injects one fault into a running deployment of real nodes and real clients, then
runs one convergence check (``converged``): presence equals the live connections on every
node, and a chat from every member reaches every member exactly once. Where it applies, the
deployment is then emptied and every table must be empty (``tables_empty``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import urllib.request
from collections import Counter
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage

from fastws.broker.localbus import LocalBusBroker
from fastws.broker.memory import MemoryBroker
from fastws.broker.redis import RedisBroker
from fastws.server import Node

from .nodes import Backend, alice_and_bob, enter, next_of, presence_seen, room_name, settle
from .utils import TIMEOUT, client, expect_silence, recv_json, send_json, server_process, ws_url

Members = list[tuple[ClientConnection, str]]  # (client, its user)


async def converged(nodes: list[Node], members: Members, room: str) -> None:
    """Presence on every member's node is exactly the live users (within TIMEOUT), then one
    chat from each member reaches every member exactly once, in one order."""
    users = sorted({user for _, user in members})
    async with asyncio.timeout(TIMEOUT * 2):
        for ws, _ in members:
            while await presence_seen(ws, room) != users:
                await asyncio.sleep(0.05)
    await settle(nodes)
    for i, (ws, user) in enumerate(members):
        await send_json(ws, "chat_message", {"room": room, "message": f"after {i} {user}"})
    orders = []
    for ws, _ in members:
        got = [(await next_of(ws, "chat_message"))["message"] for _ in members]
        assert Counter(got) == Counter(f"after {i} {u}" for i, (_, u) in enumerate(members))
        orders.append(got)
    assert all(order == orders[0] for order in orders)  # one seq order for every member
    for ws, _ in members:
        await expect_silence(ws, 0.05)


def tables_empty(backend: Backend, nodes: list[Node]) -> None:
    """Nothing is left of connections, rooms and subscriptions once everyone has left."""
    for node in {id(n): n for n in nodes}.values():
        stats = node.stats()
        assert (stats["sessions"], stats["rooms"], stats["memberships"]) == (0, 0, 0), stats
        broker: Any = node.broker
        if isinstance(broker, MemoryBroker):
            assert not [r for r in broker.ledger.rooms.values() if r.members]
            assert broker.ledger.bytes <= broker.ledger.max_bytes
        elif isinstance(broker, LocalBusBroker):
            assert not (
                broker._subscribed
                or broker._members
                or broker._leases
                or broker._acquiring
                or broker._fifo
            )
        elif isinstance(broker, RedisBroker):
            assert not (
                broker._rooms
                or any(broker._members.values())
                or broker._sessions
                or broker._joining
                or broker._leaving
            )
    if backend.kind == "localbus":
        bus = backend.bus
        assert not (bus._subscribers or bus._leases or bus._waiters or bus._revoked)
        assert not [r for r in bus.ledger.rooms.values() if r.members]
        assert bus.ledger.bytes <= bus.ledger.max_bytes


async def emptied(backend: Backend, nodes: list[Node]) -> None:
    """``tables_empty``, once the leaves of the clients just closed have landed."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        try:
            return tables_empty(backend, nodes)
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise  # what is left, not a bare timeout
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def two_members(backend: Backend, room: str) -> Any:
    """``alice_and_bob``, with alice past bob's user_joined, as (client, user) pairs."""
    async with alice_and_bob(backend, room) as (nodes, a, b):
        await next_of(a, "user_joined")
        yield nodes, [(a, "alice"), (b, "bob")]


# ---- garbage from the broker ------------------------------------------------------------------

GARBAGE = (b"no newlines", b"x\nnot-a-seq\n{}", b"x\n1\nnot json", b"\xff\n0\n{}", b"")


async def test_garbage_from_the_broker_reaches_no_client(backend: Backend) -> None:
    """Malformed publications on the room's Redis channel, or a rogue peer writing garbage
    to the local bus: dropped and counted, nothing reaches a client, delivery goes on."""
    if backend.kind == "memory":
        pytest.skip("the in-process broker reads nothing from outside")
    room = room_name("garbage")
    async with two_members(backend, room) as (nodes, members):
        if backend.kind == "localbus":
            reader, writer = await asyncio.open_unix_connection(backend.bus.path)
            writer.write(b"\x00\x00\x00\x05hello" + b"\xff" * 64)  # a frame that is no msgpack
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # cut off
            writer.close()
        else:
            broker: Any = nodes[0].broker
            channel = b"fastws:{" + room.encode() + b"}"
            command = b"SPUBLISH" if backend.kind == "redis-cluster" else b"PUBLISH"
            for garbage in GARBAGE:
                await broker._call(channel, command, channel, garbage)
        await settle(nodes)
        for ws, _ in members:
            await expect_silence(ws, 0.1)  # not even an empty frame
        if backend.kind != "localbus":
            assert sum(n.broker.health()["dropped"] for n in nodes) == 2 * len(GARBAGE)
        assert all(n.health()["status"] == "ok" for n in nodes)
        await converged(nodes, members, room)
    await emptied(backend, nodes)


# ---- a client churning rooms ---------------------------------------------------------------------


async def test_a_client_churning_rooms_leaves_nothing_behind(backend: Backend) -> None:
    """One client joins a new room, posts and leaves, 40 times, while alice and bob sit in
    another: they see nothing of it, and once everyone is gone every table is empty."""
    room = room_name("stay")
    async with two_members(backend, room) as (nodes, members):
        async with client(nodes[0], "carol") as carol:
            for r in range(40):
                churned = room_name(f"churn{r}")
                await enter(carol, churned, nodes)
                for i in range(3):
                    await send_json(carol, "chat_message", {"room": churned, "message": f"{i}"})
                for _ in range(3):
                    await next_of(carol, "chat_message")
                await send_json(carol, "leave_room", {"room": churned}, id=f"l{r}")
                await next_of(carol, "room_left")
        for ws, _ in members:
            await expect_silence(ws, 0.05)
        await converged(nodes, members, room)
    await emptied(backend, nodes)


# ---- the broker goes away --------------------------------------------------------------------


async def test_the_broker_restarted_converges(backend: Backend) -> None:
    """Redis killed and started again (its data gone), or the local bus server replaced:
    nodes keep their clients, then re-state their members and subscriptions by themselves."""
    if backend.kind in ("memory", "redis-cluster"):
        pytest.skip("nothing to restart in-process; a cluster's restart is its failover")
    room = room_name("restart")
    async with two_members(backend, room) as (nodes, members):
        if backend.kind == "localbus":
            await backend.restart_bus()
        else:
            backend.server.stop()
            await asyncio.sleep(0.2)
            backend.server.start()
        await converged(nodes, members, room)
    await emptied(backend, nodes)


async def test_the_broker_paused_past_the_client_timeout_converges(backend: Backend) -> None:
    """Redis stopped (SIGSTOP) for longer than the nodes' timeout: they go degraded, answer
    ``unavailable`` meanwhile, and once it runs again everything converges."""
    if backend.kind != "redis":
        pytest.skip("a pause of the server the nodes share: Redis")
    room = room_name("pause")
    async with two_members(backend, room) as (nodes, members):
        backend.server.pause()
        try:
            async with asyncio.timeout(TIMEOUT):
                while any(n.health()["status"] == "ok" for n in nodes):
                    await asyncio.sleep(0.05)
        finally:
            backend.server.resume()
        async with asyncio.timeout(TIMEOUT * 2):
            while any(n.health()["status"] != "ok" for n in nodes):
                await asyncio.sleep(0.05)
        await converged(nodes, members, room)


# ---- a node or a worker goes away --------------------------------------------------------------


async def test_a_node_paused_past_its_ttl_converges(backend: Backend) -> None:
    """A node process stopped (SIGSTOP) until the others sweep it, then resumed: its member
    comes back into presence everywhere and chat flows (tests/test_presence_converges.py
    has the notices the room sees)."""
    if not backend.kind.startswith("redis"):
        pytest.skip("node liveness and sweeping are Redis'")
    room = room_name("paused")
    cluster = ["--redis-cluster"] if backend.kind == "redis-cluster" else []
    with server_process("--redis", backend.url, "--redis-node-ttl", "1", *cluster) as (proc, port):
        async with (
            backend.nodes(1) as nodes,
            client(port, "alice") as a,
            client(nodes[0], "bob") as b,
        ):
            await enter(a, room, [])
            await enter(b, room, nodes)
            proc.send_signal(signal.SIGSTOP)
            try:
                await next_of(b, "user_left", skip=("user_joined",))  # swept
            finally:
                proc.send_signal(signal.SIGCONT)
            await converged(nodes, [(a, "alice"), (b, "bob")], room)


async def test_a_worker_killed_holding_leases_loses_nothing() -> None:
    """``fastws serve --workers 2``: the rooms of one worker's clients live on it alone (it
    holds their leases). SIGKILL it: its clients reconnect to whichever worker answers and
    recover with ``since``, every chat there, none twice; then the room converges."""
    with server_process("--workers", "2") as (_proc, port):
        clients = []
        for i in range(8):
            ws = await connect(ws_url(port, f"u{i}"), open_timeout=TIMEOUT, close_timeout=1)
            clients.append((ws, f"u{i}", (await recv_json(ws))["node"]))
        try:
            victim_node = clients[0][2]
            mine = [(ws, user) for ws, user, node in clients if node == victim_node]
            last: dict[str, tuple[int, str]] = {}
            for ws, user in mine:  # one room per client: each leased to the victim
                room = f"solo-{user}"
                await enter(ws, room, [])
                for i in range(20):
                    await send_json(ws, "chat_message", {"room": room, "message": f"{i}"})
                for _ in range(20):
                    msg = await next_of(ws, "chat_message")
                last[user] = (msg["seq"], msg["epoch"])
            health = await asyncio.to_thread(_health_of_node, port, victim_node)
            os.kill(health["pid"], signal.SIGKILL)
            for ws, user in mine:
                with contextlib.suppress(Exception):
                    await ws.wait_closed()
                seq, epoch = last[user]
                async with await reconnect(port, user) as again:
                    await send_json(
                        again,
                        "join_room",
                        {"room": f"solo-{user}", "since": {"seq": seq, "epoch": epoch}},
                    )
                    joined = await next_of(again, "room_joined")
                    assert (joined["seq"], joined["epoch"], joined["recovered"]) == (
                        20,
                        epoch,
                        True,
                    )
                    await expect_silence(again, 0.05)  # nothing replayed: nothing was missed
                    await converged([], [(again, user)], f"solo-{user}")
        finally:
            for ws, _, _ in clients:
                await ws.close()


async def reconnect(port: int, user: str) -> ClientConnection:
    """A new connection, retried as a real client would: one that lands in the dead worker's
    accept queue just before the kernel drops it is reset."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                ws = await connect(ws_url(port, user), open_timeout=TIMEOUT)
                await recv_json(ws)  # connected
                return ws
            except (OSError, InvalidMessage, ConnectionClosed):
                await asyncio.sleep(0.05)


def _health_of_node(port: int, node: str, tries: int = 400) -> dict[str, Any]:
    """/healthz of the worker named ``node`` (each fresh connection lands on either)."""
    for _ in range(tries):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT) as r:
            health: dict[str, Any] = json.loads(r.read())
        if health["node"] == node:
            return health
    raise AssertionError(f"no worker answered as {node}")
