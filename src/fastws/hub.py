"""Rooms -> local members, and broadcast to those members through the compiled fan-out.

The hub knows nothing of the wire protocol: it is handed encoded payloads, frames each one
once, and has the ``Outbox`` copy the same bytes to every member's sink; the outbox writes
each socket once per event-loop turn.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .accel import FANOUT, FANOUT_ERROR, fanout

if TYPE_CHECKING:
    from .session import Session


#: Seconds a joiner's presence mark is kept: a notice published before its join can still be on
#: its way from another node for about a broker timeout.
PRESENCE_MARK_TTL = 10.0


class PresenceMarks:
    """Members that joined at presence version V, which their room_joined count reflects: a
    user_joined/user_left at version <= V is stale for them. Notices come from every node, so
    not in version order; a mark is kept for ``PRESENCE_MARK_TTL`` seconds instead.

    Sorted by version, so the members a notice at version v must skip (those with marks >= v,
    the joins since v: a few in flight) are a suffix found by bisection.
    """

    __slots__ = ("sessions", "stamps", "versions")

    def __init__(self) -> None:
        self.versions: list[int] = []
        self.stamps: list[float] = []
        self.sessions: list[Session] = []

    def __len__(self) -> int:
        return len(self.versions)

    def add(self, session: Session, version: int, now: float) -> None:
        i = bisect.bisect_right(self.versions, version)
        self.versions.insert(i, version)
        self.stamps.insert(i, now)
        self.sessions.insert(i, session)

    def remove(self, session: Session) -> None:
        if session in self.sessions:
            i = self.sessions.index(session)
            del self.versions[i], self.stamps[i], self.sessions[i]

    def seen(self, version: int, now: float) -> list[Any]:
        """The sinks of members for whom a notice at ``version`` is stale; old marks go."""
        while self.stamps and now - self.stamps[0] > PRESENCE_MARK_TTL:
            del self.versions[0], self.stamps[0], self.sessions[0]
        i = bisect.bisect_left(self.versions, version)
        return [s.sink for s in self.sessions[i:]]


class Room(fanout.RoomCore):
    """One room's local members. ``sinks`` is the list the fan-out walks (``sinks``,
    ``pending`` and ``fresh`` are fields of ``RoomCore``, which the chat path reads).

    Invariant: ``sinks[index[s]] is s.sink`` for every member ``s``; removal swaps the last
    entry into the hole so join and leave stay O(1).
    """

    __slots__ = ("diff", "diff_sinks", "index", "members", "name", "presence_marks")

    def __init__(self, name: str) -> None:
        self.name = name
        self.sinks: list[Any] = []
        self.members: list[Session] = []
        self.index: dict[Session, int] = {}
        # Joiners waiting for the broker's answer: what the room was sent meanwhile is kept
        # for them as (seq, frame), to follow their room_joined and replay without a gap
        # (seq as ``broker.types.Deliver`` says: > 0 a chat, < 0 a presence notice).
        self.pending: dict[Session, list[tuple[int, bytes]]] = {}
        # Members whose join reply said "seq N": a late copy of a chat with seq <= N (the
        # broker's stream can trail its replies) must skip them; cleared once the stream passes N.
        self.fresh: dict[Session, int] = {}
        self.presence_marks: PresenceMarks | None = None  # made for the first marked joiner
        # Members that take presence as presence_diff (see presencediff.py): skipped by the
        # room's notices. ``diff_sinks`` is their sinks as a list, made when needed.
        self.diff: dict[Session, Any] | None = None
        self.diff_sinks: list[Any] | None = None

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
        # (room, payload) of each presence notice of a room with diff members (presencediff).
        self.on_diff_notice: Callable[[str, bytes], Any] | None = None

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

    def activate(
        self, name: str, session: Session, seen: int = 0, version: int = 0
    ) -> list[tuple[int, bytes]]:
        """Make a pending joiner a member that has ``seen`` every chat up to that seq and every
        presence change up to ``version`` (0: unknown); return the (seq, frame)s held for it
        meanwhile."""
        room = self.rooms.get(name)
        if room is None:
            return []
        held = room.pending.pop(session, [])
        room.add(session)
        if seen and not any(seq >= seen for seq, _ in held):
            room.fresh[session] = seen
        if version:
            if room.presence_marks is None:
                room.presence_marks = PresenceMarks()
            room.presence_marks.add(session, version, time.monotonic())
        return held

    def leave(self, name: str, session: Session) -> Room | None:
        """Remove ``session``; an emptied room is dropped. Returns the room it was in."""
        room = self.rooms.get(name)
        if room is None:
            return None
        room.fresh.pop(session, None)
        if room.presence_marks is not None:
            room.presence_marks.remove(session)
        if room.diff is not None and room.diff.pop(session, None) is not None:
            room.diff_sinks = None
        if room.pending.pop(session, None) is None and not room.remove(session):
            return None
        if not len(room):
            del self.rooms[name]
        return room

    def broadcast(
        self,
        name: str,
        payload: bytes,
        exclude: Session | None = None,
        seq: int = 0,
        origin: str = "",
    ) -> int:
        """Frame ``payload`` once and queue it for every member of ``name`` but ``exclude``.

        ``seq`` 0 with an ``origin`` (the client id it came from, maybe on another node) is an
        ephemeral notice (typing): a congested member holds only the latest of each
        (room, origin) until its socket drains, and is never closed as slow for one."""
        room = self.rooms.get(name)
        if room is None:
            return 0
        data = self._frame(payload)
        if room.pending:
            for session, held in room.pending.items():
                if session is not exclude:
                    held.append((seq, data))
        skip = None
        if seq > 0 and room.fresh:
            skip = self._seen_chat(room, seq)
        elif seq < 0:
            if room.presence_marks:
                skip = room.presence_marks.seen(-seq, time.monotonic())
            if room.diff:
                skip = self.diff_sinks(room) + skip if skip else self.diff_sinks(room)
                if self.on_diff_notice is not None:
                    self.on_diff_notice(name, payload)
        outbox = self._outbox or self.outbox  # the property only until it exists
        exclude_sink = exclude.sink if exclude is not None else None
        taken: int
        if seq == 0 and origin:
            taken = outbox.broadcast_ephemeral(room.sinks, data, exclude_sink, (name, origin))
        else:
            taken = outbox.broadcast(room.sinks, data, exclude_sink, skip)
        return taken

    def want_diffs(self, name: str, session: Session) -> None:
        """``session`` takes ``name``'s presence changes as presence_diff, not one by one."""
        room = self.rooms.get(name)
        if room is not None:
            if room.diff is None:
                room.diff = {}
            room.diff[session] = session.sink
            room.diff_sinks = None

    @staticmethod
    def diff_sinks(room: Room) -> list[Any]:
        if room.diff_sinks is None:
            room.diff_sinks = list(room.diff.values()) if room.diff else []
        return room.diff_sinks

    def send_diff(self, name: str, payload: bytes) -> int:
        """A presence_diff to the room's diff members."""
        room = self.rooms.get(name)
        if room is None or not room.diff:
            return 0
        outbox = self._outbox or self.outbox
        return int(outbox.broadcast(self.diff_sinks(room), self._frame(payload)))

    @staticmethod
    def _seen_chat(room: Room, seq: int) -> list[Any] | None:
        """Fresh members that already had chat ``seq`` (rare and short-lived). A room's chats
        arrive in seq order, so a mark is dropped once the stream reaches it."""
        seen = [s.sink for s, mark in room.fresh.items() if seq <= mark]
        for session in [s for s, mark in room.fresh.items() if seq >= mark]:
            del room.fresh[session]  # the stream has caught up with its join
        return seen or None

    def send_frame(self, sink: Any, data: bytes) -> bool:
        return bool(self.outbox.send(sink, data))

    def member_count(self) -> int:
        return sum(len(r) for r in self.rooms.values())


__all__ = [
    "FANOUT",
    "FANOUT_ERROR",
    "PRESENCE_MARK_TTL",
    "Hub",
    "PresenceMarks",
    "Room",
    "fanout",
]
