"""The node: wires transport, sessions and hub; owns start, serve and graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from importlib import resources
from typing import Any

from . import protocol as p
from .auth import Verifier
from .config import Settings
from .errors import CloseCode
from .hub import Hub
from .session import Session

log = logging.getLogger("fastws.server")


def _load_pages() -> dict[str, tuple[bytes, str]]:
    static = resources.files("fastws") / "static"
    return {
        "/": ((static / "index.html").read_bytes(), "text/html; charset=utf-8"),
        "/index.html": ((static / "index.html").read_bytes(), "text/html; charset=utf-8"),
    }


class Node:
    """One fastws process: its connections, its hub, and the chat semantics of the seed."""

    def __init__(self, settings: Settings, secret: str) -> None:
        self.settings = settings
        self.verifier = Verifier(settings, secret)
        self.hub = Hub(settings.max_send_buffer_bytes, self.slow_consumer)
        self.sessions: dict[str, Session] = {}
        self._by_transport: dict[Any, Session] = {}
        self.draining = False
        self.started_at = time.monotonic()
        self.counters: Counter[str] = Counter()
        self.server: asyncio.Server | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self, reuse_port: bool = False) -> None:
        from .transport import listen

        self.server = await listen(self, _load_pages(), reuse_port=reuse_port)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def drain(self) -> None:
        """Stop accepting, close every client with 1001, wait up to drain_timeout, drop the rest."""
        if self.draining:
            return
        self.draining = True
        if self.server is not None:
            self.server.close()
        count = len(self.sessions)
        log.info("draining", extra={"event": "drain", "connections": count})
        for session in list(self.sessions.values()):
            session.outlet.close(CloseCode.GOING_AWAY, "server shutting down")
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
        except asyncio.TimeoutError:
            log.warning("drain timed out", extra={"event": "drain_timeout",
                                                  "connections": len(self.sessions)})
            for session in list(self.sessions.values()):
                session.transport.disconnect(False)
        if self.server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
        log.info("stopped", extra={"event": "stopped", "connections": count})

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.draining else "ok",
            "pid": os.getpid(),
            "connections": len(self.sessions),
            "rooms": len(self.hub.rooms),
            "uptime": round(time.monotonic() - self.started_at, 3),
        }

    def stats(self) -> dict[str, Any]:
        """Internal table sizes and counters; tests use them to prove nothing leaks."""
        return {
            "sessions": len(self.sessions),
            "transports": len(self._by_transport),
            "rooms": len(self.hub.rooms),
            "memberships": self.hub.member_count(),
            "deliveries": self.hub.deliveries,
            **self.counters,
        }

    # ---- transport events -----------------------------------------------------------------

    def connect(self, session: Session, remote: str) -> None:
        self.sessions[session.client_id] = session
        self._by_transport[session.transport] = session
        self._idle.clear()
        self.counters["connections_total"] += 1
        log.info("connected", extra={"event": "connected", "client_id": session.client_id,
                                     "user_id": session.principal.user_id, "remote": remote})
        session.send(p.Connected(session.client_id, p.now_ms(), session.principal.user_id,
                                 session.principal.username))

    def disconnect(self, session: Session, code: int | None) -> None:
        for room in list(session.rooms):
            self._leave(session, room)
        self.sessions.pop(session.client_id, None)
        self._by_transport.pop(session.transport, None)
        if not self.sessions:
            self._idle.set()
        log.info("disconnected", extra={
            "event": "disconnected", "client_id": session.client_id, "code": code,
            "duration": round(time.time() - session.connected_at, 3)})

    def auth_failed(self, reason: str) -> None:
        self.counters["auth_failures"] += 1
        log.info("auth failed: %s", reason, extra={"event": "auth_failed", "reason": reason})

    def slow_consumer(self, transport: Any) -> None:
        session = self._by_transport.get(transport)
        if session is None or transport.is_close_frame_sent:
            return
        self.counters["slow_consumers"] += 1
        log.warning("slow consumer closed", extra={"event": "slow_consumer",
                                                   "client_id": session.client_id})
        session.outlet.close(CloseCode.SLOW_CONSUMER, "slow consumer")

    # ---- NodeActions: what sessions ask for ------------------------------------------------

    def join(self, session: Session, room: str, msg_id: p.MsgId) -> None:
        fresh = room not in session.rooms
        if fresh:
            session.rooms.add(room)
            r = self.hub.join(room, session)
        else:
            r = self.hub.rooms[room]
        session.send(p.RoomJoined(room, len(r), r.seq, msg_id))
        if fresh:
            who = session.principal
            self.hub.broadcast(room, p.encode(p.UserJoined(
                room, who.username, p.now_ms(), who.user_id, len(r))), exclude=session)
            log.debug("joined", extra={"event": "join", "client_id": session.client_id,
                                       "room": room})

    def leave(self, session: Session, room: str, msg_id: p.MsgId) -> None:
        self._leave(session, room)
        if msg_id is not None:
            session.send(p.RoomLeft(room, msg_id))

    def _leave(self, session: Session, room: str) -> None:
        session.rooms.discard(room)
        r = self.hub.leave(room, session)
        if r is not None and len(r):
            who = session.principal
            self.hub.broadcast(room, p.encode(p.UserLeft(
                room, who.username, p.now_ms(), who.user_id, len(r))))

    def chat(self, session: Session, room: str, text: str, msg_id: p.MsgId) -> None:
        r = self.hub.rooms[room]
        r.seq += 1
        who = session.principal
        self.hub.broadcast(room, p.encode(p.ChatBroadcast(
            room, who.username, text, p.now_ms(), r.seq, who.user_id)))
        self.counters["messages_in"] += 1
        if msg_id is not None:
            session.send(p.Ack(msg_id, r.seq))

    def typing(self, session: Session, room: str, is_typing: bool, msg_id: p.MsgId) -> None:
        who = session.principal
        self.hub.broadcast(room, p.encode(p.TypingBroadcast(
            room, who.username, is_typing, who.user_id)), exclude=session)
        if msg_id is not None:
            session.send(p.Ack(msg_id))

    def presence(self, session: Session, room: str, msg_id: p.MsgId) -> None:
        r = self.hub.rooms[room]
        seen: dict[str, p.Member] = {}
        for member in r.members:
            who = member.principal
            seen.setdefault(who.user_id, p.Member(who.user_id, who.username))
        session.send(p.PresenceReply(room, list(seen.values()), msg_id))


async def serve(node: Node, on_ready: Any = None) -> None:
    """Run ``node`` until SIGINT/SIGTERM, then drain; returns when shut down."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    log.info("listening on %s:%d", node.settings.host, node.port,
             extra={"event": "listening", "port": node.port, "pid": os.getpid()})
    if on_ready is not None:
        on_ready(node)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await node.drain()
