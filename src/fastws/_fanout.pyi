import asyncio
from asyncio import AbstractEventLoop
from collections import deque
from collections.abc import Callable
from typing import Any

from fastws._wire import MessageListener, Wire
from fastws.auth import Principal
from fastws.broker.types import MemberInfo

def frame(payload: bytes, opcode: int = 1) -> bytes:
    """One unmasked final server frame (text by default) holding ``payload``."""

class Sink:
    """One connection's outgoing bytes, gathered in a loop turn and sent in one write."""

    owner: Any
    congested: bool  # its transport asked for writes to stop (pause_writing)
    @property
    def closed(self) -> bool: ...
    @property
    def pending(self) -> int: ...
    def __init__(self, transport: Wire, owner: Any = None) -> None: ...

class Outbox:
    """Corks frames for many sinks within one event-loop turn; flushes before the loop sleeps."""

    @property
    def max_buffered(self) -> int: ...
    @property
    def deliveries(self) -> int: ...
    @property
    def writes(self) -> int: ...
    @property
    def conflated(self) -> int:
        """Ephemeral frames replaced by a later one of the same key while held."""
    def __init__(
        self, loop: AbstractEventLoop, max_buffered: int, on_slow: Callable[[Sink], Any]
    ) -> None: ...
    def send(self, sink: Sink, data: bytes) -> bool:
        """Queue ``data`` for one sink; False if it is closed or just became slow."""
    def broadcast(
        self,
        sinks: list[Sink],
        data: bytes,
        exclude: Sink | None = None,
        skip: list[Sink] | None = None,
    ) -> int:
        """Queue ``data`` for every open sink but ``exclude`` and ``skip``; return how many
        took it."""
    def broadcast_ephemeral(
        self, sinks: list[Sink], data: bytes, exclude: Sink | None, key: Any
    ) -> int:
        """``broadcast`` for a frame of which only the latest per ``key`` matters: a sink
        that is congested, or that it would put past half of ``max_buffered``, holds it (the
        latest of ``key`` only) until ``release``, and is never made slow by it."""
    def release(self, sink: Sink) -> None:
        """The sink takes writes again: its held ephemeral frames go out."""
    def flush(self) -> None:
        """Write every queued sink (scheduled automatically once per loop turn)."""
    def flush_if_last(self, sink: Sink) -> None:
        """``flush_sink(sink)`` when the message its Wire is handling ends its read batch and
        the sink holds bytes."""
    def flush_sink(self, sink: Sink) -> None:
        """Write one sink now, e.g. before a close frame."""

#: A kept chat: (seq, time, payload).
Entry = tuple[int, float, bytes]

class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``clock`` is injected so tests need no sleep."""

    rate: float
    burst: float
    tokens: float
    stamp: float
    clock: Callable[[], float]
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = ...) -> None: ...
    def take(self) -> bool: ...

class SessionCore:
    """The fields of ``session.Session`` a chat message touches (the session owns them)."""

    bucket: TokenBucket | None
    rejected_in_row: int
    _task: asyncio.Task[None] | None
    rooms: set[str] | frozenset[str]
    in_flight: int
    principal: Principal
    sink: Any  # Sink | None

class RoomCore:
    """The fields of ``hub.Room`` the fan-out reads."""

    sinks: list[Any]
    pending: dict[Any, list[tuple[int, bytes]]]
    fresh: dict[Any, int]

class LedgerRoom:
    """One room of a ``broker.ledger.Ledger``: its seq, epoch, history and members."""

    seq: int
    epoch: str
    epoch_bytes: bytes
    @property
    def history(self) -> deque[Entry] | None: ...  # read-only: its append is kept
    @property
    def history_size(self) -> int: ...
    members: dict[str, MemberInfo]
    lingering: dict[str, str] | None
    stamp: float
    leased: bool
    bytes: int
    def __init__(self, history: deque[Entry] | None, epoch: str) -> None: ...
    def restart(self, epoch: str) -> None: ...

class LedgerCore:
    """Sequencing and keeping of ``broker.ledger.Ledger``; ``_kept(name, room)`` is the
    subclass's, called after a keep only when the room is empty or past ``max_bytes``."""

    rooms: dict[str, LedgerRoom]
    clock: Callable[[], float]
    bytes: int
    max_bytes: float
    entry_cost: int
    def keep(self, name: str, room: LedgerRoom, entry: Entry) -> None: ...
    def _kept(self, name: str, room: LedgerRoom) -> None: ...

class ChatPath:
    """The common chat_message compiled (rate, decode, checks, seq, history, fan-out, ack);
    the rest through the Python path."""

    accepted: int  # chat messages taken from WebSockets
    published: int  # publications delivered to this node
    scanned: int  # of accepted, those read without msgspec (compact JSON)
    @property
    def outbox(self) -> Outbox | None: ...
    def __init__(
        self, node: Any, hub: Any, ledger: Any, protocol: Any, clock_now: Callable[[], float]
    ) -> None: ...
    def start(self, outbox: Outbox) -> None: ...
    def handle(self, session: Any, msg: str | bytes) -> None: ...
    def deliver(self, room: str, exclude: str, payload: bytes, seq: int = 0) -> int:
        """Broker callback: one publication for ``room`` to its local members."""

class Listener(MessageListener):
    """The message side of a connection's Wire listener."""

    session: Any
    chat: ChatPath
    def on_message(self, msg: str | bytes) -> None: ...
