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

Leases (see ``buswire``): right after subscribing to a room, and whenever the bus offers it,
the worker asks for the room's seq. While it holds the lease it sequences the room's chats
itself: each becomes a one-way ``record`` in this turn's frame, and is delivered here (and
answered) only once that frame is in the socket, so a worker that dies never leaves a chat
delivered that the bus does not have. Chats made while the answer to ``acquire`` is pending
wait for it. A ``revoke`` is answered with ``release`` behind the last record.

Timeouts without a timer per request: each write records (requests written so far, time); one
periodic check looks at the oldest batch still unanswered, and past ``timeout`` declares the
bus dead. Backpressure: past ``max_pending`` unanswered requests (or ``max_unsent`` bytes the socket
could not take yet) the broker calls ``pressure(True)`` and the node stops reading its clients;
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
from typing import Any

import msgspec

from ..errors import BrokerUnavailable
from .buswire import (
    Acquire,
    Deadline,
    Deframer,
    Event,
    Framer,
    History,
    Join,
    Leave,
    Linger,
    Offer,
    Ping,
    Presence,
    Publication,
    Publish,
    PublishSeq,
    Record,
    Release,
    Reply,
    Resync,
    Revoke,
    Sequenced,
    Subscribe,
    Unsubscribe,
)
from .types import (
    CHAT_TAIL,
    Deliver,
    JoinResult,
    LeasedChat,
    LeaveResult,
    MemberInfo,
    Pressure,
    SeqDone,
    deliver_sequenced,
)

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
        log.warning(
            message + " (%d since the last such warning)",
            *args,
            self.count,
            extra={"event": self.event, "broker": "localbus"},
        )
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

    # The write buffer's limits are 0: these say "bytes wait in user space" and "all sent".
    def pause_writing(self) -> None:
        if self.broker._link is self:
            self.broker._draining = True
            self.broker._check_pressure()

    def resume_writing(self) -> None:
        if self.broker._link is self:
            self.broker._drained()


class _RoomWaiter:
    """A waiter that takes the whole Reply (0 when the bus failed), called in place as the
    reply is read, in stream order: unlike chat callbacks, which take just the seq."""

    __slots__ = ("broker", "room")

    def __init__(self, broker: LocalBusBroker, room: str) -> None:
        self.broker = broker
        self.room = room

    def __call__(self, reply: Reply | int) -> None:
        raise NotImplementedError


class _Missed(_RoomWaiter):
    """The waiter of a re-subscription: delivers the chats the bus kept that this worker
    missed while its connection was down, in place, ahead of everything after them."""

    __slots__ = ()

    def __call__(self, reply: Reply | int) -> None:
        broker = self.broker
        if (
            not isinstance(reply, Reply)
            or not reply.messages
            or self.room not in broker._subscribed
        ):
            return
        deliver, room = broker._deliver, self.room
        assert deliver is not None
        last = broker._last_seq.get(room, 0)
        for seq, payload in enumerate(reply.messages, reply.a):
            if seq > last:
                deliver(room, "", payload, seq)
                broker.recovered += 1
        broker._last_seq[room] = max(last, reply.a + len(reply.messages) - 1)


