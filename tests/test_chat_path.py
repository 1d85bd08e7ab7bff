"""The compiled chat path (``_fanout.ChatPath``) against its reference, the Python path
(``FASTWS_FANOUT=python``): the same client script over both gives the same transcript,
and each transcript is the seed's answer. The common chat_message is taken in C, every
other case falls back: both are driven here, edge by edge."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from fastws import accel, hub
from fastws.broker.ledger import ENTRY_COST, Ledger
from fastws.broker.types import chat_payload

from .utils import TIMEOUT, recv_json, running_node, send_json, server_process, ws_url

PATHS = ["compiled", "python"]

# Texts on the edges of the compiled checks: each is either accepted or refused the same way.
EDGE_TEXTS = [
    "hi",
    " hi ",  # spaces at its edges: the compiled check hands it to the full one
    "\u3000hi",  # an ideographic space (str.isspace) first
    "h",
    "   ",  # blank: empty_message
    "\t\n",
    "",
    "x" * 20,  # exactly --max-message-chars
    "x" * 21,  # one over: message_too_long
    "é漢字 🙂",  # non-ASCII, astral
    'quote " and \\ backslash',
]


# Raw chat frames on the edges of the compiled reader (_scan_chat): what it takes (compact
# JSON, keys in any order, plain strings, integer ids) and what it leaves to msgspec.
_CHAT = '{"type":"chat_message","payload":{"room":"r","message":"hi"}'
SCAN_CASES = [
    _CHAT + "}",
    '{"payload":{"message":"hi","room":"r"},"type":"chat_message"}',
    '{"id":7,"type":"chat_message","payload":{"room":"r","message":"hi"}}',
    *(
        _CHAT + ',"id":' + msg_id + "}"
        for msg_id in (
            "null",
            "-0",
            "0",
            "-12",
            "007",
            "123456789012345678",
            "1234567890123456789",
            "99999999999999999999",
            "1.5",
            "1e3",
            "true",
            '""',
            '"é"',
            '"a\\"',
            "-",
            "",
        )
    ),
    '{"type":"chat_message","payload":{"room":"r","message":"h\\u0069"}}',
    '{"type":"chat_message","payload":{"room":"\\u0072","message":"hi"}}',
    '{"type":"chat_message","payload":{"room":"r","message":"hi","extra":1}}',
    _CHAT + ',"extra":1}',
    '{"type":"chat_message","payload":{"room":"r","message":"a","message":"b"}}',
    '{"type":"chat_message","type":"chat_message","payload":{"room":"r","message":"hi"}}',
    _CHAT + ',"payload":{"room":"r","message":"again"}}',
    _CHAT + "} ",
    _CHAT + "}x",
    _CHAT + ",}",
    _CHAT,
    " " + _CHAT + "}",
    '{"type": "chat_message","payload":{"room":"r","message":"hi"}}',
    '{"type":"chat_message","payload":{"room":"r"}}',
    '{"type":"chat_message","payload":{"message":"hi"}}',
    '{"type":"chat_message"}',
    '{"type":"chat_message","payload":{"room":"r","message":""}}',
    '{"type":"chat_message","payload":{"room":"r","message":"x\u3000"}}',
    '{"type":"chat_message","payload":{"room":"r","message":"\u00a0x"}}',
    '{"type":"chat_message","payload":{"room":"r","message":"\u2028x\u0085"}}',
    '{"type":"chat_message","payload":{"room":"r","message":"é漢字 🙂"}}',
    '{"type":"chat_message","payload":{"room":"r","message":"🙂x🙂"}}',
    '{"type":"chat_message","payload":{"room":"r","message":"\x7f"}}',
    '{"type":"chat_message","payload":{"room":"r","message":"a\tb"}}',  # a raw tab: invalid
    '{"type":"chat_message","payload":{"room":"r","message":"' + "é" * 20 + '"}}',
    '{"type":"chat_message","payload":{"room":"r","message":"' + "🙂" * 21 + '"}}',
    '{"type":"chat_message","payload":{"room":"nowhere","message":"hi"}}',
    '{"type":"chat_message","payload":{"room":"staff-x","message":"hi"}}',
    '{"type":"typing","payload":{"room":"r","message":"hi"}}',
]

# The chat script's server: no rate limit, short texts, a short history.
CHAT_SERVER = ("--rate-limit", "0", "--max-message-chars", "20", "--history-size", "3")


@pytest.fixture(params=PATHS)
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    with server_process(*CHAT_SERVER, env={"FASTWS_FANOUT": request.param}) as (_, port):
        yield port


def _compact(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def _plain(msg: dict[str, Any]) -> dict[str, Any]:
    """A message without what differs between two runs (times, epochs, ids)."""
    plain = {k: v for k, v in msg.items() if k not in ("timestamp", "epoch", "clientId")}
    if "messages" in plain:
        plain["messages"] = [_plain(m) for m in plain["messages"]]
    return plain


async def _until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Every message up to and including the next of type ``kind``."""
    got = []
    while True:
        msg = _plain(await recv_json(ws))
        got.append(msg)
        if msg["type"] == kind:
            return got


