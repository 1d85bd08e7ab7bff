"""The reconnect storm, on the generator side: users in one room while a publisher posts at a
fixed rate; when the coordinator restarts their node, every user reconnects at once (jittered
exponential backoff, like fastws.client) and re-joins with ``since`` = the seq and epoch of the
last chat_message it saw. Each user checks every chat_message by seq: a gap is a loss, a seq
seen twice a duplicate. A user has *caught up* when it holds every seq up to the room's seq
named by its ``room_joined`` (the replay of what it missed is complete).

Runs inside a generator process (see loadgen.worker_main); the coordinator writes into the
shared schedule: ``[start, restart at, publisher stops, node down, node up]`` (time_ns).
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import time
from collections.abc import Sequence
from typing import Any

import orjson
import picows

_TEXT = picows.WSMsgType.TEXT
_CLOSE = picows.WSMsgType.CLOSE
_CHAT = b'{"type":"chat_message"'
_search_seq = re.compile(rb'"seq":(\d+),"epoch":"(\w*)"\}$').search
_time_ns = time.time_ns
_IDLE_NS = 500_000_000  # the run ends after this long without a chat delivery
_BACKOFF_FIRST, _BACKOFF_CAP = 0.05, 1.0  # s: a reconnect's first jitter, the longest wait
_GOING_AWAY = 1001  # the restarted server's drain: expected, not counted as a close


class Stats:
    """What one generator process counts over all its users."""

    def __init__(self) -> None:
        self.errors: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[int] = collections.Counter()
        self.last_chat = 0
        self.chats = 0
        self.parsed: dict[bytes, tuple[int, str]] = {}


class User:
    """One simulated user across its connections: the seq bookkeeping lives here, the
    connection (``Conn``) is replaced on every reconnect."""

    def __init__(self, stats: Stats, cid: int, room: str, url: str, publisher: bool) -> None:
        self.stats = stats
        self.cid = cid
        self.room = room
        self.url = url
        self.publisher = publisher
        self.conn: Conn | None = None
        self.joined = False
        self.epoch = ""  # "" until the first room_joined
        self.last = -1  # the highest seq held in ``epoch``
        self.head = 0  # room_joined's seq: caught up once ``last`` reaches it
        self.gaps = 0
        self.duplicates = 0
        self.epoch_changes = 0  # a chat_message of another epoch arrived mid-stream
        self.recovered: bool | None = None  # the last re-join's answer
        self.reconnects = 0
        self.down_ns = 0  # when the connection dropped (0: never)
        self.caught_ns = 0  # when the last re-join had caught up
        self.failed = False  # gave up reconnecting
        self.reconnecting = False  # a reconnect() is running: a drop meanwhile is its business
        self.sent = 0

    @property
    def caught_up(self) -> bool:
        return self.joined and self.last >= self.head

    def on_chat(self, data: bytes) -> None:
        stats = self.stats
        parsed = stats.parsed.get(data)
        if parsed is None:
            match = _search_seq(data)
            if match is None:
                stats.errors["chat_message without seq/epoch"] += 1
                return
            parsed = (int(match[1]), match[2].decode())
            if len(stats.parsed) > 4096:
                stats.parsed.clear()
            stats.parsed[data] = parsed
        seq, epoch = parsed
        stats.last_chat = now = _time_ns()
        stats.chats += 1
        if epoch != self.epoch:
            self.epoch_changes += 1  # history lost under us: a new run of seqs starts here
            self.epoch, self.last = epoch, seq
        elif seq == self.last + 1:
            self.last = seq
        elif seq <= self.last:
            self.duplicates += 1
        else:
            self.gaps += seq - self.last - 1
            self.last = seq
        if self.down_ns and not self.caught_ns and self.caught_up:
            self.caught_ns = now

    def on_joined(self, msg: dict[str, Any]) -> None:
        epoch, head = str(msg.get("epoch", "")), int(msg.get("seq", 0))
        self.recovered = msg.get("recovered")
        if epoch != self.epoch:
            # A new epoch (history lost: the in-process broker restarted): nothing before
            # ``head`` can be replayed, so the stream starts at head + 1.
            self.epoch, self.last = epoch, head
        self.head = head
        self.joined = True
        if self.down_ns and not self.caught_ns and self.caught_up:
            self.caught_ns = _time_ns()

    def join_message(self) -> bytes:
        payload: dict[str, Any] = {"room": self.room}
        if self.epoch:
            payload["since"] = {"seq": max(0, self.last), "epoch": self.epoch}
        return orjson.dumps({"type": "join_room", "payload": payload})


class Conn(picows.WSListener):
    """One connection of a user: resolves ``waiter`` on the awaited control message, feeds
    chat messages to the user, and reports the drop to ``on_drop``."""

    def __init__(self, user: User, on_drop: Any) -> None:
        super().__init__()
        self.user = user
        self.on_drop = on_drop
        self.transport: picows.WSTransport | None = None
        self.want = "connected"
        self.waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.closing = False

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"dropped while waiting for {self.want}"))
        if not self.closing:
            self.on_drop(self)

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == _CLOSE:
            code = frame.get_close_code().value
            if not self.closing and code != _GOING_AWAY:
                self.user.stats.closes[code] += 1
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != _TEXT:
            return
        data = frame.get_payload_as_bytes()
        if data.startswith(_CHAT):
            self.user.on_chat(data)
            return
        if b'"user_joined"' in data or b'"user_left"' in data:
            return  # the storm's presence notices: not what is measured here
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.user.stats.errors["unparsable message from server"] += 1
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "room_joined":
            self.user.on_joined(msg)
        if kind == "error":
            self.user.stats.errors[str(msg.get("error"))[:120]] += 1
            if not self.waiter.done():
                self.waiter.set_exception(RuntimeError(f"server error: {msg.get('error')}"))
        elif kind == self.want and not self.waiter.done():
            self.waiter.set_result(msg)

    def expect(self, kind: str) -> asyncio.Future[dict[str, Any]]:
        self.want = kind
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send_close(picows.WSCloseCode.OK)
            self.transport.disconnect()


class Storm:
    """One generator process's users through the reconnect storm. The soak (soak.py) reuses
    its connecting and reconnecting with users and counters of its own: ``user_class`` and
    ``stats_class``."""

    user_class: type[User] = User
    stats_class: type[Stats] = Stats
    users: Sequence[User]

    def __init__(self, plan: dict[str, Any], schedule: Any, url_for: Any) -> None:
        self.plan = plan
        self.schedule = schedule
        self.timeout: float = plan["timeout"]
        self.stats = self.stats_class()
        self.users = [self.user_class(self.stats, cid, room, url_for(cid), posts)
                      for cid, room, posts, _node in plan["members"]]  # fmt: skip
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False

    async def connect(self, user: User) -> None:
        """Connect and join (with ``since`` once the user has seen the room)."""
        conn = Conn(user, self.dropped)
        user.joined = False
        await picows.ws_connect(
            lambda: conn, user.url, websocket_handshake_timeout=self.timeout,
            max_frame_size=1 << 20,
        )  # fmt: skip
        user.conn = conn
        await asyncio.wait_for(conn.waiter, self.timeout)
        waiter = conn.expect("room_joined")
        assert conn.transport is not None
        conn.transport.send(_TEXT, user.join_message())
        await asyncio.wait_for(waiter, self.timeout)

    async def setup(self, concurrency: int, tick: Any) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(user: User) -> None:
            async with gate:
                await self.connect(user)
                tick()

        await asyncio.gather(*(one(u) for u in self.users))

    def dropped(self, conn: Conn) -> None:
        user = conn.user
        if self.stopping or conn is not user.conn or user.reconnecting:
            return
        user.joined = False
        if not user.down_ns or user.caught_ns:
            user.down_ns, user.caught_ns = _time_ns(), 0
        task = asyncio.get_running_loop().create_task(self.reconnect(user))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def reconnect(self, user: User) -> None:
        """Jittered exponential backoff until connected and re-joined, or --timeout."""
        user.reconnects += 1
        user.reconnecting = True
        try:
            await self._retry(user)
        finally:
            user.reconnecting = False

    async def _retry(self, user: User) -> None:
        deadline = time.monotonic() + self.timeout
        delay = random.uniform(0, _BACKOFF_FIRST)
        while not self.stopping:
            await asyncio.sleep(delay)
            try:
                await self.connect(user)
                return
            except (OSError, ConnectionError, RuntimeError, asyncio.TimeoutError,
                    picows.WSError) as exc:  # fmt: skip
                if user.conn is not None and user.conn.transport is not None:
                    user.conn.closing = True  # this attempt is over; a new one follows
                    user.conn.transport.disconnect()
                if time.monotonic() + delay > deadline:
                    user.failed = True
                    self.stats.errors[f"reconnect gave up: {type(exc).__name__}: {exc}"[:120]] += 1
                    return
            delay = min(_BACKOFF_CAP, max(_BACKOFF_FIRST, delay * 2)) * random.uniform(0.5, 1)

    async def publish(self, user: User, rate: float) -> None:
        """Post at ``rate`` msg/s from the load's start to its end, skipping the ticks that
        find the publisher disconnected (its node may be the one restarted)."""
        start, end = self.schedule[0], self.schedule[2]
        interval = 1.0 / rate
        k = 0
        while True:
            due = start + int(k * interval * 1e9)
            if due >= end:
                return
            await asyncio.sleep(max(0.0, (due - _time_ns()) / 1e9))
            k += 1
            conn = user.conn
            if user.joined and conn is not None and conn.transport is not None:
                text = f"{user.cid}:{user.sent}:{_time_ns()}"
                conn.transport.send(
                    _TEXT,
                    orjson.dumps(
                        {"type": "chat_message", "payload": {"room": user.room, "message": text}}
                    ),
                )
                user.sent += 1

    def settled(self) -> bool:
        """The restart is over, the publisher has stopped, every user is back and caught up,
        and nothing has arrived for a while (the last messages are in)."""
        sched = self.schedule
        now = _time_ns()
        return (
            sched[4] != 0
            and now >= sched[2]
            and all(u.caught_up or u.failed for u in self.users)
            and now - self.stats.last_chat > _IDLE_NS
        )

    async def run(self) -> bool:
        """The storm; True when it settled, False when --timeout ran out first."""
        await asyncio.sleep(max(0.0, (self.schedule[0] - _time_ns()) / 1e9))
        pubs = [asyncio.ensure_future(self.publish(u, self.plan["rate"]))
                for u in self.users if u.publisher and self.plan["rate"] > 0]  # fmt: skip
        deadline = self.schedule[2] + int((self.timeout + 5) * 1e9)
        settled = False
        while _time_ns() < deadline:
            if self.settled():
                settled = True
                break
            await asyncio.sleep(0.05)
        self.stopping = True
        for task in [*pubs, *self.tasks]:
            task.cancel()
        await asyncio.gather(*pubs, *self.tasks, return_exceptions=True)
        return settled

    def close(self) -> None:
        for user in self.users:
            if user.conn is not None:
                user.conn.close()

    def result(self, settled: bool) -> dict[str, Any]:
        """Per user (epoch, last seq, ...) for the coordinator, which knows the final seq."""
        down = self.schedule[3]
        users = [
            {
                "cid": u.cid,
                "publisher": u.publisher,
                "epoch": u.epoch,
                "last": u.last,
                "gaps": u.gaps,
                "duplicates": u.duplicates,
                "epoch_changes": u.epoch_changes,
                "recovered": u.recovered,
                "reconnects": u.reconnects,
                "dropped": bool(u.down_ns),
                "caught_up_us": (u.caught_ns - down) // 1000 if u.caught_ns and down else None,
                "caught_ns": u.caught_ns,
                "failed": u.failed,
                "sent": u.sent,
            }
            for u in self.users
        ]
        return {
            "users": users,
            "settled": settled,
            "chats": self.stats.chats,
            "errors": dict(self.stats.errors),
            "closes": dict(self.stats.closes),
        }
