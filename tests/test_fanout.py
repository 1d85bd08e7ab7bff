"""The compiled fan-out and its pure-Python twin, on real picows sockets."""

from __future__ import annotations

import asyncio
import importlib.machinery
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import picows
import pytest

import fastws._fanout as compiled
import fastws._fanout_py as twin
from fastws import hub

TIMEOUT = 5.0


class _ServerSide(picows.WSListener):  # type: ignore[misc]
    def __init__(self, sink: list[picows.WSTransport]) -> None:
        super().__init__()
        self.sink = sink

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.sink.append(transport)


class _Receiver(picows.WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.frames: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        self.frames.put_nowait((int(frame.msg_type), frame.get_payload_as_bytes()))


@pytest.fixture(params=[compiled, twin], ids=["compiled", "python"])
def fanout(request: pytest.FixtureRequest) -> ModuleType:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def pairs() -> AsyncIterator[tuple[list[picows.WSTransport], list[Any]]]:
    """Ten connected (server transport, client receiver) pairs over loopback."""
    server_side: list[picows.WSTransport] = []
    server = await picows.ws_create_server(lambda _req: _ServerSide(server_side), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = []
    for _ in range(10):
        transport, receiver = await picows.ws_connect(_Receiver, f"ws://127.0.0.1:{port}/")
        clients.append((transport, receiver))
    async with asyncio.timeout(TIMEOUT):
        while len(server_side) < 10:
            await asyncio.sleep(0.01)
    yield server_side, [r for _, r in clients]
    for transport, _ in clients:
        transport.disconnect()
    server.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)


def test_compiled_module_is_the_one_loaded() -> None:
    """The hub uses the Cython extension, not the fallback twin."""
    assert hub.fanout is compiled
    assert isinstance(compiled.__loader__, importlib.machinery.ExtensionFileLoader)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_frame_matches_the_twin_and_rfc_header(size: int) -> None:
    """frame() builds an unmasked FIN text frame with the RFC 6455 length encoding."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    data = compiled.frame(payload)
    assert data == twin.frame(payload)
    assert data[0] == 0x81 and not data[1] & 0x80
    assert data.endswith(payload)
    assert compiled.frame(b"x", 2)[0] == 0x82


async def test_broadcast_writes_the_same_frame_to_every_socket(fanout: ModuleType, pairs) -> None:
    """Every open transport gets the frame once; delivered counts them; no slow ones."""
    transports, receivers = pairs
    delivered, slow = fanout.broadcast(transports, fanout.frame(b'{"n":1}'), 1 << 20)
    assert (delivered, slow) == (10, [])
    for r in receivers:
        assert await asyncio.wait_for(r.frames.get(), TIMEOUT) == (1, b'{"n":1}')


async def test_broadcast_skips_excluded_and_closed(fanout: ModuleType, pairs) -> None:
    """exclude and transports that sent CLOSE are skipped and not counted."""
    transports, receivers = pairs
    transports[3].send_close(picows.WSCloseCode.GOING_AWAY)
    delivered, _ = fanout.broadcast(transports, fanout.frame(b"big" * 30000), 1 << 20,
                                    transports[5])
    assert delivered == 8
    for i, r in enumerate(receivers):
        if i == 5:
            continue
        kind, payload = await asyncio.wait_for(r.frames.get(), TIMEOUT)
        if i == 3:
            assert kind == int(picows.WSMsgType.CLOSE)
            assert r.frames.empty()
        else:
            assert payload == b"big" * 30000
    assert receivers[5].frames.empty()


async def test_broadcast_reports_slow_consumers_without_writing(fanout: ModuleType, pairs) -> None:
    """A transport over max_buffered is returned as slow and not written to."""
    transports, receivers = pairs
    delivered, slow = fanout.broadcast(transports, fanout.frame(b"x"), -1)
    assert delivered == 0 and slow == transports
    await asyncio.sleep(0.05)
    assert all(r.frames.empty() for r in receivers)


async def test_broadcast_survives_a_dead_socket(fanout: ModuleType, pairs) -> None:
    """An aborted peer never makes broadcast raise; the others still get the frame."""
    transports, receivers = pairs
    transports[0].underlying_transport.abort()
    transports[1].disconnect(False)
    delivered, _ = fanout.broadcast(transports, fanout.frame(b"ok"), 1 << 20)
    assert delivered >= 8
    for r in receivers[2:]:
        assert await asyncio.wait_for(r.frames.get(), TIMEOUT) == (1, b"ok")
