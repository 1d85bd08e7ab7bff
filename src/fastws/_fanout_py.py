"""Pure-Python twin of ``_fanout``: same contract, the reference the tests run against too."""

from __future__ import annotations

import struct

from picows import WSTransport


def frame(payload: bytes, opcode: int = 1) -> bytes:
    """One unmasked final server frame (RFC 6455 section 5.2) holding ``payload``."""
    size = len(payload)
    first = 0x80 | (opcode & 0x0F)
    if size < 126:
        header = struct.pack("!BB", first, size)
    elif size < 65536:
        header = struct.pack("!BBH", first, 126, size)
    else:
        header = struct.pack("!BBQ", first, 127, size)
    return header + payload


def broadcast(
    transports: list[WSTransport],
    data: bytes,
    max_buffered: int,
    exclude: WSTransport | None = None,
) -> tuple[int, list[WSTransport]]:
    """Write ``data`` to every open transport; return (delivered, slow consumers)."""
    delivered = 0
    slow: list[WSTransport] = []
    for t in transports:
        if t is exclude or t.is_close_frame_sent or t.is_disconnected:
            continue
        tr = t.underlying_transport
        if tr.get_write_buffer_size() > max_buffered:
            slow.append(t)
            continue
        try:
            tr.write(data)
            delivered += 1
        except Exception:
            pass
    return delivered, slow
