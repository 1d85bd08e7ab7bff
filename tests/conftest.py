from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping

import pytest
import uvloop


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
