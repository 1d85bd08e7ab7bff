from picows import WSTransport

def frame(payload: bytes, opcode: int = 1) -> bytes:
    """One unmasked final server frame (text by default) holding ``payload``."""

def broadcast(
    transports: list[WSTransport],
    data: bytes,
    max_buffered: int,
    exclude: WSTransport | None = None,
) -> tuple[int, list[WSTransport]]:
    """Write ``data`` to every open transport; return (delivered, slow consumers)."""
