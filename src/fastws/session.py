"""One connection's state (user, rooms, rate bucket): a message in -> calls on the node out.

No I/O here: replies leave through the ``Outlet`` the transport gives, room effects through
the ``NodeActions`` the server gives, so tests can drive a session with plain bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import unicodedata
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

from . import protocol as p
from .accel import fanout
from .actions import Action, Actions
from .auth import Principal
from .config import Settings
from .errors import AuthError, CloseCode, MessageError
from .policy import FORBIDDEN

log = logging.getLogger("fastws.session")


def check_room_name(room: str, msg_id: p.MsgId = None, max_chars: int = 128) -> None:
    """Raise ``invalid_room`` unless ``room`` is a valid name (also for the admin API): any
    Unicode text of 1 to ``max_chars`` code points with no control character."""
    if not 0 < len(room) <= max_chars or not _printable(room):
        raise MessageError(
            "invalid_room",
            f"Invalid room name (1-{max_chars} characters, no control characters)",
            msg_id,
        )


def _printable(room: str) -> bool:
    if room.isprintable():  # the common case, in C: no control (nor format/space-sep) chars
        return True
    try:
        room.encode()  # a lone surrogate has no UTF-8: no broker could key it
    except UnicodeEncodeError:
        return False
    return not any(unicodedata.category(c) in ("Cc", "Cs") for c in room)


def check_chat_text(text: str, max_chars: int, msg_id: p.MsgId = None) -> None:
    """Raise ``message_too_long`` or ``empty_message`` for a chat text that may not be posted
    (also for the admin API)."""
    if len(text) > max_chars:
        raise MessageError(
            "message_too_long", f"Message too long (max {max_chars} characters)", msg_id
        )
    if not text.strip():
        raise MessageError("empty_message", "Message is empty", msg_id)


class Outlet(Protocol):
    """How a session's own replies leave (implemented by the transport)."""

    def send(self, payload: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class NodeActions(Protocol):
    """What a session asks of the node (implemented by the server).

    ``actions`` runs the coroutines a session's messages become (``actions.Actions``).
    """

    actions: Actions
    verifier: Any  # auth.Verifier
    policy: Any  # policy.Policy
    join_hook: Any  # joinhook.JoinHook | None
    counters: Any  # collections.Counter of node events, exported as metrics
    # ``chat`` without a coroutine (the broker answers by callback); None: use ``chat``.
    chat_now: Callable[[Session, str, str, p.MsgId], None] | None

    async def join(
        self,
        session: Session,
        room: str,
        since: p.Since | None,
        msg_id: p.MsgId,
        presence: str = "each",
    ) -> None: ...

    async def leave(self, session: Session, room: str, msg_id: p.MsgId) -> None: ...

    async def chat(self, session: Session, room: str, text: str, msg_id: p.MsgId) -> None: ...

    async def typing(
        self, session: Session, room: str, is_typing: bool, msg_id: p.MsgId
    ) -> None: ...

    async def presence(self, session: Session, room: str, msg_id: p.MsgId) -> None: ...

    async def history(self, session: Session, room: str, limit: int, msg_id: p.MsgId) -> None: ...


_NO_ROOMS: frozenset[str] = frozenset()


def _decode(data: bytes | str) -> p.ClientMessage:
    try:
        return p.decode_valid(data)  # the common case: a call less than p.decode
    except p.DECODE_ERRORS:
        return p.decode(data)  # raises the seed's MessageError for it


# The rate limit's bucket: C in the compiled fan-out (the chat path takes it without a
# Python call), Python in the twin.
TokenBucket = fanout.TokenBucket


class Session(fanout.SessionCore):
    """A connected, authenticated client. ``transport`` is opaque here: the hub fans out to it.

    ``bucket``, ``rejected_in_row``, ``_task``, ``rooms``, ``in_flight``, ``principal`` and
    ``sink`` are fields of ``SessionCore``, which the compiled chat path reads in C.
    """

    __slots__ = (
        "_backlog",
        "_clock",
        "_needs_task",
        "client_id",
        "connected_at",
        "granted",
        "ip",
        "node",
        "outlet",
        "settings",
        "transport",
    )

    def __init__(
        self,
        client_id: str,
        principal: Principal,
        transport: Any,
        outlet: Outlet,
        node: NodeActions,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client_id = client_id
        self.ip = ""
        self.principal = principal
        self.transport = transport
        self.sink: Any = None  # set by the transport: this connection's fan-out sink
        self.outlet = outlet
        self.node = node
        self.settings = settings
        # The rooms it is in: only enter_room/exit_room change it. Shared and empty until the
        # first join, and the rate bucket until the first message: most connections idle.
        self.rooms: set[str] | frozenset[str] = _NO_ROOMS
        self.connected_at = time.time()
        self.bucket: TokenBucket | None = None
        self._clock = clock
        self.rejected_in_row = 0
        self.in_flight = 0  # chats handed to a remote broker and not yet answered
        # While an action awaits a remote broker: its task, and the later messages waiting
        # behind it (made on first need). Written only by the node's runner (actions.py).
        self._backlog: deque[bytes | str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._needs_task = False  # this action awaits I/O (the join hook) even when inline
        # Private rooms opened by a room token (until its exp) or the join hook (inf).
        self.granted: dict[str, float] | None = None

    def __repr__(self) -> str:
        return f"<Session {self.client_id} user={self.principal.user_id}>"

    def send(self, message: Any) -> None:
        self.outlet.send(p.encode(message))

    def enter_room(self, room: str) -> None:
        rooms = self.rooms
        if isinstance(rooms, frozenset):
            rooms = self.rooms = set()
        rooms.add(room)

    def exit_room(self, room: str) -> None:
        rooms = self.rooms
        if isinstance(rooms, set):
            rooms.discard(room)
            if not rooms:
                self.rooms = _NO_ROOMS

    def handle(self, data: bytes | str) -> None:
        """Act on one complete client message; every refusal becomes an ``error`` reply.

        The compiled chat path (``_fanout.ChatPath``) takes the common chat_message itself
        and hands the rest to the steps below: ``refuse`` past the rate limit,
        ``handle_admitted`` for what it did not decode, ``act`` for what it did."""
        bucket = self.bucket
        if bucket is None and self.settings.rate_limit > 0:
            bucket = self.bucket = TokenBucket(
                self.settings.rate_limit, self.settings.rate_burst, self._clock
            )
        if bucket is not None and not bucket.take():
            self.refuse()
            return
        self.rejected_in_row = 0
        self.handle_admitted(data)

    def refuse(self) -> None:
        """A message past the rate limit: an error, or the close once it persists."""
        self.rejected_in_row += 1
        self.node.counters["rate_limited"] += 1
        if self.rejected_in_row > self.settings.rate_burst:
            self.outlet.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
            return
        self.outlet.send(
            p.error_bytes(MessageError("rate_limited", "Rate limit exceeded, slow down"))
        )

    def handle_admitted(self, data: bytes | str) -> None:
        """A message within the rate limit: queued behind a pending action, or acted on."""
        if self._task is not None:
            self.node.actions.queue(self, data)
            return
        try:
            msg = _decode(data)
        except MessageError as exc:
            self.outlet.send(p.error_bytes(exc))
            return
        self.act(msg)

    def act(self, msg: p.ClientMessage) -> None:
        """Decide on one decoded message (no action pending) and hand the node action, if
        any, to the node's runner (``actions.Actions``)."""
        self._needs_task = False
        try:
            action = self.dispatch(msg)
        except MessageError as exc:
            self.outlet.send(p.error_bytes(exc))
            return
        if action is not None:
            self.node.actions.run(self, action, self._needs_task)

    def decide(self, data: bytes | str) -> Action | None:
        """``data``'s node action, or None when already answered (the runner's backlog)."""
        self._needs_task = False
        try:
            return self.dispatch(_decode(data))
        except MessageError as exc:
            self.outlet.send(p.error_bytes(exc))
            return None

    def dispatch(self, msg: p.ClientMessage) -> Action | None:
        """Validate ``msg``; return the node action to run, or None when already answered."""
        if isinstance(msg, p.ChatMessage):
            room, text = msg.payload.room, msg.payload.message
            if room not in self.rooms:
                self._require_member(room, msg.id)  # raises not_in_room
            policy = self.node.policy
            if policy.post_rules and not policy.may_post(self.principal, room):
                self._forbid("chat_message", room, msg.id)
            check_chat_text(text, self.settings.max_message_chars, msg.id)
            if self.node.chat_now is not None:
                # The hot path: no coroutine to build and drive; a remote broker answers by
                # callback, up to rate_burst chats in flight per connection.
                if self.in_flight >= self.settings.rate_burst:
                    self.outlet.close(CloseCode.POLICY_VIOLATION, "too many pending messages")
                    return None
                self.node.chat_now(self, room, text, msg.id)
                return None
            return self.node.chat(self, room, text, msg.id)
        elif isinstance(msg, p.Typing):
            self._require_member(msg.payload.room, msg.id)
            if not self.node.policy.may_post(self.principal, msg.payload.room):
                self._forbid("typing", msg.payload.room, msg.id)
            return self.node.typing(self, msg.payload.room, msg.payload.isTyping, msg.id)
        elif isinstance(msg, p.JoinRoom):
            room = msg.payload.room
            check_room_name(room, msg.id, self.settings.max_room_chars)
            limit = self.settings.max_rooms_per_connection
            if room not in self.rooms and limit and len(self.rooms) >= limit:
                raise MessageError("too_many_rooms", f"Too many rooms (max {limit})", msg.id)
            allowed = self.node.policy.may_join(self.principal, room)
            if allowed is None:  # private: a room token, a grant already given, or the hook
                return self._join_private(room, msg)
            if not allowed:
                self._forbid("join_room", room, msg.id)
            return self.node.join(self, room, msg.payload.since, msg.id, msg.payload.presence)
        elif isinstance(msg, p.LeaveRoom):
            self._require_member(msg.payload.room, msg.id)
            return self.node.leave(self, msg.payload.room, msg.id)
        elif isinstance(msg, p.Presence):
            self._require_member(msg.payload.room, msg.id)
            if not self.node.policy.may_see_presence(self.principal, msg.payload.room):
                self._forbid("presence", msg.payload.room, msg.id)
            return self.node.presence(self, msg.payload.room, msg.id)
        elif isinstance(msg, p.History):
            self._require_member(msg.payload.room, msg.id)
            if not 1 <= msg.payload.limit <= 1000:
                raise MessageError("invalid_payload", "Invalid history limit (1-1000)", msg.id)
            return self.node.history(self, msg.payload.room, msg.payload.limit, msg.id)
        elif isinstance(msg, p.Refresh):
            return self.refresh(msg.payload.token, msg.id)
        elif isinstance(msg, p.Ping):
            self.send(p.ServerPong(p.now_ms(), msg.id))
        # Pong: the seed's heartbeat reply; liveness is tracked by the transport.
        return None

    def refresh(self, token: str, msg_id: p.MsgId) -> Action | None:
        """A new token for the same user extends the connection past the old one's expiry;
        private rooms its claims no longer open are left (``room_left`` with a reason)."""
        try:
            fresh = self.node.verifier.verify(token)
        except AuthError as exc:
            raise MessageError("invalid_token", f"Invalid token: {exc.reason}", msg_id) from None
        if fresh.user_id != self.principal.user_id:
            raise MessageError("wrong_user", "Token is for another user", msg_id)
        # The expiry, roles and rooms claims change; presence keeps the name it was given.
        self.principal = dataclasses.replace(
            self.principal, expires_at=fresh.expires_at, roles=fresh.roles, rooms=fresh.rooms
        )
        self.send(p.Refreshed(int(fresh.expires_at * 1000), msg_id))
        revoked = [room for room in self.rooms if not self._may_stay(room)]
        return self._leave_revoked(revoked) if revoked else None

    def _may_stay(self, room: str) -> bool:
        allowed = self.node.policy.may_join(self.principal, room)
        if allowed is None:
            return self.granted is not None and self.granted.get(room, 0.0) > time.time()
        return bool(allowed)

    async def _leave_revoked(self, rooms: list[str]) -> None:
        for room in rooms:
            if room in self.rooms:
                await self.node.leave(self, room, None)
                self.send(p.RoomLeft(room, None, "access_revoked"))
                self.node.counters["access_revoked"] += 1

    # ---- private rooms ----------------------------------------------------------------------

    def _join_private(self, room: str, msg: p.JoinRoom) -> Action:
        token = msg.payload.token
        if token:
            try:
                expires = self.node.verifier.verify_room(token, room, self.principal.user_id)
            except AuthError:
                self._forbid("join_room", room, msg.id)
            self._grant(room, expires)
            return self.node.join(self, room, msg.payload.since, msg.id, msg.payload.presence)
        if self.granted is not None and self.granted.get(room, 0.0) > time.time():
            # e.g. since again
            return self.node.join(self, room, msg.payload.since, msg.id, msg.payload.presence)
        hook = self.node.join_hook
        if hook is None:
            self._forbid("join_room", room, msg.id)
        known = hook.known(self.principal, room)
        if known is not None:
            if not known:
                self._forbid("join_room", room, msg.id)
            self._grant(room, float("inf"))
            return self.node.join(self, room, msg.payload.since, msg.id, msg.payload.presence)
        self._needs_task = True  # the hook is an HTTP call: this join runs as a task
        return self._join_by_hook(hook, room, msg)

    async def _join_by_hook(self, hook: Any, room: str, msg: p.JoinRoom) -> None:
        if not await hook.ask(self.principal, room):
            self._forbid("join_room", room, msg.id)
        self._grant(room, float("inf"))  # the backend said yes for this connection
        await self.node.join(self, room, msg.payload.since, msg.id, msg.payload.presence)

    def _grant(self, room: str, until: float) -> None:
        if self.granted is None:
            self.granted = {}
        self.granted[room] = until

    def _forbid(self, path: str, room: str, msg_id: p.MsgId) -> NoReturn:
        """Refuse with the one answer that says nothing about the room."""
        self.node.counters["forbidden"] += 1
        log.info(
            "forbidden",
            extra={
                "event": "forbidden",
                "path": path,
                "room": room[:128],
                "client_id": self.client_id,
                "user_id": self.principal.user_id,
            },
        )
        raise MessageError("forbidden", FORBIDDEN, msg_id)

    def _require_member(self, room: str, msg_id: p.MsgId) -> None:
        if room not in self.rooms:
            raise MessageError("not_in_room", f"Not a member of room: {room[:64]}", msg_id)
