"""The door: routes each request head (upgrade, /healthz, pages, 404) and checks the token
before any WebSocket exists; a refusal is answered with HTTP 401 (RFC 6455 section 4.2.2)."""

from __future__ import annotations

import asyncio
import socket
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import msgspec

from ._wire import WireServer
from .auth import (
    PROTOCOL,
    TOKEN_PROTOCOL_PREFIX,
    extract_token,
    offered_protocols,
)
from .errors import AuthError
from .transport import Connection
from .upgrade import BadRequest, Request, accept_key, parse_head, response, switching_protocols

if TYPE_CHECKING:
    from .server import Node


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


class Listening:
    """A node's listening sockets (where asyncio.Server was): the accepting is the Wires'."""

    def __init__(self, wires: WireServer) -> None:
        self.wires = wires

    @property
    def sockets(self) -> list[socket.socket]:
        return self.wires.sockets

    def close(self) -> None:
        self.wires.stop_accepting()

    async def wait_closed(self) -> None:
        """Drop the connections still open (a drain has waited for them already), and let
        their ``connection_lost`` run."""
        self.wires.abort_all()
        await asyncio.sleep(0)


async def bind(host: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for ``host:port`` (every address it resolves to, as asyncio's
    create_server binds them; port 0 picks one free port for all of them)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            # asyncio's default backlog of 100 overflows under connect bursts (clients then
            # wait a 1 s SYN retry); the kernel caps it at net.core.somaxconn anyway.
            sock.listen(4096)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def listen(
    node: Node, pages: dict[str, tuple[bytes, str]], reuse_port: bool = False
) -> tuple[Listening, WireServer]:
    """Start accepting on ``node.settings.host:port``: the listening sockets and their Wires."""
    s = node.settings
    wires = WireServer(Gateway(node, pages), s.handshake_timeout or 0.0, s.max_message_bytes)
    for sock in await bind(s.host, s.port, reuse_port):
        wires.listen(sock)
    return Listening(wires), wires


__all__ = ["Gateway", "Listening", "bind", "listen"]
