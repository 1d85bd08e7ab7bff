"""Redis broker: rooms span hosts through Redis pub/sub; seq and presence live in Redis.

It speaks to Redis through ``resp`` (our own pipelined client; its docstring says why not
redis-py): every command this node issues in one loop turn leaves in one write on one
connection per server, and every publication read from Redis in one read is delivered in
that same loop turn, so the hub's corking survives the broker. Keys (room names are
hash-tagged so a room's keys share a slot):

    fastws:{room}:seq        INCR counter; allocation and PUBLISH happen in one Lua script
    fastws:{room}:epoch      the name of the room's current run of seqs, and its lease
    fastws:{room}:history    "seq:unix_ms:payload", newest first
    fastws:{room}:members    hash clientId -> MemberInfo (msgpack)
    fastws:{room}:nodes      hash node id -> its members in the room
    fastws:{room}            the pub/sub channel; a message is ``exclude \\n seq \\n payload``

``{room}`` is the room's hash tag: the name itself, or ``~`` and its UTF-8 in hex when the name
holds ``{`` or ``}`` (which would end the tag early and scatter the room's keys over slots) or
starts with ``~`` (so the mapping stays one-to-one): see ``room_tag``.
    session:<clientId>       the seed's session record: userId, nodeId, connectedAt (TTL, refreshed)
    fastws:node:<id>         this node is alive (TTL, refreshed); holds its incarnation
    fastws:node:<id>:rooms   rooms this node has members in, so a dead node can be swept
    fastws:nodes             every node id seen
    fastws:sweep:<id>        a sweeper's claim on a dead node (deleted when it is done)
    fastws:swept:<id>        the node was swept (its rooms were told user_left): if it was
                             only paused, it re-joins its members with user_joined
    fastws:flush:{tag}:<id>  this node's private channel for ``flush`` (one per shard), and
                             for other nodes' ``revoke:<room>``

Room leases (one Redis server; the rules are in ``redisscripts``): a room whose members are
all on this node is leased to it at a join. The node then sequences the room's chats itself
and sends their history entries in one ``record`` call per loop turn, delivering each chat
when Redis has it: no INCR, PUBLISH or pub/sub read per chat. A node that joins the room, or
publishes to it, asks the holder to let go (``revoke``) and waits for it; the holder settles
the room behind its last record, holding its own chats until then, so every member sees the
room's seqs in order across the handover.

If Redis goes away the node keeps its clients: calls raise ``BrokerUnavailable`` (the client
gets an ``unavailable`` error, never a false success, and the cause is logged, at most once a
second per cause), ``health()`` says down, and a monitor reconnects with backoff, then
resubscribes and re-registers everything this node holds. When Redis is merely slow, commands
queue up to a bound and the node stops reading its clients (``pressure``) until they drain.

Presence converges (``_reconcile``, after every connect and whenever the node finds its
liveness key had expired, e.g. after a pause longer than ``node_ttl``): members this node
holds that Redis lacks are put back, silently after an outage (the rooms never heard them
leave) or with one ``user_joined`` each if a sweeper had announced them gone; entries Redis
has for this node that it no longer holds (a leave lost in an outage) leave, with
``user_left``. A sweeper claims a dead node, checks it is still dead, and releases the claim
when done; a returning node waits for the claim before restoring, so the two never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import time
from collections import Counter
from typing import Any, NamedTuple

import msgspec

from ..errors import BrokerUnavailable
from .rediscluster import ClusterServers
from .redisscripts import SCRIPTS
from .resp import ConnectionLost, ReplyError, RespError, Servers, parse_url
from .types import (
    CHAT_TAIL,
    Deliver,
    HistoryPolicy,
    JoinResult,
    LeasedChat,
    LeaveResult,
    MemberInfo,
    Pressure,
    SeqDone,
    deliver_sequenced,
    new_epoch,
)

log = logging.getLogger("fastws.broker.redis")


_STATE_TTL = 7 * 86400  # without a history ttl, a room's seq and epoch outlive a week of silence
_SESSION_TTL = 60  # the seed's session records, refreshed every _SESSION_TTL / 3
_QUEUE_LIMIT = 10_000  # commands waiting on one connection before the node is paused
_BATCH_LIMIT = 512  # chats in one script call: bounds the time Redis spends in one call
_RECORDS = "records"  # the group of a pipe's open _RecordBatch (its _SeqBatch has None)
_TAKE_PAUSE = 0.005  # after asking a lease's holder for its room, before trying again
_member_encoder = msgspec.msgpack.Encoder()
_member_decoder = msgspec.msgpack.Decoder(MemberInfo)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def room_tag(room: str) -> bytes:
    """The room's Redis hash tag: one slot for all its keys and its channel, any name."""
    raw = room.encode()
    if b"{" in raw or b"}" in raw or raw.startswith(b"~"):
        return b"~" + raw.hex().encode()
    return raw


def tag_room(tag: bytes) -> str:
    """``room_tag`` undone; ValueError (UnicodeDecodeError included) for a tag it never made."""
    if tag.startswith(b"~"):
        return bytes.fromhex(tag[1:].decode()).decode()
    if b"{" in tag or b"}" in tag:
        raise ValueError("not a room tag")
    return tag.decode()


class _RoomKeys(NamedTuple):
    seq: bytes
    epoch: bytes
    members: bytes
    history: bytes
    channel: bytes
    script: tuple[bytes, bytes, bytes, bytes]  # a message's KEYS in _PUBLISH_SEQS
    presence: bytes  # the presence version (types.JoinResult.version)
    nodes: bytes  # hash node -> its members in the room (a lease needs one node)
    lingering: bytes  # hash userId -> "clientId node" of its connection in the presence grace


@functools.lru_cache(maxsize=65536)
def _room_keys(room: str) -> _RoomKeys:
    tag = b"fastws:{" + room_tag(room) + b"}"
    seq, epoch, history = tag + b":seq", tag + b":epoch", tag + b":history"
    return _RoomKeys(
        seq,
        epoch,
        tag + b":members",
        history,
        tag,
        (seq, epoch, history, tag),
        tag + b":presence",
        tag + b":nodes",
        tag + b":lingering",
    )


