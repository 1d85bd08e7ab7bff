"""Malformed and unusual WebSocket traffic from a raw socket, against a real node.

Each test runs a misbehaving raw client next to a healthy `websockets` client (bob) joined to
a room, and proves two things: the bad traffic gets the right answer (an ``error`` reply, or
a close with the right code within 2 s), and the node keeps serving everyone else (bob
still receives a chat_message posted afterwards, and no session is left behind).
Close codes are asserted exactly where fastws decides them (transport.Connection); where
picows' frame parser decides, its close code or a TCP drop is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from fastws.server import Node

from .rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RSV1,
    RSV2,
    RSV3,
    RawWS,
    close_payload,
    raw_connect,
    raw_handshake,
)
from .utils import client, join, recv_json, running_node, send_json, token

PICOWS_DROP = (1002, None)  # picows' parser: close 1002, or the TCP connection just drops


def join_bytes(room: str, msg_id: Any = None) -> bytes:
    msg: dict[str, Any] = {"type": "join_room", "payload": {"room": room}}
    if msg_id is not None:
        msg["id"] = msg_id
    return json.dumps(msg, ensure_ascii=False).encode()


async def recv_raw_json(ws: RawWS) -> dict[str, Any]:
    return json.loads(await ws.read_text())  # type: ignore[no-any-return]


async def raw_join(ws: RawWS, room: str) -> None:
    await ws.send_text(join_bytes(room))
    reply = await recv_raw_json(ws)
    assert reply["type"] == "room_joined" and reply["room"] == room, reply


async def wait_sessions(node: Node, count: int, timeout: float = 2.0) -> None:
    """Poll until the node holds exactly ``count`` sessions (bounded)."""
    deadline = time.monotonic() + timeout
    while node.stats()["sessions"] != count:
        assert time.monotonic() < deadline, f"sessions stuck at {node.stats()}, want {count}"
        await asyncio.sleep(0.01)


async def assert_still_serving(node: Node, bob: ClientConnection) -> None:
    """A fresh client can connect and post; bob, waiting in lobby, receives the post."""
    async with client(node, "carol") as carol:
        await join(carol, "lobby")
        joined = await recv_json(bob)
        assert joined["type"] == "user_joined" and joined["username"] == "carol", joined
        await send_json(carol, "chat_message", {"room": "lobby", "message": "still alive?"})
        msg = await recv_json(bob)
        assert msg["type"] == "chat_message" and msg["username"] == "carol", msg
        assert msg["message"] == "still alive?"


@contextlib.asynccontextmanager
async def scene(**overrides: Any) -> AsyncIterator[tuple[Node, RawWS]]:
    """A node, bob in lobby, and a raw client (mallory); checks the aftermath on exit."""
    async with running_node(**overrides) as node:
        async with client(node, "bob") as bob:
            await join(bob, "lobby")
            async with await raw_connect(node.port, token("mallory")) as ws:
                yield node, ws
                await assert_still_serving(node, bob)
        await wait_sessions(node, 0)


async def expect_server_close(node: Node, ws: RawWS, codes: tuple[int | None, ...]) -> None:
    """Within 2 s: a close with one of ``codes`` (None: a TCP drop), then the TCP drop
    itself; the bad connection's session is gone (only bob's is left)."""
    code = await ws.expect_close(timeout=2.0)
    assert code in codes, f"close code {code}, expected one of {codes}"
    await ws.expect_eof(timeout=2.0)
    await wait_sessions(node, 1)


# ---- data the server refuses without closing ----------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 16, 1000, 4000])
async def test_binary_garbage_is_an_error_reply_and_the_connection_stays(size: int) -> None:
    """A binary frame of random bytes -> `error` with code invalid_format; still usable."""
    garbage = random.Random(size).randbytes(size)
    async with scene() as (node, ws):
        await ws.send_frame(OP_BINARY, garbage)
        reply = await recv_raw_json(ws)
        assert reply == {
            "type": "error",
            "error": "Invalid message format",
            "code": "invalid_format",
        }
        await raw_join(ws, "elsewhere")
        assert node.stats()["sessions"] == 2


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"chat_message","payload":' + "[" * 100_000,
        '{"type":"chat_message","payload":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"type":"join_room","payload":' + '{"a":' * 50_000,
        '{"type":"ping","extra":' + "[" * 100_000 + "]" * 100_000 + "}",
        "[" * 200_000,
    ],
    ids=["open-arrays", "closed-arrays", "objects", "unknown-field", "top-level"],
)
async def test_deeply_nested_json_is_an_error_reply(raw: str) -> None:
    """JSON nested 50k-200k levels deep -> `error` invalid_format, no crash; still usable."""
    async with scene(max_message_bytes=1 << 20) as (_node, ws):
        await ws.send_text(raw)
        reply = await recv_raw_json(ws)
        assert reply["type"] == "error" and reply["code"] == "invalid_format", reply
        await raw_join(ws, "deep")


# ---- invalid UTF-8 in text messages (fastws: 1007) -------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe",
        b"\xc0\xaf",  # overlong encoding of "/"
        b"\xed\xa0\x80",  # UTF-16 surrogate U+D800
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b'{"type":"ping","id":"\xe2\x82"}',  # truncated sequence inside valid JSON
        b'{"type":"ping"}\xe2\x82',  # truncated at the very end
    ],
    ids=["ff-fe", "overlong", "surrogate", "too-high", "truncated-inside", "truncated-end"],
)
async def test_text_frame_with_invalid_utf8_closes_1007(payload: bytes) -> None:
    """A text message that is not valid UTF-8 is closed with 1007 (RFC 6455 section 8.1)."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_TEXT, payload)
        await expect_server_close(node, ws, (1007,))


