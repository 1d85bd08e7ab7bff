"""Workers forked from one warm process, so N workers share one copy of the interpreter.

``Zygote.start`` forks a process that imports the worker's modules once, freezes them out of the
garbage collector (so no collection writes to their pages), and then forks a worker on each
request. Each worker starts with those pages shared copy-on-write instead of loading its own
interpreter and libraries.

A worker is forked twice (zygote, then a short-lived middle process that exits at once), so it
is re-parented to the supervisor, which has marked itself a child subreaper: the supervisor is
the worker's real parent. It waits for the worker's exit through a pidfd and signals it through
the same pidfd, so a reused pid can never be hit.

The zygote must be started before any event loop or thread exists in the supervisor: a fork
copies only the calling thread, and a loop's descriptors (epoll, its signal wake-up socket)
must not be shared with a process that never runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_MAX_REQUEST = 1 << 20


def supported() -> bool:
    """Forking needs Linux: child subreapers, pidfds, and prctl."""
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open")


def _prctl(option: int, value: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def preload_worker_modules() -> None:
    """What every worker imports before it listens; the metrics module is left out because
    prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is imported, and each worker
    sets that variable only when it starts."""
    import jwt  # noqa: F401
    import picows  # noqa: F401
    import uvloop  # noqa: F401

    from . import broker, gateway, heartbeat, protocol, server, transport, upgrade  # noqa: F401
    from .broker import localbus, memory  # noqa: F401


class ForkedWorker:
    """A forked worker, seen by the supervisor the way an ``asyncio.subprocess.Process`` is:
    ``pid``, ``stdout``, ``returncode``, ``wait()``, ``send_signal()``, ``kill()``."""

    def __init__(self, pid: int, stdout: asyncio.StreamReader) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        _, status = os.waitpid(self.pid, 0)
        os.close(self._pidfd)
        self.returncode = os.waitstatus_to_exitcode(status)  # -N when killed by signal N
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The supervisor's end of the fork server."""

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self._channel = channel
        self._lock = asyncio.Lock()

    @classmethod
    def start(
        cls,
        run_worker: Callable[[dict[str, Any]], int],
        preload: Callable[[], None] = preload_worker_modules,
    ) -> Zygote:
        """Fork the zygote. Call before any event loop or thread exists in this process.
        A worker runs ``run_worker(options)`` with the options and environment of its
        ``spawn`` and exits with what it returns."""
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        # Import here, before the fork, so the supervisor shares these pages too; collect
        # once, then freeze: a collection after the fork would write to every object it
        # visits and so copy the pages it was meant to share.
        preload()
        gc.collect()
        gc.freeze()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the zygote's children would print the supervisor's buffer too
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            _zygote_main(theirs, supervisor, run_worker)  # never returns
        theirs.close()
        return cls(pid, ours)

    async def spawn(self, options: dict[str, Any], env: dict[str, str]) -> ForkedWorker:
        """Fork a worker that runs with ``options`` in ``env``; its stdout is a pipe."""
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        request = json.dumps({"options": options, "env": env}).encode()
        async with self._lock:  # one request in flight: the reply is the next datagram
            try:
                # A fork takes a millisecond or two: a blocking exchange on the channel is fine.
                socket.send_fds(self._channel, [request], [write_end])
                reply = json.loads(self._channel.recv(_MAX_REQUEST))
            finally:
                os.close(write_end)
        if "error" in reply:
            os.close(read_end)
            raise OSError(f"the zygote could not fork a worker: {reply['error']}")
        stdout = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(read_end, "rb", 0)
        )
        return ForkedWorker(int(reply["pid"]), stdout)

    def close(self) -> None:
        """End the zygote (it exits when its channel closes) and reap it."""
        self._channel.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _zygote_main(
    channel: socket.socket, supervisor: int, run_worker: Callable[[dict[str, Any]], int]
) -> None:  # pragma: no cover - runs in the forked zygote; covered through the workers it forks
    code = 0
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the supervisor, even by SIGKILL
        if os.getppid() != supervisor:
            os._exit(0)
        # Ctrl-C reaches the whole process group: the supervisor drains the workers and then
        # closes the channel, which is what ends the zygote.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(channel, _MAX_REQUEST, 1)
            except OSError:
                break
            if not msg:
                break  # the supervisor closed the channel
            _fork_worker(channel, supervisor, run_worker, json.loads(msg), fds)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _fork_worker(
    channel: socket.socket,
    supervisor: int,
    run_worker: Callable[[dict[str, Any]], int],
    request: dict[str, Any],
    fds: list[int],
) -> None:  # pragma: no cover - runs in the zygote
    try:
        middle = os.fork()
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        channel.send(json.dumps({"error": str(exc)}).encode())
        return
    if middle == 0:
        try:
            middle = os.getpid()
            worker = os.fork()
            if worker == 0:
                _worker_main(channel, (supervisor, middle), run_worker, request, fds[0])
            channel.send(json.dumps({"pid": worker}).encode())
        except BaseException as exc:
            with contextlib.suppress(OSError):
                channel.send(json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(0)  # the worker is orphaned now, and re-parented to the supervisor
    for fd in fds:
        os.close(fd)
    os.waitpid(middle, 0)


def _worker_main(
    channel: socket.socket,
    parents: tuple[int, int],
    run_worker: Callable[[dict[str, Any]], int],
    request: dict[str, Any],
    stdout_fd: int,
) -> None:  # pragma: no cover - runs in the worker; its behaviour is tested through serve
    code = 1
    supervisor, middle = parents
    try:
        channel.close()
        os.dup2(stdout_fd, 1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # as a fresh process would: 0, 1, 2 only
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request["env"])
        # The worker's death signal is tied to its parent: wait until the middle process is
        # gone and the supervisor has adopted this process.
        while os.getppid() == middle:
            time.sleep(0.0005)
        if os.getppid() != supervisor:
            os._exit(1)  # the supervisor died meanwhile
        code = run_worker(request["options"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
