"""Pure-Python twin of ``_fanout``: same contract, the reference the tests run against too."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._wire import Wire


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


class Sink:
    """One connection's outgoing bytes for this loop turn."""

    def __init__(self, transport: Wire, owner: Any = None) -> None:
        self.transport = transport
        self.owner = owner
        self.buf = bytearray()
        self.queued = False
        self.closed = False
        self.congested = False
        self.held: dict[Any, bytes] | None = None

    @property
    def pending(self) -> int:
        return len(self.buf)

    def _dead(self) -> bool:
        t = self.transport
        return self.closed or t.is_close_frame_sent or t.is_disconnected


class Outbox:
    """Corks writes to many sinks within one event-loop turn."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_buffered: int, on_slow: Callable[[Sink], Any]
    ) -> None:
        self._queued: list[Sink] = []
        self._loop = loop
        self._scheduled = False
        self.max_buffered = max_buffered
        self._on_slow = on_slow
        self.deliveries = 0
        self.writes = 0
        self.conflated = 0

    def _put(self, s: Sink, data: bytes) -> int:
        if len(s.buf) + len(data) > self.max_buffered:
            self._slow(s)
            return 0
        s.buf += data
        if not s.queued:
            s.queued = True
            self._queued.append(s)
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self.flush)
        return 1

    def _slow(self, s: Sink) -> None:
        if s.closed:
            return
        s.closed = True
        s.buf.clear()
        self._on_slow(s)

    def send(self, sink: Sink, data: bytes) -> bool:
        if sink._dead():
            return False
        return self._put(sink, data) == 1

    def broadcast(
        self,
        sinks: list[Sink],
        data: bytes,
        exclude: Sink | None = None,
        skip: list[Sink] | None = None,
    ) -> int:
        taken = 0
        skipped = {id(s) for s in skip} if skip else ()
        for s in sinks:
            if s is exclude or id(s) in skipped or s._dead():
                continue
            taken += self._put(s, data)
        self.deliveries += taken
        return taken

    def broadcast_ephemeral(
        self, sinks: list[Sink], data: bytes, exclude: Sink | None, key: Any
    ) -> int:
        taken = 0
        for s in sinks:
            if s is exclude or s._dead():
                continue
            taken += self._ephemeral(s, data, key)
        self.deliveries += taken
        return taken

    def _ephemeral(self, s: Sink, data: bytes, key: Any) -> int:
        tr = s.transport.transport
        if s.congested or (
            tr.get_write_buffer_size() + len(s.buf) + len(data) > self.max_buffered // 2
        ):
            if s.held is None:
                s.held = {}
            elif key in s.held:
                self.conflated += 1
            s.held[key] = data
            return 0
        if s.held is not None:
            s.held.pop(key, None)  # this one is newer
        return self._put(s, data)

    def release(self, sink: Sink) -> None:
        held, sink.held = sink.held, None
        if held is None or sink._dead():
            return
        for key, data in held.items():
            self._ephemeral(sink, data, key)

    def flush(self) -> None:
        queued, self._queued = self._queued, []
        self._scheduled = False
        for s in queued:
            s.queued = False
            if not s.buf:
                continue
            if not s._dead():
                # A transport that refuses writes is closing; its listener reports it.
                with contextlib.suppress(Exception):
                    self._write(s)
            s.buf.clear()
            if s.held is not None and not s.congested:
                self.release(s)  # the socket took it all: what waited may go next turn

    def flush_if_last(self, sink: Sink) -> None:
        if sink.transport.last_in_batch and sink.buf:
            self.flush_sink(sink)

    def flush_sink(self, sink: Sink) -> None:
        if sink.buf and not sink._dead():
            self._write(sink)
        sink.buf.clear()

    def _write(self, s: Sink) -> None:
        tr = s.transport.transport
        if tr.get_write_buffer_size() + len(s.buf) > self.max_buffered:
            self._slow(s)
            return
        self.writes += 1
        tr.write(bytes(s.buf))


#: A kept chat: (seq, time, payload).
Entry = tuple[int, float, bytes]


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``clock`` is injected so tests need no sleep."""

    __slots__ = ("burst", "clock", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SessionCore:
    """The fields of ``session.Session`` a chat message touches (the session owns them)."""

    __slots__ = ("_task", "bucket", "in_flight", "principal", "rejected_in_row", "rooms", "sink")


class RoomCore:
    """The fields of ``hub.Room`` the fan-out reads."""

    __slots__ = ("fresh", "pending", "sinks")


class LedgerRoom:
    """One room of a ``broker.ledger.Ledger``: its seq, epoch, history and members."""

    __slots__ = (
        "bytes",
        "epoch",
        "epoch_bytes",
        "history",
        "history_size",
        "leased",
        "lingering",
        "members",
        "seq",
        "stamp",
    )

    def __init__(self, history: deque[tuple[int, float, bytes]] | None, epoch: str) -> None:
        self.seq = 0
        self.epoch = epoch
        self.epoch_bytes = epoch.encode()  # spliced into every chat payload
        self.history = history
        self.history_size = history.maxlen or 0 if history is not None else 0
        self.members: dict[str, Any] = {}
        self.lingering: dict[str, str] | None = None  # userId -> its dropped connection's id
        self.stamp = 0.0  # time of the newest message
        self.leased = False
        self.bytes = 0  # what its history costs (see ENTRY_COST)

    def restart(self, epoch: str) -> None:
        """A new epoch from seq 0, with no history (the ledger takes ``bytes`` off first)."""
        self.seq = 0
        self.epoch = epoch
        self.epoch_bytes = epoch.encode()
        if self.history is not None:
            self.history.clear()
        self.bytes = 0


class LedgerCore:
    """Keeping of ``broker.ledger.Ledger``; ``_kept(name, room)`` is the subclass's, called
    after a keep only when the room is empty or the ledger is past ``max_bytes``."""

    rooms: dict[str, LedgerRoom]
    clock: Callable[[], float]
    bytes: int
    max_bytes: float
    entry_cost: int

    def keep(self, name: str, room: LedgerRoom, entry: Entry) -> None:
        history = room.history
        assert history is not None
        cost = len(entry[2]) + self.entry_cost
        if len(history) == room.history_size:  # the append pushes the oldest out
            cost -= len(history[0][2]) + self.entry_cost
        history.append(entry)
        room.bytes += cost
        self.bytes += cost
        if not room.members or self.bytes > self.max_bytes:
            self._kept(name, room)

    def _kept(self, name: str, room: LedgerRoom) -> None:
        raise NotImplementedError


class ChatPath:
    """The chat path on the reference steps: every message to ``Session.handle``, every
    publication to ``Node.deliver_slow`` (the compiled one takes the common case itself)."""

    def __init__(self, node: Any, hub: Any, ledger: Any, protocol: Any, clock_now: Any) -> None:
        self.node = node
        self.outbox: Outbox | None = None
        self.accepted = 0  # chat messages taken from WebSockets
        self.published = 0  # publications delivered to this node
        self.scanned = 0  # the compiled path's own reader; this twin has none

    def start(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def handle(self, session: Any, msg: str | bytes) -> None:
        session.handle(msg)

    def deliver(self, room: str, exclude: str, payload: bytes, seq: int = 0) -> int:
        self.published += 1
        return int(self.node.deliver_slow(room, exclude, payload, seq))


class Listener:
    """The message side of a connection's Wire listener."""

    __slots__ = ("chat", "session")

    def __init__(self) -> None:
        self.session: Any = None
        self.chat: Any = None

    def on_message(self, msg: str | bytes) -> None:
        session = self.session
        if session is None:
            return
        self.chat.handle(session, msg)
        self.chat.outbox.flush_if_last(session.sink)