async def test_invalid_utf8_across_fragments_closes_1007() -> None:
    """A fragmented text message whose reassembly is not UTF-8 is closed with 1007."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_TEXT, b'{"type":"ping","id":"\xe2', fin=False)
        await ws.send_frame(OP_CONT, b'\x82"}')  # \xe2\x82 then '"': truncated sequence
        await expect_server_close(node, ws, (1007,))


# ---- sizes (1009) -----------------------------------------------------------------------------


async def test_single_frame_over_max_message_bytes_closes_1009() -> None:
    """One 10000-byte frame with max_message_bytes=4096 -> close 1009 (or a drop) within 2 s."""
    async with scene(max_message_bytes=4096) as (node, ws):
        await ws.send_frame(OP_TEXT, b"x" * 10_000)
        await expect_server_close(node, ws, (1009, None))


async def test_fragmented_message_over_max_message_bytes_closes_1009() -> None:
    """Three 2000-byte fragments (each under the frame limit) with a 4096 limit -> 1009."""
    async with scene(max_message_bytes=4096) as (node, ws):
        await ws.send_frame(OP_TEXT, b"[" + b" " * 1999, fin=False)
        await ws.send_frame(OP_CONT, b" " * 2000, fin=False)
        await ws.send_frame(OP_CONT, b" " * 1999 + b"]")
        await expect_server_close(node, ws, (1009,))


async def test_message_of_exactly_max_message_bytes_is_accepted() -> None:
    """A fragmented message of exactly max_message_bytes is reassembled and handled."""
    async with scene(max_message_bytes=4096) as (_node, ws):
        msg = join_bytes("exact")
        msg = msg[:-1] + b" " * (4096 - len(msg)) + b"}"
        assert len(msg) == 4096
        await ws.send_frame(OP_TEXT, msg[:2000], fin=False)
        await ws.send_frame(OP_CONT, msg[2000:])
        reply = await recv_raw_json(ws)
        assert reply["type"] == "room_joined" and reply["room"] == "exact", reply


@pytest.mark.parametrize(
    ("length_field", "codes"),
    [
        (bytes([0x80 | 127]) + struct.pack("!Q", 1 << 62), (1009, None)),  # 4 EiB declared
        (bytes([0x80 | 127]) + struct.pack("!Q", 1 << 63), PICOWS_DROP),  # MSB must be 0
        (bytes([0x80 | 126]) + struct.pack("!H", 5), PICOWS_DROP),  # not minimally encoded
        (bytes([0x80 | 127]) + struct.pack("!Q", 200), PICOWS_DROP),  # not minimally encoded
    ],
    ids=["huge", "msb-set", "short-in-16-bit", "short-in-64-bit"],
)
async def test_bogus_length_header_is_refused_before_any_payload(
    length_field: bytes, codes: tuple[int | None, ...]
) -> None:
    """A frame header alone with an absurd or non-minimal length -> closed within 2 s."""
    async with scene(max_message_bytes=4096) as (node, ws):
        await ws.send_raw(bytes([0x80 | OP_TEXT]) + length_field + b"\x00\x00\x00\x00")
        await expect_server_close(node, ws, codes)


# ---- fragmentation that is valid --------------------------------------------------------------


def split3(data: bytes, cuts: tuple[int, int]) -> list[bytes]:
    a, b = cuts
    return [data[:a], data[a:b], data[b:]]


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
async def test_fragmented_message_in_three_parts_is_handled(opcode: int) -> None:
    """A message in 3 fragments (start, continuation, final) is reassembled and handled."""
    async with scene() as (_node, ws):
        parts = split3(join_bytes("frag", msg_id="f1"), (5, 20))
        await ws.send_frame(opcode, parts[0], fin=False)
        await ws.send_frame(OP_CONT, parts[1], fin=False)
        await ws.send_frame(OP_CONT, parts[2], fin=True)
        reply = await recv_raw_json(ws)
        assert isinstance(reply.pop("epoch"), str)
        assert reply == {"type": "room_joined", "room": "frag", "members": 1, "seq": 0, "id": "f1"}


async def test_utf8_character_split_across_fragments_is_accepted() -> None:
    """A multi-byte UTF-8 character split between two fragments is accepted (8.1)."""
    async with scene() as (_node, ws):
        data = join_bytes("split", msg_id="é€😀")
        cut = data.index("€".encode()) + 1  # inside the 3-byte euro sign
        await ws.send_frame(OP_TEXT, data[:cut], fin=False)
        await ws.send_frame(OP_CONT, data[cut:])
        reply = await recv_raw_json(ws)
        assert reply["type"] == "room_joined" and reply["id"] == "é€😀", reply


async def test_ping_between_fragments_is_answered_and_the_message_completes() -> None:
    """A ping interleaved in a fragmented message gets its pong; the message still completes."""
    async with scene() as (_node, ws):
        parts = split3(join_bytes("mid"), (10, 25))
        await ws.send_frame(OP_TEXT, parts[0], fin=False)
        await ws.send_frame(OP_CONT, parts[1], fin=False)
        await ws.send_frame(OP_PING, b"mid-message")
        assert await ws.read_frame() == (OP_PONG, b"mid-message")
        await ws.send_frame(OP_CONT, parts[2])
        reply = await recv_raw_json(ws)
        assert reply["type"] == "room_joined" and reply["room"] == "mid", reply


@pytest.mark.parametrize("delay", [0.0, 0.001])
async def test_frame_sent_byte_by_byte_is_handled(delay: float) -> None:
    """A valid frame written one byte per TCP write is reassembled and handled."""
    async with scene() as (_node, ws):
        await ws.send_frame(OP_TEXT, join_bytes("slow"), byte_by_byte=True, delay=delay)
        reply = await recv_raw_json(ws)
        assert reply["type"] == "room_joined" and reply["room"] == "slow", reply


# ---- protocol errors fastws detects (exactly 1002) --------------------------------------------


@pytest.mark.parametrize(
    "rsv", [RSV1, RSV2, RSV3, RSV1 | RSV2 | RSV3], ids=["rsv1", "rsv2", "rsv3", "all"]
)
@pytest.mark.parametrize(
    "opcode",
    [
        OP_TEXT,
        OP_BINARY,
        OP_PONG,
        OP_PING,
    ],
    ids=["text", "binary", "pong", "ping"],
)
async def test_reserved_bits_close_1002(opcode: int, rsv: int) -> None:
    """Any frame with RSV1/RSV2/RSV3 set (no extension negotiated) -> close 1002."""
    async with scene() as (node, ws):
        payload = join_bytes("rsv") if opcode in (OP_TEXT, OP_BINARY) else b"p"
        await ws.send_frame(opcode, payload, rsv=rsv)
        await expect_server_close(node, ws, (1002,))


async def test_reserved_bits_on_a_continuation_close_1002() -> None:
    """RSV1 on the continuation of a fragmented message -> close 1002."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_TEXT, b'{"type":', fin=False)
        await ws.send_frame(OP_CONT, b'"ping"}', rsv=RSV1)
        await expect_server_close(node, ws, (1002,))


