"""Rooms -> local members, and broadcast to those members through the compiled fan-out.

The hub knows nothing of the wire protocol: it is handed encoded payloads, frames each one
once, and has the ``Outbox`` copy the same bytes to every member's sink; the outbox writes
each socket once per event-loop turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    from . import _fanout as fanout
except ImportError:  # pragma: no cover - only when the extension was not built
    from . import _fanout_py as fanout  # type: ignore[no-redef]

if TYPE_CHECKING:
    from .session import Session


class Room:
    """One room's local members. ``sinks`` is the list the fan-out walks.

    Invariant: ``sinks[index[s]] is s.sink`` for every member ``s``; removal swaps the last
    entry into the hole so join and leave stay O(1).
    """

    __slots__ = ("fresh", "index", "members", "name", "pending", "sinks")

    def __init__(self, name: str) -> None:
        self.name = name
        self.sinks: list[Any] = []
        self.members: list[Session] = []
        self.index: dict[Session, int] = {}
        # Joiners waiting for the broker's answer: what the room was sent meanwhile is kept
        # for them as (seq, frame), to follow their room_joined and replay without a gap.
        self.pending: dict[Session, list[tuple[int, bytes]]] = {}
        # Members whose join reply said "seq N": a late copy of a chat with seq <= N (the
        # broker's stream can trail its replies) must skip them; cleared once the stream passes N.
        self.fresh: dict[Session, int] = {}

    def __len__(self) -> int:
        return len(self.members) + len(self.pending)

    def add(self, session: Session) -> bool:
        if session in self.index:
            return False
        self.index[session] = len(self.members)
        self.members.append(session)
        self.sinks.append(session.sink)
        return True

    def remove(self, session: Session) -> bool:
        i = self.index.pop(session, None)
        if i is None:
            return False
        last = self.members.pop()
        last_sink = self.sinks.pop()
        if last is not session:
            self.members[i] = last
            self.sinks[i] = last_sink
            self.index[last] = i
        return True


class Hub:
    """Rooms of this process. ``on_slow(sink)`` is called for each sink found over the limit."""

    def __init__(
        self,
        max_send_buffer_bytes: int,
        on_slow: Callable[[Any], Any],
        fanout_module: Any = fanout,
    ) -> None:
        self.rooms: dict[str, Room] = {}
        self.max_send_buffer_bytes = max_send_buffer_bytes
        self._on_slow = on_slow
        self.fanout = fanout_module
        self._frame = fanout_module.frame
        self._outbox: Any = None

    @property
    def outbox(self) -> Any:
        """The event loop's Outbox, made on first use (a Hub may be built before the loop runs)."""
        if self._outbox is None:
            self._outbox = self.fanout.Outbox(
                asyncio.get_running_loop(), self.max_send_buffer_bytes, self._on_slow
            )
        return self._outbox

    @property
    def deliveries(self) -> int:
        return int(self._outbox.deliveries) if self._outbox is not None else 0

    def sink(self, transport: Any, owner: Any) -> Any:
        return self.fanout.Sink(transport, owner)

    def send(self, sink: Any, payload: bytes) -> bool:
        """Queue one message for one connection, behind whatever it was already sent."""
        return bool(self.outbox.send(sink, self.fanout.frame(payload)))

    def flush(self, sink: Any) -> None:
        self.outbox.flush_sink(sink)

    def join(self, name: str, session: Session, pending: bool = False) -> Room:
        """Add ``session`` to the room, or with ``pending`` hold its traffic until ``activate``."""
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        if pending:
            room.pending.setdefault(session, [])
        else:
            room.add(session)
        return room

    def activate(self, name: str, session: Session, seen: int = 0) -> list[tuple[int, bytes]]:
        """Make a pending joiner a member that has ``seen`` every chat up to that seq; return
        the (seq, frame)s held for it meanwhile."""
        room = self.rooms.get(name)
        if room is None:
            return []
        held = room.pending.pop(session, [])
        room.add(session)
        if seen and not any(seq >= seen for seq, _ in held):
            room.fresh[session] = seen
        return held

    def leave(self, name: str, session: Session) -> Room | None:
        """Remove ``session``; an emptied room is dropped. Returns the room it was in."""
        room = self.rooms.get(name)
        if room is None:
            return None
        room.fresh.pop(session, None)
        if room.pending.pop(session, None) is None and not room.remove(session):
            return None
        if not len(room):
            del self.rooms[name]
        return room

    def broadcast(
        self, name: str, payload: bytes, exclude: Session | None = None, seq: int = 0
    ) -> int:
        """Frame ``payload`` once and queue it for every member of ``name`` but ``exclude``."""
        room = self.rooms.get(name)
        if room is None:
            return 0
        data = self._frame(payload)
        if room.pending:
            for session, held in room.pending.items():
                if session is not exclude:
                    held.append((seq, data))
        sinks = room.sinks
        if seq and room.fresh:
            sinks = self._skip_seen(room, seq, sinks)
        outbox = self._outbox or self.outbox  # the property only until it exists
        return outbox.broadcast(sinks, data, exclude.sink if exclude is not None else None)

    @staticmethod
    def _skip_seen(room: Room, seq: int, sinks: list[Any]) -> list[Any]:
        """The sinks minus fresh members that already had ``seq`` (rare and short-lived)."""
        seen = {s.sink for s, mark in room.fresh.items() if seq <= mark}
        for session in [s for s, mark in room.fresh.items() if seq >= mark]:
            del room.fresh[session]  # the stream has caught up with its join
        return [sink for sink in sinks if sink not in seen] if seen else sinks

    def send_frame(self, sink: Any, data: bytes) -> bool:
        return bool(self.outbox.send(sink, data))

    def member_count(self) -> int:
        return sum(len(r) for r in self.rooms.values())
