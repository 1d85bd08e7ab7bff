"""Graceful shutdown of a real `fastws serve` process: close 1001 to every client, exit 0."""

from __future__ import annotations

import asyncio
import signal

import pytest
from websockets.exceptions import ConnectionClosed

from .utils import TIMEOUT, client, join, recv_json, server_process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_clients_with_1001_and_exits_0(sig: signal.Signals) -> None:
    """On SIGTERM/SIGINT every client gets close 1001, then the process exits with 0."""
    with server_process("--drain-timeout", "3") as (proc, port):
        async with client(port, "alice") as a, client(port, "bob") as b:
            await join(a, "r")
            await join(b, "r")
            await recv_json(a)
            proc.send_signal(sig)
            for ws in (a, b):
                with pytest.raises(ConnectionClosed):
                    await recv_json(ws)
                assert ws.close_code == 1001
                assert ws.close_reason == "server shutting down"
        rc = await asyncio.to_thread(proc.wait, TIMEOUT)
        assert rc == 0


async def test_drain_refuses_new_connections() -> None:
    """While draining, a new upgrade is refused instead of being half-served."""
    with server_process("--drain-timeout", "2") as (proc, port):
        async with client(port, "alice") as a:
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                await recv_json(a)
            with pytest.raises((OSError, Exception)):
                async with client(port, "late"):
                    pass
        assert await asyncio.to_thread(proc.wait, TIMEOUT) == 0


async def test_drain_gives_up_on_clients_that_never_close() -> None:
    """A client that ignores the close frame is dropped after drain_timeout; exit is still 0."""
    with server_process("--drain-timeout", "0.5", "--close-timeout", "5") as (proc, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        from .utils import token

        writer.write(
            (
                f"GET /ws?token={token('mute')} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101")
        proc.send_signal(signal.SIGTERM)
        # Never answer the close frame; the server must not wait forever.
        rc = await asyncio.to_thread(proc.wait, TIMEOUT)
        assert rc == 0
        writer.close()
