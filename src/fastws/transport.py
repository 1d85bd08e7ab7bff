"""Connections at the door and after it: routing, auth at the upgrade, messages in, heartbeat.

The WebSocket protocol itself is ``_wire`` (Cython). A refused client never gets a listener:
the token is checked while routing the request head, and a failure is answered with HTTP 401
before any WebSocket exists (RFC 6455 section 4.2.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import sys
import time
import uuid
from http import HTTPStatus
from time import monotonic
from typing import TYPE_CHECKING

import msgspec

from . import protocol as p
from ._wire import Wire, WireServer, protocol_factory
from .auth import (
    PROTOCOL,
    TOKEN_PROTOCOL_PREFIX,
    Principal,
    extract_token,
    offered_protocols,
)
from .errors import AuthError, CloseCode
from .session import Session
from .upgrade import BadRequest, Request, accept_key, parse_head, response, switching_protocols

if TYPE_CHECKING:
    from .server import Node

log = logging.getLogger("fastws.transport")


class Connection:
    """One upgraded socket's listener: hands its messages to the session, sends its replies.

    Framing, reassembly, UTF-8, pings and the close handshake are the ``Wire``'s (Cython);
    this object sees whole messages only.
    """

    # Slots, not a __dict__: one of these lives per connection (see the memory target). What
    # the session holds (client id, principal, sink, the Wire) is read from it, not copied.
    __slots__ = ("_abort_handle", "_admission", "node", "session")

    def __init__(self, node: Node, principal: Principal, forwarded_for: str = "") -> None:
        self.node = node
        # Needed only until on_connected makes the session.
        self._admission: tuple[Principal, str] | None = (principal, forwarded_for)
        self.session: Session | None = None
        self._abort_handle: asyncio.TimerHandle | None = None

    @property
    def transport(self) -> Wire | None:
        return self.session.transport if self.session is not None else None

    # ---- Wire callbacks ---------------------------------------------------------------

    def on_connected(self, transport: Wire) -> None:
        node = self.node
        settings = node.settings
        assert self._admission is not None
        principal, forwarded_for = self._admission
        self._admission = None
        peer = transport.transport.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if peer else ""
        ip = peer[0] if peer else ""
        if forwarded_for and ip in settings.proxies:
            # The nearest hop the trusted proxy saw is the last entry it appended.
            ip = forwarded_for.split(",")[-1].strip() or ip
        if not node.admit(ip):
            transport.send_close(int(CloseCode.POLICY_VIOLATION), b"too many connections")
            transport.disconnect()
            return
        session = Session(str(uuid.uuid4()), principal, transport, self, node, settings)
        session.sink = node.hub.sink(transport, session)
        self.session = session
        # Paused (pause_writing) at half the send-buffer cap: where typing starts to wait.
        with contextlib.suppress(AttributeError, ValueError):
            transport.transport.set_write_buffer_limits(
                high=max(1, settings.max_send_buffer_bytes // 2)
            )
        # Many connections share an address (a proxy, a NAT): one string for all of them.
        node.connect(session, remote, sys.intern(ip))

    def on_message(self, message: str | bytes) -> None:
        session = self.session
        if session is None:
            return
        session.handle(message)
        # At the end of this peer's read batch its own replies (and echoes) go out now
        # instead of a loop iteration later; others' copies stay corked.
        self.node.outbox.flush_if_last(session.sink)

    def before_close(self) -> None:
        """The Wire is about to send a close frame: replies already queued go out first."""
        session = self.session
        if session is not None and not session.sink.closed:
            self.node.hub.flush(session.sink)

    def pause_writing(self) -> None:
        """The socket's buffer passed its high-water mark: typing notices wait (conflated)."""
        if self.session is not None:
            self.session.sink.congested = True

    def resume_writing(self) -> None:
        session = self.session
        if session is not None:
            session.sink.congested = False
            self.node.hub.outbox.release(session.sink)

    def on_disconnected(self) -> None:
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        session = self.session
        if session is not None:
            self.session = None
            self.node.disconnect(session, session.transport.close_code)

    # ---- Outlet: how the session's replies leave --------------------------------------

    def send(self, payload: bytes) -> None:
        # Through the sink, so replies keep their order with the room traffic it is corking.
        if self.session is not None:
            self.node.hub.send(self.session.sink, payload)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; drop the socket if the peer has not closed within close_timeout."""
        session = self.session
        if session is None:
            return
        t = session.transport
        if t.is_disconnected:
            return
        if not t.is_close_frame_sent:
            if not session.sink.closed:
                self.node.hub.flush(session.sink)  # what was queued goes before the close frame
            t.send_close(int(code), reason.encode()[:123])
        if self._abort_handle is None:
            loop = asyncio.get_running_loop()
            self._abort_handle = loop.call_later(
                self.node.settings.close_timeout, t.disconnect, False
            )


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


def _path_only(raw_path: str) -> str:
    return raw_path.partition("?")[0]


_TEXT = "text/plain; charset=utf-8"


class Gateway:
    """Routes each request head before any upgrade happens (the Wire's ``route``).

    Returns the bytes of a whole HTTP answer (the Wire closes after it), or the listener of
    an accepted WebSocket with its 101 answer.
    """

    def __init__(self, node: Node, pages: dict[str, tuple[bytes, str]]) -> None:
        self.node = node
        self.pages = pages
        # "" (the default): a WebSocket upgrade on any path, as the seed's server does, so
        # its clients' ws://host:8080/?token=... works; else only on the listed paths.
        self.ws_paths = frozenset(p.strip() for p in node.settings.ws_paths.split(",") if p.strip())

    def __call__(self, head: bytes) -> bytes | tuple[Connection, bytes]:
        try:
            request = parse_head(head)
        except BadRequest as exc:
            return response(HTTPStatus.BAD_REQUEST, f"{exc}\n".encode(), _TEXT)
        path = _path_only(request.path)
        if "websocket" in (request.headers.get("Upgrade") or "").lower():
            if self.ws_paths and path not in self.ws_paths:
                return response(HTTPStatus.NOT_FOUND, b"no WebSocket here\n", _TEXT)
            return self._upgrade(request)
        if request.method != "GET":
            return response(
                HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", _TEXT, {"Allow": "GET"}
            )
        if path == "/healthz":
            body = msgspec.json.encode(self.node.health())
            return response(HTTPStatus.OK, body, "application/json")
        page = self.pages.get(path)
        if page is not None:
            return response(HTTPStatus.OK, page[0], page[1])
        return response(HTTPStatus.NOT_FOUND, b"not found\n", _TEXT)

    def _upgrade(self, request: Request) -> bytes | tuple[Connection, bytes]:
        node = self.node
        if node.draining:
            return response(HTTPStatus.SERVICE_UNAVAILABLE, b"shutting down\n", "text/plain")
        limit = node.settings.max_connections
        if limit and len(node.sessions) >= limit:
            node.counters["refused_full"] += 1
            return response(HTTPStatus.SERVICE_UNAVAILABLE, b"server full\n", "text/plain")
        headers = request.headers
        origin = headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin, headers.get("Host")):
            # Cross-Site WebSocket Hijacking: a page elsewhere must not ride a user's cookies
            # or token into this server (RFC 6455 section 10.2).
            node.counters["refused_origin"] += 1
            return response(HTTPStatus.FORBIDDEN, b"origin not allowed\n", "text/plain")
        offered = offered_protocols(headers.getall("Sec-WebSocket-Protocol", []))
        if PROTOCOL not in offered and any(o.startswith(TOKEN_PROTOCOL_PREFIX) for o in offered):
            # We never echo the token, and a browser fails a handshake whose answer names no
            # protocol it offered (RFC 6455 section 4.1): say so instead of a silent failure.
            return response(
                HTTPStatus.BAD_REQUEST,
                f"offer the {PROTOCOL} subprotocol with the token\n".encode(),
                _TEXT,
            )
        token = extract_token(request.path, headers.get("Authorization"), offered)
        try:
            if token is None:
                raise AuthError("no token")
            principal = self.node.verifier.verify(token)
        except AuthError as exc:
            self.node.auth_failed(exc.reason)
            return response(
                HTTPStatus.UNAUTHORIZED,
                b"Unauthorized\n",
                _TEXT,
                {"WWW-Authenticate": 'Bearer realm="fastws"'},
            )
        try:
            accept = accept_key(request)
        except BadRequest as exc:
            return response(HTTPStatus.BAD_REQUEST, f"{exc}\n".encode(), _TEXT)
        conn = Connection(self.node, principal, headers.get("X-Forwarded-For") or "")
        # Exactly one protocol, and never the token one (section 4.2.2, /subprotocol/).
        return conn, switching_protocols(accept, PROTOCOL if PROTOCOL in offered else None)

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        allowed = self.node.settings.origins
        if "*" in allowed or origin.rstrip("/") in allowed:
            return True
        # Same host: the Origin's authority is the Host the browser connected to.
        return host is not None and origin.partition("://")[2].rstrip("/") == host


async def listen(
    node: Node, pages: dict[str, tuple[bytes, str]], reuse_port: bool = False
) -> tuple[asyncio.Server, WireServer]:
    """Start accepting on ``node.settings.host:port``: the asyncio server and its Wires."""
    s = node.settings
    wires = WireServer(Gateway(node, pages), s.handshake_timeout or 0.0, s.max_message_bytes)
    server = await asyncio.get_running_loop().create_server(
        protocol_factory(wires),
        s.host,
        s.port,
        reuse_port=reuse_port,
        # asyncio's default backlog of 100 overflows under connect bursts (clients then wait
        # a 1 s SYN retry); the kernel caps it at net.core.somaxconn anyway.
        backlog=4096,
    )
    return server, wires


__all__ = ["Connection", "Gateway", "Heartbeat", "listen"]
