"""A tiny raw-socket WebSocket client (asyncio streams) for sending malformed traffic.

Everything is built by hand from RFC 6455: the HTTP upgrade (section 4.1), client frames
(section 5.2, masked unless told otherwise) and the reading of server frames. Every read
is bounded by ``asyncio.wait_for``. A peer that resets or closes the TCP connection while
we are still writing is allowed (the server may drop a misbehaving client at any time):
such write errors are recorded in ``RawWS.write_error`` instead of raised.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import struct
import time

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

RSV1 = 0b100
RSV2 = 0b010
RSV3 = 0b001

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
READ_TIMEOUT = 5.0


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` (RFC 6455 section 5.3)."""
    n = len(payload)
    if not n:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def build_frame(
    opcode: int,
    payload: bytes,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    mask_key: bytes | None = None,
) -> bytes:
    """One client frame: FIN, RSV1-3 (``rsv`` as a 3-bit value), opcode, length, mask, data."""
    head = bytearray([(0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)])
    mask_bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = mask_key if mask_key is not None else os.urandom(4)
    return bytes(head) + key + mask_payload(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class HandshakeResponse:
    """The server's answer to our upgrade request: status, headers, and the open streams."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.status = status
        self.headers = headers
        self.reader = reader
        self.writer = writer


async def raw_handshake(
    port: int,
    token: str | None,
    path: str = "/ws",
    timeout: float = READ_TIMEOUT,
) -> HandshakeResponse:
    """Open a TCP connection and send the upgrade request by hand; return the response head."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        target = f"{path}?token={token}" if token is not None else path
        request = (
            f"GET {target} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "\r\n"
        )
        writer.write(request.encode("latin-1"))
        await asyncio.wait_for(writer.drain(), timeout)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if status == 101:
            accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
            assert headers.get("sec-websocket-accept") == accept, headers
    except BaseException:
        writer.transport.abort()
        raise
    return HandshakeResponse(status, headers, reader, writer)


class RawWS:
    """An upgraded connection on which anything, valid or not, can be sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.write_error: BaseException | None = None
        self.received: list[tuple[int, bytes]] = []  # data frames skipped by expect_close

    # ---- sending ----------------------------------------------------------------------

    async def send_raw(self, data: bytes, byte_by_byte: bool = False, delay: float = 0.0) -> None:
        """Write ``data`` as is; with ``byte_by_byte``, one write (and drain) per byte."""
        try:
            if not byte_by_byte:
                self.writer.write(data)
                await asyncio.wait_for(self.writer.drain(), READ_TIMEOUT)
                return
            for i in range(len(data)):
                self.writer.write(data[i : i + 1])
                await asyncio.wait_for(self.writer.drain(), READ_TIMEOUT)
                await asyncio.sleep(delay)
        except (ConnectionError, OSError) as exc:
            self.write_error = exc

    async def send_frame(
        self,
        opcode: int,
        payload: bytes,
        fin: bool = True,
        rsv: int = 0,
        mask: bool = True,
        byte_by_byte: bool = False,
        delay: float = 0.0,
    ) -> None:
        """Build one client frame by hand (RFC 6455 section 5.2) and send it."""
        await self.send_raw(build_frame(opcode, payload, fin, rsv, mask), byte_by_byte, delay)

    async def send_text(self, text: str | bytes) -> None:
        await self.send_frame(OP_TEXT, text.encode() if isinstance(text, str) else text)

    async def send_close(self, code: int = 1000, reason: bytes = b"") -> None:
        await self.send_frame(OP_CLOSE, close_payload(code, reason))

    # ---- receiving --------------------------------------------------------------------

    async def _read(self, n: int, timeout: float) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def read_frame(self, timeout: float = READ_TIMEOUT) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame, which must be unmasked."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(deadline - time.monotonic(), 0.001)

        b0, b1 = await self._read(2, left())
        assert not b1 & 0x80, "server frames must not be masked (RFC 6455 section 5.1)"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._read(2, left()))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._read(8, left()))
        payload = await self._read(n, left()) if n else b""
        return b0 & 0x0F, payload

    async def read_text(self, timeout: float = READ_TIMEOUT) -> str:
        """The next data frame's payload as text, skipping pings/pongs."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = await self.read_frame(max(deadline - time.monotonic(), 0.001))
            if opcode in (OP_TEXT, OP_BINARY):
                return payload.decode()
            assert opcode in (OP_PING, OP_PONG), (opcode, payload)

    async def expect_close(self, timeout: float = 2.0) -> int | None:
        """Read until a CLOSE frame and return its code (1005 if it has none), or None when
        the TCP connection is dropped first (EOF or reset). Raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError(
                    f"no close within {timeout}s; frames received meanwhile: {self.received}"
                )
            try:
                opcode, payload = await self.read_frame(remaining)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError(
                    f"no close within {timeout}s; frames received meanwhile: {self.received}"
                ) from None
            if opcode == OP_CLOSE:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.received.append((opcode, payload))

    async def expect_eof(self, timeout: float = 2.0) -> None:
        """The server closes (or resets) the TCP connection within ``timeout``."""
        with contextlib.suppress(ConnectionError):
            rest = await asyncio.wait_for(self.reader.read(), timeout)
            assert rest == b"", rest

    # ---- cleanup ----------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the TCP connection at once (RST where possible), without a close frame."""
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()

    async def close(self) -> None:
        """Close our side of the TCP connection; bounded, never raises."""
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)

    async def __aenter__(self) -> RawWS:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()
        await self.close()


async def raw_connect(port: int, token: str, timeout: float = READ_TIMEOUT) -> RawWS:
    """Upgrade by hand (expects 101) and read the server's `connected` text frame."""
    resp = await raw_handshake(port, token, timeout=timeout)
    ws = RawWS(resp.reader, resp.writer)
    try:
        assert resp.status == 101, resp.status
        opcode, payload = await ws.read_frame(timeout)
        assert opcode == OP_TEXT and b'"type":"connected"' in payload, (opcode, payload)
    except BaseException:
        ws.abort()
        raise
    return ws
