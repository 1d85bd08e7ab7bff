"""Malformed and unusual WebSocket traffic from a raw socket, against a real node.

Each test runs a misbehaving raw client next to a healthy `websockets` client (bob) joined to
a room, and proves two things: the bad traffic gets the right answer (an ``error`` reply, or
a close with the right code, or a TCP drop, within 1 s), and the node keeps serving everyone
else (bob still receives a chat_message posted afterwards, and no session is left behind).
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
    build_frame,
    close_payload,
    raw_connect,
    raw_handshake,
)
from .utils import client, join, recv_json, running_node, send_json, token

PICOWS_DROP = (1002, None)  # picows' parser: close 1002, or the TCP connection just drops
FAIL_WITHIN = 1.0  # seconds: every bad case is answered (close frame or TCP drop) by then


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
    """Within FAIL_WITHIN (1 s): a close with one of ``codes`` (None: a TCP drop), then the
    TCP drop itself; the bad connection's session is gone (only bob's is left)."""
    code = await ws.expect_close(timeout=FAIL_WITHIN)
    assert code in codes, f"close code {code}, expected one of {codes}"
    await ws.expect_eof(timeout=FAIL_WITHIN)
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
    """One 10000-byte frame with max_message_bytes=4096 -> close 1009 (or a drop) within 1 s."""
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
    """A frame header alone with an absurd or non-minimal length -> closed within 1 s."""
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
    """An unmasked client frame (RFC 6455 section 5.1) -> close 1002 or a drop within 1 s."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_TEXT, b'{"type":"ping"}', mask=False)
        await expect_server_close(node, ws, PICOWS_DROP)


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
async def test_unknown_opcode_is_refused(opcode: int) -> None:
    """A reserved opcode (3-7 data, B-F control) -> close 1002 or a drop within 1 s."""
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
        1100,
        2000,
        2999,
        5000,
        65535,
    ],
)
async def test_close_with_a_forbidden_code_is_refused(code: int) -> None:
    """A client close with a code that must not be sent (RFC 6455 7.4) -> 1002 or a drop."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_CLOSE, close_payload(code))
        await expect_server_close(node, ws, PICOWS_DROP)


# ---- control frames that are valid ------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"x", b"hello", b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff", bytes(range(125))],
    ids=["empty", "1-byte", "short", "binary", "125-bytes"],
)
async def test_ping_is_answered_with_a_pong_carrying_the_same_payload(payload: bytes) -> None:
    """A ping frame gets a pong with the identical payload (RFC 6455 section 5.5.3)."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_PING, payload)
        assert await ws.read_frame() == (OP_PONG, payload)
        await ws.send_frame(OP_PONG, b"unsolicited")  # ignored (section 5.5.3)
        await raw_join(ws, "after-ping")
        assert node.stats()["sessions"] == 2


# Codes a client may send (RFC 6455 7.4.1 and the IANA registry) that the server echoes.
ECHOED_CODES = [1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3999, 4000]


