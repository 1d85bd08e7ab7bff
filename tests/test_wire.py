"""fastws' own WebSocket layer (``_wire``, ``upgrade``): buffers only while a frame is
incomplete, the HTTP answers at the door, and a failing handler closes only its connection."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from typing import Any

import pytest

from fastws.session import Session
from fastws.upgrade import BadRequest, accept_key, parse_head

from .rawws import OP_TEXT, RawWS, build_frame, raw_connect
from .utils import TIMEOUT, client, join, recv_json, running_node, send_json, token


async def http_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; the status, headers (lower-case names) and body until close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        raw = await asyncio.wait_for(reader.read(), TIMEOUT)  # the server closes after it
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def upgrade_request(port: int, **changes: str) -> bytes:
    fields = {
        "Host": f"127.0.0.1:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **changes,
    }
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"GET /ws?token={token('alice')} HTTP/1.1\r\n{head}\r\n".encode("latin-1")


def wire_of(node: Any, client_id: str) -> Any:
    return node.sessions[client_id].transport


async def test_an_idle_connection_holds_a_buffer_only_while_a_frame_is_incomplete() -> None:
    """After its handshake a connection holds no read buffer; half a frame is kept in one of
    its own, and once the frame completes (and is handled) the buffer is freed again."""
    async with running_node() as node, client(node, "bob") as bob:
        ws = await raw_connect(node.port, token("alice"))
        try:
            (session,) = [s for s in node.sessions.values() if s.principal.user_id == "alice"]
            wire = session.transport
            assert (wire.pending_bytes, wire.buffer_capacity) == (0, 0)
            await join(bob, "lobby")
            frame = build_frame(
                OP_TEXT, json.dumps({"type": "join_room", "payload": {"room": "lobby"}}).encode()
            )
            await ws.send_raw(frame[:9])
            async with asyncio.timeout(TIMEOUT):
                while wire.pending_bytes != 9:
                    await asyncio.sleep(0.01)
            assert wire.buffer_capacity >= len(frame)  # sized for the whole frame at once
            await ws.send_raw(frame[9:])
            assert json.loads(await ws.read_text())["type"] == "room_joined"
            assert (wire.pending_bytes, wire.buffer_capacity) == (0, 0)
        finally:
            ws.abort()


async def test_a_request_head_in_pieces_is_kept_until_it_is_whole() -> None:
    """An upgrade request written a few bytes at a time still upgrades (101)."""
    async with running_node() as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        try:
            request = upgrade_request(node.port)
            for i in range(0, len(request), 7):
                writer.write(request[i : i + 7])
                await writer.drain()
                await asyncio.sleep(0)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            assert head.startswith(b"HTTP/1.1 101 ")
        finally:
            writer.transport.abort()


async def test_firefox_connection_token_list_upgrades() -> None:
    """``Connection: keep-alive, Upgrade`` (Firefox) is a token list that names upgrade."""
    async with running_node() as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        try:
            writer.write(upgrade_request(node.port, Connection="keep-alive, Upgrade"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            assert head.startswith(b"HTTP/1.1 101 ")
        finally:
            writer.transport.abort()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"Sec-WebSocket-Version": "8"}, b"unsupported WebSocket version"),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, b"invalid Sec-WebSocket-Key"),
        ({"Connection": "keep-alive"}, b"no Connection: upgrade"),
    ],
    ids=["version-8", "short-key", "no-upgrade-token"],
)
async def test_a_bad_handshake_is_400_with_its_reason(
    changes: dict[str, str], reason: bytes
) -> None:
    async with running_node() as node:
        status, headers, body = await http_exchange(
            node.port, upgrade_request(node.port, **changes)
        )
        assert (status, body) == (400, reason + b"\n")
        assert headers["connection"] == "close" and node.stats()["sessions"] == 0


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        (
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            405,
            b"method not allowed\n",
        ),
        (b"GET /healthz\r\nHost: x\r\n\r\n", 400, b"malformed request line\n"),
        (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400, b"malformed header line\n"),
        (b"GET /healthz SPDY/3\r\nHost: x\r\n\r\n", 400, b"not HTTP/1.x\n"),
    ],
    ids=["post", "no-version", "bad-header", "not-http"],
)
async def test_requests_the_router_refuses(request_bytes: bytes, status: int, body: bytes) -> None:
    async with running_node() as node:
        got_status, headers, got_body = await http_exchange(node.port, request_bytes)
        assert (got_status, got_body) == (status, body)
        if status == 405:
            assert headers["allow"] == "GET"


async def test_http_10_health_check_is_answered() -> None:
    async with running_node() as node:
        status, headers, body = await http_exchange(node.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert headers["content-length"] == str(len(body))


async def test_a_failing_handler_closes_its_connection_with_1011_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server bug in one message's handling: that connection is closed with 1011 (and the
    failure counted); the node and every other client go on."""
    async with running_node() as node, client(node, "bob") as bob:
        await join(bob, "lobby")
        ws: RawWS = await raw_connect(node.port, token("alice"))
        try:
            (session,) = [s for s in node.sessions.values() if s.principal.user_id == "alice"]

            handle = Session.handle

            def broken_for_alice(self: Session, data: Any) -> None:
                if self is session:
                    raise RuntimeError("a bug")
                handle(self, data)

            monkeypatch.setattr(Session, "handle", broken_for_alice)
            await ws.send_text(b'{"type":"ping"}')
            assert await ws.expect_close() == 1011
            await ws.expect_eof()
        finally:
            ws.abort()
        assert node.stats()["handler_failures"] == 1
        await send_json(bob, "chat_message", {"room": "lobby", "message": "still here"})
        got = await recv_json(bob)
        while got["type"] != "chat_message":
            got = await recv_json(bob)
        assert got["message"] == "still here"


def test_parse_head_and_the_rfc_accept_key() -> None:
    """RFC 6455 section 1.3's own example key gives its accept value."""
    head = (
        b"GET /chat?x=1 HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Protocol: a\r\nsec-websocket-protocol: b\r\n"
        b"Sec-WebSocket-Version: 13"
    )
    request = parse_head(head)
    assert (request.method, request.path) == ("GET", "/chat?x=1")
    assert request.headers.getall("Sec-WebSocket-Protocol") == ["a", "b"]
    assert accept_key(request) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    expected = base64.b64encode(
        hashlib.sha1(b"dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    ).decode()
    assert accept_key(request) == expected
    with pytest.raises(BadRequest):
        accept_key(parse_head(head.replace(b"GET", b"PUT")))
