"""Every wire message as a msgspec Struct, and the reused encoder/decoders. No I/O.

Incoming messages are a tagged union on ``type`` with the seed's ``payload`` object;
outgoing ones are flat, as in the seed. ``id`` is optional on every request and is
echoed on its reply or error. Field names and error texts are the seed's exactly.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from .broker.types import CHAT_SEQ
from .errors import MessageError

MsgId = str | int | None


# ---- client -> server -------------------------------------------------------------------


class RoomPayload(msgspec.Struct):
    room: str


class Since(msgspec.Struct):
    seq: int
    epoch: str


class JoinPayload(msgspec.Struct):
    room: str
    since: Since | None = None
    token: str | None = None  # a room token, for a private room (see policy.py)
    # "diff": this connection takes the room's presence changes as one presence_diff per
    # interval instead of a user_joined/user_left per change (see docs/protocol.md).
    presence: Literal["diff", "each"] = "each"


class HistoryPayload(msgspec.Struct):
    room: str
    limit: int = 50


class ChatPayload(msgspec.Struct):
    room: str
    message: str


class TypingPayload(msgspec.Struct):
    room: str
    isTyping: bool = True


class JoinRoom(msgspec.Struct, tag="join_room", tag_field="type"):
    payload: JoinPayload
    id: MsgId = None


class LeaveRoom(msgspec.Struct, tag="leave_room", tag_field="type"):
    payload: RoomPayload
    id: MsgId = None


class ChatMessage(msgspec.Struct, tag="chat_message", tag_field="type"):
    payload: ChatPayload
    id: MsgId = None


class Typing(msgspec.Struct, tag="typing", tag_field="type"):
    payload: TypingPayload
    id: MsgId = None


class Presence(msgspec.Struct, tag="presence", tag_field="type"):
    payload: RoomPayload
    id: MsgId = None


class History(msgspec.Struct, tag="history", tag_field="type"):
    payload: HistoryPayload
    id: MsgId = None


class TokenPayload(msgspec.Struct):
    token: str


class Refresh(msgspec.Struct, tag="refresh", tag_field="type"):
    payload: TokenPayload
    id: MsgId = None


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    id: MsgId = None


class Pong(msgspec.Struct, tag="pong", tag_field="type"):
    id: MsgId = None


ClientMessage = (
    JoinRoom | LeaveRoom | ChatMessage | Typing | Presence | History | Refresh | Ping | Pong
)
CLIENT_TYPES = frozenset(
    (
        "join_room",
        "leave_room",
        "chat_message",
        "typing",
        "presence",
        "history",
        "refresh",
        "ping",
        "pong",
    )
)


class _Envelope(msgspec.Struct):
    """Just enough of a message to say what went wrong when the full decode fails."""

    type: str
    id: MsgId = None


_decoder = msgspec.json.Decoder(ClientMessage)
_envelope_decoder = msgspec.json.Decoder(_Envelope)
# What decoding raises for input that is not a valid client message.
DECODE_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)
# Raises DECODE_ERRORS as they are; ``decode`` turns them into the seed's MessageError.
decode_valid = _decoder.decode


def decode(data: bytes | str) -> ClientMessage:
    """Decode one client message, or raise ``MessageError`` with the seed's text."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: catch it first
        detail = str(exc)
    except DECODE_ERRORS:
        raise MessageError("invalid_format", "Invalid message format") from None
    try:
        env = _envelope_decoder.decode(data)
    except DECODE_ERRORS:
        raise MessageError("invalid_format", "Invalid message format") from None
    if env.type not in CLIENT_TYPES:
        raise MessageError("unknown_type", f"Unknown message type: {env.type}", env.id)
    raise MessageError("invalid_payload", f"Invalid {env.type} message: {detail}", env.id)


# ---- server -> client -------------------------------------------------------------------


class _Out(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class Connected(_Out, tag="connected"):
    clientId: str
    timestamp: int
    userId: str = ""
    username: str = ""
    node: str = ""


class RoomJoined(_Out, tag="room_joined"):
    room: str
    members: int
    seq: int
    epoch: str = ""
    recovered: bool | None = None  # only when the join asked for recovery (``since``)
    id: MsgId = None


class RoomLeft(_Out, tag="room_left"):
    room: str
    id: MsgId = None
    reason: str | None = None  # set when the server took the connection out (a refresh)


class UserJoined(_Out, tag="user_joined"):
    room: str
    username: str
    timestamp: int
    userId: str = ""
    members: int = 0


class UserLeft(_Out, tag="user_left"):
    room: str
    username: str
    timestamp: int
    userId: str = ""
    members: int = 0


class _ChatWithoutSeq(_Out, tag="chat_message"):
    room: str
    username: str
    message: str
    timestamp: int
    userId: str


def chat_head(room: str, username: str, message: str, user_id: str) -> bytes:
    """A chat_message (room, username, message, timestamp, userId, seq, epoch) encoded once,
    up to where its ``seq`` goes: the broker allocates seq and epoch and completes it
    (``broker.types.chat_payload``) atomically with publishing, so no node re-encodes it."""
    now = int(time.time() * 1000)  # now_ms() without a call: this runs per chat message
    body = encode(_ChatWithoutSeq(room, username, message, now, user_id))
    return body[:-1] + CHAT_SEQ


class HistoryReply(_Out, tag="history"):
    room: str
    seq: int
    epoch: str
    messages: list[msgspec.Raw]
    id: MsgId = None


class TypingBroadcast(_Out, tag="typing"):
    room: str
    username: str
    isTyping: bool
    userId: str = ""


class Member(msgspec.Struct):
    userId: str
    username: str


class PresenceDiff(_Out, tag="presence_diff"):
    """A room's presence changes of one interval, for members that asked for diffs: who
    joined and who left (each user once, net of the interval), or above the names threshold
    only how many; ``members`` is the room's connection count after them."""

    room: str
    members: int
    joined: int
    left: int
    joins: list[Member] | None = None
    leaves: list[Member] | None = None


class PresenceReply(_Out, tag="presence"):
    room: str
    members: list[Member]
    id: MsgId = None


class Ack(_Out, tag="ack"):
    id: MsgId
    seq: int = 0


class Refreshed(_Out, tag="refreshed"):
    expiresAt: int  # ms since the epoch
    id: MsgId = None


class ServerPing(_Out, tag="ping"):
    timestamp: int


class ServerPong(_Out, tag="pong"):
    timestamp: int
    id: MsgId = None


class Error(_Out, tag="error"):
    error: str
    code: str = ""
    id: MsgId = None


_encoder = msgspec.json.Encoder()
encode = _encoder.encode


def now_ms() -> int:
    """The seed's ``Date.now()``: milliseconds since the epoch."""
    return int(time.time() * 1000)


def error_bytes(exc: MessageError) -> bytes:
    return encode(Error(exc.text, exc.code, exc.msg_id))