@pytest.mark.parametrize("fin", [True, False], ids=["final", "not-final"])
async def test_continuation_without_a_started_message_closes_1002(fin: bool) -> None:
    """A continuation frame with no fragmented message open -> close 1002."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_CONT, b'{"type":"ping"}', fin=fin)
        await expect_server_close(node, ws, (1002,))


async def test_continuation_after_a_completed_message_closes_1002() -> None:
    """Once a fragmented message is complete, a further continuation -> close 1002."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_TEXT, b'{"type":', fin=False)
        await ws.send_frame(OP_CONT, b'"ping"}')
        assert (await recv_raw_json(ws))["type"] == "pong"
        await ws.send_frame(OP_CONT, b'{"type":"ping"}')
        await expect_server_close(node, ws, (1002,))


@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("second_fin", [True, False], ids=["final", "not-final"])
async def test_new_data_frame_inside_a_fragmented_message_closes_1002(
    second: int, second_fin: bool
) -> None:
    """A new text/binary frame while a fragmented message is open -> close 1002."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_TEXT, b'{"type":', fin=False)
        await ws.send_frame(second, b'{"type":"ping"}', fin=second_fin)
        await expect_server_close(node, ws, (1002,))


# ---- protocol errors picows' parser detects (1002 or a drop) ----------------------------------


async def test_unmasked_client_frame_is_refused() -> None:
    """An unmasked client frame (RFC 6455 section 5.1) -> close 1002 or a drop within 2 s."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_TEXT, b'{"type":"ping"}', mask=False)
        await expect_server_close(node, ws, PICOWS_DROP)


