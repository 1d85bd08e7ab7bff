"""The only module that speaks picows: upgrade routing, auth at the door, frames in, heartbeat.

A refused client never gets a listener: the token is checked in the upgrade handler and
a failure is answered with HTTP 401 before any WebSocket exists (RFC 6455 section 4.2.2).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import time
import uuid
from http import HTTPStatus
from time import monotonic
from typing import TYPE_CHECKING, Any

import msgspec
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)
from picows.picows import WSProtocolError  # type: ignore[attr-defined]

from . import protocol as p
from .auth import (
    PROTOCOL,
    TOKEN_PROTOCOL_PREFIX,
    AuthError,
    Principal,
    extract_token,
    offered_protocols,
)
from .config import Settings
from .errors import CloseCode
from .hub import fanout as _fanout
from .session import Session

if TYPE_CHECKING:
    from .server import Node

log = logging.getLogger("fastws.transport")

# picows logs raw upgrade requests (query-string tokens included) below INFO: never let
# those records out, whatever level an embedding application sets.
picows_log = logging.getLogger("fastws.picows")
picows_log.addFilter(lambda record: record.levelno >= logging.INFO)

# Close codes a peer may send (RFC 6455 section 7.4.1 and the IANA registry); we echo them.
_VALID_CLOSE = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))


whole_text = _fanout.whole_text


class Connection(WSListener):
    """One upgraded socket: reassembles messages, hands them to its session, sends replies."""

    # Slots, not a __dict__: one of these lives per connection (see the memory target).
    __slots__ = (
        "_abort_handle",
        "_frag_type",
        "_frags",
        "client_id",
        "forwarded_for",
        "ip",
        "last_rx",
        "node",
        "outbox",
        "path",
        "ping_sent_at",
        "principal",
        "remote",
        "session",
        "settings",
        "sink",
        "transport",
        "utf8",
    )

    def __init__(
        self, node: Node, principal: Principal, path: str, forwarded_for: str = ""
    ) -> None:
        super().__init__()
        self.forwarded_for = forwarded_for
        self.node = node
        self.settings: Settings = node.settings
        self.principal = principal
        self.path = path
        self.client_id = str(uuid.uuid4())
        self.transport: WSTransport | None = None
        self.session: Session | None = None
        self.sink: Any = None
        self.outbox: Any = None  # the hub's, once connected (read per frame)
        self.remote = ""
        self._frag_type: WSMsgType | None = None
        self._frags: bytearray | None = None  # only while a fragmented message is open
        self.utf8: Any = None  # incremental decoder, only while a fragmented text is open
        self.ip = ""
        self._abort_handle: asyncio.TimerHandle | None = None
        self.last_rx = monotonic()
        self.ping_sent_at = 0.0

    # ---- picows callbacks -------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.node.hub.fanout.release_handshake(transport)
        peer = transport.underlying_transport.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if peer else ""
        self.ip = peer[0] if peer else ""
        if self.forwarded_for and self.ip in self.settings.proxies:
            # The nearest hop the trusted proxy saw is the last entry it appended.
            self.ip = self.forwarded_for.split(",")[-1].strip() or self.ip
        self.forwarded_for = ""
        if not self.node.admit(self.ip):
            transport.send_close(WSCloseCode.POLICY_VIOLATION, b"too many connections")
            transport.disconnect()
            return
        self.session = Session(self.client_id, self.principal, transport, self, self.node,
                               self.settings)
        self.sink = self.node.hub.sink(transport, self.session)
        self.outbox = self.node.hub.outbox
        # Paused (pause_writing) at half the send-buffer cap: where typing starts to wait.
        with contextlib.suppress(AttributeError, ValueError):
            transport.underlying_transport.set_write_buffer_limits(
                high=max(1, self.settings.max_send_buffer_bytes // 2))
        self.session.sink = self.sink
        self.node.connect(self.session, self.remote, self.ip)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.last_rx = monotonic()  # any frame proves the peer alive (see Heartbeat)
        if transport.is_close_frame_sent:
            # After our Close nothing more is acted on (RFC 6455 section 5.5.1): the peer's
            # answering Close ends it; data it sent meanwhile is dropped, not half-served.
            if frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()
            return
        try:
            # The common case, a whole text message, read in C; anything else takes _on_frame.
            text = whole_text(frame) if self._frag_type is None else None
            if text is None:
                self._on_frame(transport, frame)
            else:
                self.session.handle(text)  # type: ignore[union-attr]
        except UnicodeDecodeError:
            # Text messages must be valid UTF-8 (RFC 6455 section 8.1).
            self._flush()
            raise WSProtocolError(WSCloseCode.INVALID_TEXT, "invalid UTF-8") from None
        except WSProtocolError:
            self._flush()  # replies already queued go out before picows' close frame
            raise
        # At the end of this peer's read batch its own replies (and echoes) go out now
        # instead of a loop iteration later; others' copies stay corked.
        if self.outbox is not None:
            self.outbox.flush_if_last(frame, self.sink)

    def _flush(self) -> None:
        if self.sink is not None and not self.sink.closed:
            self.node.hub.flush(self.sink)

    def _on_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            # No extension is negotiated, so any RSV bit is a protocol error (section 5.2).
            raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR, "reserved bits set")
        if msg_type == WSMsgType.TEXT or msg_type == WSMsgType.BINARY:
            if self._frag_type is not None:
                raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR,
                                      "new message inside a fragmented one")
            if frame.fin:
                self._deliver(msg_type, frame.get_payload_as_bytes())
                return
            self._frag_type = msg_type
            self._append(frame)
        elif msg_type == WSMsgType.CONTINUATION:
            if self._frag_type is None:
                raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR, "continuation without a start")
            self._append(frame)
            if frame.fin:
                data, kind = bytes(self._frags or b""), self._frag_type
                self._frags = None
                self._frag_type = None
                self.utf8 = None
                self._deliver(kind, data)
        elif msg_type == WSMsgType.PING:
            # Answered here rather than by picows, so that the RSV check above applies.
            transport.send_pong(frame.get_payload_as_bytes())
        elif msg_type == WSMsgType.CLOSE:
            if frame.payload_size == 0:
                code = 1000  # no status code given (1005 on our side): answer a normal close
            else:
                code = frame.get_close_code().value
                if code not in _VALID_CLOSE:
                    raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR, "invalid close code")
            self._flush()
            transport.send_close(WSCloseCode(code))
            transport.disconnect()
        # An unsolicited PONG is ignored (section 5.5.3).

    def pause_writing(self) -> None:
        """The socket's buffer passed its high-water mark: typing notices wait (conflated)."""
        if self.sink is not None:
            self.sink.congested = True

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.congested = False
            if self.outbox is not None:
                self.outbox.release(self.sink)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        if self.session is not None:
            handshake = transport.close_handshake
            code = None
            if handshake is not None:
                info = handshake.sent if handshake.sent is not None else handshake.recv
                code = info.code.value if info is not None else None
            self.node.disconnect(self.session, code)
            self.session = None

    def ping(self, now: float) -> None:
        """Heartbeat: a protocol PING, or the seed's JSON ping when json_ping is set."""
        t = self.transport
        if t is None or t.is_close_frame_sent or t.is_disconnected:
            return
        self.ping_sent_at = now
        if self.settings.json_ping:
            self.send(p.encode(p.ServerPing(p.now_ms())))
        else:
            t.send_ping()

    # ---- Outlet: how the session's replies leave --------------------------------------

    def send(self, payload: bytes) -> None:
        # Through the sink, so replies keep their order with the room traffic it is corking.
        self.node.hub.send(self.sink, payload)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; drop the socket if the peer has not closed within close_timeout."""
        t = self.transport
        if t is None or t.is_disconnected:
            return
        if not t.is_close_frame_sent:
            if not self.sink.closed:
                self.node.hub.flush(self.sink)  # what was queued goes before the close frame
            t.send_close(WSCloseCode(code), reason.encode())
        if self._abort_handle is None:
            loop = asyncio.get_running_loop()
            self._abort_handle = loop.call_later(
                self.settings.close_timeout, t.disconnect, False
            )

    # ---- helpers ----------------------------------------------------------------------

    def _append(self, frame: WSFrame) -> None:
        if self._frags is None:
            self._frags = bytearray()
            if self._frag_type == WSMsgType.TEXT:
                self.utf8 = codecs.getincrementaldecoder("utf-8")()
        if len(self._frags) + frame.payload_size > self.settings.max_message_bytes:
            raise WSProtocolError(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
        chunk = frame.get_payload_as_bytes()
        if self.utf8 is not None:
            try:
                # Fail fast: invalid UTF-8 closes at the fragment that has it (RFC 6455 8.1).
                self.utf8.decode(chunk, final=bool(frame.fin))
            except UnicodeDecodeError:
                raise WSProtocolError(WSCloseCode.INVALID_TEXT, "invalid UTF-8") from None
        self._frags += chunk

    def _deliver(self, msg_type: WSMsgType, data: bytes) -> None:
        if msg_type == WSMsgType.TEXT:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                # Text messages must be valid UTF-8 (RFC 6455 section 8.1).
                raise WSProtocolError(WSCloseCode.INVALID_TEXT, "invalid UTF-8") from None
            self.session.handle(text)  # type: ignore[union-attr]
        else:
            # Binary frames carry the same JSON, as the seed's server accepted them too.
            self.session.handle(data)  # type: ignore[union-attr]


class Heartbeat:
    """One timer for every connection, instead of a task each (the seed's ping/pong).

    A connection that sent nothing for ``ping_interval`` is pinged; if it still sends nothing
    within ``ping_timeout`` it is closed with 1001. Browsers answer protocol pings themselves.
    A connection whose token has expired (plus jwt_leeway) is closed with 4001 unless it sent a
    ``refresh``.
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

    def beat(self, now: float, wall: float) -> None:
        """One round over every connection; ``now`` is monotonic, ``wall`` Unix seconds."""
        for session in list(self.node.sessions.values()):
            conn = session.outlet
            if not isinstance(conn, Connection) or session.transport.is_close_frame_sent:
                continue
            if wall > session.principal.expires_at + self.leeway:
                self.expired += 1
                conn.close(CloseCode.TOKEN_EXPIRED, "token expired")
                continue
            if self.interval <= 0:
                continue
            if conn.ping_sent_at:
                if conn.last_rx >= conn.ping_sent_at:
                    conn.ping_sent_at = 0.0
                elif now - conn.ping_sent_at > self.timeout:
                    self.timeouts += 1
                    conn.close(CloseCode.GOING_AWAY, "heartbeat timeout")
                continue
            if now - conn.last_rx >= self.interval:
                conn.ping(now)


def _path_only(raw_path: str) -> str:
    return raw_path.partition("?")[0]


class Gateway:
    """picows' listener factory: routes each HTTP request before any upgrade happens."""

    def __init__(self, node: Node, pages: dict[str, tuple[bytes, str]]) -> None:
        self.node = node
        self.pages = pages
        # "" (the default): a WebSocket upgrade on any path, as the seed's server does, so
        # its clients' ws://host:8080/?token=... works; else only on the listed paths.
        self.ws_paths = frozenset(p.strip() for p in node.settings.ws_paths.split(",")
                                  if p.strip())

    def __call__(self, request: WSUpgradeRequest) -> Any:
        raw_path = request.path.decode("latin-1")
        path = _path_only(raw_path)
        if "websocket" in (request.headers.get("Upgrade") or "").lower():
            if self.ws_paths and path not in self.ws_paths:
                return _response(HTTPStatus.NOT_FOUND, b"no WebSocket here\n",
                                 "text/plain; charset=utf-8")
            return self._upgrade(request, raw_path)
        if path == "/healthz":
            body = msgspec.json.encode(self.node.health())
            return _response(HTTPStatus.OK, body, "application/json")
        page = self.pages.get(path)
        if page is not None:
            return _response(HTTPStatus.OK, page[0], page[1])
        return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def _upgrade(self, request: WSUpgradeRequest, raw_path: str) -> Any:
        node = self.node
        if node.draining:
            return _response(HTTPStatus.SERVICE_UNAVAILABLE, b"shutting down\n", "text/plain")
        limit = node.settings.max_connections
        if limit and len(node.sessions) >= limit:
            node.counters["refused_full"] += 1
            return _response(HTTPStatus.SERVICE_UNAVAILABLE, b"server full\n", "text/plain")
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin, request.headers.get("Host")):
            # Cross-Site WebSocket Hijacking: a page elsewhere must not ride a user's cookies
            # or token into this server (RFC 6455 section 10.2).
            node.counters["refused_origin"] += 1
            return _response(HTTPStatus.FORBIDDEN, b"origin not allowed\n", "text/plain")
        offered = offered_protocols(request.headers.getall("Sec-WebSocket-Protocol", []))
        if PROTOCOL not in offered and any(o.startswith(TOKEN_PROTOCOL_PREFIX) for o in offered):
            # We never echo the token, and a browser fails a handshake whose answer names no
            # protocol it offered (RFC 6455 section 4.1): say so instead of a silent failure.
            return _response(HTTPStatus.BAD_REQUEST,
                             f"offer the {PROTOCOL} subprotocol with the token\n".encode(),
                             "text/plain; charset=utf-8")
        token = extract_token(raw_path, request.headers.get("Authorization"), offered)
        try:
            if token is None:
                raise AuthError("no token")
            principal = self.node.verifier.verify(token)
        except AuthError as exc:
            self.node.auth_failed(exc.reason)
            return _response(
                HTTPStatus.UNAUTHORIZED,
                b"Unauthorized\n",
                "text/plain; charset=utf-8",
                {"WWW-Authenticate": 'Bearer realm="fastws"'},
            )
        conn = Connection(self.node, principal, _path_only(raw_path),
                          request.headers.get("X-Forwarded-For", ""))
        if PROTOCOL not in offered:
            return conn
        # Exactly one protocol, and never the token one (section 4.2.2, /subprotocol/).
        accept = WSUpgradeResponse.create_101_response({"Sec-WebSocket-Protocol": PROTOCOL})
        return WSUpgradeResponseWithListener(accept, conn)

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        allowed = self.node.settings.origins
        if "*" in allowed or origin.rstrip("/") in allowed:
            return True
        # Same host: the Origin's authority is the Host the browser connected to.
        return host is not None and origin.partition("://")[2].rstrip("/") == host


