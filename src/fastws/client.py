"""An asyncio client for fastws that reconnects and recovers what it missed.

    import asyncio
    from fastws.client import Client, ClientError

    async def main(token: str) -> None:
        async with Client("ws://127.0.0.1:8080/ws", token) as c:
            await c.join("general")
            seq = await c.send("general", "hello")   # the message's seq, from the ack
            async for event in c.events():           # until c.close()
                if event["type"] == "chat_message":
                    print(event["seq"], event["username"], event["message"])
                elif event["type"] == "room_joined" and not event.get("recovered"):
                    messages = await c.history(event["room"])  # a gap: reload

    asyncio.run(main(TOKEN))

What the client guarantees, and how (see docs/protocol.md for the wire):

- Requests carry a fresh ``id`` and wait for the reply with that id (``request_timeout``).
  An ``error`` reply raises ``ClientError``; a connection that is down, or drops before the
  reply, raises ``Disconnected`` (the request may or may not have taken effect).
- Everything else the server sends is an *event*, delivered in arrival order to
  ``events()`` and to the ``on()`` callbacks, with the synthetic ``disconnected``,
  ``reconnected`` and ``auth_failed``.
- Per joined room the client remembers the last ``(seq, epoch)`` it delivered. When the
  connection drops for any reason except ``close()``, it reconnects with exponential backoff
  and full jitter, and re-joins every room with ``since`` = that position: the server replays
  what was missed, and the client drops every ``chat_message`` it already delivered, so each
  message reaches the app once and in order. The re-join's ``room_joined`` is an event whose
  ``recovered`` is false when the server could not replay everything (history too short, or
  a new epoch after a restart): reload ``history()`` then.
- An HTTP 401 on a reconnect (the token is no longer accepted) stops the client with an
  ``auth_failed`` event; ``close()`` stops it for good.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
from picows import (
    WSCloseCode,
    WSFrame,
    WSHandshakeError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

__all__ = ["AuthFailed", "Client", "ClientError", "Disconnected", "EventStream"]

log = logging.getLogger("fastws.client")

# picows logs the raw upgrade request (the query-string token included) below INFO: never
# let those records out, whatever level the application sets.
_picows_log = logging.getLogger("fastws.client.picows")
_picows_log.addFilter(lambda record: record.levelno >= logging.INFO)

Event = dict[str, Any]
Callback = Callable[[Event], Any]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_END: Any = object()  # ends an EventStream: the client stopped
_CLOSE_TIMEOUT = 2.0  # seconds close() waits for the server's close frame


class ClientError(Exception):
    """The server refused a request (an ``error`` reply), or the client could not make it.

    ``code`` is the machine-readable kind (``not_in_room``, ``invalid_room``, ...; see
    docs/protocol.md section 4), ``text`` the server's human-readable message.
    """

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class Disconnected(ClientError):
    """No connection right now, or it dropped before the reply: retry after ``reconnected``."""

    def __init__(self, text: str = "not connected") -> None:
        super().__init__("disconnected", text)


class AuthFailed(ClientError):
    """The server answered the upgrade with HTTP 401: the token was refused."""

    def __init__(self) -> None:
        super().__init__("auth_failed", "the server refused the token (HTTP 401)")


class _Room:
    """Recovery position of one joined room: the last chat_message delivered to the app."""

    __slots__ = ("epoch", "seq")

    def __init__(self, seq: int, epoch: str) -> None:
        self.seq = seq
        self.epoch = epoch


class _Pending:
    """A request waiting for its reply. ``future`` is None for the client's own re-joins."""

    __slots__ = ("future", "room", "type")

    def __init__(self, type_: str, room: str, future: asyncio.Future[Event] | None) -> None:
        self.type = type_
        self.room = room
        self.future = future


