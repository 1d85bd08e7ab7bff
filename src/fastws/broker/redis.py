"""Redis broker: rooms span hosts through Redis pub/sub; seq and presence live in Redis.

The only module that imports redis. Keys (room names are hash-tagged so a room's keys share a
slot):

    fastws:{room}:seq        INCR counter; allocation and PUBLISH happen in one Lua script
    fastws:{room}:members    hash clientId -> MemberInfo (msgpack)
    fastws:{room}            the pub/sub channel; a message is ``exclude_client_id \\n payload``
    session:<clientId>       the seed's session record: userId, nodeId, connectedAt (TTL, refreshed)
    fastws:node:<id>         this node is alive (TTL, refreshed)
    fastws:node:<id>:rooms   rooms this node has members in, so a dead node can be swept
    fastws:nodes             every node id seen

If Redis goes away the node keeps its clients: calls raise ``BrokerUnavailable`` (the client
gets an ``unavailable`` error, never a false success), ``health()`` says down, and a monitor
reconnects with backoff, then resubscribes and re-registers everything this node holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.connection import parse_url
from redis.exceptions import RedisError

from ..errors import BrokerUnavailable
from .types import Deliver, HistoryPolicy, JoinResult, MemberInfo, Pressure, SeqDone, new_epoch

log = logging.getLogger("fastws.broker.redis")

# A room's seq, epoch and history move together. A missing epoch means the room's state is
# gone (expired, or Redis lost it): a new epoch starts, and seq restarts from 1 under it.
# History entries are "seq:unix_ms:payload", newest first, trimmed to size and aged by ttl.
_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)"

_EPOCH = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[3]
  redis.call('DEL', KEYS[1], KEYS[4])
end
redis.call('SET', KEYS[2], epoch, 'EX', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[4])
"""

# KEYS: seq, epoch, members (unused), history
# ARGV: channel, head, new epoch, state ttl s, PUBLISH|SPUBLISH, history size, history ttl ms
_PUBLISH_SEQ = _NOW_MS + _EPOCH + """
local seq = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local payload = ARGV[2] .. seq .. ',"epoch":"' .. epoch .. '"}'
redis.call(ARGV[5], ARGV[1], "\\n" .. seq .. "\\n" .. payload)
local size = tonumber(ARGV[6])
if size > 0 then
  redis.call('LPUSH', KEYS[4], seq .. ':' .. now .. ':' .. payload)
  redis.call('LTRIM', KEYS[4], 0, size - 1)
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
return seq
"""

# Reads history newer than ARGV[8] (and within ttl), oldest first, into ``out``.
_READ_HISTORY = """
local out = {}
local first = -1
local entries = redis.call('LRANGE', KEYS[4], 0, -1)
local ttl = tonumber(ARGV[7])
for i = #entries, 1, -1 do
  local e = entries[i]
  local p1 = string.find(e, ':', 1, true)
  local p2 = string.find(e, ':', p1 + 1, true)
  local s = tonumber(string.sub(e, 1, p1 - 1))
  local t = tonumber(string.sub(e, p1 + 1, p2 - 1))
  if s > tonumber(ARGV[8]) and (ttl == 0 or now - t <= ttl) then
    if first < 0 then first = s end
    table.insert(out, string.sub(e, p2 + 1))
  end
end
"""

# KEYS: seq, epoch, members, history
# ARGV: clientId, member, new epoch, state ttl s, since epoch, since seq (-1: none),
#       history ttl ms, since seq again (for _READ_HISTORY)
_JOIN = _NOW_MS + _EPOCH + """
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local count = redis.call('HLEN', KEYS[3])
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local since = tonumber(ARGV[6])
if since < 0 then return {count, seq, epoch, -1, {}} end
if ARGV[5] ~= epoch or since > seq then return {count, seq, epoch, 0, {}} end
if since == seq then return {count, seq, epoch, 1, {}} end
""" + _READ_HISTORY + """
local complete = 0
if first == since + 1 then complete = 1 end
return {count, seq, epoch, complete, out}
"""

# KEYS: seq, epoch, members (unused), history; ARGV: 1-6 unused, history ttl ms, since (-1)
_HISTORY = _NOW_MS + """
local epoch = redis.call('GET', KEYS[2]) or ''
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
""" + _READ_HISTORY + """
return {seq, epoch, out}
"""