async def _script(port: int) -> list[Any]:
    """Two members and a stranger; every case of the chat path, each answered in order
    (a ``ping`` after each case fences what it caused)."""
    out: list[Any] = []
    async with (
        connect(ws_url(port, "alice"), open_timeout=TIMEOUT) as alice,
        connect(ws_url(port, "bob"), open_timeout=TIMEOUT) as bob,
        connect(ws_url(port, "eve"), open_timeout=TIMEOUT) as eve,
    ):
        for ws in (alice, bob, eve):
            assert (await recv_json(ws))["type"] == "connected"
        for ws in (alice, bob):
            await send_json(ws, "join_room", {"room": "r"})
            out.append(await _until(ws, "room_joined"))
        out.append(await _until(alice, "user_joined"))

        async def case(ws: ClientConnection, raw: str | bytes) -> None:
            await ws.send(raw)
            await send_json(ws, "ping")
            out.append(await _until(ws, "pong"))
            await send_json(bob, "ping")
            out.append(await _until(bob, "pong"))

        for i, text in enumerate(EDGE_TEXTS):
            chat = {"type": "chat_message", "payload": {"room": "r", "message": text}}
            await case(alice, json.dumps(chat))
            await case(alice, json.dumps({**chat, "id": f"m{i}"}))
            await case(alice, json.dumps({**chat, "id": i}))
        for i, text in enumerate(EDGE_TEXTS):  # compact, as JSON.stringify: the compiled reader
            chat = {"type": "chat_message", "payload": {"room": "r", "message": text}}
            await case(alice, _compact(chat))
            await case(alice, _compact({**chat, "id": f"c{i}"}))
            await case(alice, _compact({"id": -i, **chat}))
        for raw in SCAN_CASES:
            await case(alice, raw)
        member = '{"type":"chat_message","payload":{"room":"r","message":"hi"},"id":1}'
        await case(alice, member.encode())  # a binary frame: the Python path
        await case(eve, member)  # not a member: not_in_room
        await case(alice, member.replace('"r"', '"nowhere"'))
        await case(alice, '{"type":"chat_message","payload":{"room":"r"},"id":2}')
        await case(alice, '{"type":"chat_message","payload":{"room":"r","message":1}}')
        await case(alice, '{"type":"chat_message","payload":{"room":"r","message":"a"}')
        await case(alice, '{"type":"chat_mess","payload":{"room":"r","message":"a"}}')
        await case(alice, '{"type":"typing","payload":{"room":"r"}}')
        await send_json(bob, "history", {"room": "r", "limit": 10})
        history = await _until(bob, "history")
        out.append(history)
        kept, last = [m["seq"] for m in history[-1]["messages"]], history[-1]["seq"]
        assert kept == [last - 2, last - 1, last]  # --history-size 3
    return out


async def test_the_compiled_and_the_python_path_give_the_same_transcript() -> None:
    transcripts = []
    for path in PATHS:
        with server_process(*CHAT_SERVER, env={"FASTWS_FANOUT": path}) as (_, port):
            transcripts.append(await asyncio.wait_for(_script(port), 30))
    compiled, python = transcripts
    assert compiled == python
    flat = [m for step in compiled for m in step]
    chats = [m for m in flat if m["type"] == "chat_message"]
    errors = [m for m in flat if m["type"] == "error"]
    acks = [m for m in flat if m["type"] == "ack"]
    accepted = [t for t in EDGE_TEXTS if t.strip() and len(t) <= 20]
    # Each accepted text 6 times (no id, a string id, an int id; spaced and compact), to
    # alice and to bob, plus the binary one and the raw cases taken; seqs count up from 1
    # with no gap.
    seqs = sorted({m["seq"] for m in chats})
    assert len(chats) == 2 * len(seqs)
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) > 6 * len(accepted) + 1 + 10
    ids = {a["id"] for a in acks}
    assert ids >= {f"{form}{i}" for i, t in enumerate(EDGE_TEXTS) if t in accepted for form in "mc"}
    codes = {e["code"] for e in errors}
    assert codes == {
        "empty_message",
        "message_too_long",
        "not_in_room",
        "invalid_payload",
        "invalid_format",
        "unknown_type",
    }