class _Connection(WSListener):
    """One WebSocket connection: decodes messages for the client and reports its end."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.transport: WSTransport | None = None
        self.close_code: int | None = None  # from the server's close frame, if any
        self._frag_type: WSMsgType | None = None
        self._frags = bytearray()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.client._attach(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # A WSFrame is only valid inside this callback: everything is copied or decoded here.
        kind = frame.msg_type
        if kind in (WSMsgType.TEXT, WSMsgType.BINARY):
            if frame.fin:
                self._deliver(frame.get_payload_as_bytes())
            else:
                self._frag_type = kind
                self._frags = bytearray(frame.get_payload_as_memoryview())
        elif kind == WSMsgType.CONTINUATION and self._frag_type is not None:
            self._frags += frame.get_payload_as_memoryview()
            if frame.fin:
                data = bytes(self._frags)
                self._frag_type, self._frags = None, bytearray()
                self._deliver(data)
        elif kind == WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.close_code = int(code.value) if frame.payload_size >= 2 else None
            if not transport.is_close_frame_sent:  # echo it (RFC 6455 section 5.5.1)
                transport.send_close(code if self.close_code is not None else WSCloseCode.OK)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.client._detach(self)

    def send(self, message: Event) -> None:
        if self.transport is not None and not self.transport.is_close_frame_sent:
            self.transport.send(WSMsgType.TEXT, _encode(message))

    def _deliver(self, data: bytes) -> None:
        try:
            message = _decode(data)
        except msgspec.DecodeError:
            log.warning("ignoring a message that is not JSON (%d bytes)", len(data))
            return
        if isinstance(message, dict) and isinstance(message.get("type"), str):
            self.client._receive(self, message)
        else:
            log.warning("ignoring a message without a type")


class EventStream:
    """``async for event in client.events()``: the client's events, oldest first.

    Iteration ends when the client stops (``close()``, ``auth_failed``, or a drop with
    ``reconnect=False``). All streams of a client share one queue: use one at a time.
    Cancelling a pending ``__anext__`` (``asyncio.wait_for``) loses no event.
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        queue = self._client._queue
        if queue.empty() and not self._client._running:
            raise StopAsyncIteration
        event = await queue.get()
        if event is _END:
            raise StopAsyncIteration
        return event


