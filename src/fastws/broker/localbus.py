"""The local bus, a worker's side: ``LocalBusBroker`` asks the supervisor's ``bus.BusServer``.

Each worker holds one Unix stream connection to the bus (the wire format is in ``buswire``):
requests go out, replies and publications come back, on one ordered stream. So:

- ``subscribe`` is a plain request: the server records the subscription before it replies,
  and every later publication to the room follows on the same stream.
- ``flush()`` (the barrier of ``types.Broker``) is a ``ping`` round trip.
- Replies carry no id: the server answers in order, so each one belongs to the oldest
  request still pending (a FIFO of waiters: a Future for the coroutines, the ``done``
  callback itself for ``publish_seq_nowait``, so the chat hot path makes no Task, Future or
  timer per message).

Batching, both ways: everything requested in one loop turn leaves in one frame and one write
(flushed by ``call_soon``), and everything one read brought in is handled in that read's
callback -- publications go to ``deliver`` there, so the hub's Outbox corks them into one
write per member socket.

Timeouts without a timer per request: each write records (requests written so far, time); one
periodic check looks at the oldest batch still unanswered, and past ``timeout`` declares the
bus dead. Backpressure: past ``max_pending`` unanswered requests (or when the socket's write
buffer is full) the broker calls ``pressure(True)`` and the node stops reading its clients;
``pressure(False)`` once below half of it.

Outages: when the connection drops, or no reply came within ``timeout`` (the connection is
then closed, so no late reply is taken for a later request), every pending request fails
(``BrokerUnavailable``, ``done(0)``), health says ``down``, and the broker reconnects with
backoff (50 ms doubling to 2 s). Requests made meanwhile fail at once. On reconnect it first
sends ``resync`` (this node's members, by room: the bus adds them and removes any it had for
the node that are gone) and re-subscribes its rooms, ahead of anything else. Each failure
is logged with its cause, at most one warning per second (with a count).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from typing import Any, cast

import msgspec

from ..errors import BrokerUnavailable
from .buswire import (
    Deframer,
    Event,
    Framer,
    History,
    Join,
    Leave,
    Ping,
    Presence,
    Publication,
    Publish,
    PublishSeq,
    Reply,
    Resync,
    Sequenced,
    Subscribe,
    Unsubscribe,
)
from .types import Deliver, JoinResult, LeaveResult, MemberInfo, Pressure, SeqDone

log = logging.getLogger("fastws.localbus")

#: Unanswered requests before the node is asked to stop reading its clients.
MAX_PENDING = 8192
#: Bytes the socket may hold unsent before the same happens.
MAX_UNSENT = 4 * 1024 * 1024
_BACKOFF = (0.05, 2.0)  # first and longest wait between reconnection attempts, seconds


class _Throttled:
    """A warning logged at most once per ``interval`` seconds, with the count it stands for."""

    def __init__(self, event: str, interval: float = 1.0) -> None:
        self.event = event
        self.interval = interval
        self.count = 0
        self.last = -interval

    def __call__(self, message: str, *args: Any, count: int = 1) -> None:
        self.count += count
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        log.warning(message + " (%d since the last such warning)", *args, self.count,
                    extra={"event": self.event, "broker": "localbus"})
        self.last, self.count = now, 0


class _Link(asyncio.Protocol):
    """The worker's end of its bus connection; hands everything to its broker."""

    def __init__(self, broker: LocalBusBroker) -> None:
        self.broker = broker

    def data_received(self, data: bytes) -> None:
        if self.broker._link is self:
            self.broker._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.broker._link is self:
            self.broker._outage(f"connection lost ({exc or 'closed by the bus'})")

    def pause_writing(self) -> None:
        self.broker._write_paused = True
        self.broker._check_pressure()

    def resume_writing(self) -> None:
        self.broker._write_paused = False
        self.broker._check_pressure()


