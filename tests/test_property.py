"""Property tests (hypothesis): whatever a client sends, the answer is a typed `error` or a
normal reply, never an exception, and never a close for a well-formed UTF-8 text frame.

Three layers, each with its own oracle:

* ``protocol.decode`` on arbitrary bytes, text, JSON values and typed-looking messages raises
  nothing but ``MessageError`` (with one of its three decode codes).
* A ``Session`` driven without sockets (as in test_session.py) answers every message that
  ``decode`` refuses with exactly that error, and never closes.
* A real node, over a real `websockets` client: every generated frame is followed by a sentinel
  ping, and what came back before the sentinel's pong is checked against ``decode``.

Examples are bounded (sizes and ``max_examples``); no example database is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any

import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection

from fastws import protocol as p
from fastws.auth import Principal
from fastws.config import load_settings
from fastws.errors import MessageError
from fastws.session import Session

from .recorder import Recorder
from .utils import client, join, recv_json, running_node

DECODE_CODES = {"invalid_format", "unknown_type", "invalid_payload"}
# Refusals the session adds after a successful decode (see session.py and docs/protocol.md §4).
SESSION_CODES = {
    "invalid_room",
    "too_many_rooms",
    "not_in_room",
    "message_too_long",
    "empty_message",
    "invalid_payload",
    "invalid_token",
    "wrong_user",
}
# Every reply type a lone client can get for its own message (others' events need others).
REPLY_TYPES = {
    "room_joined",
    "room_left",
    "chat_message",
    "ack",
    "presence",
    "history",
    "refreshed",
    "pong",
    "error",
}
TYPES = sorted(p.CLIENT_TYPES)
STRUCTS = (
    p.JoinRoom,
    p.LeaveRoom,
    p.ChatMessage,
    p.Typing,
    p.Presence,
    p.History,
    p.Refresh,
    p.Ping,
    p.Pong,
)

COMMON = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def bounded(examples: int) -> settings:
    return settings(COMMON, max_examples=examples)


# ---- strategies ------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: also beyond 64 bits
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=16,
)
room_names = st.sampled_from(["r", "lobby", "a" * 64, "a" * 65, "", "bad room", "é"]) | st.text(
    max_size=70
)
payloads = json_values | st.fixed_dictionaries(
    {},
    optional={
        "room": room_names | json_values,
        "message": st.text(max_size=40) | st.just(" ") | json_values,
        "isTyping": st.booleans() | json_values,
        "limit": st.integers(-5, 1500) | json_values,
        "token": st.text(max_size=20) | json_values,
        "since": json_values
        | st.fixed_dictionaries({"seq": st.integers(), "epoch": st.text(max_size=8)}),
    },
)
# Dicts shaped like client messages: a real type name (sometimes not), random payloads and ids.
typed_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES) | st.text(max_size=12) | json_values},
    optional={"payload": payloads, "id": json_values},
)


ids = st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10)
room_payload = st.fixed_dictionaries({"room": room_names})


def message(type_: str, payload: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[str]:
    parts: dict[str, st.SearchStrategy[Any]] = {"type": st.just(type_), "id": ids}
    if payload is not None:
        parts["payload"] = payload
    return st.builds(json.dumps, st.fixed_dictionaries(parts))


# Well-formed messages with random values: they decode, and the session judges them (room
# names, membership, lengths, blank text, tokens...).
wellformed = st.one_of(
    message("join_room", room_payload),
    message("leave_room", room_payload),
    message(
        "chat_message",
        st.fixed_dictionaries(
            {
                "room": st.sampled_from(["r", "elsewhere"]),
                "message": st.text(max_size=30)
                | st.just("   ")
                | st.integers(995, 1005).map(lambda n: "x" * n),
            }
        ),
    ),
    message("typing", st.fixed_dictionaries({"room": room_names, "isTyping": st.booleans()})),
    message("presence", room_payload),
    message(
        "history",
        st.fixed_dictionaries(
            {"room": st.sampled_from(["r", "x"]), "limit": st.integers(-2, 1002)}
        ),
    ),
    message("refresh", st.fixed_dictionaries({"token": st.text(max_size=20)})),
    message("ping"),
    message("pong"),
)


def nested(max_depth: int) -> st.SearchStrategy[str]:
    """JSON nested up to ``max_depth`` levels, left open or closed, bare or inside a ping."""
    return st.builds(
        lambda prefix, depth, opener, tail: prefix + opener * depth + tail,
        st.sampled_from(["", '{"type":"ping","x":']),
        st.integers(0, max_depth),
        st.sampled_from(["[", '{"a":']),
        st.sampled_from(["", "]", "}"]),
    )


deep_nesting = nested(20_000)  # up to ~100 KB
json_texts = (
    st.builds(json.dumps, json_values)
    | st.builds(json.dumps, typed_messages)
    | st.builds(lambda v: json.dumps(v, ensure_ascii=False), typed_messages)
)


def check_decode(data: bytes | str) -> None:
    """``decode`` returns a client struct or raises MessageError with a decode code: nothing else
    (any other exception propagates and fails the test). The error encodes to a wire error."""
    try:
        msg = p.decode(data)
    except MessageError as exc:
        assert exc.code in DECODE_CODES, exc.code
        assert exc.msg_id is None or isinstance(exc.msg_id, str | int)
        wire = json.loads(p.error_bytes(exc))
        assert wire["type"] == "error" and wire["code"] == exc.code
    else:
        assert isinstance(msg, STRUCTS)


# ---- (a) protocol.decode ---------------------------------------------------------------------


@bounded(500)
@given(st.binary(max_size=300))
def test_decode_of_arbitrary_bytes_raises_only_message_error(data: bytes) -> None:
    """Random bytes (binary frames) decode or raise MessageError, never anything else."""
    check_decode(data)


@bounded(500)
@given(st.text(max_size=300))
def test_decode_of_arbitrary_text_raises_only_message_error(data: str) -> None:
    """Random text (text frames) decodes or raises MessageError, never anything else."""
    check_decode(data)


@bounded(300)
@given(json_values | st.floats())
def test_decode_of_arbitrary_json_values_raises_only_message_error(value: Any) -> None:
    """Any JSON value (NaN/Infinity too, which json.dumps writes but JSON forbids), as text and
    as bytes, decodes or raises MessageError."""
    text = json.dumps(value)
    check_decode(text)
    check_decode(text.encode())


@bounded(500)
@given(typed_messages)
def test_decode_of_typed_messages_with_random_payloads(msg: dict[str, Any]) -> None:
    """Dicts with a real (or random) type and random payload/id decode to the struct of that
    type or raise MessageError; a refused one with a usable id echoes it."""
    text = json.dumps(msg)
    try:
        decoded = p.decode(text)
    except MessageError as exc:
        assert exc.code in DECODE_CODES
        if exc.code != "invalid_format":  # the envelope was read, so its id is echoed
            assert exc.msg_id == msg.get("id")
    else:
        assert decoded.__struct_config__.tag == msg["type"]


@bounded(100)
@given(deep_nesting)
def test_decode_of_deeply_nested_input_raises_only_message_error(data: str) -> None:
    """Up to 20k levels of nesting (open or closed) never escape as RecursionError."""
    check_decode(data)


# ---- (b1) a Session without sockets ---------------------------------------------------------


def expected_error(data: bytes | str) -> dict[str, Any] | None:
    """The wire error ``decode`` says this message gets, or None if it decodes."""
    try:
        p.decode(data)
    except MessageError as exc:
        return json.loads(p.error_bytes(exc))  # type: ignore[no-any-return]
    return None


# Up to 10k levels: at most ~50 KB, within the default max_message_bytes (64 KiB).
frames_in = (
    wellformed | json_texts | st.text(max_size=200) | st.binary(max_size=200) | nested(10_000)
)


@bounded(300)
@given(st.lists(frames_in, min_size=1, max_size=8))
def test_session_answers_each_undecodable_message_with_its_error_and_never_closes(
    batch: list[bytes | str],
) -> None:
    """Session.handle never raises; a message decode refuses gets exactly that error; anything
    the session refuses after decoding gets an error with a session code; no close (no rate
    limit here)."""
    rec = Recorder()
    session = Session(
        "c1", Principal("u1", "alice"), None, rec, rec, load_settings({"rate_limit": 0}, environ={})
    )
    session.handle('{"type":"join_room","payload":{"room":"r"}}')
    for data in batch:
        before = len(rec.sent)
        session.handle(data)
        replies = rec.sent[before:]
        want = expected_error(data)
        if want is not None:
            assert replies == [want]
        else:
            assert all(r["type"] in REPLY_TYPES for r in replies), replies
            errors = [r for r in replies if r["type"] == "error"]
            assert len(errors) <= 1 and all(e["code"] in SESSION_CODES for e in errors), errors
        assert rec.closed is None


# ---- (b2) a real node over real sockets -----------------------------------------------------

_sentinels = itertools.count()


async def exchange(ws: ClientConnection, data: bytes | str) -> list[dict[str, Any]]:
    """Send ``data`` then a sentinel ping; return every reply before the sentinel's pong.
    A close on the way raises ConnectionClosed, failing the example."""
    sentinel = f"sentinel-{next(_sentinels)}"
    await ws.send(data)
    await ws.send(json.dumps({"type": "ping", "id": sentinel}))
    replies = []
    while True:
        msg = await recv_json(ws)
        if msg["type"] == "pong" and msg.get("id") == sentinel:
            return replies
        replies.append(msg)


async def open_node(stack: contextlib.AsyncExitStack) -> ClientConnection:
    node = await stack.enter_async_context(running_node(rate_limit=0))
    ws = await stack.enter_async_context(client(node, "prop"))
    await join(ws, "r")
    return ws


def test_node_answers_bad_frames_with_typed_errors_and_never_closes() -> None:
    """Over a real socket: every generated text frame (well-formed UTF-8) or binary frame gets
    exactly the error decode predicts, or only normal replies; the connection never closes."""
    loop = uvloop.new_event_loop()
    stack = contextlib.AsyncExitStack()
    try:
        ws = loop.run_until_complete(asyncio.wait_for(open_node(stack), 10))
        seen = {"refused": 0, "decoded": 0}

        @bounded(200)
        @given(st.lists(frames_in, min_size=1, max_size=4))
        def run(batch: list[bytes | str]) -> None:
            for data in batch:
                replies = loop.run_until_complete(asyncio.wait_for(exchange(ws, data), 10))
                want = expected_error(data)
                seen["refused" if want is not None else "decoded"] += 1
                if want is not None:
                    assert replies == [want]
                else:
                    assert all(r["type"] in REPLY_TYPES for r in replies), replies
                    errors = [r for r in replies if r["type"] == "error"]
                    assert len(errors) <= 1, errors
                    assert all(e["code"] in SESSION_CODES for e in errors), errors

        run()
        assert ws.close_code is None
        # The generator did exercise both sides of the oracle.
        assert seen["refused"] >= 50 and seen["decoded"] >= 10, seen
    finally:
        loop.run_until_complete(asyncio.wait_for(stack.aclose(), 20))
        loop.close()