def _response(
    status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> WSUpgradeResponseWithListener:
    extra = {"Content-Type": content_type, "Cache-Control": "no-store"}
    extra.update(headers or {})
    if status == HTTPStatus.OK:
        response = WSUpgradeResponse.create_ok_response(body, extra)
    else:
        response = WSUpgradeResponse.create_error_response(status, body, extra)
    return WSUpgradeResponseWithListener(response, None)


async def listen(
    node: Node, pages: dict[str, tuple[bytes, str]], reuse_port: bool = False
) -> asyncio.Server:
    """Start accepting on ``node.settings.host:port`` and return the asyncio server."""
    s = node.settings
    return await ws_create_server(
        Gateway(node, pages),
        s.host,
        s.port,
        websocket_handshake_timeout=s.handshake_timeout,
        logger_name=picows_log,
        # The heartbeat is ours (Heartbeat): picows' costs a task per connection.
        enable_auto_ping=False,
        max_frame_size=s.max_message_bytes,
        enable_auto_pong=False,
        reuse_port=reuse_port,
        # asyncio's default backlog of 100 overflows under connect bursts (clients then wait
        # a 1 s SYN retry); the kernel caps it at net.core.somaxconn anyway.
        backlog=4096,
        # Chat messages are small; picows grows the buffer for a bigger one. Its 16 KiB
        # default would be most of an idle connection's memory.
        read_buffer_init_size=2048,
        # The plain uvloop transport: aiofastnet's costs ~5 KiB more per connection.
        use_aiofastnet=False,
    )


__all__ = ["Connection", "Gateway", "Heartbeat", "listen"]