class LocalBusBroker:
    """A worker's broker: every call is one request to the supervisor's ``BusServer``."""

    name = "localbus"
    inline = False

    def __init__(
        self,
        path: str,
        timeout: float = 5.0,
        max_pending: int = MAX_PENDING,
        max_unsent: int = MAX_UNSENT,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.max_pending = max_pending
        self.max_unsent = max_unsent
        self.node_id = ""
        self._deliver: Deliver | None = None
        self._pressure: Pressure | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None
        self._transport: asyncio.Transport | None = None
        self._framer = Framer()
        self._deframer = Deframer(Event)
        self._queued: list[msgspec.Struct] = []  # this turn's requests, not yet written
        # One waiter per request queued or written, in order: the coroutine's Future, the
        # publish_seq_nowait callback, or None when the reply only needs checking.
        self._fifo: deque[Any] = deque()
        self._written = 0  # requests written since connecting
        self._answered = 0  # replies read since connecting
        self._batches: deque[tuple[int, float]] = deque()  # (_written after a write, its time)
        self._timer: asyncio.TimerHandle | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False
        self._down = False
        self._cause = "not started"
        self._pressed = False
        self._write_paused = False
        self._subscribed: set[str] = set()
        self._members: dict[tuple[str, str], MemberInfo] = {}  # (room, clientId) -> member
        self._failed = _Throttled("broker_unavailable")
        #: Publications received per room: tests watch it.
        self.received: Counter[str] = Counter()
        self.writes = 0  # frames written (one per loop turn with requests)
        self.frames = 0  # frames read
        self.reconnects = 0

    def attach(self, node_id: str, deliver: Deliver, pressure: Pressure | None = None) -> None:
        self.node_id = node_id
        self._deliver = deliver
        self._pressure = pressure

    async def start(self) -> None:
        if self._deliver is None:
            raise RuntimeError("attach() before start()")
        self._loop = asyncio.get_running_loop()
        self._closing = False
        try:
            await self._connect()
        except OSError as exc:
            self._outage(f"bus unreachable ({exc})")

    async def close(self) -> None:
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
            self._reconnecting = None
        self._flush()
        link, transport = self._link, self._transport
        self._link = self._transport = None
        if transport is not None:
            transport.close()  # what was written still leaves
        if link is not None:
            self._fail_all("broker closed")
        self._subscribed.clear()
        self._members.clear()

    def health(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": "down" if self._down else "ok",
            "endpoint": self.path,
            "pending": len(self._fifo),
            "reconnects": self.reconnects,
            **({"cause": self._cause} if self._down else {}),
        }

    # ---- Broker ---------------------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)  # before the reply: a reconnect meanwhile re-subscribes it
        await self._call(Subscribe(room))

    async def unsubscribe(self, room: str) -> None:
        if room in self._subscribed:
            self._subscribed.discard(room)
            if self._transport is not None:
                self._send(Unsubscribe(room), None)

    async def flush(self) -> None:
        """Return once every publication the bus made before this call was delivered here:
        the ping's reply follows them on the one stream."""
        await self._call(Ping())

    async def publish(self, room: str, payload: bytes, exclude: str = "", seq: int = 0) -> None:
        await self._call(Publish(room, payload, exclude, seq))

    async def publish_seq(self, room: str, head: bytes) -> int:
        return (await self._call(PublishSeq(room, head))).a

    def publish_seq_nowait(self, room: str, head: bytes, done: SeqDone | None) -> None:
        assert done is not None  # not inline: the answer always comes later
        if self._transport is None:
            self._refuse()
            assert self._loop is not None
            self._loop.call_soon(done, 0)
            return
        # _send, inline: the chat hot path
        queued = self._queued
        if not queued:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        queued.append(PublishSeq(room, head))
        fifo = self._fifo
        fifo.append(done)
        if len(fifo) >= self.max_pending and not self._pressed:
            self._press(True)

    async def join(
        self, room: str, member: MemberInfo, since: tuple[int, str] | None = None
    ) -> JoinResult:
        seq, epoch = since if since is not None else (-1, "")
        reply = await self._call(Join(room, member, seq, epoch))
        self._members[(room, member.clientId)] = member  # re-stated on reconnect
        recovered = None if reply.recovered < 0 else bool(reply.recovered)
        return JoinResult(reply.a, reply.b, reply.epoch, recovered, reply.messages, reply.version)

    async def history(self, room: str, limit: int) -> tuple[int, str, list[bytes]]:
        reply = await self._call(History(room, limit))
        return reply.b, reply.epoch, reply.messages

    async def leave(self, room: str, client_id: str) -> LeaveResult:
        # Forgotten at once: if this request is lost, the next resync removes it on the bus.
        self._members.pop((room, client_id), None)
        reply = await self._call(Leave(room, client_id))
        return LeaveResult(reply.a, reply.version)

    async def presence(self, room: str) -> list[MemberInfo]:
        return (await self._call(Presence(room))).members

    async def session_opened(self, member: MemberInfo, connected_at: float) -> None:
        return None  # nothing the bus needs: no round trip

    async def session_closed(self, client_id: str) -> None:
        return None

    # ---- sending --------------------------------------------------------------------------------

    async def _call(self, req: msgspec.Struct) -> Reply:
        """Send ``req``; its reply, or ``BrokerUnavailable`` (the cause is logged)."""
        if self._transport is None:
            self._refuse()
            raise BrokerUnavailable()
        assert self._loop is not None
        reply: asyncio.Future[Reply] = self._loop.create_future()
        self._send(req, reply)
        result = await reply
        if not result.ok:
            self._failed("local bus refused a %s request", type(req).__name__)
            raise BrokerUnavailable()
        return result

    def _send(self, req: msgspec.Struct, waiter: Any) -> None:
        """Queue ``req`` behind this turn's others; ``_flush`` writes them all at once."""
        if not self._queued:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._queued.append(req)
        fifo = self._fifo
        fifo.append(waiter)
        if len(fifo) >= self.max_pending and not self._pressed:
            self._press(True)

    def _flush(self) -> None:
        queued, transport = self._queued, self._transport
        if not queued or transport is None:
            return
        self._queued = []
        transport.write(self._framer.frame(queued))
        self.writes += 1
        self._written += len(queued)
        assert self._loop is not None
        self._batches.append((self._written, self._loop.time()))
        if self._timer is None:
            self._timer = self._loop.call_later(self._interval(), self._check_timeout)

    def _refuse(self) -> None:
        self._failed("local bus down (%s): request refused", self._cause)

    # ---- receiving ------------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        """Everything this read completed, handled here: publications delivered, waiters
        answered, in stream order."""
        try:
            frames = self._deframer.feed(data)
        except (ValueError, msgspec.DecodeError) as exc:
            self._outage(f"broken stream ({exc})")
            return
        deliver = self._deliver
        assert deliver is not None
        received = self.received
        fifo = self._fifo
        for events in frames:
            self.frames += 1
            for event in events:
                if type(event) is not Reply:  # a Publication, or a Sequenced (also a reply)
                    room = event.room
                    received[room] += 1
                    try:
                        deliver(room, event.exclude, event.payload, event.seq)
                    except Exception:
                        log.exception("delivery failed",
                                      extra={"event": "deliver_error", "room": room})
                    if type(event) is Publication:
                        continue
                if not fifo:
                    self._outage("a reply to no request")
                    return
                self._answered += 1
                waiter = fifo.popleft()
                if type(event) is Sequenced and not isinstance(waiter, asyncio.Future):
                    try:  # the chat hot path: done(seq), in place
                        waiter(event.seq)
                    except Exception:
                        log.exception("publish callback failed", extra={"event": "bus_error"})
                    continue
                self._answer(waiter, event)
        if self._pressed:
            self._check_pressure()

    def _answer(self, waiter: Any, event: Reply | Sequenced) -> None:
        """Answer the oldest waiter: a Future gets the Reply, a callback the seq (0: refused)."""
        if isinstance(event, Sequenced):  # the chat hot path: no Reply made for it
            ok, seq = True, event.seq
        else:
            ok, seq = event.ok, event.a
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                waiter.set_result(event if isinstance(event, Reply) else Reply(a=seq))
            return
        if not ok:
            self._failed("local bus refused a request")
        if waiter is not None:
            try:
                waiter(seq if ok else 0)
            except Exception:
                log.exception("publish callback failed", extra={"event": "bus_error"})

    # ---- health: timeouts, pressure, outages ---------------------------------------------------

    def _interval(self) -> float:
        return min(max(self.timeout / 5, 0.01), 1.0)

    def _check_timeout(self) -> None:
        """The one timer: is the oldest unanswered write older than ``timeout``?"""
        self._timer = None
        batches = self._batches
        while batches and batches[0][0] <= self._answered:
            batches.popleft()
        if not batches or self._transport is None:
            return
        assert self._loop is not None
        if self._loop.time() - batches[0][1] > self.timeout:
            self._outage(f"no reply within {self.timeout:g} s")
            return
        self._timer = self._loop.call_later(self._interval(), self._check_timeout)

    def _check_pressure(self) -> None:
        over = self._write_paused or len(self._fifo) >= self.max_pending
        if over and not self._pressed:
            self._press(True)
        elif self._pressed and not self._write_paused and len(self._fifo) <= self.max_pending // 2:
            self._press(False)

    def _press(self, paused: bool) -> None:
        self._pressed = paused
        if self._pressure is not None:
            try:
                self._pressure(paused)
            except Exception:
                log.exception("pressure callback failed", extra={"event": "bus_error"})

    def _outage(self, cause: str) -> None:
        """The bus is gone or stuck: drop the connection, fail what waits, reconnect."""
        link, transport = self._link, self._transport
        self._link = self._transport = None
        if transport is not None:
            transport.abort()
        self._cause = cause
        if not self._down and not self._closing:
            log.warning("local bus down: %s", cause,
                        extra={"event": "broker_down", "broker": self.name})
        self._down = True
        if link is not None:
            self._fail_all(cause)
        if not self._closing and self._reconnecting is None:
            assert self._loop is not None
            self._reconnecting = self._loop.create_task(self._reconnect())

    def _fail_all(self, cause: str) -> None:
        self._queued = []
        self._batches.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write_paused = False
        waiters, self._fifo = self._fifo, deque()
        self._deframer = Deframer(Event)
        if waiters:
            self._failed("local bus down (%s): pending requests failed", cause,
                         count=len(waiters))
        for waiter in waiters:
            if waiter is None:
                continue
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable())
                continue
            try:
                waiter(0)
            except Exception:
                log.exception("publish callback failed", extra={"event": "bus_error"})
        if self._pressed:
            self._press(False)

    async def _reconnect(self) -> None:
        delay, longest = _BACKOFF
        try:
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                    self.reconnects += 1
                    return
                except OSError as exc:
                    self._cause = f"bus unreachable ({exc})"
                    delay = min(delay * 2, longest)
        finally:
            self._reconnecting = None

    async def _connect(self) -> None:
        assert self._loop is not None
        transport, link = await self._loop.create_unix_connection(
            lambda: _Link(self), self.path)
        transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        if self._closing:
            transport.close()
            return
        transport.set_write_buffer_limits(high=self.max_unsent)
        self._link, self._transport = link, transport
        self._written = self._answered = 0
        # This node's facts first: nothing else can be ahead of them on the new stream.
        members = [(room, member) for (room, _), member in self._members.items()]
        self._send(Resync(self.node_id, members), None)
        for room in self._subscribed:
            self._send(Subscribe(room), None)
        if self._down:
            log.info("local bus is back", extra={"event": "broker_up", "broker": self.name})
        self._down = False
