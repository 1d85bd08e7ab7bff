"""Shared test helpers: a real fastws node on 127.0.0.1:0, and real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import picows
from websockets.asyncio.client import ClientConnection, connect

from fastws.auth import mint
from fastws.config import load_settings
from fastws.server import Node

SECRET = "test-secret-that-is-long-enough-for-hs256!"
TIMEOUT = 5.0


def token(user: str = "alice", **kw: Any) -> str:
    return mint(SECRET, user, **kw)


@contextlib.asynccontextmanager
async def running_node(**overrides: Any) -> AsyncIterator[Node]:
    """A real node in this event loop on a free loopback port; drained on exit."""
    # No presence grace unless a test asks: most tests watch user_left follow a close.
    settings = load_settings(
        {"host": "127.0.0.1", "port": 0, "jwt_secret": SECRET, "presence_grace": 0, **overrides},
        environ={},
    )
    node = Node(settings, SECRET)
    await node.start()
    try:
        yield node
    finally:
        await asyncio.wait_for(node.drain(), TIMEOUT + settings.drain_timeout)


def ws_url(node_or_port: Node | int, user: str | None = "alice", **kw: Any) -> str:
    port = node_or_port if isinstance(node_or_port, int) else node_or_port.port
    base = f"ws://127.0.0.1:{port}/ws"
    return f"{base}?token={token(user, **kw)}" if user else base


@contextlib.asynccontextmanager
async def client(node: Node | int, user: str = "alice") -> AsyncIterator[ClientConnection]:
    """A `websockets` client (the independent peer), past its `connected` message."""
    async with connect(ws_url(node, user), open_timeout=TIMEOUT, close_timeout=1) as ws:
        hello = await recv_json(ws)
        assert hello["type"] == "connected", hello
        yield ws


async def recv_json(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    return json.loads(raw)  # type: ignore[no-any-return]


async def send_json(ws: ClientConnection, type_: str, payload: Any = None, **extra: Any) -> None:
    msg: dict[str, Any] = {"type": type_, **extra}
    if payload is not None:
        msg["payload"] = payload
    await ws.send(json.dumps(msg))


async def join(ws: ClientConnection, room: str) -> dict[str, Any]:
    await send_json(ws, "join_room", {"room": room})
    reply = await recv_json(ws)
    assert reply["type"] == "room_joined", reply
    return reply


async def join_across_nodes(ws: ClientConnection, room: str) -> dict[str, Any]:
    """join_room when the room spans nodes: a user_joined of someone who joined just before
    may still be in flight and land before our room_joined; skip those."""
    await send_json(ws, "join_room", {"room": room})
    while True:
        reply = await recv_json(ws)
        if reply["type"] == "room_joined":
            return reply
        assert reply["type"] == "user_joined" and reply["room"] == room, reply


async def expect_silence(ws: ClientConnection, seconds: float = 0.2) -> None:
    """Nothing arrives on ``ws`` for ``seconds`` (used only to prove a non-delivery)."""
    with contextlib.suppress(asyncio.TimeoutError):
        msg = await asyncio.wait_for(ws.recv(), seconds)
        raise AssertionError(f"unexpected message: {msg!r}")


class Collector(picows.WSListener):  # type: ignore[misc]
    """A picows client listener that queues every text message as parsed JSON."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.transport: picows.WSTransport | None = None
        self.close_code: int | None = None

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.TEXT:
            self.queue.put_nowait(json.loads(frame.get_payload_as_bytes()))
        elif frame.msg_type == picows.WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def send_json(self, msg: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.send(picows.WSMsgType.TEXT, json.dumps(msg).encode())

    async def next(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def close_picows(*clients: Collector) -> None:
    """Disconnect picows clients and wait until each is fully gone."""
    for c in clients:
        assert c.transport is not None
        c.transport.disconnect()
    for c in clients:
        assert c.transport is not None
        await asyncio.wait_for(c.transport.wait_disconnected(), TIMEOUT)


async def picows_client(node: Node | int, user: str = "alice", **kw: Any) -> Collector:
    """A picows client past its `connected` message; close with ``.transport.disconnect()``."""
    _, listener = await picows.ws_connect(Collector, ws_url(node, user), **kw)
    hello = await listener.next()
    assert hello["type"] == "connected", hello
    return listener  # type: ignore[no-any-return]


@contextlib.contextmanager
def server_process(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``fastws serve`` as a subprocess on a free port; killed on exit if still running."""
    cmd = [sys.executable, "-m", "fastws", "serve", "--port", "0", "--jwt-secret", SECRET, *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        line = _readline(proc, TIMEOUT * 2)
        match = re.search(r"listening on http://[\d.]+:(\d+)", line)
        assert match, f"no listening line: {line!r}"
        yield proc, int(match.group(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise TimeoutError("server did not start")
    return proc.stdout.readline()
