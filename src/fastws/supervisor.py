"""``fastws serve --workers N``: N worker processes on one port (SO_REUSEPORT) under a supervisor.

The supervisor owns the local bus (seq and presence for the host) unless Redis is configured,
restarts a worker that dies (with backoff, and tells the bus to forget the dead worker's
connections), and on SIGTERM/SIGINT drains every worker with 1001 and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import Settings

if TYPE_CHECKING:
    from .prefork import ForkedWorker, Zygote

log = logging.getLogger("fastws.supervisor")

ENV_BUS = "FASTWS_INTERNAL_BUS"  # set for workers: the bus directory
ENV_NODE = "FASTWS_INTERNAL_NODE_ID"
ENV_WORKER = "FASTWS_INTERNAL_WORKER"


def die_with_parent() -> None:
    """A worker gets SIGTERM when its supervisor dies, even by SIGKILL (Linux prctl), so no
    orphan keeps serving on the shared port."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so port 0 becomes one concrete port every worker can share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Worker:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.generation = 0
        self.proc: asyncio.subprocess.Process | ForkedWorker | None = None
        self.node_id = ""
        self.started_at = 0.0
        self.failures = 0


class Supervisor:
    def __init__(
        self, settings: Settings, secret: str, count: int, zygote: Zygote | None = None
    ) -> None:
        self.settings = settings
        self.zygote = zygote  # forks the workers; None: each is a fresh interpreter
        self.secret = secret
        self.count = count
        self.workers = [Worker(i) for i in range(count)]
        self.stopping = False
        self.restarts = 0
        self.port = settings.port
        self.admin_port = settings.admin_port
        self._metrics_dir: str | None = None  # PROMETHEUS_MULTIPROC_DIR of the workers
        self.bus: Any = None  # BusServer when there is no Redis
        self._bus_dir: str | None = None
        self._ready: asyncio.Queue[Worker] = asyncio.Queue()
        self._host = socket.gethostname()

    async def run(self, on_ready: Callable[[int], None] | None = None) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        holder = reserve_port(self.settings.host, self.settings.port)
        self.port = holder.getsockname()[1]
        admin_holder = None
        if self.admin_port >= 0:
            # Workers share the admin port too; /metrics reads every worker's values from here.
            admin_holder = reserve_port(self.settings.admin_host, self.admin_port)
            self.admin_port = admin_holder.getsockname()[1]
            self._metrics_dir = tempfile.mkdtemp(prefix="fastws-metrics-")
        if not self.settings.redis_url:
            from .broker.bus import BusServer

            self._bus_dir = tempfile.mkdtemp(prefix="fastws-", dir="/tmp")
            from .server import history_policy

            self.bus = BusServer(self._bus_dir, history_policy(self.settings))
            await self.bus.start()
        watchers = [loop.create_task(self._watch(w)) for w in self.workers]
        try:
            for _ in self.workers:
                await asyncio.wait_for(self._ready.get(), 30)
            log.info(
                "workers ready",
                extra={
                    "event": "ready",
                    "workers": self.count,
                    "port": self.port,
                    "admin_port": self.admin_port,
                },
            )
            if on_ready is not None:
                on_ready(self.port)
            await stop.wait()
        finally:
            self.stopping = True
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self._stop_all()
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            if self.bus is not None:
                await self.bus.close()
            if self._bus_dir:
                with contextlib.suppress(OSError):
                    for name in os.listdir(self._bus_dir):
                        os.unlink(os.path.join(self._bus_dir, name))
                    os.rmdir(self._bus_dir)
            holder.close()
            if admin_holder is not None:
                admin_holder.close()
            if self._metrics_dir:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        return 0

    async def _spawn(self, w: Worker) -> None:
        w.generation += 1
        w.node_id = f"{self._host}:w{w.slot}:{w.generation}:{secrets.token_hex(2)}"
        env = dict(os.environ)
        env.update(
            {
                "FASTWS_JWT_SECRET": self.secret,
                ENV_NODE: w.node_id,
                ENV_WORKER: str(w.slot),
            }
        )
        if self._bus_dir:
            env[ENV_BUS] = self._bus_dir
        if self._metrics_dir:
            from .config import env_name
            from .metrics import MULTIPROC_ENV

            env.update(
                {MULTIPROC_ENV: self._metrics_dir, env_name("admin_port"): str(self.admin_port)}
            )
        # Only these come as flags; every other setting reaches the worker in its environment.
        options = {"workers": 1, "port": self.port, "host": self.settings.host}
        if self.zygote is not None:
            w.proc = await self.zygote.spawn(options, env)
        else:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fastws",
                "serve",
                *(f"--{name}={value}" for name, value in options.items()),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.DEVNULL,
            )
        w.started_at = time.monotonic()

    async def _watch(self, w: Worker) -> None:
        """Keep one worker slot filled: start, wait for it to die, back off, restart."""
        while not self.stopping:
            await self._spawn(w)
            assert w.proc is not None and w.proc.stdout is not None
            line = await w.proc.stdout.readline()
            if b"listening on" in line:
                self._ready.put_nowait(w)
                log.info(
                    "worker started",
                    extra={
                        "event": "worker_started",
                        "slot": w.slot,
                        "pid": w.proc.pid,
                        "node": w.node_id,
                    },
                )
            rc = await w.proc.wait()
            if self.stopping:
                return
            self.restarts += 1
            if self.bus is not None:
                self.bus.forget_node(w.node_id)
            if self._metrics_dir:
                from .metrics import mark_process_dead

                mark_process_dead(w.proc.pid, self._metrics_dir)
            ran = time.monotonic() - w.started_at
            w.failures = 0 if ran > 30 else w.failures + 1
            delay = min(0.2 * 2**w.failures, 30.0) if w.failures else 0.0
            log.error(
                "worker exited; restarting",
                extra={
                    "event": "worker_died",
                    "slot": w.slot,
                    "pid": w.proc.pid,
                    "code": rc,
                    "restart_in": round(delay, 2),
                },
            )
            await asyncio.sleep(delay)

    async def _stop_all(self) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = self.settings.drain_timeout + 5
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), deadline)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