class _Grant(_RoomWaiter):
    """The waiter of an ``acquire``. Called in place when its reply is read, so a ``revoke``
    read right behind the reply finds the lease installed."""

    __slots__ = ("held", "stale")

    def __init__(self, broker: LocalBusBroker, room: str) -> None:
        super().__init__(broker, room)
        self.held: list[tuple[bytes, SeqDone]] = []  # chats made while waiting
        self.stale = False  # the room was unsubscribed meanwhile: the answer is moot

    def __call__(self, reply: Reply | int) -> None:
        self.broker._granted(self, reply)


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
        self._draining = False  # the socket took less than was written; see _Link
        self._subscribed: set[str] = set()
        self._leases: dict[str, list[Any]] = {}  # room -> [last seq, epoch bytes]
        self._acquiring: dict[str, _Grant] = {}
        # Leased chats whose record is not in the socket yet: (room, payload, seq, done).
        self._leased_out: list[LeasedChat] = []
        self._oneway = 0  # of _queued, messages the bus does not answer
        self._last_seq: dict[str, int] = {}  # room -> the last chat seq delivered here
        self._members: dict[tuple[str, str], MemberInfo] = {}  # (room, clientId) -> member
        self._failed = _Throttled("broker_unavailable")
        #: Publications received per subscribed room: tests watch it.
        self.received: Counter[str] = Counter()
        self.writes = 0  # frames written (one per loop turn with requests)
        self.frames = 0  # frames read
        self.reconnects = 0
        self.leased = 0  # chats sequenced here under a lease
        self.recovered = 0  # chats missed while disconnected, replayed on re-subscribing

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
        self._last_seq.clear()

    def health(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": "down" if self._down else "ok",
            "endpoint": self.path,
            "pending": len(self._fifo),
            "leases": len(self._leases),
            "reconnects": self.reconnects,
            **({"cause": self._cause} if self._down else {}),
        }

    # ---- Broker ---------------------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)  # before the reply: a reconnect meanwhile re-subscribes it
        reply = self._ask(Subscribe(room))
        self._acquire(room)
        self._check(await reply, "Subscribe")

    async def unsubscribe(self, room: str) -> None:
        if room not in self._subscribed:
            return
        self._subscribed.discard(room)
        self._last_seq.pop(room, None)
        self.received.pop(room, None)  # no per-room state outlives the room here
        self._leases.pop(room, None)  # the unsub, behind its records, gives it back
        grant = self._acquiring.pop(room, None)
        if self._transport is not None:
            self._send(Unsubscribe(room), None)
        if grant is not None:
            grant.stale = True
            for head, done in grant.held:
                self.publish_seq_nowait(room, head, done)

    async def flush(self) -> None:
        """Return once every publication the bus made before this call was delivered here:
        the ping's reply follows them on the one stream."""
        await self._call(Ping())

    async def publish(self, room: str, payload: bytes, exclude: str = "", seq: int = 0) -> None:
        await self._call(Publish(room, payload, exclude, seq))

    async def publish_seq(self, room: str, head: bytes) -> int:
        assert self._loop is not None
        answer: asyncio.Future[int] = self._loop.create_future()

        def done(seq: int) -> None:
            if not answer.done():
                answer.set_result(seq)

        self.publish_seq_nowait(room, head, done)
        seq = await answer
        if not seq:
            raise BrokerUnavailable()
        return seq

    def publish_seq_nowait(self, room: str, head: bytes, done: SeqDone | None) -> None:
        assert done is not None  # not inline: the answer always comes later
        if self._transport is None:
            self._refuse()
            assert self._loop is not None
            self._loop.call_soon(done, 0)
            return
        queued = self._queued
        lease = self._leases.get(room)
        if lease is not None:  # sequenced here: a record now, delivered once it is sent
            seq = lease[0] = lease[0] + 1
            payload = CHAT_TAIL % (head, seq, lease[1])  # types.chat_payload without a call
            if not queued:
                assert self._loop is not None
                self._loop.call_soon(self._flush)
            queued.append(Record(room, seq, payload))
            self._oneway += 1
            self._leased_out.append((room, payload, seq, done))
            self.leased += 1
            return
        grant = self._acquiring.get(room)
        if grant is not None:
            grant.held.append((head, done))
            return
        # _send, inline: the chat hot path
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
        if room in self._subscribed:  # a baseline for what a dropped connection missed
            self._last_seq[room] = max(self._last_seq.get(room, 0), reply.b)
        recovered = None if reply.recovered < 0 else bool(reply.recovered)
        return JoinResult(
            reply.a, reply.b, reply.epoch, recovered, reply.messages, reply.version, bool(reply.c)
        )

    async def history(self, room: str, limit: int) -> tuple[int, str, list[bytes]]:
        reply = await self._call(History(room, limit))
        return reply.b, reply.epoch, reply.messages

    async def leave(self, room: str, client_id: str, user_id: str = "") -> LeaveResult:
        # Forgotten at once: if this request is lost, the next resync removes it on the bus.
        self._members.pop((room, client_id), None)
        reply = await self._call(Leave(room, client_id))
        return LeaveResult(reply.a, reply.version, not reply.c)

    async def linger(self, room: str, client_id: str, user_id: str) -> None:
        await self._call(Linger(room, client_id, user_id))

    async def presence(self, room: str) -> list[MemberInfo]:
        return (await self._call(Presence(room))).members

    async def session_opened(self, member: MemberInfo, connected_at: float) -> None:
        return None  # nothing the bus needs: no round trip

    async def session_closed(self, client_id: str) -> None:
        return None

    # ---- sending --------------------------------------------------------------------------------

    async def _call(self, req: msgspec.Struct) -> Reply:
        """Send ``req``; its reply, or ``BrokerUnavailable`` (the cause is logged)."""
        return self._check(await self._ask(req), type(req).__name__)

    def _ask(self, req: msgspec.Struct) -> asyncio.Future[Reply]:
        """Send ``req`` now; the Future of its reply."""
        if self._transport is None:
            self._refuse()
            raise BrokerUnavailable()
        assert self._loop is not None
        reply: asyncio.Future[Reply] = self._loop.create_future()
        self._send(req, reply)
        return reply

    def _check(self, reply: Reply, kind: str) -> Reply:
        if not reply.ok:
            self._failed("local bus refused a %s request", kind)
            raise BrokerUnavailable()
        return reply

    def _post(self, message: msgspec.Struct) -> None:
        """Queue a message the bus does not answer (no waiter)."""
        if self._transport is None:
            return
        if not self._queued:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._queued.append(message)
        self._oneway += 1

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
        oneway, self._oneway = self._oneway, 0
        if len(queued) > oneway:  # answers awaited: past 0.8 x timeout, refuse them instead
            queued.insert(0, Deadline(time.monotonic() + self.timeout * 0.8))
            oneway += 1
        transport.write(self._framer.frame(queued))
        self.writes += 1
        if len(queued) > oneway:
            self._written += len(queued) - oneway
            assert self._loop is not None
            self._batches.append((self._written, self._loop.time()))
            if self._timer is None:
                self._timer = self._loop.call_later(self._interval(), self._check_timeout)
        if self._draining:  # set by write() itself if the socket did not take it all
            self._check_pressure()
        elif self._leased_out and not transport.is_closing():  # closing: the write failed
            self._deliver_leased()

    def _drained(self) -> None:
        """Everything written is in the socket: the leased chats it carried may go out."""
        self._draining = False
        if self._leased_out:
            self._deliver_leased()
        self._check_pressure()

    def _deliver_leased(self) -> None:
        out, self._leased_out = self._leased_out, []
        deliver = self._deliver
        assert deliver is not None
        last_seq = self._last_seq
        for room, _payload, seq, _done in out:
            last_seq[room] = seq
        deliver_sequenced(deliver, out, log)

    # ---- leases ---------------------------------------------------------------------------------

    def _acquire(self, room: str) -> None:
        if room in self._leases or room in self._acquiring or self._transport is None:
            return
        grant = self._acquiring[room] = _Grant(self, room)
        self._send(Acquire(room), grant)

    def _granted(self, grant: _Grant, reply: Reply | int) -> None:
        room = grant.room
        if self._acquiring.get(room) is grant:
            del self._acquiring[room]
        if grant.stale:
            return
        if isinstance(reply, Reply) and reply.ok and reply.a == 1 and self._transport is not None:
            self._leases[room] = [reply.b, reply.epoch.encode()]
        for head, done in grant.held:  # sequenced here now, or asked of the bus as before
            self.publish_seq_nowait(room, head, done)

    def _lease_event(self, event: Revoke | Offer) -> None:
        room = event.room
        if type(event) is Revoke:
            if self._leases.pop(room, None) is not None:
                self._post(Release(room))
        elif room in self._subscribed:
            self._acquire(room)

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
        last_seq = self._last_seq
        fifo = self._fifo
        for events in frames:
            self.frames += 1
            for event in events:
                kind = type(event)
                if kind is not Reply:  # a Publication, or a Sequenced (also a reply)
                    if kind is Revoke or kind is Offer:
                        self._lease_event(event)
                        continue
                    room = event.room
                    received[room] += 1
                    if event.seq > 0:
                        last_seq[room] = event.seq
                    try:
                        deliver(room, event.exclude, event.payload, event.seq)
                    except Exception:
                        log.exception(
                            "delivery failed", extra={"event": "deliver_error", "room": room}
                        )
                    if kind is Publication:
                        continue
                if not fifo:
                    self._outage("a reply to no request")
                    return
                self._answered += 1
                waiter = fifo.popleft()
                if kind is Sequenced and not isinstance(waiter, asyncio.Future):
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
        if isinstance(waiter, _RoomWaiter):
            waiter(event if isinstance(event, Reply) else 0)
            return
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
        transport = self._transport
        unsent = transport.get_write_buffer_size() if transport is not None else 0
        waiting = len(self._fifo) + len(self._leased_out)
        if (unsent > self.max_unsent or waiting >= self.max_pending) and not self._pressed:
            self._press(True)
        elif self._pressed and unsent <= self.max_unsent // 2 and waiting <= self.max_pending // 2:
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
            log.warning(
                "local bus down: %s", cause, extra={"event": "broker_down", "broker": self.name}
            )
        self._down = True
        if link is not None:
            self._fail_all(cause)
        if not self._closing and self._reconnecting is None:
            assert self._loop is not None
            self._reconnecting = self._loop.create_task(self._reconnect())

    def _fail_all(self, cause: str) -> None:
        self._queued = []
        self._oneway = 0
        self._batches.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._draining = False
        self._leases.clear()  # the bus took them back with the connection
        # Leased chats not known to be in the socket: the bus may not have them.
        unsent, self._leased_out = self._leased_out, []
        for _room, _payload, _seq, done in unsent:
            try:
                done(0)
            except Exception:
                log.exception("publish callback failed", extra={"event": "bus_error"})
        waiters, self._fifo = self._fifo, deque()
        self._deframer = Deframer(Event)
        if waiters:
            self._failed("local bus down (%s): pending requests failed", cause, count=len(waiters))
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
                except Exception as exc:  # never stop trying: the worker is useless without it
                    log.exception("local bus reconnect failed", extra={"event": "bus_error"})
                    self._cause = f"reconnect failed ({type(exc).__name__}: {exc})"
                    delay = min(delay * 2, longest)
        finally:
            self._reconnecting = None

    async def _connect(self) -> None:
        assert self._loop is not None
        transport, link = await self._loop.create_unix_connection(lambda: _Link(self), self.path)
        if self._closing:
            transport.close()
            return
        transport.set_write_buffer_limits(high=0)  # _Link hears of every byte left unsent
        self._link, self._transport = link, transport
        self._written = self._answered = 0
        # This node's facts first: nothing else can be ahead of them on the new stream.
        members = [(room, member) for (room, _), member in self._members.items()]
        self._send(Resync(self.node_id, members), None)
        for room in self._subscribed:
            # With the last seq delivered: the bus answers with what was missed meanwhile.
            self._send(Subscribe(room, self._last_seq.get(room, -1)), _Missed(self, room))
            self._acquire(room)
        if self._down:
            log.info("local bus is back", extra={"event": "broker_up", "broker": self.name})
        self._down = False
