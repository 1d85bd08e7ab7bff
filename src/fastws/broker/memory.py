"""The in-process broker: one node, every call answered synchronously, no hop at all."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .ledger import Ledger, SweepTimer
from .types import (
    Deliver,
    HistoryPolicy,
    JoinResult,
    LeaveResult,
    MemberInfo,
    Pressure,
    SeqDone,
)


class MemoryBroker:
    """Seq, epoch, history and presence for one process, in a ``Ledger``."""

    name = "memory"
    inline = True

    def __init__(
        self, policy: HistoryPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._deliver: Deliver | None = None
        self.ledger = Ledger(policy, clock)
        self._sweeper = SweepTimer(self.ledger)

    def attach(self, node_id: str, deliver: Deliver, pressure: Pressure | None = None) -> None:
        self._deliver = deliver  # never under pressure: every call is answered in place

    async def start(self) -> None:
        self._sweeper.start()

    async def close(self) -> None:
        self._sweeper.stop()

    def health(self) -> dict[str, Any]:
        ledger = self.ledger
        return {
            "name": self.name,
            "state": "ok",
            "rooms": len(ledger.rooms),
            "history_bytes": ledger.bytes,
            "evicted_rooms": ledger.evicted_rooms,
        }

    async def subscribe(self, room: str) -> None:
        return None

    async def unsubscribe(self, room: str) -> None:
        return None

    async def publish(self, room: str, payload: bytes, exclude: str = "", seq: int = 0) -> None:
        assert self._deliver is not None
        self._deliver(room, exclude, payload, seq)

    async def publish_seq(self, room: str, head: bytes) -> int:
        seqs: list[int] = []
        self.publish_seq_nowait(room, head, seqs.append)  # answered in place
        return seqs[0]

    def publish_seq_nowait(self, room: str, head: bytes, done: SeqDone | None) -> None:
        # Every chat message of the default deployment comes here: no call more than needed.
        seq, payload = self.ledger.publish_seq(room, head)
        self._deliver(room, "", payload, seq)  # type: ignore[misc]  # attached before start
        if done is not None:
            done(seq)

    async def join(
        self, room: str, member: MemberInfo, since: tuple[int, str] | None = None
    ) -> JoinResult:
        return self.ledger.join(room, member, since)

    async def leave(self, room: str, client_id: str, user_id: str = "") -> LeaveResult:
        return self.ledger.leave(room, client_id)

    async def linger(self, room: str, client_id: str, user_id: str) -> None:
        self.ledger.linger(room, client_id, user_id)

    async def presence(self, room: str) -> list[MemberInfo]:
        return self.ledger.presence(room)

    async def history(self, room: str, limit: int) -> tuple[int, str, list[bytes]]:
        return self.ledger.history(room, limit)

    async def session_opened(self, member: MemberInfo, connected_at: float) -> None:
        return None

    async def session_closed(self, client_id: str) -> None:
        return None

    async def flush(self) -> None:
        return None  # every publication was delivered before its call returned