class Client:
    """A fastws connection that reconnects by itself and recovers missed chat messages.

    ``url`` is the server's WebSocket URL (``ws://host:port/ws``); ``token`` a JWT, or a
    function returning one, called before every connection attempt so it can be refreshed.
    ``reconnect=False`` stops the client at the first drop instead. Reconnect attempt ``n``
    (from 0) first sleeps ``uniform(0, min(backoff_max, backoff_initial * 2**n))`` seconds.
    ``request_timeout`` bounds each request, and the connection handshake, in seconds.

    Use it as ``async with Client(...) as c:``, or call ``connect()`` and ``close()``.
    """

    def __init__(
        self,
        url: str,
        token: str | Callable[[], str],
        *,
        reconnect: bool = True,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        request_timeout: float = 10.0,
    ) -> None:
        self._url = url
        self._token = token
        self._reconnect = reconnect
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._request_timeout = request_timeout
        self._conn: _Connection | None = None  # the connection messages are taken from
        self._ready = False  # _conn said `connected` and the re-joins are sent
        self._running = False  # between connect() and the stop
        self._closing = False  # close() has begun: the supervisor must not go on
        self._had_connection = False  # a later connection is a reconnection
        self._hello: asyncio.Future[bool] | None = None
        self._dropped = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._rooms: dict[str, _Room] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._streaming = False
        self._callbacks: dict[str, list[Callback]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client_id: str | None = None
        self._user_id: str | None = None

    # ---- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and wait for the server's ``connected`` message.

        Raises ``AuthFailed`` on HTTP 401, ``TimeoutError`` after ``request_timeout``, and
        the network's ``OSError`` or picows' ``WSError`` otherwise; there is no retry here.
        Once connected, the client stays connected (reconnecting as needed) until
        ``close()``. Called again after the client stopped (``auth_failed``, or a drop with
        ``reconnect=False``), it resumes: it re-joins the remembered rooms and recovers.
        """
        if self._running:
            raise RuntimeError("already connected")
        # A stream ended by an earlier stop must not end the new one.
        left = [e for e in _drain(self._queue) if e is not _END]
        for event in left:
            self._queue.put_nowait(event)
        self._closing = False
        await self._open()
        self._running = True
        self._dropped.clear()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        """Close the connection (code 1000) and stop: no more reconnects, and every pending
        request raises ``Disconnected``. Callback tasks are cancelled, ``events()`` ends,
        and the remembered rooms are forgotten. Safe to call more than once."""
        self._closing = True
        supervisor, self._supervisor = self._supervisor, None
        # Python < 3.12's wait_for can swallow a cancellation that races its inner task
        # finishing (bpo-42130): cancel until the supervisor is really done.
        while supervisor is not None and not supervisor.done():
            supervisor.cancel()
            await asyncio.wait([supervisor], timeout=0.1)
        conn, self._conn = self._conn, None
        self._ready = False
        if conn is not None and conn.transport is not None:
            transport = conn.transport
            if not transport.is_disconnected:
                if not transport.is_close_frame_sent:
                    transport.send_close(WSCloseCode.OK)
                try:
                    await asyncio.wait_for(transport.wait_disconnected(), _CLOSE_TIMEOUT)
                except asyncio.TimeoutError:
                    transport.disconnect(False)
        self._fail_pending("client closed")
        self._rooms.clear()
        self._had_connection = False
        self._stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def connected(self) -> bool:
        """True while a connection is up and requests can be sent."""
        return self._ready and self._conn is not None

    @property
    def client_id(self) -> str | None:
        """The server's id for the current (or last) connection; it changes on reconnect."""
        return self._client_id

    @property
    def user_id(self) -> str | None:
        """The user id the server read from the token, once connected."""
        return self._user_id

    # ---- requests -------------------------------------------------------------------

    async def join(self, room: str) -> Event:
        """Join ``room`` and return its ``room_joined`` (``members``, ``seq``, ``epoch``).

        From then on the room's chat messages are events, and the room is re-joined with
        recovery after every reconnect until ``leave()`` or ``close()``.
        """
        return await self._request("join_room", {"room": room}, room)

    async def leave(self, room: str) -> None:
        """Leave ``room``; it is no longer re-joined after a reconnect."""
        self._rooms.pop(room, None)
        await self._request("leave_room", {"room": room}, room)

    async def send(self, room: str, text: str) -> int:
        """Post ``text`` to ``room`` (joined first); return the message's ``seq``.

        The message also comes back as a ``chat_message`` event, like everyone else's.
        """
        reply = await self._request("chat_message", {"room": room, "message": text}, room)
        return int(reply.get("seq", 0))

    async def typing(self, room: str, is_typing: bool = True) -> None:
        """Tell the other members of ``room`` that this user is (or stopped) typing."""
        await self._request("typing", {"room": room, "isTyping": is_typing}, room)

    async def presence(self, room: str) -> list[Event]:
        """The users in ``room`` (joined first): ``[{"userId": ..., "username": ...}]``."""
        reply = await self._request("presence", {"room": room}, room)
        return list(reply["members"])

    async def history(self, room: str, limit: int = 50) -> list[Event]:
        """Up to ``limit`` (1-1000) of the newest chat messages the server still keeps for
        ``room`` (joined first), oldest first, as ``chat_message`` dicts."""
        reply = await self._request("history", {"room": room, "limit": limit}, room)
        return list(reply["messages"])

    async def ping(self) -> float:
        """An application-level round trip; return how long it took, in seconds."""
        start = time.monotonic()
        await self._request("ping", None, "")
        return time.monotonic() - start

    # ---- events ---------------------------------------------------------------------

    def events(self) -> EventStream:
        """Every server message that is not a reply to one of our requests, as a dict, plus
        ``{"type": "disconnected", "code": int | None}``, ``{"type": "reconnected"}`` and
        ``{"type": "auth_failed"}``.

        Events are buffered from ``connect()`` on, unless callbacks were registered with
        ``on()`` before the first call of ``events()``: then the stream starts here.
        """
        self._streaming = True
        return EventStream(self)

    def on(self, type_: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event)`` for every event of ``type_`` (``"*"``: every event).

        A coroutine function's calls run as tasks, cancelled by ``close()``. A callback's
        exception is logged and does not reach the client. Returns a function that
        removes the callback.
        """
        self._callbacks.setdefault(type_, []).append(callback)

        def remove() -> None:
            callbacks = self._callbacks.get(type_, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._callbacks.pop(type_, None)

        return remove

    # ---- internals: connecting ------------------------------------------------------

    async def _open(self) -> None:
        """One connection attempt, up to `connected` and the re-joins; on failure nothing
        is left open."""
        token = self._token() if callable(self._token) else self._token
        loop = asyncio.get_running_loop()
        self._hello = hello = loop.create_future()
        try:
            await asyncio.wait_for(
                self._handshake(_with_token(self._url, token), hello), self._request_timeout
            )
        except BaseException:
            conn, self._conn = self._conn, None
            if conn is not None and conn.transport is not None:
                conn.transport.disconnect(False)
            raise
        finally:
            self._hello = None
        rejoin = self._had_connection
        self._had_connection = True
        if rejoin:
            self._rejoin()
        self._ready = True
        if rejoin:
            self._emit({"type": "reconnected"})

    async def _handshake(self, url: str, hello: asyncio.Future[bool]) -> None:
        try:
            await ws_connect(
                lambda: _Connection(self),
                url,
                websocket_handshake_timeout=self._request_timeout,
                logger_name=_picows_log,
            )
        except WSHandshakeError as exc:
            if exc.response is not None and exc.response.status == 401:
                raise AuthFailed() from None
            raise
        if not await hello:
            raise Disconnected("connection closed before `connected`")

    def _rejoin(self) -> None:
        """Re-join every remembered room from its last delivered position. Sent before any
        request of the app can be, so the server handles them first."""
        assert self._conn is not None
        for name, room in self._rooms.items():
            payload: Event = {"room": name}
            if room.epoch:
                payload["since"] = {"seq": room.seq, "epoch": room.epoch}
            msg_id = self._new_id()
            self._pending[msg_id] = _Pending("join_room", name, None)
            self._conn.send({"type": "join_room", "payload": payload, "id": msg_id})

    async def _supervise(self) -> None:
        """Wait for a drop, then reconnect; stops the client when it gives up."""
        while not self._closing:
            await self._dropped.wait()
            self._dropped.clear()
            if not self._reconnect or not await self._reconnect_loop():
                self._stop()
                self._supervisor = None
                return

    async def _reconnect_loop(self) -> bool:
        """Back off and retry until connected (True) or the token is refused (False)."""
        attempt = 0
        while not self._closing:
            ceiling = min(self._backoff_max, self._backoff_initial * 2 ** min(attempt, 62))
            await asyncio.sleep(random.uniform(0, ceiling))  # "full jitter"
            attempt += 1
            try:
                await self._open()
                return True
            except AuthFailed:
                log.warning("reconnect refused with HTTP 401: giving up")
                self._emit({"type": "auth_failed"})
                return False
            except Exception as exc:  # refused, reset, timed out, token provider failed...
                log.info("reconnect attempt %d failed: %r", attempt, exc)
        return False

    def _attach(self, conn: _Connection) -> None:
        """picows: ``conn`` finished its handshake; take messages from it from now on."""
        self._conn = conn

    def _detach(self, conn: _Connection) -> None:
        """picows: ``conn`` is gone. Reported as ``disconnected`` only if it was up."""
        if conn is not self._conn:
            return
        was_ready = self._ready
        self._conn = None
        self._ready = False
        if self._hello is not None and not self._hello.done():
            self._hello.set_result(False)
        self._fail_pending("connection lost")
        if was_ready:
            log.info("disconnected (code %s)", conn.close_code)
            self._emit({"type": "disconnected", "code": conn.close_code})
            self._dropped.set()

    def _stop(self) -> None:
        if self._running:
            self._running = False
            self._queue.put_nowait(_END)

    # ---- internals: messages --------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _request(self, type_: str, payload: Event | None, room: str) -> Event:
        conn = self._conn
        if conn is None or not self._ready:
            raise Disconnected()
        msg_id = self._new_id()
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = _Pending(type_, room, future)
        message: Event = {"type": type_, "id": msg_id}
        if payload is not None:
            message["payload"] = payload
        conn.send(message)
        try:
            return await asyncio.wait_for(future, self._request_timeout)
        finally:
            self._pending.pop(msg_id, None)

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(Disconnected(why))

    def _receive(self, conn: _Connection, msg: Event) -> None:
        """Route one server message: a reply to its request, or an event. Runs inside
        picows' callback, so room positions change in the order messages arrived."""
        if conn is not self._conn:
            return
        kind = msg["type"]
        msg_id = msg.get("id")
        entry = self._pending.pop(msg_id, None) if isinstance(msg_id, int) else None
        if entry is not None:
            self._reply(entry, msg)
            return
        if kind == "chat_message":
            room = self._rooms.get(msg.get("room", ""))
            if room is not None:
                seq, epoch = msg.get("seq"), msg.get("epoch", "")
                if isinstance(seq, int):
                    if epoch == room.epoch and seq <= room.seq:
                        return  # delivered already (a replay overlapping what we had)
                    room.seq, room.epoch = seq, epoch
        elif kind == "connected":
            self._client_id = msg.get("clientId")
            self._user_id = msg.get("userId")
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(True)
        elif kind == "ping":  # the seed's JSON heartbeat (`--json-ping`): answer, don't show
            conn.send({"type": "pong"})
            return
        self._emit(msg)

    def _reply(self, entry: _Pending, msg: Event) -> None:
        kind = msg["type"]
        if entry.type == "join_room" and kind == "room_joined":
            self._joined(entry, msg)
        if entry.future is None:  # one of our re-joins: the app sees its outcome as an event
            msg.pop("id", None)
            if kind == "error":
                self._rooms.pop(entry.room, None)
                msg["room"] = entry.room
            self._emit(msg)
        elif entry.future.done():
            pass
        elif kind == "error":
            entry.future.set_exception(
                ClientError(str(msg.get("code", "")), str(msg.get("error", "")))
            )
        else:
            entry.future.set_result(msg)

    def _joined(self, entry: _Pending, msg: Event) -> None:
        """Set the room's position from a room_joined. Messages up to the server's ``seq``
        come before it on a plain join; on a recovery they follow it (the replay), so the
        position stays where the app is unless the server's run of seqs is another one."""
        seq, epoch = int(msg.get("seq", 0)), str(msg.get("epoch", ""))
        room = self._rooms.get(entry.room)
        if room is None:
            if entry.future is not None:  # not a re-join of a room left in the meantime
                self._rooms[entry.room] = _Room(seq, epoch)
        elif epoch != room.epoch or seq < room.seq:
            room.seq, room.epoch = seq, epoch
        elif entry.future is not None:
            room.seq = max(room.seq, seq)

    def _emit(self, event: Event) -> None:
        for key in (event["type"], "*"):
            for callback in list(self._callbacks.get(key, ())):
                try:
                    result = callback(event)
                except Exception:
                    log.exception("event callback failed")
                    continue
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._callback_done)
        if self._streaming or not self._callbacks:
            self._queue.put_nowait(event)

    def _callback_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event callback failed", exc_info=task.exception())


def _with_token(url: str, token: str) -> str:
    """``url`` with its ``token`` query parameter set (replacing one already there)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    query.append(("token", token))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _drain(queue: asyncio.Queue[Event]) -> list[Event]:
    items: list[Event] = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
