"""The seed's chat protocol end to end, over real sockets, with `websockets` as the peer."""

from __future__ import annotations

import json

import pytest

from .utils import client, expect_silence, join, recv_json, running_node, send_json


async def test_connected_message_has_client_id_and_timestamp() -> None:
    """On open the client gets `connected` with clientId, timestamp and who it is."""
    async with running_node() as node, client(node, "alice") as ws:
        await send_json(ws, "ping")
        assert (await recv_json(ws))["type"] == "pong"
        (session,) = node.sessions.values()
        assert session.principal.username == "alice"


async def test_join_room_replies_room_joined_and_tells_others() -> None:
    """join_room -> room_joined (members count) to the joiner, user_joined to the others."""
    async with running_node() as node, client(node, "alice") as a, client(node, "bob") as b:
        first = await join(a, "general")
        epoch = first.pop("epoch")
        assert isinstance(epoch, str) and epoch
        assert first == {"type": "room_joined", "room": "general", "members": 1, "seq": 0}
        second = await join(b, "general")
        assert second["members"] == 2
        joined = await recv_json(a)
        assert joined["type"] == "user_joined"
        assert joined["room"] == "general" and joined["username"] == "bob"
        assert isinstance(joined["timestamp"], int) and joined["members"] == 2
        await expect_silence(b)


async def test_chat_message_reaches_every_member_including_sender() -> None:
    """chat_message is broadcast to all members, sender included, with username and seq."""
    async with (
        running_node() as node,
        client(node, "alice") as a,
        client(node, "bob") as b,
        client(node, "carol") as c,
    ):
        await join(a, "r1")
        await join(b, "r1")
        await recv_json(a)  # user_joined bob
        await join(c, "other")
        for i in range(1, 4):
            await send_json(a, "chat_message", {"room": "r1", "message": f"hello {i}"})
            for ws in (a, b):
                msg = await recv_json(ws)
                assert msg["type"] == "chat_message"
                assert msg["room"] == "r1" and msg["username"] == "alice"
                assert msg["message"] == f"hello {i}" and msg["seq"] == i
                assert isinstance(msg["timestamp"], int)
        await expect_silence(c)


async def test_typing_goes_to_the_others_only() -> None:
    """typing is relayed to the other members with username and isTyping, not to the sender."""
    async with running_node() as node, client(node, "alice") as a, client(node, "bob") as b:
        await join(a, "r")
        await join(b, "r")
        await recv_json(a)
        await send_json(a, "typing", {"room": "r", "isTyping": True})
        assert await recv_json(b) == {
            "type": "typing",
            "room": "r",
            "username": "alice",
            "isTyping": True,
            "userId": "alice",
        }
        await expect_silence(a)


async def test_leave_room_sends_user_left_to_remaining() -> None:
    """leave_room -> user_left to the remaining members; the leaver stops receiving."""
    async with running_node() as node, client(node, "alice") as a, client(node, "bob") as b:
        await join(a, "r")
        await join(b, "r")
        await recv_json(a)
        await send_json(b, "leave_room", {"room": "r"})
        left = await recv_json(a)
        assert left["type"] == "user_left" and left["username"] == "bob" and left["members"] == 1
        await send_json(a, "chat_message", {"room": "r", "message": "still here?"})
        assert (await recv_json(a))["message"] == "still here?"
        await expect_silence(b)
        assert node.stats()["memberships"] == 1


@pytest.mark.parametrize(
    ("raw", "error", "code"),
    [
        ("not json", "Invalid message format", "invalid_format"),
        ('{"payload": {}}', "Invalid message format", "invalid_format"),
        ('{"type": 7}', "Invalid message format", "invalid_format"),
        ("[1, 2]", "Invalid message format", "invalid_format"),
        ('{"type": "dance"}', "Unknown message type: dance", "unknown_type"),
    ],
)
async def test_bad_messages_get_the_seeds_errors(raw: str, error: str, code: str) -> None:
    """Invalid JSON / no type -> "Invalid message format"; unknown type -> its name."""
    async with running_node() as node, client(node) as ws:
        await ws.send(raw)
        reply = await recv_json(ws)
        assert reply == {"type": "error", "error": error, "code": code}


async def test_too_long_message_is_refused_with_the_seeds_text() -> None:
    """Over 1000 characters -> "Message too long (max 1000 characters)"; 1000 is fine."""
    async with running_node() as node, client(node) as ws:
        await join(ws, "r")
        await send_json(ws, "chat_message", {"room": "r", "message": "é" * 1001})
        reply = await recv_json(ws)
        assert reply["error"] == "Message too long (max 1000 characters)"
        await send_json(ws, "chat_message", {"room": "r", "message": "é" * 1000})
        assert (await recv_json(ws))["type"] == "chat_message"


async def test_posting_or_typing_outside_a_room_is_refused() -> None:
    """chat_message, typing, leave_room and presence need membership."""
    async with running_node() as node, client(node, "alice") as a, client(node, "bob") as b:
        await join(b, "secret")
        for type_, payload in [
            ("chat_message", {"room": "secret", "message": "hi"}),
            ("typing", {"room": "secret", "isTyping": True}),
            ("leave_room", {"room": "secret"}),
            ("presence", {"room": "secret"}),
        ]:
            await send_json(a, type_, payload, id=type_)
            reply = await recv_json(a)
            assert reply == {
                "type": "error",
                "error": "Not a member of room: secret",
                "code": "not_in_room",
                "id": type_,
            }
        await expect_silence(b)


