"""The local bus: the workers of one host share seq and presence through their supervisor.

``BusServer`` runs in the supervisor's event loop and is the only holder of the host's per-room
``seq`` counters and presence (the same semantics as ``MemoryBroker``). Each worker's
``LocalBusBroker`` talks to it over two ZeroMQ ipc sockets in the run directory:

``ipc://{dir}/bus-req``  ROUTER (server) <- DEALER (one per worker): requests and replies.
    A request is one frame, a msgpack array ``[op, id, *args]`` (the ``_Request`` union
    below); the reply is one frame ``[id, ok, a, b, members]`` (``_Reply``, trailing defaults
    omitted). ``id`` is the worker's request counter; replies are matched to it.

    ======== ============================== =======================================
    op       args                           reply
    ======== ============================== =======================================
    join     room, MemberInfo, since_seq,   a = connections in room, b = last seq,
             since_epoch                    epoch, recovered (-1/0/1), messages (replay)
    leave    room, client_id                a = connections left
    seq      room, head                     a = the seq allocated; publishes
                                            ``types.chat_payload(head, seq, epoch)``
    history  room, limit                    b = last seq, epoch, messages
    pub      room, payload, exclude         (ok); publishes ``payload``
    presence room                           members = [MemberInfo, ...]
    sync     room, token                    (ok); publishes the sync marker
    ======== ============================== =======================================

    ``ok`` false means the server failed on that request; the worker raises
    ``BrokerUnavailable``, as it does when no reply comes within its ``timeout``.

``ipc://{dir}/bus-pub``  PUB (server) -> SUB (one per worker): publications.
    A publication is ``[topic, exclude_client_id, payload, seq]`` (seq "0" for anything but a
    chat_message); a sync marker is the two frames
    ``[topic, token]``. ``topic`` is ``room.encode() + b"\\x00"``: SUB filters by byte prefix
    and room names never contain NUL, so "room1" never matches "room10". A worker subscribes
    only to rooms it has local members in.

Order: the server handles requests one at a time in arrival order, and one worker's requests
leave on one DEALER, so they are handled in the order sent; every publication is made while
its request is handled, and reaches every subscribed worker in that one global order.
(A worker more than ``HWM`` publications behind would lose some: ZeroMQ drops, never blocks.)

Subscribing is asynchronous in ZeroMQ, so ``subscribe`` sets the filter, then asks the server
to publish a sync marker with a fresh token on the room's topic (again, with back-off, until
one arrives): once the marker arrives, every later publication to the room will too. Each
worker also holds a private topic (``"\\x01" + random hex``, never a room name);
``LocalBusBroker.flush()`` syncs on it, a barrier behind every publication made before it.

The session hooks (``session_opened``/``session_closed``) carry nothing the bus needs, so the
worker answers them itself without a round trip.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import msgspec
import zmq
import zmq.asyncio

from .. import protocol as p
from ..errors import BrokerUnavailable
from .ledger import Ledger
from .types import Deliver, HistoryPolicy, JoinResult, MemberInfo, Pressure, SeqDone

log = logging.getLogger("fastws.localbus")

#: Messages ZeroMQ may queue per peer before it blocks (requests) or drops (publications).
#: Far above any healthy backlog: a worker this far behind is lost either way.
HWM = 100_000
#: Longest ``sun_path`` of an ipc endpoint (108 bytes with its NUL on Linux).
MAX_IPC_PATH = 107
#: A socket's reader yields to the event loop after this many back-to-back messages.
_BATCH = 256


# ---- wire format ------------------------------------------------------------------------------


class _Join(msgspec.Struct, array_like=True, tag="join"):
    id: int
    room: str
    member: MemberInfo
    since_seq: int = -1  # -1: no recovery asked
    since_epoch: str = ""


class _Leave(msgspec.Struct, array_like=True, tag="leave"):
    id: int
    room: str
    client_id: str


class _PublishSeq(msgspec.Struct, array_like=True, tag="seq"):
    id: int
    room: str
    head: bytes


class _History(msgspec.Struct, array_like=True, tag="history"):
    id: int
    room: str
    limit: int


class _Publish(msgspec.Struct, array_like=True, tag="pub"):
    id: int
    room: str
    payload: bytes
    exclude: str = ""


class _Presence(msgspec.Struct, array_like=True, tag="presence"):
    id: int
    room: str


class _Sync(msgspec.Struct, array_like=True, tag="sync"):
    id: int
    room: str
    token: bytes


_Request = _Join | _Leave | _PublishSeq | _Publish | _Presence | _History | _Sync


class _Reply(msgspec.Struct, array_like=True, omit_defaults=True):
    id: int
    ok: bool = True
    a: int = 0
    b: int = 0
    members: list[MemberInfo] = []
    epoch: str = ""
    recovered: int = -1  # -1 none, 0 false, 1 true
    messages: list[bytes] = []


def topic(room: str) -> bytes:
    """The SUB filter and first publication frame for ``room``."""
    return room.encode() + b"\x00"


def _ipc(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    if len(path.encode()) > MAX_IPC_PATH:
        raise ValueError(f"ipc path too long ({len(path.encode())} > {MAX_IPC_PATH}): {path}")
    return f"ipc://{path}"


async def _pump(sock: zmq.asyncio.Socket, handle: Callable[[list[bytes]], None]) -> None:
    """Call ``handle`` with each message of ``sock``, in order, until cancelled.

    Waits through zmq.asyncio, then drains what is already queued with plain non-blocking
    receives (the asyncio wrapper costs a Future per call), yielding to the loop between
    batches so a busy socket cannot starve it.
    """
    raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
    while True:
        handle(await sock.recv_multipart())
        for _ in range(_BATCH):
            try:
                frames = raw.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            handle(frames)
        else:
            await asyncio.sleep(0)


async def _reap(task: asyncio.Task[None]) -> None:
    """Wait for a cancelled reader; a reader that had died of a bug is logged, not raised."""
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("local bus reader failed", extra={"event": "bus_error"})


# ---- the supervisor's side ----------------------------------------------------------------------


class BusServer:
    """The host's seq counters and presence, served to the workers over ZeroMQ."""

    def __init__(self, directory: str, policy: HistoryPolicy | None = None) -> None:
        self.directory = directory
        self.req_endpoint = _ipc(directory, "bus-req")
        self.pub_endpoint = _ipc(directory, "bus-pub")
        self.ledger = Ledger(policy)
        self._nodes: set[str] = set()
        self._forgotten: set[str] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._decoder = msgspec.msgpack.Decoder(_Request)
        self._encoder = msgspec.msgpack.Encoder()
        self.requests = 0

    async def start(self) -> None:
        ctx = self._ctx = zmq.asyncio.Context()
        # Publications are sent in place while a request is handled: a plain socket, as a PUB
        # send never blocks.
        pub = self._pub = zmq.Socket(ctx, zmq.PUB)
        pub.linger = 0
        pub.sndhwm = HWM
        pub.bind(self.pub_endpoint)
        router = self._router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.sndhwm = router.rcvhwm = HWM
        router.bind(self.req_endpoint)
        self._task = asyncio.get_running_loop().create_task(self._serve())
        log.info(
            "local bus listening", extra={"event": "bus_listening", "endpoint": self.req_endpoint}
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await _reap(self._task)
            self._task = None
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close(linger=0)
        self._router = self._pub = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def stats(self) -> dict[str, Any]:
        """Rooms with presence (connections each), seq counters and known nodes."""
        rooms = self.ledger.rooms
        return {
            "rooms": {name: len(r.members) for name, r in rooms.items() if r.members},
            "seq": {name: r.seq for name, r in rooms.items() if r.seq},
            "nodes": sorted(self._nodes),
            "requests": self.requests,
        }

    def forget_node(self, node_id: str) -> None:
        """Drop a dead worker's presence; tell each room, once per connection it lost.

        Node ids are unique per worker process, so the id is also refused from now on: a join
        the dead worker sent just before dying, still queued here, leaves no ghost behind.
        """
        self._nodes.discard(node_id)
        self._forgotten.add(node_id)
        gone = self.ledger.forget_node(node_id)
        for room, member, left in gone:
            if left:
                notice = p.UserLeft(room, member.username, p.now_ms(), member.userId, left)
                self._publish(room, p.encode(notice))
        if gone:
            log.info(
                "forgot node's members",
                extra={"event": "bus_forget", "node": node_id, "connections": len(gone)},
            )

    # ---- serving ------------------------------------------------------------------------------

    def _publish(self, room: str, payload: bytes, exclude: str = "", seq: int = 0) -> None:
        if self._pub is not None:
            self._pub.send_multipart((topic(room), exclude.encode(), payload, b"%d" % seq))

    async def _serve(self) -> None:
        assert self._router is not None
        # Replies go out in place: a ROUTER send never blocks (it drops for a gone peer).
        router: zmq.Socket[bytes] = zmq.Socket.shadow(self._router.underlying)
        encode = self._encoder.encode

        def serve(frames: list[bytes]) -> None:
            self.requests += 1
            if len(frames) != 2:
                log.warning("bad bus request", extra={"event": "bus_bad_request"})
                return
            ident, body = frames
            try:
                req = self._decoder.decode(body)
            except msgspec.DecodeError:
                log.warning("undecodable bus request", extra={"event": "bus_bad_request"})
                return
            try:
                reply = self._handle(req)
            except Exception:
                log.exception("bus request failed", extra={"event": "bus_error"})
                reply = _Reply(req.id, ok=False)
            router.send_multipart((ident, encode(reply)))

        await _pump(self._router, serve)

    def _handle(self, req: _Request) -> _Reply:
        ledger = self.ledger
        if isinstance(req, _PublishSeq):
            seq, payload = ledger.publish_seq(req.room, req.head)
            self._publish(req.room, payload, "", seq)
            return _Reply(req.id, a=seq)
        if isinstance(req, _Publish):
            self._publish(req.room, req.payload, req.exclude)
            return _Reply(req.id)
        if isinstance(req, _Join):
            if req.member.node in self._forgotten:  # queued before its worker died
                return _Reply(req.id, ok=False)
            if req.member.node:
                self._nodes.add(req.member.node)
            since = (req.since_seq, req.since_epoch) if req.since_seq >= 0 else None
            result = ledger.join(req.room, req.member, since)
            recovered = -1 if result.recovered is None else int(result.recovered)
            return _Reply(req.id, a=result.members, b=result.seq, epoch=result.epoch,
                          recovered=recovered, messages=result.replay)
        if isinstance(req, _Leave):
            return _Reply(req.id, a=ledger.leave(req.room, req.client_id))
        if isinstance(req, _Presence):
            return _Reply(req.id, members=ledger.presence(req.room))
        if isinstance(req, _History):
            seq, epoch, messages = ledger.history(req.room, req.limit)
            return _Reply(req.id, b=seq, epoch=epoch, messages=messages)
        if self._pub is not None:  # _Sync: the marker, on the room's topic only
            self._pub.send_multipart((topic(req.room), req.token))
        return _Reply(req.id)


# ---- the worker's side --------------------------------------------------------------------------


class LocalBusBroker:
    """A worker's broker: every call is one request to the supervisor's ``BusServer``."""

    name = "localbus"
    inline = False

    def __init__(self, req_endpoint: str, pub_endpoint: str, timeout: float = 5.0) -> None:
        self.req_endpoint = req_endpoint
        self.pub_endpoint = pub_endpoint
        self.timeout = timeout
        self.node_id = ""
        self._deliver: Deliver | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._raw_dealer: zmq.Socket[bytes] | None = None  # the DEALER, without asyncio
        self._queued_sends = 0  # sends waiting in zmq.asyncio for a connection
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[_Reply]] = {}
        self._syncs: dict[bytes, asyncio.Future[None]] = {}
        self._token_prefix = secrets.token_hex(4).encode() + b":"
        self._private = "\x01" + secrets.token_hex(8)
        self._subscribed: set[str] = set()
        self._down = False
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(_Reply)
        #: Publications received per room (sync markers excluded): tests watch it.
        self.received: Counter[str] = Counter()

    def attach(self, node_id: str, deliver: Deliver, pressure: Pressure | None = None) -> None:
        self.node_id = node_id
        self._deliver = deliver

    async def start(self) -> None:
        if self._deliver is None:
            raise RuntimeError("attach() before start()")
        loop = asyncio.get_running_loop()
        ctx = self._ctx = zmq.asyncio.Context()
        dealer = self._dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.sndhwm = dealer.rcvhwm = HWM
        # Queue requests only on a live connection: a request that cannot reach the server
        # waits (and times out) here, instead of being executed long after it was given up.
        dealer.immediate = True
        dealer.connect(self.req_endpoint)
        self._raw_dealer = zmq.Socket.shadow(dealer.underlying)
        sub = self._sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.rcvhwm = HWM
        sub.setsockopt(zmq.SUBSCRIBE, topic(self._private))
        sub.connect(self.pub_endpoint)
        self._tasks = [
            loop.create_task(_pump(dealer, self._on_reply)),
            loop.create_task(_pump(sub, self._on_publication)),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            await _reap(task)
        self._tasks = []
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(BrokerUnavailable())
        self._pending.clear()
        for sock in (self._dealer, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._dealer = self._sub = self._raw_dealer = None
        self._subscribed.clear()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def health(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": "down" if self._down else "ok",
            "endpoint": self.req_endpoint,
            "pending": len(self._pending),
        }

    # ---- Broker ---------------------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        if self._sub is None:
            raise BrokerUnavailable()
        if room not in self._subscribed:
            self._subscribed.add(room)
            self._sub.setsockopt(zmq.SUBSCRIBE, topic(room))
            self._sub.get(zmq.EVENTS)  # re-arm the reader (see _call)
        await self._sync(room)

    async def flush(self) -> None:
        """Return once every publication the bus made before this call was delivered here.

        Not part of ``Broker``: a barrier for tests and shutdown. It syncs on this worker's
        private topic, which no room can share (room names never hold control characters).
        """
        if self._sub is None:
            raise BrokerUnavailable()
        await self._sync(self._private)

    async def _sync(self, room: str) -> None:
        """Have the bus publish a fresh marker on ``room``'s topic until one arrives here."""
        loop = asyncio.get_running_loop()
        token = self._token_prefix + b"%d" % next(self._ids)
        marker: asyncio.Future[None] = loop.create_future()
        self._syncs[token] = marker
        deadline = loop.time() + self.timeout
        wait = 0.002
        try:
            while True:
                await self._call(_Sync(next(self._ids), room, token), deadline - loop.time())
                remaining = deadline - loop.time()
                if remaining > 0:
                    await asyncio.wait((marker,), timeout=min(wait, remaining))
                if marker.done():
                    return
                if loop.time() >= deadline:
                    log.warning(
                        "subscription not confirmed",
                        extra={"event": "bus_sync_timeout", "room": room},
                    )
                    raise BrokerUnavailable()
                wait = min(wait * 2, 0.1)
        finally:
            del self._syncs[token]

    async def unsubscribe(self, room: str) -> None:
        if room in self._subscribed:
            self._subscribed.discard(room)
            if self._sub is not None:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, topic(room))
                self._sub.get(zmq.EVENTS)

    async def publish(self, room: str, payload: bytes, exclude: str = "") -> None:
        await self._call(_Publish(next(self._ids), room, payload, exclude))

    async def publish_seq(self, room: str, head: bytes) -> int:
        return (await self._call(_PublishSeq(next(self._ids), room, head))).a

    def publish_seq_nowait(self, room: str, head: bytes, done: SeqDone | None) -> None:
        assert done is not None  # not inline: the answer always comes later
        task = asyncio.get_running_loop().create_task(self.publish_seq(room, head))
        task.add_done_callback(lambda t: done(0 if t.cancelled() or t.exception() else t.result()))

    async def join(
        self, room: str, member: MemberInfo, since: tuple[int, str] | None = None
    ) -> JoinResult:
        seq, epoch = since if since is not None else (-1, "")
        reply = await self._call(_Join(next(self._ids), room, member, seq, epoch))
        recovered = None if reply.recovered < 0 else bool(reply.recovered)
        return JoinResult(reply.a, reply.b, reply.epoch, recovered, reply.messages)

    async def history(self, room: str, limit: int) -> tuple[int, str, list[bytes]]:
        reply = await self._call(_History(next(self._ids), room, limit))
        return reply.b, reply.epoch, reply.messages

    async def leave(self, room: str, client_id: str) -> int:
        return (await self._call(_Leave(next(self._ids), room, client_id))).a

    async def presence(self, room: str) -> list[MemberInfo]:
        return (await self._call(_Presence(next(self._ids), room))).members

    async def session_opened(self, member: MemberInfo, connected_at: float) -> None:
        return None

    async def session_closed(self, client_id: str) -> None:
        return None

    # ---- plumbing -------------------------------------------------------------------------------

    async def _call(self, req: _Request, timeout: float | None = None) -> _Reply:
        """Send ``req``; its reply, or ``BrokerUnavailable`` after ``timeout`` seconds."""
        dealer, raw = self._dealer, self._raw_dealer
        if dealer is None or raw is None or (timeout is not None and timeout <= 0):
            raise BrokerUnavailable()
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[_Reply] = loop.create_future()
        self._pending[req.id] = reply
        body = self._encoder.encode(req)
        sent: asyncio.Future[Any] | None = None
        if self._queued_sends:  # stay behind the sends still waiting for a connection
            sent = self._send_later(dealer, req.id, body)
        else:
            try:
                raw.send(body, zmq.NOBLOCK)
                # A plain send may take the socket's edge-triggered wake-up for a reply that
                # already came; reading EVENTS through zmq.asyncio re-arms its reader.
                dealer.get(zmq.EVENTS)
            except zmq.Again:  # no connection up yet: wait for one, within the deadline
                sent = self._send_later(dealer, req.id, body)
            except zmq.ZMQError as exc:
                self._pending.pop(req.id, None)
                log.warning("bus send failed: %s", exc, extra={"event": "bus_send_failed"})
                raise BrokerUnavailable() from None
        timer = loop.call_later(self.timeout if timeout is None else timeout, self._expire, req.id)
        try:
            result = await reply
        finally:
            timer.cancel()
            self._pending.pop(req.id, None)
            if sent is not None and not sent.done():
                sent.cancel()
        if not result.ok:
            raise BrokerUnavailable()
        return result

    def _send_later(self, dealer: zmq.asyncio.Socket, request_id: int, body: bytes) -> Any:
        self._queued_sends += 1
        sent = cast("asyncio.Future[Any]", dealer.send(body))  # zmq.asyncio returns a Future
        sent.add_done_callback(functools.partial(self._sent, request_id))
        return sent

    def _sent(self, request_id: int, sent: asyncio.Future[Any]) -> None:
        self._queued_sends -= 1
        if sent.cancelled() or sent.exception() is None:
            return
        log.warning("bus send failed: %s", sent.exception(), extra={"event": "bus_send_failed"})
        reply = self._pending.pop(request_id, None)
        if reply is not None and not reply.done():
            reply.set_exception(BrokerUnavailable())

    def _expire(self, request_id: int) -> None:
        reply = self._pending.pop(request_id, None)
        if reply is None or reply.done():
            return
        if not self._down:
            log.warning("local bus timed out", extra={"event": "broker_down", "broker": self.name})
        self._down = True
        reply.set_exception(BrokerUnavailable())

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            reply = self._decoder.decode(frames[-1])
        except msgspec.DecodeError:
            log.warning("undecodable bus reply", extra={"event": "bus_bad_reply"})
            return
        if self._down:
            self._down = False
            log.info("local bus is back", extra={"event": "broker_up", "broker": self.name})
        fut = self._pending.pop(reply.id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    def _on_publication(self, frames: list[bytes]) -> None:
        if len(frames) == 4:
            room = frames[0][:-1].decode()
            self.received[room] += 1
            assert self._deliver is not None
            try:
                self._deliver(room, frames[1].decode(), frames[2], int(frames[3]))
            except Exception:
                log.exception("delivery failed", extra={"event": "deliver_error", "room": room})
        elif len(frames) == 2:
            marker = self._syncs.get(frames[1])
            if marker is not None and not marker.done():
                marker.set_result(None)
