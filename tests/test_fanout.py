"""The compiled fan-out and its pure-Python twin, on real sockets: fastws' own server side
(``_wire``) and picows clients."""

from __future__ import annotations

import asyncio
import importlib.machinery
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any

import picows
import pytest

import fastws._fanout as compiled
import fastws._fanout_py as twin
from fastws import hub
from fastws._wire import Wire, WireServer
from fastws.gateway import Listening, bind
from fastws.upgrade import accept_key, parse_head, switching_protocols

TIMEOUT = 5.0


class _ServerSide:
    """A Wire listener that records its Wire; ``on_message`` runs the test's hook."""

    def __init__(self, wires: list[Wire], hook: list[Callable[[Wire, Any], None]]) -> None:
        self.wires = wires
        self.hook = hook

    def on_connected(self, wire: Wire) -> None:
        self.wires.append(wire)

    def on_message(self, message: str | bytes) -> None:
        for hook in self.hook:
            hook(self.wires[0], message)

    def before_close(self) -> None:
        pass

    def on_disconnected(self) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class _Receiver(picows.WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.frames: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.peer: picows.WSTransport | None = None

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        self.frames.put_nowait((int(frame.msg_type), frame.get_payload_as_bytes()))


@pytest.fixture(params=[compiled, twin], ids=["compiled", "python"])
def fanout(request: pytest.FixtureRequest) -> ModuleType:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def hooks() -> list[Callable[[Wire, Any], None]]:
    return []


@pytest.fixture
async def pairs(hooks: list[Any]) -> AsyncIterator[tuple[list[Wire], list[Any]]]:
    """Ten connected (server Wire, client receiver) pairs over loopback."""
    server_side: list[Wire] = []

    def route(head: bytes) -> tuple[_ServerSide, bytes]:
        listener = _ServerSide(server_side, hooks)
        return listener, switching_protocols(accept_key(parse_head(head)))

    wires = WireServer(route, 5.0, 1 << 20)
    for sock in await bind("127.0.0.1", 0):
        wires.listen(sock)
    server = Listening(wires)
    port = server.sockets[0].getsockname()[1]
    clients = []
    for _ in range(10):
        transport, receiver = await picows.ws_connect(_Receiver, f"ws://127.0.0.1:{port}/")
        receiver.peer = transport
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


def _outbox(fanout: ModuleType, max_buffered: int = 1 << 20) -> tuple[Any, list[Any]]:
    slow: list[Any] = []
    return fanout.Outbox(asyncio.get_running_loop(), max_buffered, slow.append), slow


async def _drain(receivers: list[Any], count: int) -> list[list[tuple[int, bytes]]]:
    out = []
    for r in receivers:
        out.append([await asyncio.wait_for(r.frames.get(), TIMEOUT) for _ in range(count)])
    return out


async def test_broadcast_writes_the_same_frame_to_every_socket(fanout: ModuleType, pairs) -> None:
    """Every open sink gets the frame once; broadcast returns how many took it."""
    transports, receivers = pairs
    outbox, slow = _outbox(fanout)
    sinks = [fanout.Sink(t, i) for i, t in enumerate(transports)]
    assert outbox.broadcast(sinks, fanout.frame(b'{"n":1}')) == 10
    assert [s.pending for s in sinks] == [9] * 10  # queued, not yet written
    assert await _drain(receivers, 1) == [[(1, b'{"n":1}')]] * 10
    assert slow == [] and outbox.deliveries == 10


async def test_one_turn_of_broadcasts_is_one_write_per_socket(fanout: ModuleType, pairs) -> None:
    """Many frames to a socket within one loop turn leave in one write, in order (corking)."""
    transports, receivers = pairs
    outbox, _ = _outbox(fanout)
    sinks = [fanout.Sink(t) for t in transports]
    for i in range(50):
        outbox.broadcast(sinks, fanout.frame(b"m%d" % i))
    got = await _drain(receivers, 50)
    assert outbox.writes == 10
    for frames in got:
        assert frames == [(1, b"m%d" % i) for i in range(50)]


async def test_send_keeps_order_with_broadcasts(fanout: ModuleType, pairs) -> None:
    """A frame sent to one sink lands between the broadcasts queued around it."""
    transports, receivers = pairs
    outbox, _ = _outbox(fanout)
    sinks = [fanout.Sink(t) for t in transports]
    outbox.broadcast(sinks, fanout.frame(b"a"))
    assert outbox.send(sinks[0], fanout.frame(b"only-0"))
    outbox.broadcast(sinks, fanout.frame(b"b"))
    got = await _drain(receivers[:2], 2)
    assert got[1] == [(1, b"a"), (1, b"b")]
    assert [await asyncio.wait_for(receivers[0].frames.get(), TIMEOUT)] == [(1, b"b")]
    assert got[0] == [(1, b"a"), (1, b"only-0")]


async def test_broadcast_skips_excluded_and_closed(fanout: ModuleType, pairs) -> None:
    """exclude and sinks whose transport sent CLOSE are skipped and not counted."""
    transports, receivers = pairs
    outbox, _ = _outbox(fanout)
    sinks = [fanout.Sink(t) for t in transports]
    transports[3].send_close(1001)
    assert outbox.broadcast(sinks, fanout.frame(b"big" * 30000), sinks[5]) == 8
    for i, r in enumerate(receivers):
        if i == 5:
            continue
        kind, payload = await asyncio.wait_for(r.frames.get(), TIMEOUT)
        if i == 3:
            assert kind == int(picows.WSMsgType.CLOSE)
        else:
            assert payload == b"big" * 30000
    await asyncio.sleep(0.05)
    assert receivers[5].frames.empty() and receivers[3].frames.empty()


async def test_broadcast_skips_the_listed_sinks_for_that_call_only(
    fanout: ModuleType, pairs
) -> None:
    """Sinks in ``skip`` get nothing from that broadcast and everything from the next."""
    transports, receivers = pairs
    outbox, _ = _outbox(fanout)
    sinks = [fanout.Sink(t) for t in transports]
    assert outbox.broadcast(sinks, fanout.frame(b"one"), sinks[0], [sinks[2], sinks[7]]) == 7
    assert outbox.broadcast(sinks, fanout.frame(b"two")) == 10
    for i, r in enumerate(receivers):
        want = [(1, b"two")] if i in (0, 2, 7) else [(1, b"one"), (1, b"two")]
        assert [await asyncio.wait_for(r.frames.get(), TIMEOUT) for _ in want] == want, i


async def test_slow_sinks_are_reported_once_and_not_written(fanout: ModuleType, pairs) -> None:
    """A sink that would pass max_buffered goes to on_slow once, closed, and gets nothing."""
    transports, receivers = pairs
    outbox, slow = _outbox(fanout, max_buffered=100)
    sinks = [fanout.Sink(t, i) for i, t in enumerate(transports)]
    assert outbox.broadcast(sinks, fanout.frame(b"x" * 60)) == 10
    assert outbox.broadcast(sinks[:3], fanout.frame(b"y" * 60)) == 0
    assert [s.owner for s in slow] == [0, 1, 2]
    assert all(s.closed for s in sinks[:3]) and not sinks[3].closed
    assert outbox.broadcast(sinks, fanout.frame(b"z")) == 7
    assert len(slow) == 3
    got = await _drain(receivers[3:], 2)
    assert all(frames == [(1, b"x" * 60), (1, b"z")] for frames in got)
    await asyncio.sleep(0.05)
    assert all(r.frames.empty() for r in receivers[:3])


async def test_flush_sink_writes_now(fanout: ModuleType, pairs) -> None:
    """flush_sink writes one sink's queued bytes at once (before a close frame, say)."""
    transports, receivers = pairs
    outbox, _ = _outbox(fanout)
    sink = fanout.Sink(transports[0])
    outbox.send(sink, fanout.frame(b"first"))
    outbox.flush_sink(sink)
    assert sink.pending == 0
    transports[0].send_close(1001)
    kinds = [await asyncio.wait_for(receivers[0].frames.get(), TIMEOUT) for _ in range(2)]
    assert kinds[0] == (1, b"first") and kinds[1][0] == int(picows.WSMsgType.CLOSE)


async def test_flush_if_last_writes_the_sink_at_the_end_of_a_read_batch(
    fanout: ModuleType, pairs, hooks
) -> None:
    """flush_if_last flushes a peer's sink after the last whole message of its read only:
    three messages in one write leave their replies corked until the third."""
    transports, receivers = pairs
    outbox, _ = _outbox(fanout)
    sink = fanout.Sink(transports[0])
    pending_after: list[int] = []

    def reply(wire: Wire, message: Any) -> None:
        outbox.send(sink, fanout.frame(b"re:" + message.encode()))
        outbox.flush_if_last(sink)
        pending_after.append(sink.pending)

    hooks.append(reply)
    # Three masked text frames (an all-zero mask key) in one TCP write.
    frames = b"".join(bytes([0x81, 0x80 | 2, 0, 0, 0, 0]) + b"m%d" % i for i in range(3))
    receivers[0].peer.underlying_transport.write(frames)
    got = [await asyncio.wait_for(receivers[0].frames.get(), TIMEOUT) for _ in range(3)]
    assert got == [(1, b"re:m0"), (1, b"re:m1"), (1, b"re:m2")]
    assert pending_after[0] > 0 and pending_after[1] > pending_after[0]
    assert pending_after[2] == 0


async def test_broadcast_survives_a_dead_socket(fanout: ModuleType, pairs) -> None:
    """An aborted peer never makes broadcast or flush raise; the others still get the frame."""
    transports, receivers = pairs
    outbox, _ = _outbox(fanout)
    sinks = [fanout.Sink(t) for t in transports]
    outbox.broadcast(sinks, fanout.frame(b"warm"))
    transports[0].transport.abort()
    transports[1].disconnect(False)
    outbox.broadcast(sinks, fanout.frame(b"ok"))
    outbox.flush()
    for r in receivers[2:]:
        assert [await asyncio.wait_for(r.frames.get(), TIMEOUT) for _ in range(2)] == [
            (1, b"warm"),
            (1, b"ok"),
        ]