async def test_a_post_rule_holds_on_both_paths() -> None:
    """With a post rule every chat takes the Python path's check: the same refusal."""
    answers = []
    for path in PATHS:
        with server_process("--room-post", "staff-*=role:staff", env={"FASTWS_FANOUT": path}) as (
            _,
            port,
        ):
            async with connect(ws_url(port, "alice"), open_timeout=TIMEOUT) as alice:
                await recv_json(alice)
                for room in ("staff-x", "r"):
                    await send_json(alice, "join_room", {"room": room})
                    await _until(alice, "room_joined")
                for room in ("staff-x", "r"):
                    chat = {"room": room, "message": "hi"}
                    await alice.send(_compact({"type": "chat_message", "payload": chat, "id": 1}))
                    answers.append(await _until(alice, "ack" if room == "r" else "error"))
    compiled, python = answers[:2], answers[2:]
    assert compiled == python
    assert compiled[0][-1]["code"] == "forbidden"


async def test_compact_chats_are_read_without_msgspec() -> None:
    """JSON.stringify's form (compact, plain strings) takes the compiled reader; spaced JSON
    or an escape takes msgspec; both are accepted the same."""
    if accel.FANOUT != "compiled":
        pytest.skip("the compiled fan-out is not loaded")
    async with running_node(rate_limit=0) as node:
        async with connect(ws_url(node.port, "alice"), open_timeout=TIMEOUT) as alice:
            await recv_json(alice)
            await send_json(alice, "join_room", {"room": "r"})
            await _until(alice, "room_joined")
            frames = [
                '{"type":"chat_message","payload":{"room":"r","message":"é 🙂"},"id":3}',
                '{"id":"x","payload":{"message":"hi","room":"r"},"type":"chat_message"}',
                '{"type": "chat_message", "payload": {"room": "r", "message": "hi"}}',
                '{"type":"chat_message","payload":{"room":"r","message":"h\\u0069"}}',
            ]
            for raw in frames:
                await alice.send(raw)
                got = await _until(alice, "chat_message")
                assert got[-1]["message"] in ("é 🙂", "hi")
            assert (node.messages_in, node.chat_path.scanned) == (4, 2)
            # A room found among more than 8, and a room with a non-ASCII name.
            for room in [f"x{i}" for i in range(9)] + ["ü"]:
                await send_json(alice, "join_room", {"room": room})
                await _until(alice, "room_joined")
            for room in ("x7", "ü", "r"):
                chat = {"type": "chat_message", "payload": {"room": room, "message": "hi"}}
                await alice.send(_compact(chat))
                assert (await _until(alice, "chat_message"))[-1]["room"] == room
            await alice.send(_compact({"type": "chat_message", "payload": {"room": "x9"}}))
            assert (await _until(alice, "error"))[-1]["code"] == "invalid_payload"
        assert (node.messages_in, node.chat_path.scanned) == (7, 5)


# Texts and ids the compiled path writes its JSON for itself (or hands to msgspec): quotes,
# backslashes, UTF-8 of every width, controls (msgspec's \uXXXX).
BYTE_TEXTS = ['say "hi" \\ ok', "é漢字 🙂", "ctl\u0001x", "a\tb", "tail\\", '"']
BYTE_IDS: list[Any] = ["s", 'q"id\\', "ü", 0, -5, 2**62, "i" * 120, "j" * 200]
# The first needs escapes (msgspec reads it), the second not (the compiled reader does).
BYTE_ROOMS = ['r "q" ü', "ü room"]


def _raw(frame: str | bytes) -> str:
    """A frame's text with what differs between runs (time, epoch) blanked."""
    text = frame if isinstance(frame, str) else frame.decode()
    text = re.sub(r'"timestamp":\d+', '"timestamp":0', text)
    return re.sub(r'"epoch":"[0-9a-f]+"', '"epoch":""', text)


