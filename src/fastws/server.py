"""The node: wires transport, sessions and hub; owns start, serve and graceful drain, the
registry of connections, and the chat semantics of the seed (rooms: membership.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import msgspec

from . import protocol as p
from .accel import FANOUT_CHOSEN
from .actions import Actions
from .auth import Principal, Verifier
from .broker import Broker
from .broker.memory import MemoryBroker
from .broker.types import HistoryPolicy
from .config import Settings
from .errors import BrokerUnavailable, CloseCode
from .hub import FANOUT, FANOUT_ERROR, Hub
from .membership import Membership, quietly
from .policy import Policy
from .presencediff import PresenceDiffs
from .session import Session

if TYPE_CHECKING:
    from .gateway import Listening

log = logging.getLogger("fastws.server")


def _load_pages() -> dict[str, tuple[bytes, str]]:
    static = resources.files("fastws") / "static"
    return {
        "/": ((static / "index.html").read_bytes(), "text/html; charset=utf-8"),
        "/index.html": ((static / "index.html").read_bytes(), "text/html; charset=utf-8"),
        # The JavaScript client (clients/js re-exports it), so pages import it from the server.
        "/fastws.js": ((static / "fastws.js").read_bytes(), "text/javascript; charset=utf-8"),
    }


def history_policy(settings: Settings) -> HistoryPolicy:
    return HistoryPolicy(
        settings.history_size,
        settings.history_ttl,
        settings.history_off,
        settings.history_max_bytes,
    )


class Node:
    """One fastws process: its connections, its hub, and the chat semantics of the seed."""

    def __init__(
        self,
        settings: Settings,
        secret: str,
        broker: Broker | None = None,
        node_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.verifier = Verifier(settings, secret)
        self.policy = Policy(settings)
        self.join_hook: Any = None
        if settings.join_hook_url:  # aiohttp (about 9 MiB) is imported only for it
            from .joinhook import JoinHook

            self.join_hook = JoinHook(settings)
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.events: Any = None
        if settings.events_url:  # aiohttp again, only when configured
            from .events import BackendEvents

            self.events = BackendEvents(
                settings.events_url,
                settings.events_secret,
                self.node_id,
                settings.events_batch,
                settings.events_interval,
                settings.events_queue,
            )
        self.broker: Broker = (
            broker if broker is not None else MemoryBroker(history_policy(settings))
        )
        self.inline = self.broker.inline
        self._publish_seq_nowait = self.broker.publish_seq_nowait
        self.chat_now: Callable[[Session, str, str, p.MsgId], None] | None = self._chat_now
        self.paused = False  # the broker is over its queue bound: clients are not read
        # Seconds from a chat handed to a remote broker to its seq (metrics observes them).
        self.on_publish_latency: Callable[[float], None] | None = None
        self.actions = Actions(self.inline)  # runs sessions' actions and the node's own
        self.hub = Hub(settings.max_send_buffer_bytes, self.slow_consumer)
        self.counters: Counter[str] = Counter()
        self.membership = Membership(
            settings, self.hub, self.broker, self.actions, self.counters, self._event, self.node_id
        )
        # The common chat_message, compiled: the in-process broker's ledger it sequences
        # itself (a subclass may do more than the ledger: it keeps its own method).
        ledger = self.broker.ledger if type(self.broker) is MemoryBroker else None
        self.chat_path = self.hub.fanout.ChatPath(self, self.hub, ledger, p, time.time)
        self.broker.attach(self.node_id, self.chat_path.deliver, self.pressure)
        self.diffs = PresenceDiffs(
            settings.presence_diff_interval, settings.presence_diff_names, self.hub.send_diff
        )
        self.hub.on_diff_notice = self.diffs.notice
        self.sessions: dict[str, Session] = {}
        self.wires: Any = None  # the listener's WireServer: it counts open sockets
        self.outbox: Any = None  # the hub's, once started: read per message (no property)
        self.draining = False
        self.started_at = time.monotonic()
        self.auth_failures: Counter[str] = Counter()  # by reason
        self._per_ip: Counter[str] = Counter()
        self.server: Listening | None = None
        self.heartbeat: Any = None
        self.admin: Any = None  # admin.Admin when admin_port >= 0: publish API, /metrics
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self, reuse_port: bool = False) -> None:
        from .gateway import listen
        from .heartbeat import Heartbeat

        if FANOUT_ERROR:  # it works, at a fraction of the speed: say so, once
            log.log(
                logging.WARNING if FANOUT_CHOSEN else logging.ERROR,
                "compiled fan-out not loaded, running the pure-Python one: %s",
                FANOUT_ERROR,
                extra={"event": "fanout_fallback", "reason": FANOUT_ERROR},
            )
        log.info(self.policy.describe(), extra={"event": "room_policy"})
        await self.broker.start()
        if self.events is not None:
            self.events.start()
        self.outbox = self.hub.outbox
        self.chat_path.start(self.outbox)
        self.server, self.wires = await listen(self, _load_pages(), reuse_port=reuse_port)
        self.heartbeat = Heartbeat(self).start()
        if self.settings.admin_port >= 0:
            from .admin import start_admin

            self.admin = await start_admin(self, reuse_port)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def drain(self) -> None:
        """Stop accepting, close every client with 1001, wait up to drain_timeout, drop the rest."""
        if self.draining:
            return
        self.draining = True
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.server is not None:
            self.server.close()
        count = len(self.sessions)
        log.info("draining", extra={"event": "drain", "connections": count})
        for session in list(self.sessions.values()):
            session.outlet.close(CloseCode.GOING_AWAY, "server shutting down")
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
        except asyncio.TimeoutError:
            log.warning(
                "drain timed out",
                extra={"event": "drain_timeout", "connections": len(self.sessions)},
            )
            for session in list(self.sessions.values()):
                session.transport.disconnect(False)
        await self.membership.end_grace(self.settings.drain_timeout - (time.monotonic() - started))
        if self.actions.tasks:
            await asyncio.wait(list(self.actions.tasks), timeout=self.settings.drain_timeout)
        if self.server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
        self.diffs.close()
        if self.events is not None:
            await self.events.close(
                max(1.0, self.settings.drain_timeout - (time.monotonic() - started))
            )
        await self.broker.close()
        if self.join_hook is not None:
            await self.join_hook.close()
        if self.admin is not None:
            await self.admin.close()
        log.info("stopped", extra={"event": "stopped", "connections": count})

    @property
    def messages_in(self) -> int:
        """Chat messages accepted from WebSockets."""
        return int(self.chat_path.accepted)

    @property
    def messages_out(self) -> int:
        """Publications delivered to this node."""
        return int(self.chat_path.published)

    def health(self) -> dict[str, Any]:
        broker = self.broker.health()
        status = "ok" if broker.get("state") == "ok" else "degraded"
        return {
            "status": "draining" if self.draining else status,
            "node": self.node_id,
            "broker": broker,
            "pid": os.getpid(),
            "connections": len(self.sessions),
            "rooms": len(self.hub.rooms),
            "uptime": round(time.monotonic() - self.started_at, 3),
            "fanout": FANOUT,
        }

    def stats(self) -> dict[str, Any]:
        """Internal table sizes and counters; tests use them to prove nothing leaks."""
        return {
            "sessions": len(self.sessions),
            "transports": self.wires.open if self.wires is not None else 0,
            # Messages whose handling raised (a server bug): each closed its connection, 1011.
            "handler_failures": self.wires.failures if self.wires is not None else 0,
            "rooms": len(self.hub.rooms),
            "memberships": self.hub.member_count(),
            "deliveries": self.hub.deliveries,
            "ips": len(self._per_ip),
            "auth_failures_by_reason": dict(self.auth_failures),
            "messages_out": self.messages_out,
            "messages_in": self.messages_in,
            **self.counters,
        }

    # ---- transport events -----------------------------------------------------------------

    def admit(self, ip: str) -> bool:
        """Whether one more connection from ``ip`` fits max_connections_per_ip."""
        limit = self.settings.max_connections_per_ip
        if limit and self._per_ip[ip] >= limit:
            self.counters["refused_per_ip"] += 1
            return False
        return True

    def connect(self, session: Session, remote: str, ip: str = "") -> None:
        self._per_ip[ip] += 1
        session.ip = ip
        self.sessions[session.client_id] = session
        if self.heartbeat is not None:
            self.heartbeat.track(session)
        self._idle.clear()
        self.counters["connections_total"] += 1
        if self.paused:
            _pause_reading(session, True)
        log.info(
            "connected",
            extra={
                "event": "connected",
                "client_id": session.client_id,
                "user_id": session.principal.user_id,
                "remote": remote,
            },
        )
        session.send(
            p.Connected(
                session.client_id,
                p.now_ms(),
                session.principal.user_id,
                session.principal.username,
                self.node_id,
            )
        )
        self.actions.spawn(
            quietly(
                self.broker.session_opened(self.membership.member(session), session.connected_at)
            )
        )
        self._event("connect", session.client_id, session.principal)

    def disconnect(self, session: Session, code: int | None) -> None:
        self.actions.cancel(session)
        # The sink's owner is the one reference back from it to the session: dropped, a
        # closed connection (session, transports, sink: ~18 objects) is freed by refcount at
        # once instead of waiting for the cyclic GC, whose full passes over 10k live
        # connections pause the loop for hundreds of ms.
        if session.sink is not None:
            session.sink.owner = None
        self._per_ip[session.ip] -= 1
        if self._per_ip[session.ip] <= 0:
            del self._per_ip[session.ip]
        self.sessions.pop(session.client_id, None)
        self._event("disconnect", session.client_id, session.principal)
        self.actions.spawn(self.membership.close(session))
        if not self.sessions:
            self._idle.set()
        log.info(
            "disconnected",
            extra={
                "event": "disconnected",
                "client_id": session.client_id,
                "code": code,
                "duration": round(time.time() - session.connected_at, 3),
            },
        )

    def _event(self, kind: str, client_id: str, who: Principal, room: str | None = None) -> None:
        if self.events is not None:
            self.events.add(kind, client_id, who.user_id, who.username, room)

    def auth_failed(self, reason: str) -> None:
        self.counters["auth_failures"] += 1
        self.auth_failures[reason.split(":")[0]] += 1
        log.info("auth failed: %s", reason, extra={"event": "auth_failed", "reason": reason})

    def slow_consumer(self, sink: Any) -> None:
        """Outbox callback: ``sink`` passed max_send_buffer_bytes and takes no more."""
        session = sink.owner
        if session is None or session.transport.is_close_frame_sent:
            return
        self.counters["slow_consumers"] += 1
        log.warning(
            "slow consumer closed", extra={"event": "slow_consumer", "client_id": session.client_id}
        )
        session.outlet.close(CloseCode.SLOW_CONSUMER, "slow consumer")

    # ---- NodeActions: what sessions ask for ------------------------------------------------
    # Each is a coroutine; with an inline broker it never suspends (see broker/__init__.py).

    async def join(
        self,
        session: Session,
        room: str,
        since: p.Since | None,
        msg_id: p.MsgId,
        presence: str = "each",
    ) -> None:
        await self.membership.join(session, room, since, msg_id, presence)

    async def leave(self, session: Session, room: str, msg_id: p.MsgId) -> None:
        await self.membership.leave(session, room, msg_id)

    async def chat(self, session: Session, room: str, text: str, msg_id: p.MsgId) -> None:
        who = session.principal
        head = p.chat_head(room, who.username, text, who.user_id)
        try:
            seq = await self.broker.publish_seq(room, head)
        except BrokerUnavailable:
            raise BrokerUnavailable(msg_id) from None
        self.chat_path.accepted += 1
        if msg_id is not None:
            session.send(p.Ack(msg_id, seq))

    async def publish_system(self, room: str, text: str, username: str, user_id: str) -> int:
        """A chat_message from a backend (the admin API): same path, seq and history as chat."""
        seq = await self.broker.publish_seq(room, p.chat_head(room, username, text, user_id))
        self.counters["api_messages_in"] += 1
        return seq

    def _chat_now(self, session: Session, room: str, text: str, msg_id: p.MsgId) -> None:
        """``chat`` without a coroutine per message (the hot path): the broker answers through
        a callback, in place when it is in-process, else when its reply arrives."""
        who = session.principal
        head = p.chat_head(room, who.username, text, who.user_id)
        if self.inline:
            self.chat_path.accepted += 1
            done = None if msg_id is None else functools.partial(self._acked, session, msg_id)
            self._publish_seq_nowait(room, head, done)
            return
        session.in_flight += 1
        sent = time.perf_counter() if self.on_publish_latency is not None else 0.0
        self._publish_seq_nowait(
            room, head, functools.partial(self._chat_done, session, msg_id, sent)
        )

    def _acked(self, session: Session, msg_id: p.MsgId, seq: int) -> None:
        session.send(p.Ack(msg_id, seq))

    def _chat_done(self, session: Session, msg_id: p.MsgId, sent: float, seq: int) -> None:
        session.in_flight -= 1
        if self.on_publish_latency is not None:
            self.on_publish_latency(time.perf_counter() - sent)
        if seq:
            self.chat_path.accepted += 1
            if msg_id is not None:
                session.send(p.Ack(msg_id, seq))
        elif session.client_id in self.sessions:
            session.outlet.send(p.error_bytes(BrokerUnavailable(msg_id)))

    async def typing(self, session: Session, room: str, is_typing: bool, msg_id: p.MsgId) -> None:
        who = session.principal
        try:
            await self.broker.publish(
                room,
                p.encode(p.TypingBroadcast(room, who.username, is_typing, who.user_id)),
                session.client_id,
            )
        except BrokerUnavailable:
            raise BrokerUnavailable(msg_id) from None
        if msg_id is not None:
            session.send(p.Ack(msg_id))

    async def presence(self, session: Session, room: str, msg_id: p.MsgId) -> None:
        try:
            entries = await self.broker.presence(room)
        except BrokerUnavailable:
            raise BrokerUnavailable(msg_id) from None
        seen: dict[str, p.Member] = {}
        for entry in entries:
            seen.setdefault(entry.userId, p.Member(entry.userId, entry.username))
        session.send(p.PresenceReply(room, list(seen.values()), msg_id))

    async def history(self, session: Session, room: str, limit: int, msg_id: p.MsgId) -> None:
        try:
            seq, epoch, messages = await self.broker.history(room, limit)
        except BrokerUnavailable:
            raise BrokerUnavailable(msg_id) from None
        session.send(p.HistoryReply(room, seq, epoch, [msgspec.Raw(m) for m in messages], msg_id))

    # ---- broker callbacks -------------------------------------------------------------------

    def pressure(self, paused: bool) -> None:
        """Broker callback: stop reading from every client while the broker's queue is full
        (TCP then pushes back on them), and read again once it has drained."""
        if paused == self.paused:
            return
        self.paused = paused
        self.counters["broker_pauses" if paused else "broker_resumes"] += 1
        log.warning(
            "broker backlog full: pausing clients"
            if paused
            else "broker backlog drained: resuming clients",
            extra={"event": "broker_pressure", "paused": paused},
        )
        for session in self.sessions.values():
            _pause_reading(session, paused)

    def deliver_slow(self, room: str, exclude: str, payload: bytes, seq: int = 0) -> int:
        """One publication for ``room``, framed once for every local member: what the chat
        path's ``deliver`` (the broker callback) does not take itself."""
        return self.hub.broadcast(
            room, payload, self.sessions.get(exclude) if exclude else None, seq, exclude
        )


def _pause_reading(session: Session, paused: bool) -> None:
    wire = session.transport
    if not hasattr(wire, "pause_reading"):  # a test double
        return
    with contextlib.suppress(RuntimeError):  # a transport already closing
        if paused:
            wire.pause_reading()
        else:
            wire.resume_reading()


async def serve(node: Node, on_ready: Any = None, reuse_port: bool = False) -> None:
    """Run ``node`` until SIGINT/SIGTERM, then drain; returns when shut down."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await node.start(reuse_port=reuse_port)
    log.info(
        "listening on %s:%d",
        node.settings.host,
        node.port,
        extra={"event": "listening", "port": node.port, "pid": os.getpid()},
    )
    if on_ready is not None:
        on_ready(node)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await node.drain()
