"""What every broker and the node agree on: the Broker protocol, its value types, and the one
chat payload format every broker publishes (the Redis Lua script is checked against it).

No I/O and no imports from the rest of the package: every broker module and the ledger import
this one, and nothing here imports them.
"""

from __future__ import annotations

import fnmatch
import secrets
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import msgspec

#: deliver(room, exclude_client_id, payload, seq): seq > 0 is a chat_message's seq; seq < 0 marks
#: a presence notice (user_joined/user_left) made at presence version -seq; 0 anything else.
#: A broker calls it for every publication it read, all of one read in one loop turn, so the
#: hub's corking writes each member's socket once for the lot.
Deliver = Callable[[str, str, bytes, int], None]

#: pressure(paused): the broker's queue of commands passed its bound (True) or drained below
#: its low mark (False); the node stops and restarts reading from its clients.
Pressure = Callable[[bool], None]

#: done(seq) for ``Broker.publish_seq_nowait``: the seq allocated, or 0 when the broker could
#: not publish (it has logged why; the node answers ``unavailable``).
SeqDone = Callable[[int], None]


class MemberInfo(msgspec.Struct, frozen=True):
    """One connection's presence entry in a room."""

    clientId: str
    userId: str
    username: str
    node: str = ""


class JoinResult(NamedTuple):
    members: int  # connections in the room, this one included
    seq: int  # the room's last seq at the moment of joining
    epoch: str
    recovered: bool | None  # None: no recovery was asked for
    replay: list[bytes]  # chat payloads after the client's seq, oldest first
    # The room's presence version after this join. Every join and leave of the room moves it
    # up, so a presence notice at version <= this one is already counted in ``members``.
    version: int = 0
    # The user had a connection lingering in the room (``Broker.linger``): it was replaced by
    # this one, and the room is not told the user joined.
    resumed: bool = False


class LeaveResult(NamedTuple):
    members: int  # connections left in the room
    version: int = 0  # the room's presence version after this leave (see JoinResult)
    removed: bool = True  # False: it was not in the room (a join of its user replaced it)


class HistoryPolicy(NamedTuple):
    size: int = 100  # messages kept per room; 0 = no history
    ttl: float = 3600.0  # seconds a message is kept; 0 = until pushed out by size
    off: str = ""  # fnmatch pattern of rooms that keep no history ("" = none)
    # Bytes of history one process keeps in all (payloads plus their bookkeeping); past it,
    # the least recently used empty rooms go first (0 = no cap; Redis has its own maxmemory).
    max_bytes: int = 48 * 1024 * 1024

    def size_for(self, room: str) -> int:
        if self.off and fnmatch.fnmatchcase(room, self.off):
            return 0
        return self.size


def new_epoch() -> str:
    return secrets.token_hex(4)


# The published chat_message: the node's encoded head (protocol.chat_head, which ends in
# '"seq":'), then the seq and the epoch. The Redis script builds the same bytes in Lua from
# CHAT_SEQ_SEP and CHAT_END; tests check the two byte for byte.
CHAT_SEQ = b',"seq":'  # what the head ends in, in place of its closing brace
CHAT_EPOCH = b',"epoch":"'
CHAT_END = b'"}'
CHAT_TAIL = b"%b%d" + CHAT_EPOCH + b"%b" + CHAT_END


#: A chat a broker sequenced itself (under a lease): (room, payload, seq, done).
LeasedChat = tuple[str, bytes, int, SeqDone]


def deliver_sequenced(deliver: Deliver, out: list[LeasedChat], log: Any) -> None:
    """Deliver and answer leased chats in order; one's failing callback costs the others
    nothing (each is logged on ``log``)."""
    for room, payload, seq, done in out:
        try:
            deliver(room, "", payload, seq)
        except Exception:
            log.exception("delivery failed", extra={"event": "deliver_error", "room": room})
        try:
            done(seq)
        except Exception:
            log.exception("publish_seq callback failed")


def chat_payload(head: bytes, seq: int, epoch: str) -> bytes:
    """The published chat_message: the node's encoded head, then ``seq`` and ``epoch``."""
    return CHAT_TAIL % (head, seq, epoch.encode())


class Broker(Protocol):
    """Everything the node asks of a broker; one conformance suite runs it over every broker.

    The coroutines of an ``inline`` broker never suspend, so the node drives them to completion
    in place (``coro.send(None)``): the single-process default pays for no task and no
    event-loop turn. Every failure the node must tell a client about is ``BrokerUnavailable``.
    """

    name: str
    inline: bool  # True: coroutines never suspend and may be driven in place

    def attach(self, node_id: str, deliver: Deliver, pressure: Pressure | None = None) -> None:
        """Called once, before ``start``: who this node is and where publications go."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def health(self) -> dict[str, Any]:
        """``{"name": ..., "state": "ok" | "down", ...}``; down means degraded, not dead."""
        ...

    async def subscribe(self, room: str) -> None:
        """Start delivering ``room``'s publications here; returns once they will arrive."""
        ...

    async def unsubscribe(self, room: str) -> None: ...

    async def publish(self, room: str, payload: bytes, exclude: str = "", seq: int = 0) -> None:
        """Publish ``payload`` to the room's members but ``exclude``; ``seq`` as ``Deliver``
        has it (<= 0 here: chats go through ``publish_seq``)."""
        ...

    async def publish_seq(self, room: str, head: bytes) -> int:
        """Allocate the room's next seq, keep the message in history and publish
        ``chat_payload(head, seq, epoch)``, atomically; return the seq."""
        ...

    def publish_seq_nowait(self, room: str, head: bytes, done: SeqDone | None) -> None:
        """``publish_seq`` without a coroutine (the chat hot path): ``done(seq)`` once the seq is
        allocated, ``done(0)`` if the broker is unavailable. An inline broker calls ``done``
        before returning; ``done`` None is allowed only for an inline broker."""
        ...

    async def join(
        self, room: str, member: MemberInfo, since: tuple[int, str] | None = None
    ) -> JoinResult:
        """Add ``member`` to the room's presence; with ``since`` (seq, epoch), also return the
        chat payloads after that seq, as of the same instant."""
        ...

    async def history(self, room: str, limit: int) -> tuple[int, str, list[bytes]]:
        """(last seq, epoch, up to ``limit`` newest chat payloads, oldest first)."""
        ...

    async def leave(self, room: str, client_id: str, user_id: str = "") -> LeaveResult:
        """Remove a connection from the room's presence; return the connections left."""
        ...

    async def linger(self, room: str, client_id: str, user_id: str) -> None:
        """The connection dropped: it stays in the room's presence until the node's ``leave``
        after the presence grace, unless a join of ``user_id`` (on any node) comes first and
        takes its place (``JoinResult.resumed``; that ``leave`` then finds it gone)."""
        ...

    async def presence(self, room: str) -> list[MemberInfo]: ...

    async def session_opened(self, member: MemberInfo, connected_at: float) -> None: ...

    async def session_closed(self, client_id: str) -> None: ...

    async def flush(self) -> None:
        """Return once every publication made before this call that this node subscribed to
        has been delivered here (a barrier for tests and drain)."""
        ...
