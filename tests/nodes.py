"""One node factory for every multi-node test: N real in-loop nodes sharing one broker backend.

``Backend`` is the shared part of a deployment: nothing, a local bus server (started here), or
a redis-server or Redis Cluster (started by the caller, see redisutil). ``backend.nodes(n)``
starts ``n`` nodes on it, each on its own loopback port, and drains them on exit. The
in-process broker cannot span nodes, so its "n nodes" are one node listed ``n`` times: a test
that puts client i on ``nodes[i % n]`` runs unchanged on every broker, and the suite proves
the same contract for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.client import ClientConnection

from fastws.broker.types import Broker
from fastws.config import load_settings
from fastws.server import Node, history_policy

from .utils import SECRET, TIMEOUT, client, recv_json, send_json

BROKERS = ("memory", "localbus", "redis", "redis-cluster")
DRAIN = 2.0
_names = itertools.count(1)


class Backend:
    """What the nodes of one deployment share; ``kind`` is one of ``BROKERS``."""

    def __init__(self, kind: str, url: str = "", server: Any = None) -> None:
        self.kind = kind
        self.url = url  # redis kinds: the server (or a cluster node) the caller started
        self.server = server  # its RedisServer / RedisClusterServers, for the fault suite
        self._bus: Any = None  # BusServer
        self._bus_dir = ""

    @property
    def spans_nodes(self) -> bool:
        return self.kind != "memory"

    async def start(self) -> Backend:
        if self.kind == "localbus":
            await self._start_bus()
        return self

    async def _start_bus(self) -> None:
        from fastws.broker.bus import BusServer

        self._bus_dir = tempfile.mkdtemp(prefix="fastws-", dir="/tmp")
        self._bus = BusServer(self._bus_dir, history_policy(self._settings()))
        await self._bus.start()

    async def restart_bus(self) -> None:
        """The local bus server goes away and a new one starts on the same socket (what a
        restarted supervisor does): the workers reconnect and re-state their members."""
        from fastws.broker.bus import BusServer

        await asyncio.wait_for(self._bus.close(), TIMEOUT)
        self._bus = BusServer(self._bus_dir, history_policy(self._settings()))
        await self._bus.start()

    @property
    def bus(self) -> Any:
        return self._bus

    async def close(self) -> None:
        if self._bus is not None:
            await asyncio.wait_for(self._bus.close(), TIMEOUT)
            shutil.rmtree(self._bus_dir, ignore_errors=True)

    def _settings(self, **overrides: Any) -> Any:
        base: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "jwt_secret": SECRET,
            "drain_timeout": DRAIN,
            "presence_grace": 0,
        }
        if self.kind.startswith("redis"):
            base.update(redis_url=self.url, redis_cluster=self.kind == "redis-cluster")
        return load_settings({**base, **overrides}, environ={})

    def broker(self, settings: Any, timeout: float = 1.0) -> Broker:
        """A new node's broker on this backend; a dead Redis peer is swept after 1 s."""
        policy = history_policy(settings)
        if self.kind.startswith("redis"):
            from fastws.broker.redis import RedisBroker

            return RedisBroker(
                self.url,
                timeout=timeout,
                node_ttl=1,
                policy=policy,
                cluster=self.kind == "redis-cluster",
            )
        if self.kind == "localbus":
            from fastws.broker.localbus import LocalBusBroker

            return LocalBusBroker(self._bus.path, timeout=timeout * 2)
        from fastws.broker.memory import MemoryBroker

        return MemoryBroker(policy)

    @contextlib.asynccontextmanager
    async def nodes(
        self,
        count: int = 2,
        names: list[str] | None = None,
        broker_timeout: float = 1.0,
        **overrides: Any,
    ) -> AsyncIterator[list[Node]]:
        """``count`` started nodes (one node ``count`` times for the in-process broker), with
        node ids ``names`` if given; ``overrides`` are settings."""
        started: list[Node] = []
        try:
            for i in range(count if self.spans_nodes else 1):
                settings = self._settings(**overrides)
                name = names[i] if names else f"{self.kind}-n{next(_names)}"
                node = Node(settings, SECRET, self.broker(settings, broker_timeout), node_id=name)
                await node.start()
                started.append(node)
            yield [started[i % len(started)] for i in range(count)]
        finally:
            for node in started:
                await asyncio.wait_for(node.drain(), TIMEOUT + DRAIN)


# ---- what the suites over every broker share -------------------------------------------------


def room_name(tag: str) -> str:
    """A room no other test uses (the Redis servers are shared by a module's tests)."""
    return f"{tag}-{uuid.uuid4().hex[:8]}"


async def settle(nodes: list[Node]) -> None:
    """Every publication made so far has reached every node (the broker's barrier)."""
    for node in {id(n): n for n in nodes}.values():
        await asyncio.wait_for(node.broker.flush(), TIMEOUT)


NOTICES = ("user_joined", "user_left", "typing")


async def next_of(
    ws: ClientConnection, type_: str, skip: tuple[str, ...] = NOTICES
) -> dict[str, Any]:
    """The next message of ``type_``, skipping ``skip``; anything else fails the test."""
    while True:
        msg = await recv_json(ws)
        if msg["type"] == type_:
            return msg
        assert msg["type"] in skip, msg


async def chats(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [await next_of(ws, "chat_message") for _ in range(count)]


async def enter(ws: ClientConnection, room: str, nodes: list[Node], **payload: Any) -> dict:
    await send_json(ws, "join_room", {"room": room, **payload})
    reply = await next_of(ws, "room_joined")
    await settle(nodes)
    return reply


async def presence_seen(ws: ClientConnection, room: str) -> list[str] | None:
    """The room's users as the client's node sees them; None while it answers an error."""
    await send_json(ws, "presence", {"room": room}, id="seen")
    while True:
        msg = await recv_json(ws)
        if msg.get("id") == "seen":
            return (
                sorted(m["userId"] for m in msg["members"]) if msg["type"] == "presence" else None
            )
        assert msg["type"] in ("user_joined", "user_left", "typing", "chat_message"), msg


@contextlib.asynccontextmanager
async def alice_and_bob(
    backend: Backend, room: str
) -> AsyncIterator[tuple[list[Node], ClientConnection, ClientConnection]]:
    """Two nodes, alice on the first and bob on the second, both members of ``room``."""
    async with (
        backend.nodes(2) as nodes,
        client(nodes[0], "alice") as a,
        client(nodes[1], "bob") as b,
    ):
        await enter(a, room, nodes)
        await enter(b, room, nodes)
        yield nodes, a, b