# On a cluster a plain SPUBLISH is routed through a script whose key pins the room's slot.
_SPUBLISH = """
return redis.call('SPUBLISH', ARGV[1], ARGV[2])
"""

_LEAVE = """
redis.call('HDEL', KEYS[1], ARGV[1])
local left = redis.call('HLEN', KEYS[1])
if left == 0 then redis.call('DEL', KEYS[1]) end
return left
"""

_STATE_TTL = 7 * 86400  # without a history ttl, a room's seq and epoch outlive a week of silence
_SESSION_TTL = 60  # the seed's session records, refreshed every _SESSION_TTL / 3
_member_encoder = msgspec.msgpack.Encoder()
_member_decoder = msgspec.msgpack.Decoder(MemberInfo)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _channel(room: str) -> str:
    return f"fastws:{{{room}}}"


def _members_key(room: str) -> str:
    return f"fastws:{{{room}}}:members"


def _seq_key(room: str) -> str:
    return f"fastws:{{{room}}}:seq"


def _room_keys(room: str) -> list[str]:
    return [_seq_key(room), f"fastws:{{{room}}}:epoch", _members_key(room),
            f"fastws:{{{room}}}:history"]


class RedisBroker:
    name = "redis"
    inline = False

    def __init__(
        self,
        url: str,
        timeout: float = 2.0,
        node_ttl: float = 15.0,
        cluster: bool = False,
        policy: HistoryPolicy | None = None,
    ) -> None:
        self.url = url
        self.cluster = cluster
        self.policy = policy or HistoryPolicy()
        ttl = self.policy.ttl
        self._state_ttl = max(1, int(ttl) + 1) if ttl else _STATE_TTL
        self._history_ttl_ms = int(ttl * 1000)
        self.timeout = timeout
        self.node_ttl = max(1, int(node_ttl))
        self.sweep_interval = node_ttl / 3
        self._deliver: Deliver | None = None
        self.node_id = ""
        self._redis: Any = None  # Redis, or RedisCluster in sharded mode
        self._listeners: dict[str, _Listener] = {}  # "" standalone, else one per shard primary
        self._monitor: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._rooms: set[str] = set()  # rooms subscribed here
        self._members: dict[str, dict[str, MemberInfo]] = {}  # local presence, to re-register
        self._sessions: dict[str, tuple[MemberInfo, float]] = {}
        self.state = "down"
        self._publish_cmd = "SPUBLISH" if cluster else "PUBLISH"
        self.outages = 0
        self._closing = False

    # ---- lifecycle ------------------------------------------------------------------------

    def attach(self, node_id: str, deliver: Deliver, pressure: Pressure | None = None) -> None:
        self.node_id = node_id
        self._deliver = deliver

    async def start(self) -> None:
        self._open()
        try:
            await self._connect()
        except (RedisError, OSError) as exc:
            # Serve anyway: local clients still work, and the monitor keeps trying.
            self._went_down(exc)
        self._keeper = asyncio.get_running_loop().create_task(self._keep_alive())

    def _open(self) -> None:
        """Make the client and register the scripts; no I/O yet."""
        options: dict[str, Any] = {"socket_timeout": self.timeout,
                                   "socket_connect_timeout": self.timeout}
        if self.cluster:
            self._redis = RedisCluster.from_url(self.url, **options)
        else:
            self._redis = aioredis.Redis.from_url(self.url, health_check_interval=0, **options)
        self._publish_seq = self._redis.register_script(_PUBLISH_SEQ)
        self._spublish = self._redis.register_script(_SPUBLISH)
        self._join = self._redis.register_script(_JOIN)
        self._history = self._redis.register_script(_HISTORY)
        self._leave = self._redis.register_script(_LEAVE)

    async def close(self) -> None:
        self._closing = True
        for task in (self._keeper, self._monitor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._redis is not None and self.state == "ok":
            with contextlib.suppress(RedisError, OSError):
                await asyncio.wait_for(self._redis.delete(f"fastws:node:{self.node_id}"), 1.0)
        await self._close_pubsub()
        if self._redis is not None:
            await self._redis.aclose()

    def health(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "outages": self.outages,
                "rooms": len(self._rooms)}

    async def _connect(self) -> None:
        """(Re)build the subscription and re-register everything this node holds in Redis."""
        assert self._redis is not None
        await self._redis.ping()
        await self._close_pubsub()
        by_listener: dict[str, list[bytes]] = {}
        for room in self._rooms:
            channel = _channel(room).encode()
            by_listener.setdefault(await self._listener_name(channel), []).append(channel)
        for name, channels in by_listener.items():
            await self._listener(name).subscribe(*channels)
        pipe = self._redis.pipeline(transaction=False)
        for room, members in self._members.items():
            for client_id, member in members.items():
                pipe.hset(_members_key(room), client_id, _member_encoder.encode(member))
            pipe.sadd(f"fastws:node:{self.node_id}:rooms", room)
        for client_id, (member, connected_at) in self._sessions.items():
            pipe.set(f"session:{client_id}", self._session_record(member, connected_at),
                     ex=_SESSION_TTL)
        pipe.set(f"fastws:node:{self.node_id}", b"1", ex=self.node_ttl)
        pipe.sadd("fastws:nodes", self.node_id)
        await pipe.execute()
        if self.state != "ok":
            log.info("redis connected", extra={"event": "broker_up", "url": self._safe_url()})
        self.state = "ok"

    async def _close_pubsub(self) -> None:
        listeners, self._listeners = self._listeners, {}
        for listener in listeners.values():
            await listener.close()
        for fut in self._confirm.values():
            if not fut.done():
                fut.set_exception(BrokerUnavailable())
        self._confirm.clear()

    def _safe_url(self) -> str:
        return self.url.split("@")[-1]  # never log a password

    def _went_down(self, exc: BaseException) -> None:
        if self._closing:
            return
        if self.state != "down" or self._monitor is None:
            self.outages += 1
            log.warning("redis unavailable: %s", type(exc).__name__,
                        extra={"event": "broker_down", "url": self._safe_url()})
        self.state = "down"
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.05
        while not self._closing:
            await asyncio.sleep(delay * (0.5 + random.random()))
            try:
                await self._connect()
                return
            except (RedisError, OSError) as exc:
                log.debug("redis reconnect failed: %s", exc)
                delay = min(delay * 2, 2.0)

    # ---- the subscription -----------------------------------------------------------------

    async def _listener_name(self, channel: bytes) -> str:
        """Which connection carries ``channel``: the one, or its shard's primary on a cluster."""
        if not self.cluster:
            return ""
        node = self._redis.get_node_from_key(channel)
        return f"{node.host}:{node.port}"

    def _listener(self, name: str) -> _Listener:
        listener = self._listeners.get(name)
        if listener is None:
            if name:
                host, _, port = name.rpartition(":")
                client = aioredis.Redis(host=host, port=int(port), **self._node_options())
            else:
                client = self._redis
            listener = self._listeners[name] = _Listener(self, client, sharded=self.cluster)
        return listener

    def _node_options(self) -> dict[str, Any]:
        options = parse_url(self.url)
        for key in ("host", "port", "db", "path", "connection_class"):
            options.pop(key, None)
        options.update(socket_timeout=self.timeout, socket_connect_timeout=self.timeout)
        return options

    def on_message(self, channel: bytes, data: bytes) -> None:
        # "exclude \n seq \n payload"; channel is fastws:{room}
        exclude, _, rest = data.partition(b"\n")
        seq, _, payload = rest.partition(b"\n")
        assert self._deliver is not None
        self._deliver(channel[8:-1].decode(), exclude.decode(), payload, int(seq or 0))

    def on_subscribed(self, channel: bytes) -> None:
        fut = self._confirm.pop(channel, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def subscribe(self, room: str) -> None:
        self._rooms.add(room)
        if self.state != "ok":
            self._rooms.discard(room)
            raise BrokerUnavailable()
        channel = _channel(room).encode()
        fut = self._confirm.get(channel)
        if fut is None:
            fut = self._confirm[channel] = asyncio.get_running_loop().create_future()
        try:
            listener = self._listener(await self._listener_name(channel))
            await self._call(listener.subscribe(channel))
            await asyncio.wait_for(asyncio.shield(fut), self.timeout)
            await self._call(self._redis_sadd_room(room))
        except (asyncio.TimeoutError, BrokerUnavailable):
            self._rooms.discard(room)
            raise BrokerUnavailable() from None

    def _redis_sadd_room(self, room: str) -> Any:
        assert self._redis is not None
        return self._redis.sadd(f"fastws:node:{self.node_id}:rooms", room)

    async def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)
        self._members.pop(room, None)
        if self.state != "ok" or self._redis is None:
            return
        channel = _channel(room).encode()
        listener = self._listeners.get(await self._listener_name(channel))
        if listener is not None:
            await self._call(listener.unsubscribe(channel))
        await self._call(self._redis.srem(f"fastws:node:{self.node_id}:rooms", room))

    # ---- commands -------------------------------------------------------------------------

    async def _call(self, aw: Any) -> Any:
        if self.state != "ok":
            aw.close()
            raise BrokerUnavailable()
        try:
            return await aw
        except (RedisError, OSError) as exc:
            self._went_down(exc)
            raise BrokerUnavailable() from exc

    async def publish(self, room: str, payload: bytes, exclude: str = "") -> None:
        assert self._redis is not None
        message = b"%b\n0\n%b" % (exclude.encode(), payload)
        if self.cluster:
            await self._call(self._spublish(keys=[_seq_key(room)], args=[_channel(room), message]))
        else:
            await self._call(self._redis.publish(_channel(room), message))

    async def publish_seq(self, room: str, head: bytes) -> int:
        seq = await self._call(self._publish_seq(
            keys=_room_keys(room),
            args=[_channel(room), head, new_epoch(), self._state_ttl, self._publish_cmd,
                  self.policy.size_for(room), self._history_ttl_ms]))
        return int(seq)

    def publish_seq_nowait(self, room: str, head: bytes, done: SeqDone | None) -> None:
        assert done is not None  # not inline: the answer always comes later
        task = asyncio.get_running_loop().create_task(self.publish_seq(room, head))
        task.add_done_callback(lambda t: done(0 if t.cancelled() or t.exception() else t.result()))

    async def join(
        self, room: str, member: MemberInfo, since: tuple[int, str] | None = None
    ) -> JoinResult:
        since_seq, since_epoch = since if since is not None else (-1, "")
        count, seq, epoch, complete, replay = await self._call(self._join(
            keys=_room_keys(room),
            args=[member.clientId, _member_encoder.encode(member), new_epoch(), self._state_ttl,
                  since_epoch, since_seq, self._history_ttl_ms, since_seq]))
        self._members.setdefault(room, {})[member.clientId] = member
        recovered = None if int(complete) < 0 else bool(int(complete))
        return JoinResult(int(count), int(seq), _text(epoch), recovered, list(replay))

    async def history(self, room: str, limit: int) -> tuple[int, str, list[bytes]]:
        seq, epoch, messages = await self._call(self._history(
            keys=_room_keys(room), args=[0, 0, 0, 0, 0, 0, self._history_ttl_ms, -1]))
        return int(seq), _text(epoch), list(messages)[-limit:]

    async def leave(self, room: str, client_id: str) -> int:
        local = self._members.get(room)
        if local is not None:
            local.pop(client_id, None)
        left = await self._call(self._leave(keys=[_members_key(room)], args=[client_id]))
        return int(left)

    async def presence(self, room: str) -> list[MemberInfo]:
        assert self._redis is not None
        raw = await self._call(self._redis.hgetall(_members_key(room)))
        return [_member_decoder.decode(v) for v in raw.values()]

    def _session_record(self, member: MemberInfo, connected_at: float) -> bytes:
        return msgspec.json.encode({"userId": member.userId, "nodeId": self.node_id,
                                    "connectedAt": int(connected_at * 1000)})

    async def session_opened(self, member: MemberInfo, connected_at: float) -> None:
        assert self._redis is not None
        self._sessions[member.clientId] = (member, connected_at)
        await self._call(self._redis.set(f"session:{member.clientId}",
                                         self._session_record(member, connected_at),
                                         ex=_SESSION_TTL))

    async def session_closed(self, client_id: str) -> None:
        assert self._redis is not None
        self._sessions.pop(client_id, None)
        await self._call(self._redis.delete(f"session:{client_id}"))

    async def flush(self) -> None:
        """A barrier: a message published to a private channel after every earlier one."""
        # Replaced with the pipelined client's barrier.
        await asyncio.sleep(0.05)

    # ---- upkeep: liveness, session TTLs, sweeping dead nodes ---------------------------------

    async def _keep_alive(self) -> None:
        last_sessions = 0.0
        while True:
            await asyncio.sleep(self.sweep_interval)
            if self.state != "ok" or self._redis is None:
                continue
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.set(f"fastws:node:{self.node_id}", b"1", ex=self.node_ttl)
                pipe.sadd("fastws:nodes", self.node_id)
                if time.monotonic() - last_sessions > _SESSION_TTL / 3:
                    last_sessions = time.monotonic()
                    for client_id in self._sessions:
                        pipe.expire(f"session:{client_id}", _SESSION_TTL)
                await pipe.execute()
                await self.sweep()
            except (RedisError, OSError) as exc:
                self._went_down(exc)

    async def sweep(self) -> int:
        """Remove the presence of nodes that stopped refreshing; tell their rooms. Returns count."""
        assert self._redis is not None
        removed = 0
        for raw in await self._redis.smembers("fastws:nodes"):
            node = _text(raw)
            if node == self.node_id or await self._redis.exists(f"fastws:node:{node}"):
                continue
            # One sweeper per dead node, whichever node gets there first.
            if not await self._redis.set(f"fastws:sweep:{node}", b"1", nx=True, ex=30):
                continue
            removed += await self._sweep_node(node)
        return removed

    async def _sweep_node(self, node: str) -> int:
        from .. import protocol as p

        assert self._redis is not None
        removed = 0
        rooms_key = f"fastws:node:{node}:rooms"
        for raw_room in await self._redis.smembers(rooms_key):
            room = _text(raw_room)
            entries = await self._redis.hgetall(_members_key(room))
            gone = [m for m in (_member_decoder.decode(_raw(v)) for v in entries.values())
                    if m.node == node]
            for member in gone:
                left = await self._leave(keys=[_members_key(room)], args=[member.clientId])
                await self.publish(room, p.encode(p.UserLeft(
                    room, member.username, p.now_ms(), member.userId, int(left))))
                removed += 1
        await self._redis.delete(rooms_key)
        await self._redis.srem("fastws:nodes", node)
        log.info("swept dead node", extra={"event": "node_swept", "node": node,
                                           "connections": removed})
        return removed


class RedisRooms(RedisBroker):
    """Publish into rooms and read their presence and history without being a node (for
    ``fastws.Publisher.over_redis``): the nodes' own Lua script and keys, so every node with
    members in the room delivers the message and its history keeps it. It subscribes to
    nothing and registers nothing; each call either succeeds or raises ``BrokerUnavailable``.
    """

    name = "redis-rooms"

    async def start(self) -> None:
        self._open()
        self.state = "ok"  # redis-py reconnects on the next call by itself

    def _went_down(self, exc: BaseException) -> None:
        log.debug("redis call failed: %s", type(exc).__name__)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


class _Listener:
    """One pub/sub connection and its reader task (one per shard primary on a cluster)."""

    def __init__(self, broker: RedisBroker, client: Any, sharded: bool) -> None:
        self.broker = broker
        self.client = client
        self.sharded = sharded
        self.pubsub = client.pubsub()
        self.task: asyncio.Task[None] | None = None

    async def subscribe(self, *channels: bytes) -> None:
        if self.sharded:
            await self.pubsub.ssubscribe(*channels)
        else:
            await self.pubsub.subscribe(*channels)
        if self.task is None:
            # Reading starts after the first subscription: redis-py needs one to read at all.
            self.task = asyncio.get_running_loop().create_task(self._read())

    async def unsubscribe(self, channel: bytes) -> None:
        if self.sharded:
            await self.pubsub.sunsubscribe(channel)
        else:
            await self.pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        message_type = b"smessage" if self.sharded else b"message"
        subscribe_type = b"ssubscribe" if self.sharded else b"subscribe"
        try:
            while True:
                msg = await self.pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
                if msg is None:
                    continue
                kind = _raw(msg["type"])
                if kind == message_type:
                    self.broker.on_message(_raw(msg["channel"]), msg["data"])
                elif kind == subscribe_type:
                    self.broker.on_subscribed(_raw(msg["channel"]))
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            self.broker._went_down(exc)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        with contextlib.suppress(RedisError, OSError):
            await self.pubsub.aclose()
        if self.client is not self.broker._redis:
            with contextlib.suppress(RedisError, OSError):
                await self.client.aclose()
