"""Liveness and token expiry for every connection of a node, on one timer."""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from time import monotonic
from typing import TYPE_CHECKING

from . import protocol as p
from .errors import CloseCode
from .session import Session

if TYPE_CHECKING:
    from .server import Node


class Heartbeat:
    """One timer for every connection, instead of a task each (the seed's ping/pong).

    A connection that sent nothing for ``ping_interval`` is pinged; if it still sends nothing
    within ``ping_timeout`` it is closed with 1001. Browsers answer protocol pings themselves.
    A connection whose token has expired (plus jwt_leeway) is closed with 4001 unless it sent a
    ``refresh``.

    Each tick costs little for idle connections: the liveness round is the WireServer's, in C,
    and token expiry is a heap of whole-second deadlines, looked at only when one is due.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        s = node.settings
        self.interval = s.ping_interval
        self.timeout = s.ping_timeout
        self.leeway = s.jwt_leeway
        pings = min(s.ping_interval, s.ping_timeout or s.ping_interval) / 4
        self.tick = max(0.02, min(pings, 1.0) if s.ping_interval > 0 else 1.0)
        self.task: asyncio.Task[None] | None = None
        self.timeouts = 0
        self.expired = 0
        # Deadline second -> the client ids whose token (plus leeway) ends in it; and a heap
        # of those seconds. An entry a refresh made stale is checked and put back when due.
        self._expiring: dict[int, list[str]] = {}
        self._deadlines: list[int] = []

    def start(self) -> Heartbeat:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.beat(monotonic(), time.time())

    def track(self, session: Session) -> None:
        """Watch ``session``'s token expiry (call once it is connected)."""
        second = math.ceil(session.principal.expires_at + self.leeway)
        bucket = self._expiring.get(second)
        if bucket is None:
            bucket = self._expiring[second] = []
            heapq.heappush(self._deadlines, second)
        bucket.append(session.client_id)

    def beat(self, now: float, wall: float) -> None:
        """One round; ``now`` is monotonic, ``wall`` Unix seconds."""
        self._expire(wall)
        wires = self.node.wires
        if wires is None:
            return
        json_ping = self.node.settings.json_ping
        due, dead = wires.sweep(now, self.interval, self.timeout, not json_ping)
        for wire in dead:
            if wire.listener is not None:
                self.timeouts += 1
                wire.listener.close(CloseCode.GOING_AWAY, "heartbeat timeout")
        for wire in due:  # json_ping: the seed's {"type": "ping"} instead of a protocol PING
            if wire.listener is not None:
                wire.listener.send(p.encode(p.ServerPing(p.now_ms())))

    def _expire(self, wall: float) -> None:
        deadlines = self._deadlines
        sessions = self.node.sessions
        while deadlines and deadlines[0] <= wall:
            for client_id in self._expiring.pop(heapq.heappop(deadlines)):
                session = sessions.get(client_id)
                if session is None or session.transport.is_close_frame_sent:
                    continue
                if wall > session.principal.expires_at + self.leeway:
                    self.expired += 1
                    session.outlet.close(CloseCode.TOKEN_EXPIRED, "token expired")
                else:
                    self.track(session)  # refreshed meanwhile


__all__ = ["Heartbeat"]
