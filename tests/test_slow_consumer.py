"""A client that stops reading is cut off at max_send_buffer_bytes; the others lose nothing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

from fastws.server import Node

from .utils import TIMEOUT, Collector, picows_client, running_node, token

ROOM = "busy"
TEXT = "x" * 900
BATCH = 50
MAX_MESSAGES = 2000
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class RawClient:
    """A WebSocket client on a bare non-blocking socket: it reads only when told to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.loop = asyncio.get_running_loop()

    async def _fill(self) -> None:
        chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), TIMEOUT)
        assert chunk, "server closed the connection"
        self.buf += chunk

    async def handshake(self, port: int, user: str) -> None:
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET /ws?token={token(user)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await asyncio.wait_for(self.loop.sock_sendall(self.sock, request.encode()), TIMEOUT)
        while b"\r\n\r\n" not in self.buf:
            await self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        assert head.startswith(b"HTTP/1.1 101"), head
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        assert b"Sec-WebSocket-Accept: " + accept in head, head

    async def recv_json(self) -> dict[str, Any]:
        """One unfragmented, unmasked text frame from the server, parsed."""
        while True:
            if len(self.buf) >= 2:
                assert self.buf[0] == 0x81 and not self.buf[1] & 0x80, self.buf[:2]
                size, start = self.buf[1] & 0x7F, 2
                assert size < 127
                if size == 126:
                    start = 4
                    size = struct.unpack("!H", self.buf[2:4])[0] if len(self.buf) >= 4 else 0
                if len(self.buf) >= start and start + size <= len(self.buf):
                    payload = bytes(self.buf[start : start + size])
                    del self.buf[: start + size]
                    return json.loads(payload)  # type: ignore[no-any-return]
            await self._fill()

    async def send_json(self, msg: dict[str, Any]) -> None:
        payload = json.dumps(msg).encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frame = bytes([0x81, 0x80 | len(payload)]) + mask + masked
        await asyncio.wait_for(self.loop.sock_sendall(self.sock, frame), TIMEOUT)


@contextlib.asynccontextmanager
async def raw_client(node: Node, user: str, rcvbuf: int = 4096) -> AsyncIterator[RawClient]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", node.port)), TIMEOUT)
        raw = RawClient(sock)
        await raw.handshake(node.port, user)
        yield raw
    finally:
        sock.close()


async def chats(c: Collector, n: int, others: list[dict[str, Any]]) -> list[int]:
    """The seqs of the next ``n`` chat messages on ``c``; anything else goes to ``others``."""
    seqs: list[int] = []
    while len(seqs) < n:
        msg = await c.next()
        if msg["type"] == "chat_message":
            assert msg["message"] == TEXT
            seqs.append(msg["seq"])
        else:
            others.append(msg)
    return seqs


async def wait_until(predicate: Any, timeout: float = TIMEOUT) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def test_slow_consumer_is_cut_off_and_healthy_members_get_everything() -> None:
    """A never-reading member is flagged once, closed, removed; others get all messages in order."""
    async with running_node(max_send_buffer_bytes=65536, close_timeout=0.5, rate_limit=0) as node:
        healthy = [await picows_client(node, f"h{i}") for i in range(3)]
        others: dict[int, list[dict[str, Any]]] = {i: [] for i in range(3)}
        try:
            for i, c in enumerate(healthy):
                c.send_json({"type": "join_room", "payload": {"room": ROOM}})
                assert (await c.next())["type"] == "room_joined"
                for j in range(i):  # earlier members hear of this one
                    assert (await healthy[j].next())["type"] == "user_joined"
            async with raw_client(node, "slow") as slow:
                hello = await slow.recv_json()
                assert hello["type"] == "connected"
                slow_id = hello["clientId"]
                await slow.send_json({"type": "join_room", "payload": {"room": ROOM}})
                while (await slow.recv_json())["type"] != "room_joined":
                    pass
                for c in healthy:
                    assert (await c.next())["type"] == "user_joined"
                session = node.sessions[slow_id]
                # Loopback autotunes the server's kernel send buffer up to tcp_wmem's max
                # (MBs), which would swallow thousands of messages before any byte waits in
                # user space; pin it small so the test is bounded by the 64 KiB limit.
                server_sock = session.transport.transport.get_extra_info("socket")
                server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                # From here on the slow client never reads again.
                before = node.stats()
                seen: list[list[int]] = [[], [], []]
                sent = 0
                flagged_at: dict[str, Any] | None = None
                while sent < MAX_MESSAGES:
                    for _ in range(BATCH):
                        healthy[0].send_json(
                            {"type": "chat_message", "payload": {"room": ROOM, "message": TEXT}}
                        )
                    sent += BATCH
                    for i, c in enumerate(healthy):
                        seen[i] += await chats(c, BATCH, others[i])
                    if node.stats().get("slow_consumers"):
                        flagged_at = node.stats()
                        break
                assert flagged_at is not None, f"not flagged after {sent} messages"
                assert flagged_at["slow_consumers"] == 1
                assert session.transport.is_close_frame_sent
                # Nothing more is written to the flagged transport: deliveries grow by
                # exactly the healthy members per message, and its buffer does not grow.
                buffered = session.transport.transport.get_write_buffer_size()
                assert buffered <= 65536 + 2 * 1024  # the limit + one frame + the close frame
                slow_deliveries = flagged_at["deliveries"] - before["deliveries"] - 3 * sent
                # Frames queued for it before the cut (the last turn's may be dropped unsent).
                assert 0 < slow_deliveries <= sent
                if slow_id in node.sessions:
                    for _ in range(BATCH):
                        healthy[0].send_json(
                            {"type": "chat_message", "payload": {"room": ROOM, "message": TEXT}}
                        )
                    sent += BATCH
                    for i, c in enumerate(healthy):
                        seen[i] += await chats(c, BATCH, others[i])
                    if slow_id in node.sessions:
                        now = session.transport.transport.get_write_buffer_size()
                        assert now <= buffered
                # Dropped after close_timeout even though it never answers the close.
                await wait_until(lambda: slow_id not in node.sessions, 0.5 + 2.0)
                assert session.transport.is_disconnected
                for i, c in enumerate(healthy):
                    c.send_json({"type": "ping", "id": "end"})  # a barrier: all that came before
                    while (msg := await c.next())["type"] != "pong":
                        others[i].append(msg)
                    left = [m for m in others[i] if m["type"] == "user_left"]
                    assert len(left) == 1 and left[0]["username"] == "slow", left
                    assert left[0]["members"] == 3
                stats = node.stats()
                # user_left went to the 3 healthy members only.
                assert stats["deliveries"] == before["deliveries"] + 3 * sent + slow_deliveries + 3
                assert stats["slow_consumers"] == 1
                assert stats["sessions"] == 3 and stats["memberships"] == 3
            for i in range(3):
                assert seen[i] == list(range(1, sent + 1)), f"client {i} lost or reordered"
        finally:
            for c in healthy:
                assert c.transport is not None
                c.transport.disconnect()
                await asyncio.wait_for(c.transport.wait_disconnected(), TIMEOUT)


async def test_typing_to_a_congested_member_is_conflated_and_never_closes_it() -> None:
    """A member that stops reading while another types a storm: its pending typing notices
    shrink to the latest per typist instead of filling its buffer, it is not closed (4008),
    and once it reads again it gets every chat and the typist's last state."""
    typed = 3000  # ~110 bytes each: five times max_send_buffer_bytes
    async with running_node(max_send_buffer_bytes=65536, close_timeout=0.5, rate_limit=0) as node:
        alice = await picows_client(node, "alice")
        try:
            alice.send_json({"type": "join_room", "payload": {"room": ROOM}})
            assert (await alice.next())["type"] == "room_joined"
            async with raw_client(node, "slow") as slow:
                hello = await slow.recv_json()
                await slow.send_json({"type": "join_room", "payload": {"room": ROOM}})
                while (await slow.recv_json())["type"] != "room_joined":
                    pass
                assert (await alice.next())["type"] == "user_joined"
                session = node.sessions[hello["clientId"]]
                server_sock = session.transport.transport.get_extra_info("socket")
                server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                for i in range(typed):
                    alice.send_json(
                        {
                            "type": "typing",
                            "payload": {"room": ROOM, "isTyping": i % 2 == 0 or i == typed - 2},
                        }
                    )
                    if i % 100 == 99:
                        alice.send_json({"type": "ping", "id": str(i)})  # paced: let it read
                        while (await alice.next()).get("id") != str(i):
                            pass
                outbox = node.hub.outbox
                assert outbox.conflated > 0
                assert node.stats().get("slow_consumers", 0) == 0
                assert hello["clientId"] in node.sessions
                alice.send_json(
                    {"type": "chat_message", "payload": {"room": ROOM, "message": "end"}}
                )
                typing: list[bool] = []
                got_end = False
                loop = asyncio.get_running_loop()
                quiet_until = loop.time() + TIMEOUT
                while not got_end or loop.time() < quiet_until:
                    try:
                        msg = await asyncio.wait_for(slow.recv_json(), 0.3)
                    except asyncio.TimeoutError:
                        if got_end:
                            break
                        continue
                    if msg["type"] == "typing":
                        typing.append(msg["isTyping"])
                    elif msg["type"] == "chat_message":
                        assert msg["message"] == "end"
                        got_end, quiet_until = True, loop.time() + 0.5
                assert got_end
                assert 0 < len(typing) < typed
                assert typing[-1] is False  # the typist's last state
                assert node.stats().get("slow_consumers", 0) == 0
        finally:
            assert alice.transport is not None
            alice.transport.disconnect()
