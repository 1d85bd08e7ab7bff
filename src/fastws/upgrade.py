"""HTTP/1.1 at the door: the request head a connection opens with, and the answers to it.

Only heads are read (no request bodies): every route here is a GET, and a request with a body
is answered and closed like any other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from http import HTTPStatus

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


class Headers:
    """Request headers by case-insensitive name; a repeated header keeps every value."""

    __slots__ = ("_by_name",)

    def __init__(self) -> None:
        self._by_name: dict[str, list[str]] = {}

    def add(self, name: str, value: str) -> None:
        self._by_name.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._by_name.get(name.lower())
        return values[0] if values else default

    def getall(self, name: str, default: list[str] | None = None) -> list[str]:
        return list(self._by_name.get(name.lower(), default or []))


class Request:
    """One parsed request head: ``path`` is the raw request target (query string included)."""

    __slots__ = ("headers", "method", "path", "version")

    def __init__(self, method: str, path: str, version: str, headers: Headers) -> None:
        self.method = method
        self.path = path
        self.version = version
        self.headers = headers


class BadRequest(ValueError):
    """A head that is not HTTP/1.1, or an upgrade the WebSocket handshake refuses."""


def parse_head(head: bytes) -> Request:
    """The request in ``head`` (everything before the blank line); raises ``BadRequest``."""
    lines = head.split(b"\r\n")
    try:
        method, path, version = lines[0].decode("latin-1").split(" ")
    except ValueError:
        raise BadRequest("malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise BadRequest("not HTTP/1.x")
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed header line")
        headers.add(name, value.strip())
    return Request(method, path, version, headers)


def accept_key(request: Request) -> str:
    """The ``Sec-WebSocket-Accept`` for a valid upgrade request; raises ``BadRequest``."""
    h = request.headers
    if request.method != "GET" or request.version != "HTTP/1.1":
        raise BadRequest("a WebSocket upgrade is a GET over HTTP/1.1")
    # Firefox sends "Connection: keep-alive, Upgrade": a token list, not one value.
    tokens = {t.strip().lower() for v in h.getall("Connection") for t in v.split(",")}
    if "upgrade" not in tokens:
        raise BadRequest("no Connection: upgrade")
    if (h.get("Sec-WebSocket-Version") or "") != "13":
        raise BadRequest("unsupported WebSocket version")
    key = h.get("Sec-WebSocket-Key") or ""
    try:
        if len(base64.b64decode(key.encode("ascii"), validate=True)) != 16:
            raise BadRequest("invalid Sec-WebSocket-Key")
    except (UnicodeEncodeError, binascii.Error):
        raise BadRequest("invalid Sec-WebSocket-Key") from None
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode()


def switching_protocols(accept: str, protocol: str | None = None) -> bytes:
    """The 101 answer that completes the handshake (section 4.2.2)."""
    extra = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    ).encode("latin-1")


def response(
    status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> bytes:
    """A whole HTTP response; the connection is closed after it."""
    fields = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Cache-Control": "no-store",
        "Connection": "close",
        **(headers or {}),
    }
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"HTTP/1.1 {status.value} {status.phrase}\r\n{head}\r\n".encode("latin-1") + body


__all__ = [
    "BadRequest",
    "Headers",
    "Request",
    "accept_key",
    "parse_head",
    "response",
    "switching_protocols",
]
