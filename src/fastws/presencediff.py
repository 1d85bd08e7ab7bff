"""Presence diffs: a room's user_joined/user_left of one interval, as one presence_diff.

Members that join a room with ``"presence": "diff"`` are skipped by the room's presence
notices (the hub keeps their sinks apart); this node reads each notice once, whoever published
it, and every ``interval`` seconds sends those members one ``presence_diff`` per room that
changed: each user once, net of the interval (a join and a leave of the same user cancel), and
above ``names_max`` members only the counts. A join storm of S clients then costs each diff
member a few messages instead of S.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec

from . import protocol as p


class _Notice(msgspec.Struct):
    type: str
    username: str = ""
    userId: str = ""
    members: int = 0


_notice = msgspec.json.Decoder(_Notice)


class _Changes:
    __slots__ = ("members", "names", "net")

    def __init__(self) -> None:
        self.net: dict[str, int] = {}  # userId -> joins minus leaves in the interval
        self.names: dict[str, str] = {}
        self.members = 0


class PresenceDiffs:
    """Gathers the notices of rooms that have diff members; ``send(room, frame_payload)`` is
    called for each room's diff at the end of each interval."""

    def __init__(self, interval: float, names_max: int, send: Callable[[str, bytes], Any]) -> None:
        self.interval = interval
        self.names_max = names_max
        self._send = send
        self._rooms: dict[str, _Changes] = {}
        self._timer: asyncio.TimerHandle | None = None

    def notice(self, room: str, payload: bytes) -> None:
        """A user_joined or user_left for ``room`` (an encoded payload, as delivered)."""
        try:
            msg = _notice.decode(payload)
        except msgspec.DecodeError:
            return
        step = 1 if msg.type == "user_joined" else -1 if msg.type == "user_left" else 0
        if not step:
            return
        changes = self._rooms.get(room)
        if changes is None:
            changes = self._rooms[room] = _Changes()
        user = msg.userId or msg.username
        changes.net[user] = changes.net.get(user, 0) + step
        changes.names[user] = msg.username
        changes.members = msg.members
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        self._timer = None
        rooms, self._rooms = self._rooms, {}
        for room, changes in rooms.items():
            joins = [p.Member(u, changes.names[u]) for u, n in changes.net.items() if n > 0]
            leaves = [p.Member(u, changes.names[u]) for u, n in changes.net.items() if n < 0]
            if not joins and not leaves:
                continue
            named = changes.members <= self.names_max
            self._send(
                room,
                p.encode(
                    p.PresenceDiff(
                        room,
                        changes.members,
                        len(joins),
                        len(leaves),
                        joins if named and joins else None,
                        leaves if named and leaves else None,
                    )
                ),
            )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
