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
from collections.abc import AsyncIterator
from typing import Any

from fastws.broker.types import Broker
from fastws.config import load_settings
from fastws.server import Node, history_policy

from .utils import SECRET, TIMEOUT

BROKERS = ("memory", "localbus", "redis", "redis-cluster")
DRAIN = 2.0
_names = itertools.count(1)


class Backend:
    """What the nodes of one deployment share; ``kind`` is one of ``BROKERS``."""

    def __init__(self, kind: str, url: str = "") -> None:
        self.kind = kind
        self.url = url  # redis kinds: the server (or a cluster node) the caller started
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

    async def close(self) -> None:
        if self._bus is not None:
            await asyncio.wait_for(self._bus.close(), TIMEOUT)
            shutil.rmtree(self._bus_dir, ignore_errors=True)

    def _settings(self, **overrides: Any) -> Any:
        base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "jwt_secret": SECRET,
                                "drain_timeout": DRAIN}
        if self.kind.startswith("redis"):
            base.update(redis_url=self.url, redis_cluster=self.kind == "redis-cluster")
        return load_settings({**base, **overrides}, environ={})

    def broker(self, settings: Any, timeout: float = 1.0) -> Broker:
        """A new node's broker on this backend; a dead Redis peer is swept after 1 s."""
        policy = history_policy(settings)
        if self.kind.startswith("redis"):
            from fastws.broker.redis import RedisBroker

            return RedisBroker(self.url, timeout=timeout, node_ttl=1, policy=policy,
                               cluster=self.kind == "redis-cluster")
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