@pytest.mark.parametrize("opcode", [0x3, 0x7, 0xB, 0xF])
async def test_unknown_opcode_is_refused(opcode: int) -> None:
    """A reserved opcode (3-7 data, B-F control) -> close 1002 or a drop within 2 s."""
    async with scene() as (node, ws):
        await ws.send_frame(opcode, b"??")
        await expect_server_close(node, ws, PICOWS_DROP)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE], ids=["ping", "pong", "close"])
async def test_control_frame_over_125_bytes_is_refused(opcode: int) -> None:
    """A control frame with a 126-byte payload (max is 125) -> close 1002 or a drop."""
    async with scene() as (node, ws):
        payload = close_payload(1000, b"r" * 124) if opcode == OP_CLOSE else b"p" * 126
        assert len(payload) == 126
        await ws.send_frame(opcode, payload)
        await expect_server_close(node, ws, PICOWS_DROP)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE], ids=["ping", "pong", "close"])
async def test_fragmented_control_frame_is_refused(opcode: int) -> None:
    """A control frame without FIN (control frames cannot be fragmented) -> 1002 or drop."""
    async with scene() as (node, ws):
        payload = close_payload(1000) if opcode == OP_CLOSE else b"frag"
        await ws.send_frame(opcode, payload, fin=False)
        await expect_server_close(node, ws, PICOWS_DROP)


