from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import pytest
import uvloop

from .nodes import BROKERS, Backend


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_loops: run on uvloop and on the stdlib asyncio loop")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """uvloop (fastws' production loop) everywhere; the stdlib loop too where marked."""
    if item.get_closest_marker("both_loops"):
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def redis_server() -> Iterator[object]:
    """A real redis-server on a free loopback port, for the multi-node tests."""
    from .redisutil import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_cluster() -> Iterator[object]:
    """Three cluster-enabled redis-server primaries on loopback, joined into one cluster."""
    from .redisutil import RedisClusterServers

    cluster = RedisClusterServers().start()
    try:
        yield cluster
    finally:
        cluster.close()


# ---- every broker: the conformance and fault suites run each test on each --------------------


@pytest.fixture(scope="module", params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, Any]]:
    """(kind, url, server): the redis-server or cluster is started once per module and kind
    (server is its RedisServer or RedisClusterServers; None for the others)."""
    kind = request.param
    if kind == "redis":
        from .redisutil import RedisServer

        server: Any = RedisServer().start()
    elif kind == "redis-cluster":
        from .redisutil import RedisClusterServers

        server = RedisClusterServers().start()
    else:
        yield kind, "", None
        return
    try:
        yield kind, server.url, server
    finally:
        server.close()


@pytest.fixture
async def backend(broker_kind: tuple[str, str, Any]) -> AsyncIterator[Backend]:
    kind, url, server = broker_kind
    backend = await Backend(kind, url, server).start()
    try:
        yield backend
    finally:
        await backend.close()