class _SeqBatch:
    """The chats of one loop turn for one server (one slot on a cluster): ONE call of
    _PUBLISH_SEQS carrying every message's keys and args, in the order of the calls (so a
    room's seqs are in that order), answered with every seq. Built by
    ``RedisBroker._send_publish_seq``, closed (sent) by ``resp.Pipe`` at the end of the turn
    or before another command on the same connection. A failure is the batch's: NOSCRIPT is
    retried once with EVAL, any other error answers every message ``done(0)``."""

    __slots__ = ("args", "broker", "dones", "full", "key", "keys", "sent", "servers")
    held = False

    def __init__(self, broker: RedisBroker, servers: Servers, key: bytes) -> None:
        self.broker = broker
        self.servers = servers  # the connections it was made for, even if replaced since
        self.key = key  # any of its keys: they share a slot
        self.keys: list[bytes] = []
        self.args: list[Any] = []
        self.dones: list[SeqDone] = []
        self.full = False
        self.sent: tuple[Any, ...] = ()

    def close(self) -> None:
        broker = self.broker
        # Redis' clock: this node's plus the offset measured at connect (see _clock_offset).
        deadline = int((time.time() + broker.timeout * 0.8) * 1000) + broker._clock_offset_ms
        self.sent = (
            b"EVALSHA",
            SCRIPTS["publish_seqs"].sha,
            len(self.keys),
            *self.keys,
            new_epoch(),
            broker._state_ttl_arg,
            broker._publish_cmd,
            deadline,
            broker._me,
            *self.args,
        )
        self.servers.send(self.key, self.sent, self)

    def __call__(self, reply: Any) -> None:
        if type(reply) is list and len(reply) == len(self.dones):
            for i, (done, seq) in enumerate(zip(self.dones, reply, strict=True)):
                try:
                    if type(seq) is int:
                        done(seq)
                    else:  # the room is leased: its holder ("node incarnation") sequences it
                        self.broker._leased(
                            tag_room(self.keys[i * 4 + 3][8:-1]), self.args[i * 2], done, seq
                        )
                except Exception:  # one caller's bug must not cost the others their answer
                    log.exception("publish_seq callback failed")
            return
        sent = self.sent
        if (
            sent[0] == b"EVALSHA"
            and type(reply) is ReplyError
            and str(reply).startswith("NOSCRIPT")
        ):
            # A SCRIPT FLUSH or a failover lost it: EVAL loads it again.
            self.sent = (b"EVAL", SCRIPTS["publish_seqs"].source, *sent[2:])
            self.servers.send(self.key, self.sent, self)
            return
        refused = self.broker._refused
        if reply == b"expired":
            reply = RespError("redis ran the chats past their deadline: none applied")
        refused(reply if isinstance(reply, RespError) else RespError(f"bad reply {reply!r:.80}"))
        refused.total += len(self.dones) - 1  # every message was refused; one cause logged
        for done in self.dones:
            try:
                done(0)
            except Exception:
                log.exception("publish_seq callback failed")


class _RecordBatch:
    """A lease holder's chats for its server: ONE call of ``record`` with every chat's
    history entry; once Redis answers "ok", each chat is delivered here and answered, in order
    (so nothing is delivered that Redis does not have). Any other answer is the batch's: every
    chat gets ``done(0)`` and the node's leases are dropped (see
    ``RedisBroker._records_failed``). One call is in flight at a time: the chats of the turns
    until it is answered wait in the next one (``held``), so a busy node makes few large calls
    (Redis and this node pay per call about what 10-20 chats cost) for one Redis round trip
    of added latency at most."""

    __slots__ = (
        "args",
        "broker",
        "full",
        "inc",
        "keys",
        "next_inc",
        "now",
        "out",
        "sent",
        "servers",
    )

    def __init__(self, broker: RedisBroker, servers: Servers, key: bytes) -> None:
        self.broker = broker
        self.servers = servers
        self.inc = broker._inc
        self.next_inc = broker._next_inc
        self.keys: list[bytes] = [broker._alive_key]
        self.args: list[bytes] = []
        self.out: list[LeasedChat] = []
        # Entries carry Redis' clock (this node's plus the offset measured at connect).
        self.now = b":%d:" % (int(time.time() * 1000) + broker._clock_offset_ms)
        self.full = False
        self.sent: tuple[Any, ...] = ()

    @property
    def held(self) -> bool:
        return self.broker._records_in_flight > 0 and not self.full

    def close(self) -> None:
        broker = self.broker
        deadline = int((time.time() + broker.timeout * 0.8) * 1000) + broker._clock_offset_ms
        self.sent = (
            b"EVALSHA",
            SCRIPTS["record"].sha,
            len(self.keys),
            *self.keys,
            self.inc,
            self.next_inc,
            deadline,
            *self.args,
        )
        broker.record_calls += 1
        broker._records_in_flight += 1
        self.servers.send(self.keys[0], self.sent, self)

    def __call__(self, reply: Any) -> None:
        broker = self.broker
        sent = self.sent
        if (
            sent[0] == b"EVALSHA"
            and type(reply) is ReplyError
            and str(reply).startswith("NOSCRIPT")
        ):
            self.sent = (b"EVAL", SCRIPTS["record"].source, *sent[2:])  # still in flight
            self.servers.send(self.keys[0], self.sent, self)
            return
        broker._records_in_flight -= 1
        if not broker._records_in_flight and self.servers is broker._servers:
            self.servers.close_batch(self.keys[0], _RECORDS)  # the held one goes now
        if reply != b"ok":
            broker._records_failed(self, reply)
            return
        assert broker._deliver is not None
        deliver_sequenced(broker._deliver, self.out, log)


class _Refusals:
    """Why calls were refused: each ``unavailable`` a client sees has a logged cause, logged
    at most once a second per cause with the count of the ones not logged."""

    def __init__(self) -> None:
        self.total = 0
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, cause: object) -> BrokerUnavailable:
        self.total += 1
        reason = str(cause) or type(cause).__name__
        key = reason.split(":")[0][:60]
        now = time.monotonic()
        last, unlogged = self._last.get(key, (0.0, 0))
        if now - last >= 1.0:
            log.warning(
                "redis call refused (unavailable): %s%s",
                reason,
                f" (and {unlogged} more since)" if unlogged else "",
                extra={"event": "broker_refused", "cause": key},
            )
            self._last[key] = (now, 0)
        else:
            self._last[key] = (last, unlogged + 1)
        return BrokerUnavailable()


