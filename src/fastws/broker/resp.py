"""A small asyncio Redis client: one auto-pipelined command connection per server and one
pub/sub connection per server, on asyncio Protocols with hiredis' C parser.

Why our own client and not redis-py (or coredis, valkey-glide):

- redis-py's asyncio client takes a pooled connection per command in flight and gives it
  back when the reply is in. Concurrency therefore needs as many connections as commands in
  flight: past ``max_connections`` (100) a call fails with MaxConnectionsError, and a node
  whose clients all rejoin at once after a restart is exactly that case. Its pipelines are
  explicit (``pipeline().execute()``), not "whatever was issued this loop turn", and every
  call is a coroutine, a Task or Future and several awaits, which the chat hot path cannot
  afford. Its PubSub object is one connection whose subscribe/unsubscribe bookkeeping is not
  safe under concurrent callers, and it hands messages over one ``get_message`` await each,
  so what one read brought in is spread over many loop turns and the hub cannot cork it.
- coredis multiplexes commands over fewer connections but is a large, anyio-based library
  whose calls are still coroutines; valkey-glide is a Rust core behind an FFI with its own
  thread, answering through futures. Neither gives a callback per reply nor a synchronous
  hand-over of every pub/sub message of one read.
- What fastws needs is small: RESP2 commands, EVALSHA, (S)SUBSCRIBE, and the slots of a
  cluster. hiredis (already a dependency: redis-py's own fast parser) parses; the rest is
  the few hundred lines below.

How it behaves:

- ``Pipe.send(args, callback)`` packs the command and appends it to the turn's buffer; the
  buffer is written once, by a ``call_soon`` at the end of the turn, so every command issued in
  one loop turn leaves in one write on one connection. Replies are matched to callbacks in
  order (Redis answers a connection's commands in order): the hot path costs a deque append
  and a callback, no Task and no Future. ``Pipe.call`` is the coroutine form for the rest.
- ``Pipe.batch(group, make)``: many items of one loop turn as ONE command (the Redis broker's
  chats: one script call for every chat of the turn). The batch is open until the turn's
  write, or until any other command is sent on the pipe: then it is closed (it sends its one
  command) first, so commands still leave in the order they were issued.
- A callback receives the reply, or an instance of ``RespError`` (an error reply is a
  ``ReplyError``; a lost, timed-out or overfull connection a ``ConnectionLost``/``QueueFull``).
- Backpressure: past ``limit`` commands waiting for replies the pipe calls
  ``pressure(pipe, True)``, and ``pressure(pipe, False)`` once they drop under ``limit // 2``;
  past ``limit * 16`` it refuses commands with ``QueueFull`` rather than grow without bound.
- Timeouts without a timer per command: a watchdog runs every ``timeout / 4`` and aborts the
  connection when the oldest waiting command has been the oldest for four ticks (no reply at
  all for 0.75-1.0 x ``timeout``). A slow Redis that answers keeps its connection.
- The pub/sub ``Listener`` hands every message parsed from one read to ``on_message`` in that
  same call, so the node's deliveries of one read are corked together.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import hiredis

log = logging.getLogger("fastws.broker.resp")

#: callback(reply): the reply, or a RespError instance when there will be none.
Callback = Callable[[Any], None]

B = TypeVar("B", bound="Batch")


class RespError(Exception):
    """Base of this client's errors; instances are also passed to callbacks as the reply."""


class ReplyError(RespError):
    """Redis answered with an error (``-ERR ...``, ``-MOVED ...``, ``-NOSCRIPT ...``)."""


class ConnectionLost(RespError):
    """No reply will come: not connected, the connection dropped, or Redis timed out."""


class QueueFull(RespError):
    """Too many commands are already waiting for this connection."""


class Batch(Protocol):
    """What ``Pipe.batch`` keeps open: items added until ``close()``, which sends them as one
    command (through ``Servers.send``, so a cluster's redirects apply). ``full`` True: the
    next ``Pipe.batch`` closes this one and opens another. ``held`` True: the end of the turn
    leaves it open (its owner closes it later, e.g. when the call before it is answered);
    any other command on the pipe still closes it first, so it keeps its place."""

    full: bool

    @property
    def held(self) -> bool: ...

    def close(self) -> None: ...


