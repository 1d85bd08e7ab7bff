"""A real redis-server on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from fastws.broker.resp import Pipe, parse_url
from fastws.server import Node

from .utils import TIMEOUT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server`` without persistence; ``stop()`` kills it, ``start()`` brings it back."""

    def __init__(self, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="fastws-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--protected-mode",
                "no",
                "--logfile",
                f"{self.dir}/redis.log",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up (maybe with a password)
                        return self
            except OSError:
                time.sleep(0.02)
        try:
            with open(f"{self.dir}/redis.log") as fh:
                tail = fh.read()[-800:]
        except OSError:
            tail = ""
        raise RuntimeError(f"redis-server did not start on port {self.port}: {tail}")

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing until ``resume()``."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot die of SIGKILL late
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def free_cluster_port() -> int:
    """A free port whose cluster-bus twin (port + 10000) is free and valid too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterServers:
    """Three cluster-enabled ``redis-server`` primaries joined with ``redis-cli --cluster``."""

    def __init__(self) -> None:
        self.nodes = [RedisServer(free_cluster_port()) for _ in range(3)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"{node.dir}/nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]
            node.start()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # Every node must agree, or the first commands may meet CLUSTERDOWN.
            infos = [
                subprocess.run(
                    ["redis-cli", "-p", str(n.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for n in self.nodes
            ]
            if all("cluster_state:ok" in info for info in infos):
                return self
            time.sleep(0.05)
        raise RuntimeError("redis cluster did not become ready")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@contextlib.asynccontextmanager
async def redis_node(url: str, name: str, **overrides: Any) -> AsyncIterator[Node]:
    """One in-loop node on ``url`` (tests/nodes.py's factory), its dead peers swept after 1 s."""
    from .nodes import Backend

    async with Backend("redis", url).nodes(1, [name], broker_timeout=0.5, **overrides) as nodes:
        yield nodes[0]


@contextlib.asynccontextmanager
async def redis_pipe(url: str, timeout: float = TIMEOUT) -> AsyncIterator[Pipe]:
    """A plain command connection to ``url`` for tests to look at what Redis holds."""
    pipe = Pipe(parse_url(url), timeout=timeout)
    await pipe.connect()
    try:
        yield pipe
    finally:
        pipe.close()