class RedisBroker:
    name = "redis"
    inline = False
    _listens = True  # a node subscribes and registers itself; RedisRooms does neither

    def __init__(
        self,
        url: str,
        timeout: float = 2.0,
        node_ttl: float = 15.0,
        cluster: bool = False,
        policy: HistoryPolicy | None = None,
        queue_limit: int = _QUEUE_LIMIT,
        leases: bool = True,
    ) -> None:
        self.url = url
        self.endpoint = parse_url(url)
        self.cluster = cluster
        self.policy = policy or HistoryPolicy()
        ttl = self.policy.ttl
        self._state_ttl = max(1, int(ttl) + 1) if ttl else _STATE_TTL
        self._history_ttl_ms = int(ttl * 1000)
        self._state_ttl_arg = b"%d" % self._state_ttl  # packed as given: no int -> str per call
        self._last_index = b"%d" % (self.policy.size - 1)
        self.timeout = timeout
        self.queue_limit = queue_limit
        self.node_ttl = max(1, int(node_ttl))
        self.sweep_interval = node_ttl / 3
        self._deliver: Deliver | None = None
        self._pressure: Pressure | None = None
        self.node_id = ""
        self._servers: Servers | None = None
        self._publish_cmd = b"SPUBLISH" if cluster else b"PUBLISH"
        self._monitor: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._rooms: set[str] = set()  # rooms subscribed here
        self._members: dict[str, dict[str, MemberInfo]] = {}  # local presence, to re-register
        self._sessions: dict[str, tuple[MemberInfo, float]] = {}
        self._flush_channels: set[bytes] = set()
        self._flushes: dict[bytes, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.state = "down"
        self.outages = 0
        self.dropped = 0  # pub/sub messages that did not parse
        self.reconciled = 0  # presence entries put back or removed by _reconcile
        self._upkeep_error = ""  # why the last upkeep round failed ("" = it did not)
        self._joining: set[tuple[str, str]] = set()  # (room, clientId) with a join in flight
        self._leaving: set[tuple[str, str]] = set()
        self._refused = _Refusals()
        self._closing = False
        self._clock_offset_ms = 0  # Redis' clock minus this node's, in ms (the largest shard's)
        # Room leases (see redisscripts): one Redis server only, and only for a node.
        self.leases = leases and not cluster and self._listens
        self._inc = b""  # this node's incarnation: the value of its liveness key
        self._next_inc = new_epoch().encode()  # the one it moves to if that one ends
        self._me = b""  # b"node incarnation", as a lease names its holder
        self._alive_key = b""
        self._leases: dict[str, list[Any]] = {}  # room -> [last seq, epoch bytes, refreshed]
        # Chats of a room held while its lease changes hands: (head, done), sent after.
        self._held: dict[str, list[tuple[bytes, SeqDone]]] = {}
        # Chats for a room another node leases, waiting for it to let go: (head, done, until).
        self._waiting: dict[str, list[tuple[bytes, SeqDone, float]]] = {}
        self._joins_in_flight: Counter[str] = Counter()  # room -> joins not answered yet
        self._revoked_early: set[str] = set()  # revoked while a join was on its way
        self.leased = 0  # chats sequenced here under a lease
        self.record_calls = 0  # calls of ``record`` that carried them
        self._records_in_flight = 0
        self.handovers = 0  # leases given back because another node asked

    # ---- lifecycle ------------------------------------------------------------------------

    def attach(self, node_id: str, deliver: Deliver, pressure: Pressure | None = None) -> None:
        self.node_id = node_id
        self._alive_key = b"fastws:node:" + node_id.encode()
        self._deliver = deliver
        self._pressure = pressure

    async def start(self) -> None:
        try:
            await self._connect()
        except (RespError, OSError) as exc:
            # Serve anyway: local clients still work, and the monitor keeps trying.
            self._went_down(exc)
        self._keeper = asyncio.get_running_loop().create_task(self._keep_alive())

    async def close(self) -> None:
        self._closing = True
        for task in (self._keeper, self._monitor, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._servers is not None and self.state == "ok" and self._listens:
            key = b"fastws:node:" + self.node_id.encode()
            with contextlib.suppress(RespError, asyncio.TimeoutError):
                await asyncio.wait_for(self._servers.call(key, b"DEL", key), 1.0)
        if self._servers is not None:
            self._servers.close()
        self.state = "down"

    def health(self) -> dict[str, Any]:
        servers = self._servers
        # Upkeep failing (liveness not refreshed) is degraded even while commands work.
        state = "degraded" if self.state == "ok" and self._upkeep_error else self.state
        return {
            "name": self.name,
            "state": state,
            "outages": self.outages,
            "rooms": len(self._rooms),
            "dropped": self.dropped,
            "reconciled": self.reconciled,
            "leases": len(self._leases),
            "leased": self.leased,
            "record_calls": self.record_calls,
            "handovers": self.handovers,
            **({"upkeep_error": self._upkeep_error} if self._upkeep_error else {}),
            "refused": self._refused.total,
            "waiting": servers.waiting if servers is not None else 0,
        }

    def _new_servers(self) -> Servers:
        kind = ClusterServers if self.cluster else Servers
        return kind(
            self.endpoint,
            timeout=self.timeout,
            limit=self.queue_limit,
            on_message=self.on_message,
            on_lost=self._lost,
            pressure=self._pressure_changed,
            on_dropped=self._dropped,
        )

    async def _connect(self) -> None:
        """(Re)connect, then resubscribe and re-register everything this node holds."""
        servers = self._new_servers()
        try:
            await servers.connect(listen=self._listens)
            for script in SCRIPTS.values():
                await servers.call_all(b"SCRIPT", b"LOAD", script.source)
            self._clock_offset_ms = await _clock_offset(servers)
            if self._listens:
                await self._register(servers)
        except BaseException:
            servers.close()
            raise
        old, self._servers = self._servers, servers
        if old is not None:
            old.close()
        if self.state != "ok":
            log.info("redis connected", extra={"event": "broker_up", "url": self._safe_url()})
        self.state = "ok"
        if self._listens:
            self._spawn(self._reconcile_quietly())

    async def _register(self, servers: Servers) -> None:
        node = self.node_id.encode()
        self._flush_channels = set()
        waits: list[Any] = []
        for listener in servers.listeners.values():
            channel = b"fastws:flush:{%b}:%b" % (servers.hash_tag_for(listener), node)
            self._flush_channels.add(channel)
            waits.append(listener.subscribe(channel))
        waits += [
            servers.listener_for(_room_keys(room).channel).subscribe(_room_keys(room).channel)
            for room in self._rooms
        ]
        rooms_key = b"fastws:node:%b:rooms" % node
        for room in self._members:  # the members themselves: _reconcile, once connected
            waits.append(servers.call(rooms_key, b"SADD", rooms_key, room))
        for client_id, (member, connected_at) in self._sessions.items():
            key = f"session:{client_id}".encode()
            waits.append(
                servers.call(
                    key,
                    b"SET",
                    key,
                    self._session_record(member, connected_at),
                    b"EX",
                    _SESSION_TTL,
                )
            )
        waits.append(self._announce(servers, fresh=True))
        await asyncio.gather(*waits)  # one write per connection: they were all issued together

    async def _announce(self, servers: Servers, fresh: bool = False) -> bool:
        """Refresh this node's liveness; False if its incarnation had ended (the key expired,
        so it was presumed dead; or a node found it gone): it has moved to the next one, and
        its leases are over. ``fresh`` (a connect): a new incarnation, whatever was before."""
        key = self._alive_key
        if fresh:
            self._adopt(new_epoch().encode())
            renew = servers.call(key, b"SET", key, self._inc, b"EX", self.node_ttl)
        else:
            renew = self._eval(servers, "renew", (key,), self._inc, self._next_inc, self.node_ttl)
        inc, following = self._inc, self._next_inc
        live, _ = await asyncio.gather(
            renew, servers.call(b"fastws:nodes", b"SADD", b"fastws:nodes", self.node_id)
        )
        if fresh:
            return True
        if not live and self._inc == inc:
            self._adopt(following)
        return bool(live)

    def _adopt(self, inc: bytes) -> None:
        """This node's incarnation is ``inc`` from now on: the leases of the one before are
        over (whoever uses those rooms next settles them, see redisscripts)."""
        self._inc, self._next_inc = inc, new_epoch().encode()
        self._me = b"%b %b" % (self.node_id.encode(), inc)
        if self._leases:
            log.info(
                "room leases dropped: this node's incarnation ended",
                extra={"event": "leases_dropped", "rooms": len(self._leases)},
            )
            self._leases.clear()

    def _safe_url(self) -> str:
        return self.url.split("@")[-1]  # never log a password

    def _lost(self, exc: BaseException | None) -> None:
        """A connection of the current servers died: everything is reconnected."""
        self._went_down(exc or ConnectionLost("connection closed"))

    def _went_down(self, exc: BaseException) -> None:
        if self._closing:
            return
        if self.state != "down" or self._monitor is None:
            self.outages += 1
            log.warning(
                "redis unavailable: %s",
                exc or type(exc).__name__,
                extra={"event": "broker_down", "url": self._safe_url()},
            )
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
            except (RespError, OSError, asyncio.TimeoutError) as exc:
                log.debug("redis reconnect failed: %s", exc)
                delay = min(delay * 2, 2.0)
            except Exception as exc:  # a bug, or data that breaks it: keep trying, loudly
                log.exception("redis reconnect failed", extra={"event": "broker_upkeep_error"})
                self._upkeep_error = f"reconnect: {type(exc).__name__}: {exc}"[:200]
                delay = min(delay * 2, 2.0)

    def _pressure_changed(self, paused: bool) -> None:
        if self._pressure is not None:
            self._pressure(paused)

    # ---- the subscription -----------------------------------------------------------------

    def on_message(self, channel: bytes, data: bytes) -> None:
        """One pub/sub message, called for every message of a read within that read."""
        if channel.startswith(b"fastws:{"):
            # "exclude \n seq \n payload"; channel is fastws:{room}. Untrusted: parse, or drop.
            exclude, _, rest = data.partition(b"\n")
            seq, sep, payload = rest.partition(b"\n")
            try:
                if not sep or payload[:1] != b"{" or payload[-1:] != b"}":
                    raise ValueError("not exclude\\nseq\\n{payload}")
                room, number, client = tag_room(channel[8:-1]), int(seq), exclude.decode()
            except (ValueError, UnicodeDecodeError) as exc:
                self._drop(channel, exc)
                return
            assert self._deliver is not None
            self._deliver(room, client, payload, number)
        elif channel in self._flush_channels:
            if data.startswith(b"revoke:"):  # another node asks for a room leased here
                try:
                    room = data[7:].decode()
                except UnicodeDecodeError as exc:
                    self._drop(channel, exc)
                    return
                self._revoked(room)
                return
            future = self._flushes.pop(data, None)
            if future is not None and not future.done():
                future.set_result(None)
        else:
            self._drop(channel, ValueError("unknown channel"))

    def _drop(self, channel: bytes, exc: Exception) -> None:
        self.dropped += 1
        if self.dropped & (self.dropped - 1) == 0:  # the 1st, 2nd, 4th, 8th...: rate-limited
            log.warning(
                "dropped an unparsable pub/sub message on %.80r: %s (%d dropped)",
                channel,
                exc,
                self.dropped,
                extra={"event": "broker_dropped"},
            )

    def _dropped(self, channel: bytes) -> None:
        """Redis unsubscribed us (a shard's slot moved): subscribe where it lives now."""
        try:
            room = tag_room(channel[8:-1])
        except ValueError:
            return
        if room in self._rooms:
            self._spawn(self._resubscribe(room))

    async def _resubscribe(self, room: str) -> None:
        servers = self._servers
        if isinstance(servers, ClusterServers):
            servers.refresh()
            await asyncio.sleep(0.1)
        with contextlib.suppress(BrokerUnavailable):
            if room in self._rooms:
                await self.subscribe(room)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def subscribe(self, room: str) -> None:
        servers = self._servers
        if self.state != "ok" or servers is None:
            raise self._refused("redis is down")
        self._rooms.add(room)
        channel = _room_keys(room).channel
        rooms_key = b"fastws:node:%b:rooms" % self.node_id.encode()
        # Sent now, so that it and a later SREM of the same room leave in the order called.
        servers.send(rooms_key, (b"SADD", rooms_key, room), self._checked)
        try:
            for attempt in range(3):
                try:
                    await servers.listener_for(channel).subscribe(channel)
                    return
                except ReplyError as exc:
                    # MOVED on a cluster: the shard changed; reload the map and try again.
                    if not isinstance(servers, ClusterServers) or attempt == 2:
                        raise
                    servers.refresh()
                    await asyncio.sleep(0.05 * (attempt + 1))
                    log.debug("resubscribing %s after %s", room, exc)
        except RespError as exc:
            self._rooms.discard(room)
            raise self._refused(exc) from None

    async def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)
        self._members.pop(room, None)
        servers = self._servers
        if self.state != "ok" or servers is None:
            return
        if self._leases.pop(room, None) is not None:
            self._settle(room, None)  # its last member here left: the lease goes back
        channel = _room_keys(room).channel
        servers.listener_for(channel).unsubscribe(channel)
        rooms_key = b"fastws:node:%b:rooms" % self.node_id.encode()
        servers.send(rooms_key, (b"SREM", rooms_key, room), self._checked)

    def _checked(self, reply: Any) -> None:
        """A fire-and-forget command's reply: failures are logged (and seen by the monitor)."""
        if isinstance(reply, RespError):
            log.debug("redis command failed: %s", reply)

    # ---- commands -------------------------------------------------------------------------

    async def _call(self, key: bytes, *args: Any) -> Any:
        servers = self._servers
        if self.state != "ok" or servers is None:
            raise self._refused("redis is down")
        try:
            return await servers.call(key, *args)
        except RespError as exc:
            raise self._refused(exc) from None

    async def _script(self, name: str, keys: tuple[bytes, ...], *args: Any) -> Any:
        servers = self._servers
        if self.state != "ok" or servers is None:
            raise self._refused("redis is down")
        try:
            return await self._eval(servers, name, keys, *args)
        except RespError as exc:
            raise self._refused(exc) from None

    @staticmethod
    async def _eval(servers: Servers, name: str, keys: tuple[bytes, ...], *args: Any) -> Any:
        script = SCRIPTS[name]
        try:
            return await servers.call(keys[0], b"EVALSHA", script.sha, len(keys), *keys, *args)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # A SCRIPT FLUSH or a failover lost it: EVAL loads it again.
        return await servers.call(keys[0], b"EVAL", script.source, len(keys), *keys, *args)

    def _send_script(
        self, name: str, keys: tuple[bytes, ...], args: tuple[Any, ...], callback: Any
    ) -> None:
        """A script whose reply is handled in the read that brings it (``callback(reply)``,
        before anything after it on the connection): NOSCRIPT is retried once with EVAL."""
        servers = self._servers
        if self.state != "ok" or servers is None:
            callback(ConnectionLost("redis is down"))
            return
        script = SCRIPTS[name]

        def answered(reply: Any) -> None:
            if type(reply) is ReplyError and str(reply).startswith("NOSCRIPT"):
                servers.send(keys[0], (b"EVAL", script.source, len(keys), *keys, *args), callback)
            else:
                callback(reply)

        servers.send(keys[0], (b"EVALSHA", script.sha, len(keys), *keys, *args), answered)

    async def publish(self, room: str, payload: bytes, exclude: str = "", seq: int = 0) -> None:
        channel = _room_keys(room).channel
        await self._call(
            channel, self._publish_cmd, channel, b"%b\n%d\n%b" % (exclude.encode(), seq, payload)
        )

    async def publish_seq(self, room: str, head: bytes) -> int:
        future = asyncio.get_running_loop().create_future()
        self._send_publish_seq(room, head, future.set_result)
        seq = await future
        if not seq:
            raise BrokerUnavailable()
        return int(seq)

    def publish_seq_nowait(self, room: str, head: bytes, done: SeqDone | None) -> None:
        assert done is not None  # not inline: the answer always comes later
        self._send_publish_seq(room, head, done)

    def _send_publish_seq(self, room: str, head: bytes, done: SeqDone) -> None:
        """The hot path: the chat joins this turn's one script call for its server (slot on a
        cluster); ``done`` is called from that call's reply."""
        servers = self._servers
        if self.state != "ok" or servers is None:
            self._refused("redis is down")
            done(0)
            return
        keys = _room_keys(room)
        lease = self._leases.get(room)
        if lease is not None:  # sequenced here; delivered once Redis has its history entry
            seq = lease[0] = lease[0] + 1
            payload = CHAT_TAIL % (head, seq, lease[1])  # types.chat_payload without a call
            records = servers.batch(keys.channel, self._new_records, _RECORDS)
            last = self._history_last(room)
            if last == b"-1":
                records.keys.append(keys.seq)
                records.args += (b"%d" % seq, last)
            else:
                records.keys.append(keys.history)
                records.args += (b"%d%b%b" % (seq, records.now, payload), last)
            out = records.out
            out.append((room, payload, seq, done))
            records.full = len(out) >= _BATCH_LIMIT
            self.leased += 1
            return
        held = self._held.get(room)
        if held is not None:
            held.append((head, done))
            return
        batch = servers.batch(keys.channel, self._new_batch)
        batch.keys += keys.script
        batch.args += (head, self._history_last(room))
        dones = batch.dones
        dones.append(done)
        batch.full = len(dones) >= _BATCH_LIMIT

    def _new_batch(self, servers: Servers, key: bytes) -> _SeqBatch:
        return _SeqBatch(self, servers, key)

    def _new_records(self, servers: Servers, key: bytes) -> _RecordBatch:
        return _RecordBatch(self, servers, key)

    # ---- room leases (see redisscripts) ------------------------------------------------------

    def _joined(self, room: str, me: bytes, reply: Any) -> None:
        """A join's reply, in the read that brought it: a room leased to this node (to this
        incarnation: ``me``) is sequenced here from now on, once every publication made before
        the lease was delivered (a flush); its chats wait until then. A revoke that came while
        the join was on its way wins: the lease goes straight back."""
        granted = self.leases and type(reply) is list and len(reply) == 8 and reply[6] == 1
        if room in self._revoked_early:
            if not self._joins_in_flight[room]:
                self._revoked_early.discard(room)
            if granted and room not in self._leases:
                self._settle(room, None)
            return
        if (
            granted
            and me == self._me
            and room not in self._leases
            and room not in self._held
            and room in self._rooms
        ):
            self._leases[room] = [int(reply[1]), bytes(reply[2]), time.monotonic()]
            held = self._held[room] = []
            self._spawn(self._acquired(room, held))

    async def _acquired(self, room: str, held: list[tuple[bytes, SeqDone]]) -> None:
        try:
            await self.flush()
        finally:
            self._release(room, held)

    def _release(self, room: str, held: list[tuple[bytes, SeqDone]] | None) -> None:
        """The chats held for ``room`` go where the room is now (leased here, or not)."""
        if held is None or self._held.get(room) is not held:
            return
        del self._held[room]
        for head, done in held:
            self._send_publish_seq(room, head, done)

    def _leased(self, room: str, head: bytes, done: SeqDone, holder: bytes) -> None:
        """A chat refused by Redis because ``holder`` leases its room."""
        if room in self._leases or room in self._held:
            self._send_publish_seq(room, head, done)  # ours since it was sent: sequence it
            return
        if holder == self._me:  # ours in Redis, given up here: settle it, then go on
            self._settle(room, None)
            self._send_publish_seq(room, head, done)
            return
        waiting = self._waiting.get(room)
        if waiting is None:
            waiting = self._waiting[room] = []
            self._spawn(self._take(room, holder, waiting))
        waiting.append((head, done, time.monotonic() + self.node_ttl + self.timeout))

    async def _take(
        self, room: str, holder: bytes, waiting: list[tuple[bytes, SeqDone, float]]
    ) -> None:
        """Ask ``holder`` for ``room``, then send the chats that waited for it (again)."""
        try:
            await self._revoke(room, holder)
            await asyncio.sleep(_TAKE_PAUSE)
        finally:
            if self._waiting.get(room) is waiting:
                del self._waiting[room]
            now = time.monotonic()
            for head, done, until in waiting:
                if now > until:
                    self._refused(
                        f"room {room!r} is leased by {holder.decode(errors='replace')}"
                        ", which does not let go"
                    )
                    done(0)
                else:
                    self._send_publish_seq(room, head, done)

    async def _revoke(self, room: str, holder: bytes) -> None:
        node, _, inc = holder.rpartition(b" ")
        with contextlib.suppress(BrokerUnavailable):
            await self._script(
                "revoke",
                (b"fastws:node:" + node,),
                b"fastws:flush:{0}:" + node,
                b"revoke:" + room.encode(),
                inc,
            )

    def _revoked(self, room: str) -> None:
        """Another node wants ``room``: its lease goes back behind this node's last
        records, and its chats wait for that (so none is delivered out of seq order)."""
        lease = self._leases.pop(room, None)
        held = self._held.get(room)
        if lease is None and self._joins_in_flight[room]:
            self._revoked_early.add(room)  # a join's reply may yet bring the lease: see _joined
        if lease is not None:
            self.handovers += 1
            if held is None:
                held = self._held[room] = []
        self._settle(room, held)

    def _settle(self, room: str, held: list[tuple[bytes, SeqDone]] | None) -> None:
        keys = _room_keys(room)
        self._send_script(
            "settle",
            (keys.seq, keys.epoch, keys.history),
            (self._me, self._state_ttl_arg),
            lambda reply: self._settled(room, held, reply),
        )

    def _settled(self, room: str, held: list[tuple[bytes, SeqDone]] | None, reply: Any) -> None:
        if isinstance(reply, RespError):
            log.debug("redis settle failed: %s", reply)  # the lease ends with the incarnation
        self._release(room, held)

    def _records_failed(self, batch: _RecordBatch, reply: Any) -> None:
        """A lease holder's records were not applied: each chat is refused, and this node's
        leases are over -- after \"expired\" the script moved it to its next incarnation,
        after \"fenced\" its incarnation had ended (a pause past node_ttl), after an error
        it cannot know which of its records landed."""
        if reply == b"expired":
            cause: Any = RespError("redis ran the chats past their deadline: none applied")
            if self._inc == batch.inc:
                self._adopt(batch.next_inc)
        elif reply == b"fenced":
            cause = RespError("this node's incarnation ended (paused past node_ttl?): none applied")
            if self._inc == batch.inc:
                self._leases.clear()
                self._spawn(self._renew_now())
        else:
            cause = reply if isinstance(reply, RespError) else RespError(f"bad reply {reply!r:.80}")
            if self._inc == batch.inc:
                self._leases.clear()
        self._refused(cause)
        self._refused.total += len(batch.out) - 1
        for _room, _payload, _seq, done in batch.out:
            try:
                done(0)
            except Exception:
                log.exception("publish_seq callback failed")

    async def _renew_now(self) -> None:
        servers = self._servers
        if servers is not None and self.state == "ok":
            with contextlib.suppress(RespError):
                await self._announce(servers)

    def _history_last(self, room: str) -> bytes:
        """The last index of ``room``'s history list (size - 1; b"-1" keeps none), as bytes."""
        if not self.policy.off:
            return self._last_index
        return b"%d" % (self.policy.size_for(room) - 1)

    async def join(
        self, room: str, member: MemberInfo, since: tuple[int, str] | None = None
    ) -> JoinResult:
        since_seq, since_epoch = since if since is not None else (-1, "")
        keys = _room_keys(room)
        pending = (room, member.clientId)
        args = (
            member.clientId,
            _member_encoder.encode(member),
            new_epoch(),
            self._state_ttl,
            since_epoch,
            since_seq,
            self._history_ttl_ms,
            since_seq,
            self._history_last(room),
            self._me,
            member.node or self.node_id,
            b"1" if self.leases else b"0",
            member.userId,
        )
        until = time.monotonic() + self.node_ttl + self.timeout
        self._joining.add(pending)  # _reconcile leaves it alone while in flight
        try:
            while True:
                reply = await self._join_script(
                    room, (*keys[:4], keys.presence, keys.nodes, keys.lingering), args
                )
                if reply[0] != b"leased":
                    break
                # Another node leases the room: ask it to let go, and try again.
                if time.monotonic() > until:
                    raise self._refused(
                        f"room {room!r} is leased by "
                        f"{reply[1].decode(errors='replace')}, which does "
                        "not let go"
                    )
                await self._revoke(room, reply[1])
                await asyncio.sleep(_TAKE_PAUSE)
        finally:
            self._joining.discard(pending)
        count, seq, epoch, complete, replay, version, _leased, resumed = reply
        self._members.setdefault(room, {})[member.clientId] = member
        recovered = None if int(complete) < 0 else bool(int(complete))
        return JoinResult(
            int(count), int(seq), _text(epoch), recovered, list(replay), int(version), bool(resumed)
        )

    async def _join_script(self, room: str, keys: tuple[bytes, ...], args: tuple[Any, ...]) -> Any:
        future = asyncio.get_running_loop().create_future()

        def answered(reply: Any) -> None:
            in_flight[room] -= 1
            if not in_flight[room]:
                del in_flight[room]
            self._joined(room, args[9], reply)  # before any reply after it: see _joined
            if not future.done():
                future.set_result(reply)

        in_flight = self._joins_in_flight
        in_flight[room] += 1
        self._send_script("join", keys, args, answered)
        reply = await future
        if isinstance(reply, RespError):
            raise self._refused(reply)
        return reply

    async def history(self, room: str, limit: int) -> tuple[int, str, list[bytes]]:
        seq, epoch, messages = await self._script(
            "history",
            _room_keys(room)[:4],
            0,
            0,
            0,
            0,
            0,
            0,
            self._history_ttl_ms,
            -1,
            self._history_last(room),
        )
        return int(seq), _text(epoch), list(messages)[-limit:] if limit else []

    async def leave(self, room: str, client_id: str, user_id: str = "") -> LeaveResult:
        local = self._members.get(room)
        if local is not None:
            local.pop(client_id, None)
        pending = (room, client_id)
        self._leaving.add(pending)
        try:
            return await self._leave_script(room, client_id, self.node_id, user_id)
        finally:
            self._leaving.discard(pending)

    async def _leave_script(
        self, room: str, client_id: str, node: str, user_id: str = ""
    ) -> LeaveResult:
        keys = _room_keys(room)
        left, version, removed = await self._script(
            "leave",
            (keys.members, keys.presence, keys.nodes, keys.lingering),
            client_id,
            self._state_ttl,
            node,
            user_id,
        )
        return LeaveResult(int(left), int(version), bool(removed))

    async def linger(self, room: str, client_id: str, user_id: str) -> None:
        keys = _room_keys(room)
        await self._script(
            "linger",
            (keys.members, keys.lingering),
            client_id,
            user_id,
            self.node_id,
            self._state_ttl,
        )

    async def presence(self, room: str) -> list[MemberInfo]:
        key = _room_keys(room).members
        return _decoded(await self._call(key, b"HVALS", key))

    def _session_record(self, member: MemberInfo, connected_at: float) -> bytes:
        return msgspec.json.encode(
            {
                "userId": member.userId,
                "nodeId": self.node_id,
                "connectedAt": int(connected_at * 1000),
            }
        )

    async def session_opened(self, member: MemberInfo, connected_at: float) -> None:
        self._sessions[member.clientId] = (member, connected_at)
        key = f"session:{member.clientId}".encode()
        await self._call(
            key, b"SET", key, self._session_record(member, connected_at), b"EX", _SESSION_TTL
        )

    async def session_closed(self, client_id: str) -> None:
        self._sessions.pop(client_id, None)
        key = f"session:{client_id}".encode()
        await self._call(key, b"DEL", key)

    async def flush(self) -> None:
        """A barrier: a token published on this node's private channel of every shard it
        listens to, after every earlier command; when each is back, everything published
        before it on those shards has been delivered (Redis keeps each connection's order)."""
        servers = self._servers
        if self.state != "ok" or servers is None or not self._flush_channels:
            return
        loop = asyncio.get_running_loop()
        waits: list[Any] = []
        for channel in self._flush_channels:
            token = secrets.token_hex(8).encode()
            future = self._flushes[token] = loop.create_future()
            waits.append(future)
            servers.send(channel, (self._publish_cmd, channel, token), self._checked)
        # Leased chats are delivered from the pipe's replies, not the listener: a round trip
        # there too, behind every record sent before.
        waits.append(self._ping(servers))
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.timeout * 2)
        except asyncio.TimeoutError:
            log.warning("redis flush timed out", extra={"event": "broker_flush_timeout"})

    async def _ping(self, servers: Servers) -> None:
        with contextlib.suppress(RespError):
            await servers.call(self._alive_key or b"fastws:nodes", b"PING")

    # ---- upkeep: liveness, session TTLs, sweeping dead nodes ---------------------------------

    async def _keep_alive(self) -> None:
        last_sessions = 0.0
        while True:
            await asyncio.sleep(self.sweep_interval)
            servers = self._servers
            if self.state != "ok" or servers is None:
                continue
            try:
                waits = [self._announce(servers)]
                if time.monotonic() - last_sessions > _SESSION_TTL / 3:
                    last_sessions = time.monotonic()
                    for client_id in self._sessions:
                        key = f"session:{client_id}".encode()
                        waits.append(servers.call(key, b"EXPIRE", key, _SESSION_TTL))
                self._refresh_leased(servers)
                alive, *_ = await asyncio.gather(*waits)
                if not alive:
                    log.warning(
                        "this node's liveness had expired (a pause longer than "
                        "node_ttl?): reconciling its presence",
                        extra={"event": "node_expired", "node": self.node_id},
                    )
                    await self._reconcile()
                await self.sweep()
                self._upkeep_error = ""
            except (RespError, BrokerUnavailable) as exc:
                log.debug("redis upkeep failed: %r", exc)  # the monitor handles outages
            except Exception as exc:  # never let upkeep end: liveness depends on it
                if not self._upkeep_error:
                    log.exception("redis upkeep failed", extra={"event": "broker_upkeep_error"})
                self._upkeep_error = f"{type(exc).__name__}: {exc}"[:200]

    def _refresh_leased(self, servers: Servers) -> None:
        """A leased room's keys get no TTL refresh per chat: here, every state ttl / 4."""
        now = time.monotonic()
        for room, lease in self._leases.items():
            if now - lease[2] > self._state_ttl / 4:
                lease[2] = now
                keys = _room_keys(room)
                for key in (keys.seq, keys.epoch, keys.history):
                    servers.send(key, (b"EXPIRE", key, self._state_ttl), self._checked)

    async def sweep(self) -> int:
        """Remove the presence of nodes that stopped refreshing; tell their rooms. Returns count."""
        removed = 0
        for raw in await self._call(b"fastws:nodes", b"SMEMBERS", b"fastws:nodes"):
            node = _text(raw)
            alive = f"fastws:node:{node}".encode()
            if node == self.node_id or await self._call(alive, b"EXISTS", alive):
                continue
            # One sweeper per dead node, whichever node gets there first; dead still once
            # claimed (a node that came back meanwhile waits for the claim, see _reconcile).
            claim = f"fastws:sweep:{node}".encode()
            if not await self._call(claim, b"SET", claim, b"1", b"NX", b"EX", 30):
                continue
            try:
                if not await self._call(alive, b"EXISTS", alive):
                    removed += await self._sweep_node(node)
            finally:
                await self._call(claim, b"DEL", claim)
        return removed

    async def _sweep_node(self, node: str) -> int:
        from .. import protocol as p

        removed = 0
        rooms_key = f"fastws:node:{node}:rooms".encode()
        swept = f"fastws:swept:{node}".encode()
        await self._call(swept, b"SET", swept, b"1", b"EX", 86400)
        for raw_room in await self._call(rooms_key, b"SMEMBERS", rooms_key):
            room = _text(raw_room)
            members_key = _room_keys(room).members
            entries = await self._call(members_key, b"HVALS", members_key)
            gone = [m for m in _decoded(entries) if m.node == node]
            for member in gone:
                left = await self._leave_script(room, member.clientId, node)
                # Not to the member itself: if its node was only paused, it is still here.
                await self.publish(
                    room,
                    p.encode(
                        p.UserLeft(room, member.username, p.now_ms(), member.userId, left.members)
                    ),
                    member.clientId,
                    -left.version,
                )
                removed += 1
        await self._call(rooms_key, b"DEL", rooms_key)
        await self._call(b"fastws:nodes", b"SREM", b"fastws:nodes", node)
        log.info(
            "swept dead node", extra={"event": "node_swept", "node": node, "connections": removed}
        )
        return removed

    # ---- presence converges ----------------------------------------------------------------

    async def _reconcile_quietly(self) -> None:
        try:
            await self._reconcile()
        except (RespError, BrokerUnavailable) as exc:
            log.debug("redis reconcile failed: %r", exc)  # retried at the next connect
        except Exception:
            log.exception("redis reconcile failed", extra={"event": "broker_upkeep_error"})

    async def _reconcile(self) -> None:
        """Make Redis' presence entries for this node equal the members it holds (see the
        module docstring): missing ones back, lost leaves done, each room told as it must."""
        from .. import protocol as p

        node = self.node_id.encode()
        claim = b"fastws:sweep:" + node
        for _ in range(300):  # a sweeper at work on this node: let it finish first (<= 30 s)
            if not await self._call(claim, b"EXISTS", claim):
                break
            await asyncio.sleep(0.1)
        swept_key = b"fastws:swept:" + node
        swept = bool(await self._call(swept_key, b"DEL", swept_key))
        rooms_key = b"fastws:node:%b:rooms" % node
        listed = {_text(r) for r in await self._call(rooms_key, b"SMEMBERS", rooms_key)}
        for room in listed | set(self._members):
            keys = _room_keys(room)
            raw = await self._call(keys.members, b"HGETALL", keys.members)
            present = {_text(raw[i]) for i in range(0, len(raw), 2)}
            mine = [m for m in _decoded(raw[1::2]) if m.node == self.node_id]
            for member in list(self._members.get(room, {}).values()):
                cid = member.clientId
                if cid in present or (room, cid) in self._joining:
                    continue
                if cid not in self._members.get(room, {}):
                    continue  # left while we were asking
                self.reconciled += 1
                if not swept:  # the room never heard it leave: put it back silently
                    if await self._call(
                        keys.members, b"HSET", keys.members, cid, _member_encoder.encode(member)
                    ):
                        await self._call(keys.nodes, b"HINCRBY", keys.nodes, self.node_id, 1)
                    continue
                joined = await self.join(room, member)
                await self.publish(
                    room,
                    p.encode(
                        p.UserJoined(
                            room, member.username, p.now_ms(), member.userId, joined.members
                        )
                    ),
                    cid,
                    -joined.version,
                )
            for member in mine:
                cid = member.clientId
                if (
                    cid in self._members.get(room, {})
                    or (room, cid) in self._leaving
                    or (room, cid) in self._joining
                ):
                    continue
                self.reconciled += 1
                left = await self._leave_script(room, cid, self.node_id)
                if left.members:
                    await self.publish(
                        room,
                        p.encode(
                            p.UserLeft(
                                room, member.username, p.now_ms(), member.userId, left.members
                            )
                        ),
                        "",
                        -left.version,
                    )
            if room in self._members or room in self._rooms:
                await self._call(rooms_key, b"SADD", rooms_key, room)
            else:
                await self._call(rooms_key, b"SREM", rooms_key, room)
        if swept:
            log.info(
                "restored this node's presence after a sweep",
                extra={"event": "node_restored", "node": self.node_id},
            )