@pytest.mark.parametrize(
    "room", ["", "x" * 129, "a\nb", "nul\x00", "tab\there", "del\x7f", "\x1b[31m"]
)
async def test_invalid_room_names_are_refused(room: str) -> None:
    """Room names are 1-128 code points of any text without control characters."""
    async with running_node() as node, client(node) as ws:
        await send_json(ws, "join_room", {"room": room})
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["code"] == "invalid_room"
        assert node.stats()["rooms"] == 0


async def test_invalid_payload_is_a_typed_error_with_id() -> None:
    """A known type with a wrong payload says what is wrong, and echoes the id."""
    async with running_node() as node, client(node) as ws:
        await send_json(ws, "join_room", {"room": 5}, id="j1")
        reply = await recv_json(ws)
        assert reply["code"] == "invalid_payload" and reply["id"] == "j1"
        assert "join_room" in reply["error"] and "$.payload.room" in reply["error"]
        await send_json(ws, "chat_message", id=2)
        reply = await recv_json(ws)
        assert reply["code"] == "invalid_payload" and reply["id"] == 2


async def test_ids_are_echoed_on_replies_and_acks() -> None:
    """A request's id comes back on its reply: room_joined, ack (with seq), room_left, presence."""
    async with running_node() as node, client(node) as ws:
        await send_json(ws, "join_room", {"room": "r"}, id="a")
        assert (await recv_json(ws))["id"] == "a"
        await send_json(ws, "chat_message", {"room": "r", "message": "m"}, id=10)
        got = [await recv_json(ws), await recv_json(ws)]
        by_type = {m["type"]: m for m in got}
        assert "id" not in by_type["chat_message"]
        assert by_type["ack"] == {"type": "ack", "id": 10, "seq": 1}
        await send_json(ws, "presence", {"room": "r"}, id="p")
        assert (await recv_json(ws)) == {
            "type": "presence",
            "room": "r",
            "id": "p",
            "members": [{"userId": "alice", "username": "alice"}],
        }
        await send_json(ws, "leave_room", {"room": "r"}, id="l")
        assert (await recv_json(ws)) == {"type": "room_left", "room": "r", "id": "l"}


async def test_presence_lists_each_user_once() -> None:
    """presence has one entry per user, however many connections that user has."""
    async with (
        running_node() as node,
        client(node, "alice") as a1,
        client(node, "alice") as a2,
        client(node, "bob") as b,
    ):
        for ws in (a1, a2, b):
            await join(ws, "r")
        await send_json(b, "presence", {"room": "r"})
        reply = await recv_json(b)
        assert sorted(m["userId"] for m in reply["members"]) == ["alice", "bob"]


async def test_pong_is_accepted_silently_and_binary_json_works() -> None:
    """The seed's JSON pong is accepted; a binary frame carrying JSON is handled like text."""
    async with running_node() as node, client(node) as ws:
        await send_json(ws, "pong")
        await expect_silence(ws)
        await ws.send(json.dumps({"type": "join_room", "payload": {"room": "b"}}).encode())
        assert (await recv_json(ws))["type"] == "room_joined"


async def test_rejoining_a_room_is_idempotent() -> None:
    """A second join_room for the same room answers room_joined again without a duplicate."""
    async with running_node() as node, client(node) as ws:
        await join(ws, "r")
        again = await join(ws, "r")
        assert again["members"] == 1
        await send_json(ws, "chat_message", {"room": "r", "message": "once"})
        assert (await recv_json(ws))["message"] == "once"
        await expect_silence(ws)


async def test_too_many_rooms_is_refused() -> None:
    """max_rooms_per_connection bounds how many rooms one connection may be in."""
    async with running_node(max_rooms_per_connection=2) as node, client(node) as ws:
        await join(ws, "a")
        await join(ws, "b")
        await send_json(ws, "join_room", {"room": "c"})
        assert (await recv_json(ws))["code"] == "too_many_rooms"


async def test_the_in_process_broker_takes_the_synchronous_chat_path() -> None:
    """The default node chats without a coroutine per message, and its acks and seqs are
    those of the coroutine path (which a remote broker uses)."""
    async with running_node() as node, client(node) as ws:
        assert node.chat_now is not None
        await join(ws, "r")
        for i in range(3):
            await send_json(ws, "chat_message", {"room": "r", "message": f"m{i}"}, id=f"c{i}")
        got = [await recv_json(ws) for _ in range(6)]
        acks = [m for m in got if m["type"] == "ack"]
        echoes = [m for m in got if m["type"] == "chat_message"]
        assert [(a["id"], a["seq"]) for a in acks] == [("c0", 1), ("c1", 2), ("c2", 3)]
        assert [(e["message"], e["seq"]) for e in echoes] == [("m0", 1), ("m1", 2), ("m2", 3)]