@pytest.mark.parametrize(
    "code",
    [
        0,
        999,
        1004,
        1005,
        1006,
        1015,
        1016,
        2000,
        2999,
    ],
)
async def test_close_with_a_forbidden_code_is_refused(code: int) -> None:
    """A client close with a code that must not be sent (RFC 6455 7.4) -> 1002 or a drop."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_CLOSE, close_payload(code))
        await expect_server_close(node, ws, PICOWS_DROP)


# ---- control frames that are valid ------------------------------------------------------------


@pytest.mark.parametrize(
    "payload", [b"", b"hello", bytes(range(125))], ids=["empty", "short", "125-bytes"]
)
async def test_ping_is_answered_with_a_pong_carrying_the_same_payload(payload: bytes) -> None:
    """A ping frame gets a pong with the identical payload (RFC 6455 section 5.5.3)."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_PING, payload)
        assert await ws.read_frame() == (OP_PONG, payload)
        await ws.send_frame(OP_PONG, b"unsolicited")  # ignored (section 5.5.3)
        await raw_join(ws, "after-ping")
        assert node.stats()["sessions"] == 2


@pytest.mark.parametrize(
    ("payload", "echo"),
    [
        (close_payload(1000), 1000),
        (close_payload(1000, b"bye"), 1000),
        (close_payload(1001), 1001),
        (close_payload(3000), 3000),
        (close_payload(4999, "désolé".encode()), 4999),
        (b"", 1000),  # no status code: answered with a normal close
    ],
    ids=["1000", "1000-reason", "1001", "3000", "4999-utf8-reason", "no-code"],
)
async def test_client_close_is_echoed_and_the_session_is_removed(payload: bytes, echo: int) -> None:
    """A client close is echoed (1000 for no code), the socket dropped, sessions back to 0."""
    async with running_node() as node:
        ws = await raw_connect(node.port, token("mallory"))
        async with ws:
            assert node.stats()["sessions"] == 1
            await raw_join(ws, "closing")
            await ws.send_frame(OP_CLOSE, payload)
            assert await ws.expect_close(timeout=2.0) == echo
            await ws.expect_eof(timeout=2.0)
            await wait_sessions(node, 0)
            assert node.stats()["memberships"] == 0 and node.stats()["rooms"] == 0
        async with client(node, "bob") as bob:
            await join(bob, "lobby")
            await assert_still_serving(node, bob)
        await wait_sessions(node, 0)


async def test_tcp_reset_without_close_removes_the_session() -> None:
    """A raw client that vanishes (TCP abort, no close frame) leaves no session behind."""
    async with scene() as (node, ws):
        await raw_join(ws, "gone")
        ws.abort()
        await wait_sessions(node, 1)
        assert node.stats()["memberships"] == 1  # bob in lobby only


# ---- the handshake ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad_token", [None, "", "not-a-jwt"], ids=["none", "empty", "garbage"])
async def test_upgrade_without_a_valid_token_is_401_and_gets_no_listener(
    bad_token: str | None,
) -> None:
    """An upgrade request without a (valid) token -> HTTP 401, and no session is created."""
    async with running_node() as node:
        resp = await raw_handshake(node.port, bad_token)
        try:
            assert resp.status == 401, resp.status
            assert resp.headers.get("www-authenticate", "").startswith("Bearer")
            assert "sec-websocket-accept" not in resp.headers
            assert node.stats()["sessions"] == 0
            assert node.stats()["auth_failures"] == 1
            body = await asyncio.wait_for(resp.reader.read(), 2.0)  # then the server hangs up
            assert body == b"Unauthorized\n"
        finally:
            resp.writer.transport.abort()
        await asyncio.sleep(0.05)
        assert node.stats()["sessions"] == 0
        async with client(node, "bob") as bob:
            await join(bob, "lobby")
            await assert_still_serving(node, bob)
        await wait_sessions(node, 0)