async def _clock_offset(servers: Servers) -> int:
    """How far Redis' clock (the most advanced of its servers) is ahead of this node's, in ms:
    deadlines sent to scripts are in Redis' time, so a skewed host clock does not matter."""
    sent = time.time()
    replies = await servers.call_all(b"TIME")
    local = (sent + time.time()) / 2 * 1000  # the middle of the round trip
    return max(int(int(sec) * 1000 + int(usec) / 1000 - local) for sec, usec in replies)


def _decoded(entries: list[bytes]) -> list[MemberInfo]:
    """Members of a presence hash; an entry that does not decode is skipped, not fatal."""
    out = []
    for raw in entries:
        try:
            out.append(_member_decoder.decode(raw))
        except (msgspec.DecodeError, TypeError):
            log.warning(
                "undecodable presence entry skipped: %.80r", raw, extra={"event": "broker_dropped"}
            )
    return out


class RedisRooms(RedisBroker):
    """Publish into rooms and read their presence and history without being a node (for
    ``fastws.Publisher.over_redis``): the nodes' own Lua script and keys, so every node with
    members in the room delivers the message and its history keeps it. It subscribes to
    nothing and registers nothing; each call either succeeds or raises ``BrokerUnavailable``,
    and after a failure the next ``start()`` connects again.
    """

    name = "redis-rooms"
    _listens = False

    async def start(self) -> None:
        try:
            await self._connect()
        except (RespError, OSError) as exc:
            self._went_down(exc)  # the call that follows raises BrokerUnavailable

    def _went_down(self, exc: BaseException) -> None:
        log.debug("redis call failed: %s", exc)
        self.state = "down"
        if self._servers is not None:
            self._servers.close()
            self._servers = None

    async def close(self) -> None:
        if self._servers is not None:
            self._servers.close()
            self._servers = None
        self.state = "down"