async def _byte_script(port: int) -> list[str]:
    """Every chat and ack as the sender and another member get them, byte for byte."""
    out: list[str] = []
    async with (
        connect(ws_url(port, 'zoë "z" \\'), open_timeout=TIMEOUT) as zoe,
        connect(ws_url(port, "bob"), open_timeout=TIMEOUT) as bob,
    ):
        for ws in (zoe, bob):
            await recv_json(ws)
        for room in BYTE_ROOMS:
            for ws in (zoe, bob):
                await send_json(ws, "join_room", {"room": room})
                await _until(ws, "room_joined")
            await _until(zoe, "user_joined")
        for room in BYTE_ROOMS:
            for text in BYTE_TEXTS:
                for msg_id in BYTE_IDS:
                    chat = {"type": "chat_message", "payload": {"room": room, "message": text}}
                    chat["id"] = msg_id
                    for raw in (json.dumps(chat), _compact(chat)):
                        await zoe.send(raw)
                        out += [_raw(await zoe.recv()), _raw(await zoe.recv())]
                        out.append(_raw(await bob.recv()))
    return out


async def test_the_compiled_json_is_msgspecs_byte_for_byte() -> None:
    transcripts = []
    for path in PATHS:
        with server_process(
            *CHAT_SERVER, "--max-message-chars", "200", env={"FASTWS_FANOUT": path}
        ) as (_, port):
            transcripts.append(await asyncio.wait_for(_byte_script(port), 30))
    compiled, python = transcripts
    assert len(compiled) == 2 * 3 * len(BYTE_ROOMS) * len(BYTE_TEXTS) * len(BYTE_IDS)
    assert compiled == python
    assert '"message":"say \\"hi\\" \\\\ ok"' in compiled[0]
    assert compiled[1] == '{"type":"ack","id":"s","seq":1}'


async def test_a_chat_is_acked_after_its_broadcast_with_its_seq(server: int) -> None:
    async with connect(ws_url(server, "alice"), open_timeout=TIMEOUT) as ws:
        await recv_json(ws)
        await send_json(ws, "join_room", {"room": "r"})
        await _until(ws, "room_joined")
        for n in range(1, 4):
            await send_json(ws, "chat_message", {"room": "r", "message": "hi"}, id=n)
            chat, ack = await recv_json(ws), await recv_json(ws)
            assert (chat["type"], chat["seq"]) == ("chat_message", n)
            assert ack == {"type": "ack", "id": n, "seq": n}


@pytest.mark.parametrize("path", PATHS)
async def test_the_rate_limit_holds_on_both_paths(path: str) -> None:
    """Burst 3 at 0.001 msg/s: three chats pass, the rest are rate_limited, and past the
    burst of refusals the connection is closed 1008."""
    with server_process(
        "--rate-limit", "0.001", "--rate-burst", "3", env={"FASTWS_FANOUT": path}
    ) as (_, port):
        async with connect(ws_url(port, "alice"), open_timeout=TIMEOUT) as ws:
            await recv_json(ws)
            await send_json(ws, "join_room", {"room": "r"})  # takes a token
            await _until(ws, "room_joined")
            for _ in range(6):
                await send_json(ws, "chat_message", {"room": "r", "message": "hi"})
            got = [(await recv_json(ws))["type"] for _ in range(5)]
            assert got == ["chat_message", "chat_message", "error", "error", "error"]
            await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
            assert ws.close_code == 1008


async def test_the_compiled_history_keeps_the_ledgers_accounts() -> None:
    """What the compiled path keeps costs what the ledger counts: payload plus ENTRY_COST
    each, within history_size, the oldest pushed out."""
    assert hub.FANOUT == "compiled"
    async with (
        running_node(rate_limit=0, history_size=3) as node,
        connect(ws_url(node, "alice"), open_timeout=TIMEOUT) as ws,
    ):
        await recv_json(ws)
        await send_json(ws, "join_room", {"room": "r"})
        await _until(ws, "room_joined")
        for i in range(5):
            await send_json(ws, "chat_message", {"room": "r", "message": f"m{i}"})
            await recv_json(ws)
        ledger: Ledger = node.broker.ledger  # type: ignore[attr-defined]
        room = ledger.rooms["r"]
        assert room.history is not None
        kept = [entry[2] for entry in room.history]
        assert [json.loads(p)["message"] for p in kept] == ["m2", "m3", "m4"]
        assert room.bytes == ledger.bytes == sum(len(p) + ENTRY_COST for p in kept)
        head = kept[-1][: kept[-1].index(b',"seq":')] + b',"seq":'
        assert kept[-1] == chat_payload(head, 5, room.epoch)
        assert node.stats()["messages_in"] == 5
        assert node.stats()["messages_out"] >= 5


