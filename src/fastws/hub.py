"""Rooms -> local members, and broadcast to those members through the compiled fan-out.

The hub knows nothing of the wire protocol: it is handed encoded payloads, frames each
one once, and writes the same bytes to every member's socket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from picows import WSTransport

try:
    from . import _fanout as fanout
except ImportError:  # pragma: no cover - only when the extension was not built
    from . import _fanout_py as fanout  # type: ignore[no-redef]

if TYPE_CHECKING:
    from .session import Session


class Room:
    """One room's local members. ``transports`` is the list the fan-out walks.

    Invariant: ``transports[index[s]] is s.transport`` for every member ``s``; removal
    swaps the last entry into the hole so join and leave stay O(1).
    """

    __slots__ = ("index", "members", "name", "seq", "transports")

    def __init__(self, name: str) -> None:
        self.name = name
        self.transports: list[WSTransport] = []
        self.members: list[Session] = []
        self.index: dict[Session, int] = {}
        self.seq = 0

    def __len__(self) -> int:
        return len(self.members)

    def add(self, session: Session) -> bool:
        if session in self.index:
            return False
        self.index[session] = len(self.members)
        self.members.append(session)
        self.transports.append(session.transport)
        return True

    def remove(self, session: Session) -> bool:
        i = self.index.pop(session, None)
        if i is None:
            return False
        last = self.members.pop()
        last_transport = self.transports.pop()
        if last is not session:
            self.members[i] = last
            self.transports[i] = last_transport
            self.index[last] = i
        return True


class Hub:
    """Rooms of this process. ``on_slow`` is called with each transport found over the limit."""

    def __init__(
        self,
        max_send_buffer_bytes: int,
        on_slow: Callable[[WSTransport], Any],
        fanout_module: Any = fanout,
    ) -> None:
        self.rooms: dict[str, Room] = {}
        self.max_send_buffer_bytes = max_send_buffer_bytes
        self._on_slow = on_slow
        self._fanout = fanout_module
        self.deliveries = 0
        self.broadcasts = 0

    def get(self, name: str) -> Room | None:
        return self.rooms.get(name)

    def join(self, name: str, session: Session) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        room.add(session)
        return room

    def leave(self, name: str, session: Session) -> Room | None:
        """Remove ``session``; an emptied room is dropped. Returns the room it was in."""
        room = self.rooms.get(name)
        if room is None or not room.remove(session):
            return None
        if not room.members:
            del self.rooms[name]
        return room

    def broadcast(self, name: str, payload: bytes, exclude: Session | None = None) -> int:
        """Frame ``payload`` once and write it to every member of ``name`` but ``exclude``."""
        room = self.rooms.get(name)
        if room is None:
            return 0
        return self.broadcast_frame(room, self._fanout.frame(payload), exclude)

    def broadcast_frame(self, room: Room, data: bytes, exclude: Session | None = None) -> int:
        delivered, slow = self._fanout.broadcast(
            room.transports,
            data,
            self.max_send_buffer_bytes,
            exclude.transport if exclude is not None else None,
        )
        self.broadcasts += 1
        self.deliveries += delivered
        for transport in slow:
            self._on_slow(transport)
        return int(delivered)

    def member_count(self) -> int:
        return sum(len(r) for r in self.rooms.values())

    def __iter__(self) -> Iterator[Room]:
        return iter(self.rooms.values())
