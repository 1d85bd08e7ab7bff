"""Brokers carry room traffic and room-wide facts between nodes.

A node asks its broker to publish, to allocate per-room ``seq`` and to keep presence; the
broker calls ``deliver(room, exclude_client_id, payload)`` for every publication in a room this
node subscribed to. Every method is a coroutine. An ``inline`` broker's coroutines never suspend,
so the node drives them to completion in place (``coro.send(None)``): the single-process default
pays for no task and no event-loop turn.

    MemoryBroker    one process, no hop at all (memory.py)
    LocalBusBroker  workers of one host, via the supervisor over ZeroMQ (localbus.py)
    RedisBroker     several hosts, via Redis pub/sub and Lua (redis.py)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec

#: deliver(room, exclude_client_id, payload, seq): seq is the chat_message's, 0 for other events.
Deliver = Callable[[str, str, bytes, int], None]


class MemberInfo(msgspec.Struct, frozen=True):
    """One connection's presence entry in a room."""

    clientId: str
    userId: str
    username: str
    node: str = ""


class Broker(Protocol):
    name: str
    inline: bool  # True: coroutines never suspend and may be driven in place

    def attach(self, node_id: str, deliver: Deliver) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def health(self) -> dict[str, Any]:
        """``{"name": ..., "state": "ok" | "down", ...}``; down means degraded, not dead."""
        ...

    async def subscribe(self, room: str) -> None:
        """Start delivering ``room``'s publications here; returns once they will arrive."""
        ...

    async def unsubscribe(self, room: str) -> None: ...

    async def publish(self, room: str, payload: bytes, exclude: str = "") -> None: ...

    async def publish_seq(self, room: str, head: bytes) -> int:
        """Allocate the room's next seq, keep the message in history and publish
        ``ledger.chat_payload(head, seq, epoch)``, atomically; return the seq."""
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

    async def leave(self, room: str, client_id: str) -> int:
        """Remove a connection from the room's presence; return the connections left."""
        ...

    async def presence(self, room: str) -> list[MemberInfo]: ...

    async def session_opened(self, member: MemberInfo, connected_at: float) -> None: ...

    async def session_closed(self, client_id: str) -> None: ...


from .ledger import JoinResult  # noqa: E402  (needs MemberInfo above)

__all__ = ["Broker", "Deliver", "JoinResult", "MemberInfo"]