@pytest.mark.parametrize(
    ("payload", "echo"),
    [
        (close_payload(1000), 1000),
        (close_payload(1000, b"bye"), 1000),
        (close_payload(1001), 1001),
        (close_payload(3000), 3000),
        *[(close_payload(code), code) for code in ECHOED_CODES],
        (close_payload(1000, b"r" * 123), 1000),  # the longest reason a control frame holds
        (close_payload(4999, "désolé".encode()), 4999),
        (b"", 1000),  # no status code: answered with a normal close
    ],
    ids=[
        "1000",
        "1000-reason",
        "1001",
        "3000",
        *[str(code) for code in ECHOED_CODES],
        "1000-123-byte-reason",
        "4999-utf8-reason",
        "no-code",
    ],
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


# ================================================================================================
# Autobahn-testsuite style cases, by category (1 framing, 2 ping/pong, 3 reserved bits,
# 4 opcodes, 5 fragmentation, 6 UTF-8, 7 close handling, 9 limits). Bad cases are sent whole,
# byte by byte, or in chunks with pauses (``send_in``); each is answered within FAIL_WITHIN.
# ================================================================================================

INVALID_FORMAT = {"type": "error", "error": "Invalid message format", "code": "invalid_format"}


async def send_in(ws: RawWS, data: bytes, mode: str) -> None:
    """Write ``data`` in one write ("whole"), one write per byte ("bytes"), or in four chunks
    with 50 ms pauses between them ("paused"), so the server sees every kind of partial read.
    Once the server has dropped the connection the rest is not written (as in RawWS)."""
    if mode == "whole":
        await ws.send_raw(data)
        return
    step = 1 if mode == "bytes" else max(1, -(-len(data) // 4))
    for i in range(0, len(data), step):
        if i and mode == "paused":
            await asyncio.sleep(0.05)
        if ws.writer.transport.is_closing():
            return
        try:
            ws.writer.write(data[i : i + step])
            await asyncio.wait_for(ws.writer.drain(), FAIL_WITHIN)
        except (ConnectionError, OSError, RuntimeError) as exc:
            ws.write_error = exc
            return


def padded_ping(size: int) -> bytes:
    """Exactly ``size`` bytes: a JSON ping whose id is ``size``, padded with spaces; below 24
    bytes (too short for that JSON) just ``size`` spaces, which is not a JSON value."""
    body = b'{"type":"ping","id":%d}' % size
    if len(body) > size:
        return b" " * size
    return body[:-1] + b" " * (size - len(body)) + b"}"


def ping_with_id(raw_id: bytes) -> bytes:
    """A JSON ping whose id string holds ``raw_id`` as is (valid UTF-8 or not)."""
    return b'{"type":"ping","id":"' + raw_id + b'"}'


async def expect_pong_reply(ws: RawWS, msg_id: Any) -> None:
    reply = await recv_raw_json(ws)
    assert reply["type"] == "pong" and reply["id"] == msg_id, reply


def frames(*specs: tuple[Any, ...]) -> bytes:
    """Several client frames as one byte string (``build_frame`` arguments per frame)."""
    return b"".join(build_frame(*spec) for spec in specs)


# ---- 1. framing: every payload-length encoding (Autobahn 1.1, 1.2) ----------------------------

FRAME_SIZES = [0, 1, 125, 126, 127, 128, 65535, 65536]


@pytest.mark.parametrize("size", FRAME_SIZES)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
async def test_single_frame_of_each_length_encoding_is_handled(opcode: int, size: int) -> None:
    """A text/binary frame of 0..65536 bytes (7-, 16- and 64-bit lengths, up to the default
    max_message_bytes) is handled: a JSON ping gets its pong; a blank one invalid_format."""
    async with scene() as (_node, ws):
        await ws.send_frame(opcode, padded_ping(size))
        if size < 24:
            assert await recv_raw_json(ws) == INVALID_FORMAT
            await raw_join(ws, "still-open")
        else:
            await expect_pong_reply(ws, size)


@pytest.mark.parametrize("size", [65535, 65536])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
async def test_64k_frame_written_in_997_byte_chunks_is_handled(opcode: int, size: int) -> None:
    """A 64 KiB frame arriving in 997-byte TCP writes (Autobahn 1.1.8) is reassembled."""
    async with scene() as (_node, ws):
        data = build_frame(opcode, padded_ping(size))
        for i in range(0, len(data), 997):
            await ws.send_raw(data[i : i + 997])
        await expect_pong_reply(ws, size)


# ---- 2. ping/pong ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bytes", "paused"])
async def test_125_byte_ping_in_chunks_is_answered(mode: str) -> None:
    """A 125-byte ping written byte by byte or in paused chunks gets its pong (Autobahn 2.6)."""
    async with scene() as (_node, ws):
        payload = bytes(range(0xFE, 0xFE - 125, -1))
        await send_in(ws, build_frame(OP_PING, payload), mode)
        assert await ws.read_frame() == (OP_PONG, payload)


@pytest.mark.parametrize(
    "payload", [b"", b"unsolicited", b"\xff" * 125], ids=["empty", "text", "125-bytes"]
)
async def test_unsolicited_pong_is_ignored(payload: bytes) -> None:
    """An unsolicited pong gets no answer (5.5.3): the next frame we read is a later ping's."""
    async with scene() as (_node, ws):
        await ws.send_frame(OP_PONG, payload)
        await ws.send_frame(OP_PING, b"after-pong")
        assert await ws.read_frame() == (OP_PONG, b"after-pong")
        await raw_join(ws, "after-pong")


@pytest.mark.parametrize("mode", ["whole", "paused"])
async def test_ten_pings_get_ten_pongs_in_order(mode: str) -> None:
    """Ten pings in one write or paused chunks -> ten pongs, same payloads, same order."""
    async with scene() as (_node, ws):
        await send_in(ws, frames(*[(OP_PING, b"ping-%d" % i) for i in range(10)]), mode)
        for i in range(10):
            assert await ws.read_frame() == (OP_PONG, b"ping-%d" % i)


@pytest.mark.parametrize("mode", ["bytes", "paused"])
async def test_ping_over_125_bytes_in_chunks_is_refused(mode: str) -> None:
    """A 126-byte ping written byte by byte or in paused chunks -> 1002 or a drop."""
    async with scene() as (node, ws):
        await send_in(ws, build_frame(OP_PING, b"p" * 126), mode)
        await expect_server_close(node, ws, PICOWS_DROP)


# ---- 3. reserved bits ------------------------------------------------------------------------


async def test_reserved_bits_on_a_close_frame_close_1002() -> None:
    """A close frame with RSV1 set is a protocol error, not a close: answered 1002."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_CLOSE, close_payload(1000), rsv=RSV1)
        await expect_server_close(node, ws, (1002,))


async def test_reserved_bits_after_a_valid_message_close_1002_after_its_reply() -> None:
    """A valid ping is answered; the next frame (RSV2) closes 1002; a ping after it is not
    answered (Autobahn 3.2)."""
    async with scene() as (node, ws):
        await ws.send_text(padded_ping(40))
        await expect_pong_reply(ws, 40)
        await ws.send_frame(OP_TEXT, padded_ping(41), rsv=RSV2)
        await ws.send_frame(OP_PING, b"never")
        await expect_server_close(node, ws, (1002,))
        assert all(op != OP_PONG for op, _ in ws.received), ws.received


@pytest.mark.parametrize("mode", ["bytes", "paused"])
@pytest.mark.parametrize(
    ("opcode", "rsv"),
    [(OP_TEXT, RSV2 | RSV3), (OP_BINARY, RSV1 | RSV3), (OP_PING, RSV1 | RSV2)],
    ids=["text-rsv3", "binary-rsv5", "ping-rsv6"],
)
async def test_reserved_bits_in_chunks_close_1002(opcode: int, rsv: int, mode: str) -> None:
    """RSV 3/5/6 on text/binary/ping, written byte by byte or in paused chunks -> 1002
    (Autobahn 3.3-3.6)."""
    async with scene() as (node, ws):
        await send_in(ws, build_frame(opcode, padded_ping(30), rsv=rsv), mode)
        await expect_server_close(node, ws, (1002,))


# ---- 4. opcodes ------------------------------------------------------------------------------


async def test_reserved_opcode_after_a_valid_message_is_refused_after_its_reply() -> None:
    """A valid ping is answered; a frame with opcode 5 then closes the connection, and a ping
    sent after it is not answered (Autobahn 4.1.3)."""
    async with scene() as (node, ws):
        await ws.send_text(padded_ping(40))
        await expect_pong_reply(ws, 40)
        await ws.send_raw(frames((0x5, b""), (OP_PING, b"never")))
        await expect_server_close(node, ws, PICOWS_DROP)
        assert all(op != OP_PONG for op, _ in ws.received), ws.received


@pytest.mark.parametrize("mode", ["bytes", "paused"])
@pytest.mark.parametrize("opcode", [0x6, 0xD])
async def test_reserved_opcode_in_chunks_is_refused(opcode: int, mode: str) -> None:
    """A reserved data/control opcode written byte by byte or in paused chunks -> 1002/drop."""
    async with scene() as (node, ws):
        await send_in(ws, build_frame(opcode, b"reserved"), mode)
        await expect_server_close(node, ws, PICOWS_DROP)


async def test_reserved_opcode_between_fragments_is_refused() -> None:
    """A reserved opcode inside a fragmented message -> 1002 or a drop; nothing is delivered."""
    async with scene() as (node, ws):
        parts = split3(join_bytes("never"), (8, 20))
        await ws.send_frame(OP_TEXT, parts[0], fin=False)
        await ws.send_frame(0xC, b"")
        await ws.send_raw(frames((OP_CONT, parts[1], False), (OP_CONT, parts[2])))
        await expect_server_close(node, ws, PICOWS_DROP)
        assert node.stats()["rooms"] == 1  # lobby only: the join never happened


# ---- 5. fragmentation ------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["two", "one-byte"])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
async def test_message_in_many_fragments_is_handled(opcode: int, split: str) -> None:
    """A message in two fragments, or in one-byte fragments (multi-byte characters cut in
    every place), is reassembled and handled."""
    async with scene() as (_node, ws):
        data = join_bytes("frag", msg_id="κόσμε-😀")
        chunks = (
            [data[:9], data[9:]] if split == "two" else [data[i : i + 1] for i in range(len(data))]
        )
        specs = [(OP_CONT, c, False) for c in chunks]
        specs[0] = (opcode, chunks[0], False)
        specs[-1] = (OP_CONT, chunks[-1], True)
        await ws.send_raw(frames(*specs))
        reply = await recv_raw_json(ws)
        assert reply["type"] == "room_joined" and reply["id"] == "κόσμε-😀", reply


@pytest.mark.parametrize(
    "layout",
    ["empty-first", "empty-middle", "empty-last", "empty-around", "all-empty"],
)
async def test_empty_fragments_are_accepted(layout: str) -> None:
    """Zero-length fragments anywhere in a message are allowed (5.4): the message is handled;
    a message made only of empty fragments is an empty text, answered invalid_format."""
    async with scene() as (_node, ws):
        data = join_bytes("empty-frags")
        chunks = {
            "empty-first": [b"", data],
            "empty-middle": [data[:10], b"", data[10:]],
            "empty-last": [data, b""],
            "empty-around": [b"", b"", data[:5], b"", data[5:], b"", b""],
            "all-empty": [b"", b"", b""],
        }[layout]
        specs: list[tuple[Any, ...]] = [(OP_CONT, c, False) for c in chunks]
        specs[0] = (OP_TEXT, chunks[0], False)
        specs[-1] = (OP_CONT, chunks[-1], True)
        await ws.send_raw(frames(*specs))
        reply = await recv_raw_json(ws)
        if layout == "all-empty":
            assert reply == INVALID_FORMAT
            await raw_join(ws, "empty-frags")
        else:
            assert reply["type"] == "room_joined" and reply["room"] == "empty-frags", reply


@pytest.mark.parametrize("between", ["pong", "ping-and-pong", "ping-after-each"])
async def test_control_frames_between_fragments_are_handled(between: str) -> None:
    """Pongs and pings interleaved with fragments (Autobahn 5.16-5.20): pings are answered at
    once, pongs ignored, and the message still completes."""
    async with scene() as (_node, ws):
        data = join_bytes("interleaved")
        cuts = [data[i : i + 8] for i in range(0, len(data), 8)]
        specs: list[tuple[Any, ...]] = []
        pings = 0
        for i, chunk in enumerate(cuts):
            specs.append((OP_TEXT if i == 0 else OP_CONT, chunk, i == len(cuts) - 1))
            if i == len(cuts) - 1:
                break
            if between == "pong" or (between == "ping-and-pong" and i == 1):
                specs.append((OP_PONG, b"pong-%d" % i))
            if between == "ping-after-each" or (between == "ping-and-pong" and i == 2):
                specs.append((OP_PING, b"ping-%d" % i))
                pings += 1
        await ws.send_raw(frames(*specs))
        got = [await ws.read_frame() for _ in range(pings)]
        assert all(op == OP_PONG for op, _ in got), got
        reply = await recv_raw_json(ws)
        assert reply["type"] == "room_joined" and reply["room"] == "interleaved", reply


@pytest.mark.parametrize("mode", ["bytes", "paused"])
async def test_fragments_with_a_ping_between_in_chunks_are_handled(mode: str) -> None:
    """Fragment, ping, fragment written byte by byte or in paused chunks (Autobahn 5.7, 5.8):
    the pong comes first, then the message's reply."""
    async with scene() as (_node, ws):
        data = join_bytes("chunked")
        await send_in(
            ws, frames((OP_TEXT, data[:12], False), (OP_PING, b"mid"), (OP_CONT, data[12:])), mode
        )
        assert await ws.read_frame() == (OP_PONG, b"mid")
        reply = await recv_raw_json(ws)
        assert reply["type"] == "room_joined" and reply["room"] == "chunked", reply


@pytest.mark.parametrize("mode", ["bytes", "paused"])
@pytest.mark.parametrize("fin", [True, False], ids=["final", "not-final"])
async def test_continuation_without_a_start_in_chunks_closes_1002(fin: bool, mode: str) -> None:
    """A continuation with nothing to continue, written byte by byte or in paused chunks
    (Autobahn 5.10-5.14) -> close 1002."""
    async with scene() as (node, ws):
        await send_in(ws, build_frame(OP_CONT, b'{"type":"ping"}', fin=fin), mode)
        await expect_server_close(node, ws, (1002,))


async def test_close_between_fragments_is_echoed_and_the_message_dropped() -> None:
    """A client close in the middle of a fragmented message is echoed (1000); the unfinished
    message is never handled."""
    async with scene() as (node, ws):
        data = join_bytes("unfinished")
        await ws.send_frame(OP_TEXT, data[:10], fin=False)
        await ws.send_frame(OP_CLOSE, close_payload(1000))
        assert await ws.expect_close(timeout=FAIL_WITHIN) == 1000
        await ws.send_frame(OP_CONT, data[10:])  # too late: the server has closed
        await ws.expect_eof(timeout=FAIL_WITHIN)
        await wait_sessions(node, 1)
        assert ws.received == [] and node.stats()["rooms"] == 1


async def test_message_after_a_refused_continuation_is_never_handled() -> None:
    """Autobahn 5.15: a complete fragmented message is answered; the stray continuation after
    it closes 1002, and the text frame behind that is never handled."""
    async with scene() as (node, ws):
        data = join_bytes("first")
        await ws.send_raw(frames((OP_TEXT, data[:9], False), (OP_CONT, data[9:])))
        assert (await recv_raw_json(ws))["room"] == "first"
        await ws.send_raw(frames((OP_CONT, b"stray", False), (OP_TEXT, join_bytes("second"))))
        await expect_server_close(node, ws, (1002,))
        assert ws.received == [] and node.stats()["rooms"] == 1


# ---- 6. UTF-8 --------------------------------------------------------------------------------

VALID_UTF8 = {
    "kosme": "κόσμε",
    "mixed": "Hello-µ@ßöäüàá-UTF-8!!",
    "u+0080": "\u0080",
    "u+07ff": "\u07ff",
    "u+0800": "\u0800",
    "u+d7ff": "\ud7ff",
    "u+e000": "\ue000",
    "u+fffd": "\ufffd",
    "u+fffe-noncharacter": "\ufffe",
    "u+ffff": "\uffff",
    "u+10000": "\U00010000",
    "u+10ffff": "\U0010ffff",
    "bom-inside": "\ufeffbom",
    "emoji-zwj": "👩\u200d💻",
}


@pytest.mark.parametrize("framing", ["one-frame", "one-byte-fragments"])
@pytest.mark.parametrize("text", list(VALID_UTF8.values()), ids=list(VALID_UTF8))
async def test_valid_utf8_is_accepted_and_round_trips(text: str, framing: str) -> None:
    """Valid UTF-8 (boundary code points, noncharacters, 4-byte sequences; Autobahn 6.2, 6.5-6.7),
    in one frame or one byte per fragment, is accepted and echoed back unchanged as the id."""
    async with scene() as (_node, ws):
        data = ping_with_id(text.encode())
        if framing == "one-frame":
            await ws.send_frame(OP_TEXT, data)
        else:
            specs = [(OP_CONT, data[i : i + 1], False) for i in range(len(data))]
            specs[0] = (OP_TEXT, data[:1], False)
            specs[-1] = (OP_CONT, data[-1:], True)
            await ws.send_raw(frames(*specs))
        await expect_pong_reply(ws, text)


@pytest.mark.parametrize(
    "data",
    [ping_with_id(b"\x00"), b"\xef\xbb\xbf" + b'{"type":"ping"}', "κόσμε".encode()],
    ids=["raw-nul-in-string", "bom-before-json", "plain-text"],
)
async def test_valid_utf8_that_is_not_json_is_an_error_reply(data: bytes) -> None:
    """Well-formed UTF-8 that is not a JSON message -> `error` invalid_format, not 1007."""
    async with scene() as (_node, ws):
        await ws.send_frame(OP_TEXT, data)
        assert await recv_raw_json(ws) == INVALID_FORMAT
        await raw_join(ws, "utf8-ok")


@pytest.mark.parametrize(
    "bad", [b"\xff", b"\xed\xa0\x80", b"\xc0\xaf"], ids=["ff", "surrogate", "overlong"]
)
async def test_binary_message_with_invalid_utf8_json_is_an_error_reply(bad: bytes) -> None:
    """Binary frames are not text (no 1007), but a JSON string in one must still be UTF-8:
    msgspec refuses it -> `error` invalid_format; the connection stays."""
    async with scene() as (_node, ws):
        await ws.send_frame(OP_BINARY, ping_with_id(bad))
        assert await recv_raw_json(ws) == INVALID_FORMAT
        await raw_join(ws, "binary-ok")


INVALID_UTF8 = {
    "kosme-then-surrogate": b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
    "lone-80": b"\x80",
    "lone-bf": b"\xbf",
    "80-bf-80-bf": b"\x80\xbf\x80\xbf",
    "all-64-continuations": bytes(range(0x80, 0xC0)),
    "lonely-c0": b"\xc0 ",
    "lonely-df": b"\xdf ",
    "lonely-e0": b"\xe0 ",
    "lonely-f0": b"\xf0 ",
    "lonely-f8": b"\xf8 ",
    "lonely-fc": b"\xfc ",
    "missing-last-of-3": b"\xef\xbf",
    "missing-last-of-4": b"\xf0\x9f\x98",
    "byte-fe": b"\xfe",
    "fe-fe-ff-ff": b"\xfe\xfe\xff\xff",
    "overlong-slash-3": b"\xe0\x80\xaf",
    "overlong-slash-4": b"\xf0\x80\x80\xaf",
    "overlong-nul": b"\xc0\x80",
    "max-overlong-2": b"\xc1\xbf",
    "max-overlong-3": b"\xe0\x9f\xbf",
    "max-overlong-4": b"\xf0\x8f\xbf\xbf",
    "surrogate-dbff": b"\xed\xad\xbf",
    "surrogate-dc00": b"\xed\xb0\x80",
    "surrogate-pair": b"\xed\xa0\x80\xed\xb0\x80",
    "5-byte-sequence": b"\xf8\x88\x80\x80\x80",
    "6-byte-sequence": b"\xfc\x84\x80\x80\x80\x80",
    "f5-lead-byte": b"\xf5\x80\x80\x80",
}


@pytest.mark.parametrize("bad", list(INVALID_UTF8.values()), ids=list(INVALID_UTF8))
async def test_invalid_utf8_sequences_close_1007(bad: bytes) -> None:
    """Each malformed sequence of Autobahn 6.3-6.21 (lone continuations, lonely and truncated
    starts, impossible bytes, overlongs, surrogates) in a text message -> close 1007."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_TEXT, ping_with_id(bad))
        await expect_server_close(node, ws, (1007,))


@pytest.mark.parametrize("mode", ["bytes", "paused"])
async def test_invalid_utf8_frame_in_chunks_closes_1007(mode: str) -> None:
    """An invalid text frame written byte by byte or in paused chunks -> close 1007."""
    async with scene() as (node, ws):
        await send_in(ws, build_frame(OP_TEXT, ping_with_id(INVALID_UTF8["max-overlong-3"])), mode)
        await expect_server_close(node, ws, (1007,))


FAIL_FAST = {
    "ff-in-first": [b'{"type":"ping","id":"\xff'],
    "c0-in-first": [b'{"type":"ping","id":"ab\xc0'],
    "surrogate-split": [b'{"type":"ping","id":"\xed', b"\xa0\x80"],
    "too-high-split": [b'{"type":"ping","id":"\xf4', b"\x90\x80\x80"],
    "not-a-continuation": [b'{"type":"ping","id":"\xe2\x82', b"("],
    "overlong-split": [b'{"type":"ping","id":"\xe0', b"\x80\xaf"],
    "continuation-opens-fragment": [b'{"type":"ping","id":"ab', b"\x80cd"],
    "valid-then-surrogate": [
        b'{"type":"ping","id":"\xce\xba',
        b"\xe1\xbd\xb9\xcf\x83",
        b"\xce\xbc\xce\xb5\xed\xa0\x80",
    ],
    "one-byte-fragments": [bytes([b]) for b in b'{"type":"ping","id":"\xce\xba\xed\xa0\x80'],
}


@pytest.mark.parametrize("mode", ["whole", "paused"])
@pytest.mark.parametrize("parts", list(FAIL_FAST.values()), ids=list(FAIL_FAST))
async def test_invalid_utf8_fails_fast_before_the_final_fragment(
    parts: list[bytes], mode: str
) -> None:
    """Invalid UTF-8 in a fragmented text message, also split across fragments, closes 1007 as
    soon as the fragment that makes it invalid arrives: the close comes before we even send the
    final fragment (RFC 6455 8.1; Autobahn 6.4 fail-fast)."""
    async with scene() as (node, ws):
        specs: list[tuple[Any, ...]] = [(OP_CONT, part, False) for part in parts]
        specs[0] = (OP_TEXT, parts[0], False)
        await send_in(ws, frames(*specs), mode)
        assert await ws.expect_close(timeout=FAIL_WITHIN) == 1007
        await ws.send_frame(OP_CONT, b'"}')  # the final fragment, only now
        await ws.expect_eof(timeout=FAIL_WITHIN)
        await wait_sessions(node, 1)


async def test_invalid_utf8_inside_one_frame_is_judged_when_the_frame_is_complete() -> None:
    """Within one frame fastws sees the payload only once it is complete (picows hands over
    whole frames), so fail-fast is per fragment: nothing happens while the frame is partial,
    then the last byte brings close 1007 within FAIL_WITHIN."""
    async with scene() as (node, ws):
        data = build_frame(OP_TEXT, ping_with_id(b"\xff" + b"x" * 100))
        await ws.send_raw(data[:-1])
        with pytest.raises(asyncio.TimeoutError):
            await ws.read_frame(timeout=0.2)
        await ws.send_raw(data[-1:])
        await expect_server_close(node, ws, (1007,))


# ---- 7. close handling -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "codes"),
    [
        (b"\x03", PICOWS_DROP),
        (close_payload(1000, b"\xff\xfe"), (1007, None)),
        (close_payload(1000, b"caf\xc3"), (1007, None)),
        (close_payload(1001, b"\xed\xa0\x80"), (1007, None)),
    ],
    ids=["1-byte-payload", "reason-ff", "reason-truncated", "reason-surrogate"],
)
async def test_malformed_close_payload_is_refused(
    payload: bytes, codes: tuple[int | None, ...]
) -> None:
    """A close with a 1-byte payload (no room for a code) -> 1002; a close whose reason is not
    UTF-8 -> 1007 (Autobahn 7.3.2, 7.5.1); or a drop."""
    async with scene() as (node, ws):
        await ws.send_frame(OP_CLOSE, payload)
        await expect_server_close(node, ws, codes)


@pytest.mark.parametrize("after", ["ping", "text", "binary"])
async def test_nothing_is_sent_after_the_close_echo(after: str) -> None:
    """Frames after the client's close, even in the same write (Autobahn 7.1.3, 7.1.4), get no
    answer: the echo 1000 is the last frame, then the TCP drop."""
    async with scene() as (node, ws):
        late = {
            "ping": (OP_PING, b"late"),
            "text": (OP_TEXT, padded_ping(30)),
            "binary": (OP_BINARY, padded_ping(31)),
        }[after]
        await ws.send_raw(frames((OP_CLOSE, close_payload(1000)), late))
        assert await ws.expect_close(timeout=FAIL_WITHIN) == 1000
        await ws.expect_eof(timeout=FAIL_WITHIN)
        assert ws.received == []
        await wait_sessions(node, 1)


@pytest.mark.parametrize("write", ["same", "separate"])
async def test_a_second_close_gets_no_second_answer(write: str) -> None:
    """Two client closes (Autobahn 7.1.2): one close frame comes back, then the TCP drop. With
    the second sent after the echo it is the 1000 echo; in the same write picows' parser meets
    the second close before the first is handed over and answers 1002 (a peer must send nothing
    after its close, RFC 6455 5.5.1)."""
    async with scene() as (node, ws):
        first, second = (OP_CLOSE, close_payload(1000)), (OP_CLOSE, close_payload(1001))
        if write == "same":
            await ws.send_raw(frames(first, second))
            assert await ws.expect_close(timeout=FAIL_WITHIN) in (1000, 1002)
        else:
            await ws.send_raw(frames(first))
            assert await ws.expect_close(timeout=FAIL_WITHIN) == 1000
            await ws.send_raw(frames(second))
        await ws.expect_eof(timeout=FAIL_WITHIN)
        assert ws.received == []
        await wait_sessions(node, 1)


async def test_replies_before_a_separate_close_all_arrive_first() -> None:
    """Messages answered before the client's close arrives: every reply, then the 1000 echo
    (Autobahn 7.1.6, with the close in a later write)."""
    async with scene() as (node, ws):
        await ws.send_raw(frames(*[(OP_TEXT, padded_ping(30 + i)) for i in range(20)]))
        for i in range(20):
            await expect_pong_reply(ws, 30 + i)
        await ws.send_close(1000)
        assert await ws.expect_close(timeout=FAIL_WITHIN) == 1000
        await ws.expect_eof(timeout=FAIL_WITHIN)
        await wait_sessions(node, 1)


# ---- replies and effects around a close in the same TCP read --------------------------------


async def test_replies_to_messages_in_the_same_read_as_the_close_come_before_the_echo() -> None:
    """Five pings and a close in one write: five pongs, then the 1000 echo (RFC 5.5.1)."""
    async with scene() as (_node, ws):
        await ws.send_raw(
            frames(
                *[(OP_TEXT, padded_ping(30 + i)) for i in range(5)], (OP_CLOSE, close_payload(1000))
            )
        )
        assert await ws.expect_close(timeout=FAIL_WITHIN) == 1000
        assert len(ws.received) == 5, f"replies before the echo: {ws.received}"


@pytest.mark.parametrize(
    "bad",
    [(OP_TEXT, b"{}", True, RSV1), (OP_TEXT, b"\xff")],
    ids=["rsv", "invalid-utf8"],
)
async def test_reply_to_a_message_comes_before_a_protocol_error_close(bad: tuple[Any, ...]) -> None:
    """A valid ping and a bad frame in one write: the pong, then the close (Autobahn 3.2)."""
    async with scene() as (_node, ws):
        await ws.send_raw(frames((OP_TEXT, padded_ping(30)), bad))
        assert await ws.expect_close(timeout=FAIL_WITHIN) in (1002, 1007)
        assert len(ws.received) == 1, f"replies before the close: {ws.received}"


async def chat_then(ws: RawWS, bob: ClientConnection, *after: tuple[Any, ...]) -> bool:
    """Mallory (in lobby) sends a chat then ``after`` in one write; whether bob got the chat."""
    chat = json.dumps(
        {"type": "chat_message", "payload": {"room": "lobby", "message": "late"}, "id": "c1"}
    ).encode()
    await ws.send_raw(frames((OP_TEXT, chat), *after))
    await ws.expect_close(timeout=FAIL_WITHIN)
    with contextlib.suppress(asyncio.TimeoutError):
        while True:
            msg = await recv_json(bob, 0.3)
            if msg["type"] == "chat_message" and msg["message"] == "late":
                return True
    return False


@contextlib.asynccontextmanager
async def lobby_scene() -> AsyncIterator[tuple[Node, ClientConnection, RawWS]]:
    async with running_node() as node, client(node, "bob") as bob:
        await join(bob, "lobby")
        async with await raw_connect(node.port, token("mallory")) as ws:
            await raw_join(ws, "lobby")
            assert (await recv_json(bob))["type"] == "user_joined"
            yield node, bob, ws


async def test_data_after_the_client_close_is_not_acted_on() -> None:
    """A chat_message behind the client's close (same write) is not broadcast (RFC 5.5.1)."""
    async with lobby_scene() as (_node, bob, ws):
        chat = json.dumps(
            {"type": "chat_message", "payload": {"room": "lobby", "message": "late"}}
        ).encode()
        await ws.send_raw(frames((OP_CLOSE, close_payload(1000)), (OP_TEXT, chat)))
        assert await ws.expect_close(timeout=FAIL_WITHIN) == 1000
        with contextlib.suppress(asyncio.TimeoutError):
            msg = await recv_json(bob, 0.3)
            assert msg["type"] == "user_left", f"acted on after the close: {msg}"


async def test_a_message_before_a_parser_error_is_acted_on_only_if_answered() -> None:
    """A chat and a reserved-opcode frame in one write: picows fails the connection while
    parsing ahead, then hands fastws the chat. Broadcast and ack must agree: both or neither."""
    async with lobby_scene() as (_node, bob, ws):
        broadcast = await chat_then(ws, bob, (0x5, b""))
        acked = any(b'"type":"ack"' in payload for _, payload in ws.received)
        assert broadcast == acked, f"broadcast={broadcast} but acked={acked}"


# ---- 9. limits -------------------------------------------------------------------------------


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
async def test_one_byte_over_max_message_bytes_in_one_frame_closes_1009(opcode: int) -> None:
    """A 65537-byte frame with the default max_message_bytes (65536) -> 1009 or a drop."""
    async with scene() as (node, ws):
        await ws.send_frame(opcode, padded_ping(65537))
        await expect_server_close(node, ws, (1009, None))


async def test_reassembled_size_is_checked_at_the_fragment_that_crosses_it() -> None:
    """16 fragments of 4096 bytes fill max_message_bytes exactly; one more byte closes 1009
    before any final fragment is sent."""
    async with scene() as (node, ws):
        specs = [(OP_TEXT if i == 0 else OP_CONT, b" " * 4096, False) for i in range(16)]
        await ws.send_raw(frames(*specs))
        with pytest.raises(asyncio.TimeoutError):
            await ws.read_frame(timeout=0.1)  # at the limit: still open
        await ws.send_frame(OP_CONT, b" ", fin=False)
        await expect_server_close(node, ws, (1009,))


MIB = 1 << 20


@pytest.mark.parametrize("fragment", [256, 4096, 65536, MIB], ids=["256", "4k", "64k", "1m"])
async def test_1_mib_message_in_fragments_of_each_size_is_handled(fragment: int) -> None:
    """With max_message_bytes=1 MiB, a 1 MiB message in fragments of 256 B .. 1 MiB is
    reassembled and handled (Autobahn 9.4)."""
    async with scene(max_message_bytes=MIB) as (_node, ws):
        data = padded_ping(MIB)
        chunks = [data[i : i + fragment] for i in range(0, MIB, fragment)]
        specs: list[tuple[Any, ...]] = [(OP_CONT, c, False) for c in chunks]
        specs[0] = (OP_TEXT, chunks[0], len(chunks) == 1)
        specs[-1] = (specs[-1][0], chunks[-1], True)
        await ws.send_raw(frames(*specs))
        await expect_pong_reply(ws, MIB)


async def test_1_mib_plus_one_byte_in_fragments_closes_1009() -> None:
    """With max_message_bytes=1 MiB, a fragmented message one byte longer -> close 1009."""
    async with scene(max_message_bytes=MIB) as (node, ws):
        data = padded_ping(MIB) + b" "
        chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
        specs = [
            (OP_TEXT if i == 0 else OP_CONT, c, i == len(chunks) - 1) for i, c in enumerate(chunks)
        ]
        await ws.send_raw(frames(*specs))
        await expect_server_close(node, ws, (1009,))


async def test_1000_messages_in_one_write_are_all_answered_in_order() -> None:
    """With rate_limit=0, 1000 pings in one write get 1000 pongs in order (Autobahn 9.7)."""
    async with scene(rate_limit=0) as (_node, ws):
        await ws.send_raw(frames(*[(OP_TEXT, padded_ping(30 + i)) for i in range(1000)]))
        for i in range(1000):
            await expect_pong_reply(ws, 30 + i)


async def test_burst_past_rate_burst_gets_rate_limited_errors_not_a_close() -> None:
    """300 pings in one write with the default rate (100/s, burst 200): about 200 pongs, the
    rest `rate_limited` errors, and the connection stays (fewer than rate_burst refused)."""
    async with scene() as (_node, ws):
        await ws.send_raw(frames(*[(OP_TEXT, padded_ping(30 + i)) for i in range(300)]))
        replies = [await recv_raw_json(ws) for _ in range(300)]
        kinds = [r["type"] if r["type"] == "pong" else r["code"] for r in replies]
        assert set(kinds) == {"pong", "rate_limited"}, set(kinds)
        assert 200 <= kinds.count("pong") < 250, kinds.count("pong")
        assert kinds[:200] == ["pong"] * 200
        await asyncio.sleep(0.05)  # a few tokens back at 100/s
        await raw_join(ws, "after-burst")


async def trickle(writer: asyncio.StreamWriter, data: bytes, pause: float) -> None:
    """Write ``data`` one byte per ``pause`` (a slowloris), until the server hangs up."""
    for i in range(len(data)):
        if writer.transport.is_closing():
            return
        try:
            writer.write(data[i : i + 1])
            await writer.drain()
        except (ConnectionError, OSError, RuntimeError):
            return
        await asyncio.sleep(pause)


@pytest.mark.parametrize("stall", ["silent", "half-a-request", "trickle", "oversized-head"])
async def test_an_upgrade_never_completed_is_dropped(stall: str) -> None:
    """A TCP client that never finishes its upgrade (silent, half a request, a byte every 50 ms)
    is dropped at handshake_timeout; a request head over picows' 16 KiB cap at once. No session
    is made and bob is still served."""
    async with running_node(handshake_timeout=0.3) as node, client(node, "bob") as bob:
        await join(bob, "lobby")
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        head = (
            f"GET /ws?token={token('mallory')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        ).encode()  # no blank line: the head never ends
        slow: asyncio.Task[None] | None = None
        try:
            started = time.monotonic()
            if stall == "half-a-request":
                writer.write(head)
            elif stall == "oversized-head":
                writer.write(head + b"X-Pad: " + b"a" * 20_000)
            elif stall == "trickle":
                slow = asyncio.ensure_future(trickle(writer, head * 10, 0.05))
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 0.3 + FAIL_WITHIN) == b""
            took = time.monotonic() - started
            assert took < 0.3 + FAIL_WITHIN
            if stall == "oversized-head":
                assert took < FAIL_WITHIN
        finally:
            if slow is not None:
                slow.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await slow
            writer.transport.abort()
        assert node.stats()["sessions"] == 1 and node.stats().get("auth_failures", 0) == 0
        await assert_still_serving(node, bob)


async def test_permessage_deflate_is_offered_but_never_negotiated() -> None:
    """No extension is ever agreed (RFC 6455 9.1): a client offering permessage-deflate (as
    `websockets` does by default) gets a 101 without Sec-WebSocket-Extensions, so a compressed
    (RSV1) frame from it is a protocol error (see test_reserved_bits_close_1002)."""
    async with running_node() as node, client(node, "bob") as bob:
        assert bob.request is not None and bob.response is not None
        assert "permessage-deflate" in bob.request.headers.get("Sec-WebSocket-Extensions", "")
        assert "Sec-WebSocket-Extensions" not in bob.response.headers
        await join(bob, "lobby")
        await assert_still_serving(node, bob)
