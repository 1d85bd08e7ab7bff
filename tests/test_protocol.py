"""protocol.py without sockets: decoding into typed structs, errors, and the wire shape out."""

from __future__ import annotations

import json

import pytest

from fastws import protocol as p
from fastws.errors import MessageError


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ('{"type":"join_room","payload":{"room":"a"}}', p.JoinRoom),
        ('{"type":"leave_room","payload":{"room":"a"},"id":"x"}', p.LeaveRoom),
        ('{"type":"chat_message","payload":{"room":"a","message":"hi"}}', p.ChatMessage),
        ('{"type":"typing","payload":{"room":"a","isTyping":false}}', p.Typing),
        ('{"type":"presence","payload":{"room":"a"}}', p.Presence),
        ('{"type":"pong"}', p.Pong),
        ('{"type":"ping","id":3}', p.Ping),
    ],
)
def test_each_client_message_decodes_to_its_struct(raw: str, kind: type) -> None:
    """Every seed message type decodes into its own typed struct, from str or bytes."""
    assert isinstance(p.decode(raw), kind)
    assert isinstance(p.decode(raw.encode()), kind)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    """Extra fields (a newer client's) do not break decoding."""
    msg = p.decode('{"type":"join_room","payload":{"room":"a","x":1},"meta":{"v":2}}')
    assert isinstance(msg, p.JoinRoom) and msg.payload.room == "a"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("", "invalid_format"),
        ("{", "invalid_format"),
        ("null", "invalid_format"),
        ('"join_room"', "invalid_format"),
        ('{"type":null}', "invalid_format"),
        ('{"type":"join_room"}', "invalid_payload"),
        ('{"type":"typing","payload":{"room":"a","isTyping":"yes"}}', "invalid_payload"),
        ('{"type":"fly"}', "unknown_type"),
        ('{"type":"x","payload":' + "[" * 50000 + "]" * 50000 + "}", "invalid_format"),
        ('{"type":"pong","deep":' + "[" * 50000 + "]" * 50000 + "}", "invalid_format"),
    ],
)
def test_refusals_are_typed(raw: str, code: str) -> None:
    """Malformed input raises MessageError with a machine-readable code, never anything else."""
    with pytest.raises(MessageError) as err:
        p.decode(raw)
    assert err.value.code == code


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type":"\xff"}',
        b'{"type":"join_room","payload":{"room":"\xc0\xaf"}}',
        b'{"type":"ping","id":"\xed\xa0\x80"}',
    ],
)
def test_invalid_utf8_inside_binary_json_is_invalid_format(raw: bytes) -> None:
    """Invalid UTF-8 in a string msgspec reads is a typed refusal, not a server error."""
    with pytest.raises(MessageError) as err:
        p.decode(raw)
    assert err.value.code == "invalid_format"


def test_outgoing_messages_use_the_seeds_field_names() -> None:
    """Outgoing JSON is flat with the seed's camelCase names and `type` first."""
    from fastws.broker.types import chat_payload

    out = chat_payload(p.chat_head("r", "alice", "hi", "u1"), 7, "ep0")
    assert out.startswith(b'{"type":"chat_message"')
    msg = json.loads(out)
    assert isinstance(msg.pop("timestamp"), int)
    assert msg == {
        "type": "chat_message",
        "room": "r",
        "username": "alice",
        "message": "hi",
        "seq": 7,
        "epoch": "ep0",
        "userId": "u1",
    }
    assert json.loads(p.encode(p.Connected("c", 5))) == {
        "type": "connected",
        "clientId": "c",
        "timestamp": 5,
    }
    assert json.loads(p.encode(p.TypingBroadcast("r", "a", False))) == {
        "type": "typing",
        "room": "r",
        "username": "a",
        "isTyping": False,
    }


def test_error_replies_carry_the_request_id() -> None:
    """An error for a request that had an id carries the same id."""
    err = MessageError("not_in_room", "Not a member of room: r", "abc")
    assert json.loads(p.error_bytes(err)) == {
        "type": "error",
        "error": "Not a member of room: r",
        "code": "not_in_room",
        "id": "abc",
    }