class Endpoint(NamedTuple):
    host: str
    port: int
    path: str = ""  # a unix socket instead of host:port
    username: str = ""
    password: str = ""
    db: int = 0
    tls: bool = False

    def with_address(self, host: str, port: int) -> Endpoint:
        """Another server of the same deployment (a cluster node): same credentials."""
        return self._replace(host=host, port=port, path="", db=0)

    @property
    def address(self) -> str:
        return self.path or f"{self.host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """``redis://[user:pass@]host:port/db``, ``rediss://`` (TLS) or ``unix:///path?db=N``."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a redis URL: {parts.scheme}://")
    db = 0
    if parts.scheme == "unix":
        for item in parts.query.split("&"):
            key, _, value = item.partition("=")
            if key == "db" and value:
                db = int(value)
    elif parts.path.strip("/"):
        db = int(parts.path.strip("/"))
    return Endpoint(
        parts.hostname or "127.0.0.1",
        parts.port or 6379,
        parts.path if parts.scheme == "unix" else "",
        unquote(parts.username or ""),
        unquote(parts.password or ""),
        db,
        parts.scheme == "rediss",
    )


async def _open(endpoint: Endpoint, protocol: asyncio.Protocol, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    if endpoint.path:
        connecting = loop.create_unix_connection(lambda: protocol, endpoint.path)
    else:
        context = ssl.create_default_context() if endpoint.tls else None
        connecting = loop.create_connection(
            lambda: protocol, endpoint.host, endpoint.port, ssl=context
        )
    try:
        await asyncio.wait_for(connecting, timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ConnectionLost(f"connect to {endpoint.address}: {exc!r}") from exc


def _auth(endpoint: Endpoint) -> tuple[bytes | str, ...] | None:
    if not endpoint.password:
        return None
    if endpoint.username:
        return (b"AUTH", endpoint.username, endpoint.password)
    return (b"AUTH", endpoint.password)


class _Watchdog:
    """One periodic check per connection instead of a timer per command: ``stalled()`` is
    asked every ``timeout / 4`` and the connection is aborted after four stalled ticks."""

    __slots__ = ("handle", "oldest", "strikes")

    def __init__(self) -> None:
        self.handle: asyncio.TimerHandle | None = None
        self.oldest: Any = None  # the oldest waiter seen at the last tick (kept alive: identity)
        self.strikes = 0

    def tick(self, oldest: Any) -> bool:
        """True when ``oldest`` has been the oldest waiter for four ticks in a row."""
        if oldest is None or oldest is not self.oldest:
            self.oldest = oldest
            self.strikes = 0
            return False
        self.strikes += 1
        return self.strikes >= 4

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.oldest = None


class _Connection(asyncio.Protocol):
    """What a Pipe and a Listener share: one connection to one server, written once per loop
    turn, watched for silence, aborted on a protocol error or a timeout."""

    endpoint: Endpoint
    timeout: float
    lost: BaseException | None
    writes: int
    _transport: asyncio.Transport | None
    _out: list[bytes]
    _flushing: bool
    _closing: bool
    _watchdog: _Watchdog
    _reader: hiredis.Reader

    def _oldest(self) -> Any:
        """The oldest command still waiting for its reply, or None."""
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._watch()

    def _watch(self) -> None:
        if self._watchdog.tick(self._oldest()):
            self._abort(
                ConnectionLost(
                    f"{type(self).__name__.lower()} on {self.endpoint.address}: no reply for "
                    f"{self.timeout:g} s"
                )
            )
            return
        self._watchdog.handle = asyncio.get_running_loop().call_later(self.timeout / 4, self._watch)

    def _abort(self, error: RespError) -> None:
        self.lost = error
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows and fails the waiters

    def _parse(self, data: bytes) -> list[Any] | None:
        """Every reply ``data`` completes, in order; None (and the connection aborted) when
        the server broke the protocol."""
        reader = self._reader
        reader.feed(data)
        replies: list[Any] = []
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._abort(ConnectionLost(f"protocol error from {self.endpoint.address}: {exc}"))
                return None
            if reply is False:
                return replies
            replies.append(reply)


class Pipe(_Connection):
    """One auto-pipelined command connection (see the module docstring). ``connect()`` first;
    after ``on_lost`` is called the pipe is dead and a new one must be made."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout: float = 2.0,
        limit: int = 10_000,
        on_lost: Callable[[Pipe, BaseException | None], None] | None = None,
        pressure: Callable[[Pipe, bool], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.limit = limit
        self._low = limit // 2
        self._hard = limit * 16
        self._on_lost = on_lost
        self._pressure = pressure
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._out: list[bytes] = []
        self._pending: deque[Callback] = deque()
        self._batches: dict[Any, Batch] = {}  # open batches by group, none outside a turn
        self._flushing = False
        self._closing = False
        self._watchdog = _Watchdog()
        self.pressured = False
        self.writes = 0  # writes to the socket (tests check one per loop turn)
        self.lost: BaseException | None = None

    @property
    def connected(self) -> bool:
        return self._transport is not None

    @property
    def waiting(self) -> int:
        """Commands sent or buffered whose reply has not arrived."""
        return len(self._pending)

    async def connect(self) -> None:
        """Connect, then AUTH and SELECT as the URL says. Raises ``RespError``."""
        await _open(self.endpoint, self, self.timeout)
        auth = _auth(self.endpoint)
        if auth is not None:
            await self.call(*auth)
        if self.endpoint.db:
            await self.call(b"SELECT", self.endpoint.db)

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def _oldest(self) -> Any:
        return self._pending[0] if self._pending else None

    def data_received(self, data: bytes) -> None:
        replies = self._parse(data)
        if replies is None:
            return
        pending = self._pending
        for reply in replies:
            try:
                pending.popleft()(reply)
            except IndexError:
                self._abort(ConnectionLost("a reply nobody asked for"))
                return
            except Exception:  # a callback's bug must not end the connection's reader
                log.exception("redis reply callback failed")
        if self.pressured and len(pending) <= self._low:
            self.pressured = False
            if self._pressure is not None:
                self._pressure(self, False)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        self._watchdog.cancel()
        error = self.lost if isinstance(self.lost, RespError) else None
        if error is None:
            error = ConnectionLost(f"connection to {self.endpoint.address} lost: {exc!r}")
            self.lost = error
        self._close_batches()  # not connected: each is answered with ``error`` right away
        self._fail_all(error)
        if self.pressured:
            self.pressured = False
            if self._pressure is not None:
                self._pressure(self, False)
        if not self._closing and self._on_lost is not None:
            self._on_lost(self, error)

    # ---- commands -------------------------------------------------------------------------

    def send(self, args: tuple[Any, ...], callback: Callback) -> None:
        """Queue one command; ``callback(reply)`` is called exactly once, maybe right away
        (with a ``RespError``) if the pipe is down or full."""
        if self._batches:
            self._close_batches()  # they were issued first: they leave first
        if self._transport is None:
            callback(self.lost or ConnectionLost(f"not connected to {self.endpoint.address}"))
            return
        waiting = len(self._pending)
        if waiting >= self._hard:
            callback(QueueFull(f"{waiting} commands waiting on {self.endpoint.address}"))
            return
        self._out.append(hiredis.pack_command(args))
        self._pending.append(callback)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)
        if waiting >= self.limit and not self.pressured:
            self.pressured = True
            if self._pressure is not None:
                self._pressure(self, True)

    def batch(self, group: Any) -> Batch | None:
        """The open batch of ``group`` (one per group, e.g. a cluster slot), or None if there
        is none or it is ``full``: then ``open_batch`` a new one."""
        batch = self._batches.get(group)
        return None if batch is None or batch.full else batch

    def open_batch(self, group: Any, batch: B) -> B:
        """Make ``batch`` the open one of ``group`` (a full one before it is closed first).
        The caller adds items to it; it is closed (sends its one command) at the end of the
        turn, or before any other command is sent on this pipe, so it leaves in its place
        among them. Items added to one open batch leave together: commands issued between
        them go after it."""
        full = self._batches.pop(group, None)
        if full is not None:
            full.close()
        self._batches[group] = batch
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)
        return batch

    def _close_batches(self, turn_end: bool = False) -> None:
        batches, self._batches = self._batches, {}
        for group, batch in batches.items():
            if turn_end and batch.held:
                self._batches[group] = batch
                continue
            try:
                batch.close()
            except Exception:  # a batch's bug must not stop the write of the others
                log.exception("redis batch failed to close")

    def close_batch(self, group: Any) -> None:
        """Send ``group``'s open batch now (a held one, whose time has come)."""
        batch = self._batches.pop(group, None)
        if batch is not None:
            batch.close()

    async def call(self, *args: Any) -> Any:
        """One command as a coroutine: its reply, or raises ``RespError``."""
        future = asyncio.get_running_loop().create_future()
        self.send(args, functools.partial(answer, future))  # a RespError is raised below
        reply = await future
        if isinstance(reply, RespError):
            raise reply
        return reply

    def _flush(self) -> None:
        if self._batches:
            self._close_batches(True)  # while _flushing is still set: no second call_soon
        self._flushing = False
        if self._out and self._transport is not None:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            self._transport.write(data)
            self.writes += 1

    def _fail_all(self, error: RespError) -> None:
        self._out.clear()
        pending, self._pending = self._pending, deque()
        for callback in pending:
            with contextlib.suppress(Exception):
                callback(error)

    def close(self) -> None:
        self._closing = True
        self._watchdog.cancel()
        if self._transport is not None:
            self._flush()
            self._transport.close()
        self._close_batches()  # if not connected: answered with errors now
        self._fail_all(ConnectionLost("closed"))


def answer(future: asyncio.Future[Any], reply: Any) -> None:
    """A reply for a caller that may have stopped waiting (cancelled): then it is dropped."""
    if not future.done():
        future.set_result(reply)


class _Op:
    """One (S)SUBSCRIBE/(S)UNSUBSCRIBE/AUTH sent on a listener, waiting for its reply."""

    __slots__ = ("channel", "future", "kind")

    def __init__(
        self, kind: bytes, channel: bytes | None, future: asyncio.Future[Any] | None
    ) -> None:
        self.kind = kind
        self.channel = channel
        self.future = future


class Listener(_Connection):
    """One pub/sub connection (sharded: SSUBSCRIBE, for a cluster shard's primary).

    Safe under any concurrency: for every channel, the last command sent is what the latest
    caller asked for, and Redis applies a connection's commands in order, so the final state
    is always the wanted one. ``subscribe`` returns once the confirmation of the SUBSCRIBE
    sent for it (or of one still in flight for the same channel) arrives.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        sharded: bool = False,
        timeout: float = 2.0,
        on_message: Callable[[bytes, bytes], None],
        on_lost: Callable[[Listener, BaseException | None], None] | None = None,
        on_dropped: Callable[[Listener, bytes], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.sharded = sharded
        self.timeout = timeout
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_dropped = on_dropped
        self._sub, self._unsub = (
            (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
        )
        self._message = b"smessage" if sharded else b"message"
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._out: list[bytes] = []
        self._flushing = False
        self._ops: deque[_Op] = deque()  # sent, unanswered, in order
        self._wanted: set[bytes] = set()  # channels whose last command sent was SUBSCRIBE
        self._in_flight: dict[bytes, _Op] = {}  # the latest unconfirmed SUBSCRIBE per channel
        self._closing = False
        self._watchdog = _Watchdog()
        self.lost: RespError | None = None
        self.writes = 0

    @property
    def channels(self) -> set[bytes]:
        return set(self._wanted)

    async def connect(self) -> None:
        await _open(self.endpoint, self, self.timeout)
        auth = _auth(self.endpoint)
        if auth is not None:
            future = asyncio.get_running_loop().create_future()
            self._send(_Op(b"auth", None, future), auth)
            reply = await future
            if isinstance(reply, RespError):
                raise reply

    def _oldest(self) -> Any:
        return self._ops[0] if self._ops else None

    def data_received(self, data: bytes) -> None:
        replies = self._parse(data)
        if replies is None:
            return
        message = self._message
        on_message = self._on_message
        for reply in replies:
            try:
                if type(reply) is list and reply[0] == message:
                    on_message(reply[1], reply[2])  # must not raise; guarded anyway
                else:
                    self._answer(reply)
            except Exception:  # one bad reply never ends the reader
                log.exception("redis pub/sub reply not handled: %.100r", reply)

    def _answer(self, reply: Any) -> None:
        kind = reply[0].upper() if type(reply) is list and reply else b""
        if kind in (self._sub, self._unsub):
            channel = reply[1]
            op = self._ops[0] if self._ops else None
            if op is None or op.kind != kind or op.channel != channel:
                if kind == self._unsub and channel in self._wanted:
                    # Unasked: Redis dropped us (a sharded channel's slot moved away).
                    self._wanted.discard(channel)
                    if self._on_dropped is not None:
                        self._on_dropped(self, channel)
                return
            self._ops.popleft()
            if self._in_flight.get(channel) is op:
                del self._in_flight[channel]
        elif not self._ops:
            return  # e.g. a pong nobody waits for
        else:
            op = self._ops.popleft()
            # A refused SUBSCRIBE (e.g. MOVED): the channel is not ours.
            if op.channel is not None and self._in_flight.get(op.channel) is op:
                del self._in_flight[op.channel]
                self._wanted.discard(op.channel)
        if op.future is not None and not op.future.done():
            op.future.set_result(reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        self._watchdog.cancel()
        error = self.lost or ConnectionLost(f"listener on {self.endpoint.address} lost: {exc!r}")
        self.lost = error
        ops, self._ops = self._ops, deque()
        for op in ops:
            if op.future is not None and not op.future.done():
                op.future.set_result(error)
        self._in_flight.clear()
        if not self._closing and self._on_lost is not None:
            self._on_lost(self, error)

    # ---- subscriptions -----------------------------------------------------------------------

    async def subscribe(self, channel: bytes) -> None:
        """Return once ``channel``'s messages arrive here. Raises ``RespError``."""
        op = self._in_flight.get(channel)
        if op is None:
            if channel in self._wanted:
                return  # confirmed, and nobody changed it since
            if self._transport is None:
                raise self.lost or ConnectionLost("listener not connected")
            op = _Op(self._sub, channel, asyncio.get_running_loop().create_future())
            self._wanted.add(channel)
            self._in_flight[channel] = op
            self._send(op, (self._sub, channel))
        assert op.future is not None
        reply = await asyncio.shield(op.future)  # shared by every caller waiting on it
        if isinstance(reply, RespError):
            raise reply

    def unsubscribe(self, channel: bytes) -> None:
        """Stop ``channel`` (no wait: a late message for it is harmless)."""
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        self._in_flight.pop(channel, None)  # its waiters still get that confirmation
        if self._transport is not None:
            self._send(_Op(self._unsub, channel, None), (self._unsub, channel))

    def _send(self, op: _Op, args: Iterable[Any]) -> None:
        if self._transport is None:
            if op.future is not None:
                op.future.set_result(self.lost or ConnectionLost("listener not connected"))
            return
        self._ops.append(op)
        self._out.append(hiredis.pack_command(tuple(args)))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
            self._out.clear()
            self.writes += 1

    def close(self) -> None:
        self._closing = True
        self._watchdog.cancel()
        if self._transport is not None:
            self._transport.close()  # connection_lost follows and fails the waiters


class Servers:
    """Where commands and subscriptions go: one ``Pipe`` and one ``Listener`` on one Redis
    server. ``rediscluster.ClusterServers`` routes the same calls over a cluster's primaries.

    ``key`` names what a command touches (for routing); a standalone server ignores it.
    """

    sharded = False
    publish_command = b"PUBLISH"

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout: float = 2.0,
        limit: int = 10_000,
        on_message: Callable[[bytes, bytes], None] | None = None,
        on_lost: Callable[[BaseException | None], None] | None = None,
        pressure: Callable[[bool], None] | None = None,
        on_dropped: Callable[[bytes], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.limit = limit
        self._on_message = on_message
        self._on_lost = on_lost
        self._pressure = pressure
        self._on_dropped = on_dropped
        self._pressured: set[Pipe] = set()
        self.pipes: dict[str, Pipe] = {}
        self.listeners: dict[str, Listener] = {}
        self.closed = False

    # ---- connections ------------------------------------------------------------------------

    async def connect(self, listen: bool = True) -> None:
        """Connect every pipe (and listener); raises ``RespError`` if any fails."""
        self._pipe = await self._new_pipe(self.endpoint)
        if listen:
            self._listener = await self._new_listener(self.endpoint)

    async def _new_pipe(self, endpoint: Endpoint) -> Pipe:
        pipe = Pipe(
            endpoint,
            timeout=self.timeout,
            limit=self.limit,
            on_lost=self._pipe_lost,
            pressure=self._pipe_pressure,
        )
        self.pipes[endpoint.address] = pipe
        await pipe.connect()
        return pipe

    async def _new_listener(self, endpoint: Endpoint) -> Listener:
        assert self._on_message is not None
        listener = Listener(
            endpoint,
            sharded=self.sharded,
            timeout=self.timeout,
            on_message=self._on_message,
            on_lost=self._listener_lost,
            on_dropped=self._listener_dropped,
        )
        self.listeners[endpoint.address] = listener
        await listener.connect()
        return listener

    def _pipe_lost(self, pipe: Pipe, exc: BaseException | None) -> None:
        if not self.closed and self._on_lost is not None:
            self._on_lost(exc)

    def _listener_lost(self, listener: Listener, exc: BaseException | None) -> None:
        if not self.closed and self._on_lost is not None:
            self._on_lost(exc)

    def _listener_dropped(self, listener: Listener, channel: bytes) -> None:
        if self._on_dropped is not None:
            self._on_dropped(channel)

    def _pipe_pressure(self, pipe: Pipe, paused: bool) -> None:
        before = bool(self._pressured)
        if paused:
            self._pressured.add(pipe)
        else:
            self._pressured.discard(pipe)
        if bool(self._pressured) != before and self._pressure is not None:
            self._pressure(bool(self._pressured))

    def close(self) -> None:
        self.closed = True
        for pipe in self.pipes.values():
            pipe.close()
        for listener in self.listeners.values():
            listener.close()

    @property
    def waiting(self) -> int:
        return sum(pipe.waiting for pipe in self.pipes.values())

    # ---- routing ----------------------------------------------------------------------------

    def send(self, key: bytes, args: tuple[Any, ...], callback: Callback) -> None:
        self._pipe.send(args, callback)

    def batch(self, key: bytes, make: Callable[[Servers, bytes], B], group: Any = None) -> B:
        """The open batch of ``group`` on the pipe ``key`` goes to (``Pipe.batch``), else a new
        one from ``make(self, key)``: one per server and group here, one per slot on a cluster
        (a script's keys must share a slot there)."""
        pipe = self._pipe
        batch = pipe.batch(group)
        if batch is None:
            return pipe.open_batch(group, make(self, key))
        return batch  # type: ignore[return-value]  # made by ``make``

    def close_batch(self, key: bytes, group: Any) -> None:
        """Send the open batch of ``group`` on the pipe ``key`` goes to, now."""
        self._pipe.close_batch(group)

    async def call(self, key: bytes, *args: Any) -> Any:
        return await self._pipe.call(*args)

    async def call_all(self, *args: Any) -> list[Any]:
        """The same command on every server (SCRIPT LOAD)."""
        return list(await asyncio.gather(*(p.call(*args) for p in self.pipes.values())))

    def listener_for(self, channel: bytes) -> Listener:
        return self._listener

    def hash_tag_for(self, listener: Listener) -> bytes:
        """A ``{tag}`` whose keys and shard channels land on ``listener``'s server."""
        return b"0"