# ---- the compiled reader against msgspec, on generated frames --------------------------

_ids = st.one_of(
    st.none(),
    st.integers(-(10**20), 10**20),
    st.integers(-1000, 1000),
    st.text(max_size=8),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
_texts = st.one_of(st.text(max_size=16), st.sampled_from(EDGE_TEXTS))
_controls = st.sampled_from(["\t", "\n", "\x00", "\x1f"])
_rooms = st.sampled_from(["r"] * 6 + ["nowhere", "", " r"])


@st.composite
def _near_chats(draw: st.DrawFn) -> str:
    """A compact chat_message in any key order, sometimes with a key missing, repeated or
    extra, sometimes with one byte cut, doubled or spaced."""
    payload = {"room": draw(_rooms), "message": draw(_texts)}
    fields: list[tuple[str, Any]] = [("type", "chat_message"), ("payload", payload)]
    if draw(st.booleans()):
        fields.append(("id", draw(_ids)))
    fields = draw(st.permutations(fields))
    extra = draw(st.sampled_from([None, None, None, "drop", "repeat", "extra"]))
    if extra == "drop":
        fields = fields[1:]
    elif extra == "repeat":
        fields = [*fields, fields[0]]
    elif extra == "extra":
        fields.append(("x", 1))
    raw = "{" + ",".join(f"{_compact(k)}:{_compact(v)}" for k, v in fields) + "}"
    edit = draw(st.sampled_from([None, None, None, "cut", "double", "space", "control"]))
    if edit is not None and raw:
        at = draw(st.integers(0, len(raw) - 1))
        if edit == "cut":
            raw = raw[:at] + raw[at + 1 :]
        elif edit == "control":  # raw in a string: invalid JSON
            text_at = raw.find('"message":"')
            at = text_at + len('"message":"') if text_at >= 0 else at
            raw = raw[:at] + draw(_controls) + raw[at:]
        else:
            raw = raw[:at] + {"double": raw[at], "space": " "}[edit] + raw[at:]
    return raw


_fences = itertools.count()


async def _exchange(ws: ClientConnection, raw: str) -> list[dict[str, Any]]:
    """``raw``'s replies, up to the pong of a ping sent after it."""
    fence = f"fence-{next(_fences)}"
    await ws.send(raw)
    await ws.send(json.dumps({"type": "ping", "id": fence}))
    got = []
    while True:
        msg = _plain(await recv_json(ws))
        if msg["type"] == "pong" and msg.get("id") == fence:
            return got
        got.append(msg)


def test_generated_chats_get_the_same_answers_on_both_paths() -> None:
    """Frames near the compiled reader's shape, sent to a compiled and a Python server:
    each gets the same replies from both (the seqs included), and neither closes."""
    loop = uvloop.new_event_loop()
    with contextlib.ExitStack() as servers:
        ports = [
            servers.enter_context(server_process(*CHAT_SERVER, env={"FASTWS_FANOUT": path}))[1]
            for path in PATHS
        ]
        stack = contextlib.AsyncExitStack()

        async def open_clients() -> list[ClientConnection]:
            clients = []
            for port in ports:
                ws = await stack.enter_async_context(
                    connect(ws_url(port, "alice"), open_timeout=TIMEOUT)
                )
                await recv_json(ws)
                await send_json(ws, "join_room", {"room": "r"})
                await _until(ws, "room_joined")
                clients.append(ws)
            return clients

        try:
            clients = loop.run_until_complete(asyncio.wait_for(open_clients(), 20))
            seen = {"chat": 0, "error": 0}

            @settings(
                max_examples=300,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(_near_chats())
            def run(raw: str) -> None:
                answers = [
                    loop.run_until_complete(asyncio.wait_for(_exchange(ws, raw), 10))
                    for ws in clients
                ]
                assert answers[0] == answers[1], raw
                for msg in answers[0]:
                    seen["chat" if msg["type"] == "chat_message" else "error"] += 1

            run()
            assert all(ws.close_code is None for ws in clients)
            assert seen["chat"] >= 50 and seen["error"] >= 50, seen
        finally:
            loop.run_until_complete(asyncio.wait_for(stack.aclose(), 20))
            loop.close()
