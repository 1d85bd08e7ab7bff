"""The compiled chat path (``_fanout.ChatPath``) against its reference, the Python path
(``FASTWS_FANOUT=python``): the same client script over both gives the same transcript,
and each transcript is the seed's answer. The common chat_message is taken in C, every
other case falls back: both are driven here, edge by edge."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from fastws import hub
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


# The chat script's server: no rate limit, short texts, a short history, one post rule.
CHAT_SERVER = ("--rate-limit", "0", "--max-message-chars", "20", "--history-size", "3")
CHAT_SERVER += ("--room-post", "staff-*=role:staff")


@pytest.fixture(params=PATHS)
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    with server_process(*CHAT_SERVER, env={"FASTWS_FANOUT": request.param}) as (_, port):
        yield port


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
        member = '{"type":"chat_message","payload":{"room":"r","message":"hi"},"id":1}'
        await case(alice, member.encode())  # a binary frame: the Python path
        await case(eve, member)  # not a member: not_in_room
        await case(alice, member.replace('"r"', '"nowhere"'))
        await case(alice, '{"type":"chat_message","payload":{"room":"r"},"id":2}')
        await case(alice, '{"type":"chat_message","payload":{"room":"r","message":1}}')
        await case(alice, '{"type":"chat_message","payload":{"room":"r","message":"a"}')
        await case(alice, '{"type":"chat_mess","payload":{"room":"r","message":"a"}}')
        await case(alice, '{"type":"typing","payload":{"room":"r"}}')
        await send_json(alice, "join_room", {"room": "staff-x"})
        out.append(await _until(alice, "room_joined"))
        await case(alice, member.replace('"r"', '"staff-x"'))  # a post rule: forbidden
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
    # Each accepted text 3 times (no id, a string id, an int id), to alice and to bob, plus
    # the binary one; seqs count up from 1 with no gap.
    assert len(chats) == 2 * (3 * len(accepted) + 1)
    seqs = sorted({m["seq"] for m in chats})
    assert seqs == list(range(1, 3 * len(accepted) + 2))
    assert {a["id"] for a in acks} >= {f"m{i}" for i, t in enumerate(EDGE_TEXTS) if t in accepted}
    codes = {e["code"] for e in errors}
    assert codes == {
        "empty_message",
        "message_too_long",
        "not_in_room",
        "invalid_payload",
        "invalid_format",
        "unknown_type",
        "forbidden",
    }


# Texts and ids the compiled path writes its JSON for itself (or hands to msgspec): quotes,
# backslashes, UTF-8 of every width, controls (msgspec's \uXXXX).
BYTE_TEXTS = ['say "hi" \\ ok', "é漢字 🙂", "ctl\u0001x", "a\tb", "tail\\", '"']
BYTE_IDS: list[Any] = ["s", 'q"id\\', "ü", 0, -5, 2**62, "i" * 120, "j" * 200]


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
            await send_json(ws, "join_room", {"room": 'r "q" ü'})
            await _until(ws, "room_joined")
        await _until(zoe, "user_joined")
        for text in BYTE_TEXTS:
            for msg_id in BYTE_IDS:
                chat = {"room": 'r "q" ü', "message": text}
                await zoe.send(json.dumps({"type": "chat_message", "payload": chat, "id": msg_id}))
                out += [_raw(await zoe.recv()), _raw(await zoe.recv()), _raw(await bob.recv())]
    return out


async def test_the_compiled_json_is_msgspecs_byte_for_byte() -> None:
    transcripts = []
    for path in PATHS:
        with server_process(
            *CHAT_SERVER, "--max-message-chars", "200", env={"FASTWS_FANOUT": path}
        ) as (_, port):
            transcripts.append(await asyncio.wait_for(_byte_script(port), 30))
    compiled, python = transcripts
    assert len(compiled) == 3 * len(BYTE_TEXTS) * len(BYTE_IDS)
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
