"""The in-process broker: one node, every call answered synchronously, no hop at all."""

from __future__ import annotations

from typing import Any

from . import Deliver, MemberInfo


class MemoryBroker:
    """Seq counters and presence for one process. A room's state goes when its last member does."""

    name = "memory"
    inline = True

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._seq: dict[str, int] = {}
        self._members: dict[str, dict[str, MemberInfo]] = {}

    def attach(self, node_id: str, deliver: Deliver) -> None:
        self._deliver = deliver

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def health(self) -> dict[str, Any]:
        return {"name": self.name, "state": "ok"}

    async def subscribe(self, room: str) -> None:
        return None

    async def unsubscribe(self, room: str) -> None:
        return None

    async def publish(self, room: str, payload: bytes, exclude: str = "") -> None:
        assert self._deliver is not None
        self._deliver(room, exclude, payload)

    async def publish_seq(self, room: str, head: bytes, tail: bytes) -> int:
        seq = self._seq[room] = self._seq.get(room, 0) + 1
        assert self._deliver is not None
        self._deliver(room, "", b"%b%d%b" % (head, seq, tail))
        return seq

    async def join(self, room: str, member: MemberInfo) -> tuple[int, int]:
        members = self._members.setdefault(room, {})
        members[member.clientId] = member
        return len(members), self._seq.get(room, 0)

    async def leave(self, room: str, client_id: str) -> int:
        members = self._members.get(room)
        if members is None:
            return 0
        members.pop(client_id, None)
        if not members:
            del self._members[room]
            self._seq.pop(room, None)
        return len(members)

    async def presence(self, room: str) -> list[MemberInfo]:
        return list(self._members.get(room, {}).values())

    async def session_opened(self, member: MemberInfo, connected_at: float) -> None:
        return None

    async def session_closed(self, client_id: str) -> None:
        return None
