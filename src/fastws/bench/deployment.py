"""The server side of a run as a deployment of several processes, all pinned to
``--server-cpus`` and all counted in the server's CPU seconds and memory:

    one       one fastws process (the in-process broker)
    workers2  ``fastws serve --workers 2``: a supervisor (the local bus) and two workers
    redis     one fastws process on a redis-server started here
    redis2    two fastws processes (two nodes) on one redis-server started here

The redis-server is the harness's own: no persistence, a free loopback port, stopped after the
run. A deployment can restart one node (the reconnect storm): a process is stopped and started
again on the same port; under --workers a worker is killed and the supervisor restarts it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from .targets import BenchError, LocalServer, Target, descendants

DEPLOYMENTS = ("one", "workers2", "redis", "redis2")
_REDIS_START_TIMEOUT = 10.0


def parse_deployments(text: str) -> list[str]:
    """``"one,redis"`` -> ``["one", "redis"]``; ``"all"`` -> every deployment."""
    names = list(DEPLOYMENTS) if text == "all" else [n.strip() for n in text.split(",") if n]
    unknown = [n for n in names if n not in DEPLOYMENTS]
    if unknown or not names:
        raise BenchError(
            f"unknown deployment {', '.join(unknown) or text!r}: "
            f"choose from {', '.join(DEPLOYMENTS)} or all"
        )
    return list(dict.fromkeys(names))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A throw-away redis-server on 127.0.0.1: no RDB, no AOF, pinned like the server."""

    def __init__(self, cpus: str) -> None:
        self.cpus = cpus if cpus and shutil.which("taskset") else ""
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("redis-server not found on PATH (needed by the redis deployments)")
        for _ in range(3):  # a free port can be taken between the probe and the bind
            self.port = _free_port()
            cmd = [*(["taskset", "-c", self.cpus] if self.cpus else []), exe,
                   "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
                   "--maxclients", "10000"]  # fmt: skip
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            if self._wait_ready():
                return
            self.stop()
        raise BenchError("redis-server did not start (3 attempts)")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + _REDIS_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return True
            time.sleep(0.05)
        return False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Deployment:
    """The processes of one deployment mode and the :class:`Target` the generator aims at.
    ``target.urls`` lists the nodes (round robin over them), ``target.pids`` every process."""

    def __init__(
        self, kind: str, mode: str, secret: str, cpus: str, extra: list[str],
        baselines: str | None,
    ) -> None:  # fmt: skip
        self.kind = kind  # fastws, or a baseline (which only runs as "one")
        self.mode = mode
        self.redis = RedisServer(cpus) if mode.startswith("redis") else None
        self.secret, self.cpus, self.extra, self.baselines = secret, cpus, extra, baselines
        self.nodes: list[LocalServer] = []
        self.target: Target | None = None

    def start(self) -> Target:
        extra = list(self.extra)
        if self.redis is not None:
            self.redis.start()
            extra += [f"--redis={self.redis.url}"]
        if self.mode == "workers2":
            extra += ["--workers", "2"]
        count = 2 if self.mode == "redis2" else 1
        targets = []
        for _ in range(count):
            node = LocalServer(self.kind, self.secret, self.cpus, extra, self.baselines)
            self.nodes.append(node)
            targets.append(node.start())
        first = targets[0]
        first.urls = [t.url for t in targets]
        first.deployment = self.mode if self.kind == "fastws" else None
        self.target = first
        self._refresh()
        return first

    def _refresh(self) -> None:
        """Point the target at the processes running now (after a restart)."""
        assert self.target is not None
        pids = [n.pid for n in self.nodes if n.pid is not None]
        if self.redis is not None and self.redis.pid is not None:
            pids.append(self.redis.pid)
        self.target.pids = pids
        self.target.pid = pids[0] if pids else None
        self.target.processes = {
            "fastws": [n.pid for n in self.nodes],
            "redis-server": self.redis.pid if self.redis is not None else None,
            "redis_url": self.redis.url if self.redis is not None else None,
        }

    def restart_node(self, index: int = 0) -> dict[str, Any]:
        """Restart node ``index`` and return what happened, with ``time.time_ns()`` instants:
        ``down`` (the signal was sent) and ``up`` (the node listens again)."""
        node = self.nodes[index]
        if self.mode == "workers2":
            return self._kill_worker(node)
        old = node.pid
        down = time.time_ns()
        node.restart()
        up = time.time_ns()
        self._refresh()
        return {"how": "SIGTERM, then started again on the same port", "down": down, "up": up,
                "old_pid": old, "new_pid": node.pid}  # fmt: skip

    def _kill_worker(self, supervisor: LocalServer) -> dict[str, Any]:
        assert supervisor.pid is not None
        workers = descendants(supervisor.pid)[1:]
        if not workers:
            raise BenchError("--workers 2: no worker process found under the supervisor")
        victim = workers[0]
        down = time.time_ns()
        os.kill(victim, signal.SIGKILL)
        up = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the supervisor's replacement is listening
            alive = [p for p in descendants(supervisor.pid)[1:] if p != victim]
            if len(alive) >= len(workers) and _listens(alive):
                up = time.time_ns()
                break
            time.sleep(0.02)
        return {"how": "SIGKILL of one worker, restarted by the supervisor", "down": down,
                "up": up, "old_pid": victim, "new_pid": None}  # fmt: skip

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.redis is not None:
            self.redis.stop()


def _listens(pids: list[int]) -> bool:
    """Every one of ``pids`` holds a listening TCP socket (a worker that has started)."""
    listening = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(path) as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A":  # TCP_LISTEN
                    listening.add(cols[9])  # inode
    for pid in pids:
        inodes = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
        if not inodes & listening:
            return False
    return True


@contextlib.contextmanager
def deployed(
    kind: str, mode: str, secret: str, cpus: str, extra: list[str], baselines: str | None
) -> Iterator[tuple[Deployment, Target]]:
    """Start ``kind`` as the deployment ``mode``; stop every one of its processes after."""
    deployment = Deployment(kind, mode, secret, cpus, extra, baselines)
    try:
        yield deployment, deployment.start()
    finally:
        deployment.stop()
