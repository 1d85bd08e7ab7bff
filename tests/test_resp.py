"""broker/resp.py and the Redis broker on it, against a real redis-server: pipelining,
concurrency without a pool, pub/sub safety, outages, backpressure, bad input, clusters."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import pytest

from fastws.broker.redis import RedisBroker, RedisRooms
from fastws.broker.rediscluster import ClusterServers, key_slot
from fastws.broker.resp import ConnectionLost, Listener, Pipe, RespError, parse_url
from fastws.broker.types import HistoryPolicy, MemberInfo, chat_payload
from fastws.errors import BrokerUnavailable

from .redisutil import RedisServer, redis_pipe
from .utils import TIMEOUT


class Deliveries:
    """A node's deliver callback that records (room, exclude, payload, seq)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, bytes, int]] = []

    def __call__(self, room: str, exclude: str, payload: bytes, seq: int) -> None:
        self.got.append((room, exclude, payload, seq))


async def started_broker(
    url: str, deliveries: Deliveries | None = None, **options: Any
) -> RedisBroker:
    broker = RedisBroker(url, **{"timeout": 1.0, "node_ttl": 5, **options})
    broker.attach("test-node", deliveries or Deliveries())
    await broker.start()
    assert broker.state == "ok"
    return broker


async def test_commands_of_one_loop_turn_leave_in_one_write_and_replies_keep_order(
    redis_server: RedisServer,
) -> None:
    """100 commands issued in one turn are one socket write; their replies come back in order."""
    async with redis_pipe(redis_server.url) as pipe:
        before = pipe.writes
        replies: list[Any] = []
        for _ in range(100):
            pipe.send((b"INCR", b"counter"), replies.append)
        async with asyncio.timeout(TIMEOUT):
            while len(replies) < 100:
                await asyncio.sleep(0.001)
        assert pipe.writes == before + 1
        assert replies == list(range(1, 101))


async def test_a_thousand_concurrent_commands_need_no_pool(redis_server: RedisServer) -> None:
    """1,000 coroutine calls in flight at once on one connection: every one succeeds."""
    async with redis_pipe(redis_server.url) as pipe:
        async with asyncio.timeout(TIMEOUT):
            replies = await asyncio.gather(*(pipe.call(b"INCR", b"n") for _ in range(1000)))
        assert sorted(replies) == list(range(1, 1001))


async def test_a_thousand_concurrent_joins_all_succeed(redis_server: RedisServer) -> None:
    """The reconnect storm: 1,000 subscribes and joins at once, zero unavailable."""
    broker = await started_broker(redis_server.url)
    try:

        async def join(i: int) -> int:
            room = f"room{i % 100}"
            await broker.subscribe(room)
            result = await broker.join(room, MemberInfo(f"c{i}", f"u{i}", f"user{i}", "n"))
            return result.members

        async with asyncio.timeout(TIMEOUT * 2):
            counts = await asyncio.gather(*(join(i) for i in range(1000)))
        assert sorted(counts)[-1] == 10 and len(counts) == 1000
        assert broker.health()["refused"] == 0
    finally:
        await broker.close()


async def test_concurrent_subscribe_and_unsubscribe_end_in_the_last_wanted_state(
    redis_server: RedisServer,
) -> None:
    """Interleaved subscribes and unsubscribes of one channel, in any order and any number
    in flight: Redis ends subscribed exactly when the last call was a subscribe."""
    listener = Listener(parse_url(redis_server.url), on_message=lambda c, d: None)
    await listener.connect()
    rng = random.Random(7)
    try:
        async with redis_pipe(redis_server.url) as pipe, asyncio.timeout(TIMEOUT * 2):
            for _ in range(30):
                calls: list[bool] = []  # in the order their bodies ran

                async def subscribe(calls: list[bool] = calls) -> None:
                    calls.append(True)
                    await listener.subscribe(b"chan")

                waits = []
                for _ in range(rng.randint(1, 12)):
                    if rng.random() < 0.5:
                        waits.append(asyncio.ensure_future(subscribe()))
                    else:
                        calls.append(False)
                        listener.unsubscribe(b"chan")
                    if rng.random() < 0.3:
                        await asyncio.sleep(0)
                await asyncio.gather(*waits)
                last = calls[-1]
                # Redis applies the listener's commands on its own connection: wait until it
                # agrees (bounded by the timeout above).
                while True:
                    _, count = await pipe.call(b"PUBSUB", b"NUMSUB", b"chan")
                    if count == int(last):
                        break
                    await asyncio.sleep(0.005)
                assert (b"chan" in listener.channels) == last
    finally:
        listener.close()


async def test_every_message_of_one_read_is_handed_over_in_that_read() -> None:
    """A read holding many pub/sub messages calls on_message for all of them before
    data_received returns: the node's deliveries of one read are corked together."""
    got: list[bytes] = []
    listener = Listener(
        parse_url("redis://127.0.0.1:1/0"), on_message=lambda channel, data: got.append(data)
    )
    chunk = b"".join(
        b"*3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$%d\r\n%b\r\n" % (len(d), d)
        for d in (b"m%d" % i for i in range(50))
    )
    listener.data_received(chunk[:-3])  # a partial last message waits for the rest
    assert len(got) == 49
    listener.data_received(chunk[-3:])
    assert got == [b"m%d" % i for i in range(50)]


async def test_killed_server_fails_waiters_then_the_broker_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Killing redis-server fails every waiting command at once (no hang), the broker goes
    down and logs why each call is refused, then reconnects by itself after a restart."""
    broker = await started_broker(redis_server.url)
    try:
        seqs: list[int] = []
        redis_server.pause()
        for _ in range(5):
            broker.publish_seq_nowait("r", b'{"type":"chat_message","seq":', seqs.append)
        await asyncio.sleep(0.05)
        assert redis_server.proc is not None
        redis_server.proc.kill()  # SIGKILL while stopped: it never answers what it holds
        redis_server.stop()
        async with asyncio.timeout(TIMEOUT):
            while len(seqs) < 5 or broker.state == "ok":
                await asyncio.sleep(0.01)
        assert seqs == [0] * 5
        caplog.clear()
        with caplog.at_level(logging.WARNING, "fastws.broker.redis"):
            broker.publish_seq_nowait("r", b"{", seqs.append)
        assert seqs[-1] == 0
        assert any("refused" in r.getMessage() and "down" in r.getMessage() for r in caplog.records)
        redis_server.start()
        async with asyncio.timeout(TIMEOUT * 2):
            while broker.state != "ok":
                await asyncio.sleep(0.02)
        assert await broker.publish_seq("r", b'{"seq":') == 1
        assert broker.health()["outages"] == 1
    finally:
        await broker.close()


async def test_a_paused_server_applies_backpressure_then_releases_it(
    redis_server: RedisServer,
) -> None:
    """With redis-server stopped (SIGSTOP) the queue passes its bound and pressure(True) is
    signalled; after SIGCONT every reply arrives, and pressure(False) follows."""
    signals: list[bool] = []
    pipe = Pipe(
        parse_url(redis_server.url),
        timeout=10.0,
        limit=100,
        pressure=lambda _pipe, paused: signals.append(paused),
    )
    await pipe.connect()
    replies: list[Any] = []
    try:
        redis_server.pause()
        try:
            for _ in range(300):
                pipe.send((b"INCR", b"k"), replies.append)
            await asyncio.sleep(0.1)
            assert signals == [True] and replies == []
        finally:
            redis_server.resume()
        async with asyncio.timeout(TIMEOUT):
            while len(replies) < 300:
                await asyncio.sleep(0.01)
        assert replies == list(range(1, 301))
        assert signals == [True, False]
    finally:
        pipe.close()


async def test_a_server_that_stops_answering_times_out(redis_server: RedisServer) -> None:
    """No reply for ``timeout``: the watchdog (one tick per connection, no timer per command)
    fails the waiting commands with ConnectionLost within about that time."""
    lost: list[BaseException | None] = []
    pipe = Pipe(parse_url(redis_server.url), timeout=0.4, on_lost=lambda _p, e: lost.append(e))
    await pipe.connect()
    try:
        redis_server.pause()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ConnectionLost, match="no reply"):
            await asyncio.wait_for(pipe.call(b"PING"), TIMEOUT)
        assert 0.25 <= loop.time() - start <= 1.0
        assert len(lost) == 1
    finally:
        redis_server.resume()
        pipe.close()


async def test_garbage_on_a_room_channel_is_dropped_and_delivery_goes_on(
    redis_server: RedisServer,
) -> None:
    """Messages that do not parse are dropped and counted; the reader keeps delivering."""
    deliveries = Deliveries()
    broker = await started_broker(redis_server.url, deliveries)
    try:
        await broker.subscribe("r")
        async with redis_pipe(redis_server.url) as pipe:
            for garbage in (
                b"no newlines",
                b"x\nnot-a-seq\n{}",
                b"x\n1\nnot json",
                b"\xff\n0\n{}",
                b"",
            ):
                await pipe.call(b"PUBLISH", b"fastws:{r}", garbage)
        await broker.publish("r", b'{"type":"typing"}', "someone")
        await broker.flush()
        assert deliveries.got == [("r", "someone", b'{"type":"typing"}', 0)]
        assert broker.health()["dropped"] == 5
    finally:
        await broker.close()


async def test_the_lua_chat_payload_is_types_chat_payload_byte_for_byte(
    redis_server: RedisServer,
) -> None:
    """What the publish_seq script publishes and keeps equals types.chat_payload."""
    deliveries = Deliveries()
    broker = await started_broker(redis_server.url, deliveries)
    try:
        await broker.subscribe("lua")
        head = b'{"type":"chat_message","room":"lua","message":"h\\u00e9 \\"q\\"","seq":'
        seq = await broker.publish_seq("lua", head)
        await broker.flush()
        last, epoch, kept = await broker.history("lua", 10)
        expected = chat_payload(head, seq, epoch)
        assert (last, kept) == (seq, [expected])
        assert deliveries.got == [("lua", "", expected, seq)]
    finally:
        await broker.close()


async def test_flush_waits_for_what_another_node_published_before(
    redis_server: RedisServer,
) -> None:
    """flush() returns only after every publication made before it has been delivered."""
    deliveries = Deliveries()
    listener = await started_broker(redis_server.url, deliveries)
    other = await started_broker(redis_server.url)
    try:
        await listener.subscribe("f")
        for _ in range(200):
            other.publish_seq_nowait("f", b'{"seq":', lambda seq: None)
        await other.publish("f", b"{}")  # after the 200: one connection, in order
        await listener.flush()
        assert [seq for *_, seq in deliveries.got] == [*range(1, 201), 0]
    finally:
        await other.close()
        await listener.close()


async def test_auth_and_select_come_from_the_url() -> None:
    """redis://user:pass@host:port/db: AUTH then SELECT before any command."""
    server = RedisServer()
    server.extra = ["--requirepass", "s3cret"]
    server.start()
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        async with redis_pipe(url) as pipe:
            await pipe.call(b"SET", b"k", b"v")
            assert await pipe.call(b"CLIENT", b"INFO") and b"db=3" in await pipe.call(
                b"CLIENT", b"INFO"
            )
        async with redis_pipe(f"redis://:s3cret@127.0.0.1:{server.port}/0") as other:
            assert await other.call(b"GET", b"k") is None
        with pytest.raises(RespError, match=r"NOAUTH|WRONGPASS|invalid"):
            async with redis_pipe(f"redis://:wrong@127.0.0.1:{server.port}/0"):
                pass
    finally:
        server.close()


async def test_cluster_routes_every_key_to_its_slots_primary(redis_cluster: Any) -> None:
    """On a 3-primary cluster, commands go to the primary of their key's slot, concurrently."""
    servers = ClusterServers(
        parse_url(redis_cluster.url), timeout=TIMEOUT, on_message=lambda c, d: None
    )
    await servers.connect(listen=False)
    try:
        keys = [b"fastws:{room%d}:seq" % i for i in range(300)]
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(servers.call(k, b"SET", k, b"1") for k in keys))
        sizes = []
        for node in redis_cluster.nodes:
            async with redis_pipe(node.url) as pipe:
                sizes.append(await pipe.call(b"DBSIZE"))
        assert sum(sizes) == 300 and all(sizes), sizes
        assert key_slot(b"fastws:{room1}:seq") == key_slot(b"room1")
        assert key_slot(b"123456789") == 12739  # the Redis Cluster spec's test vector
    finally:
        servers.close()


async def test_cluster_follows_moved_and_corrects_its_map(redis_cluster: Any) -> None:
    """A stale slot map (every slot on one primary): the others answer MOVED, the command is
    retried where they say, succeeds, and the map is corrected."""
    servers = ClusterServers(
        parse_url(redis_cluster.url), timeout=TIMEOUT, on_message=lambda c, d: None
    )
    await servers.connect(listen=False)
    try:
        truth = list(servers._slot_pipes)
        wrong = truth[0]
        servers._slot_pipes = [wrong] * len(truth)
        keys = [b"k{%d}" % i for i in range(100)]
        async with asyncio.timeout(TIMEOUT):
            assert (
                await asyncio.gather(*(servers.call(k, b"SET", k, b"v") for k in keys))
                == [b"OK"] * 100
            )
            assert await asyncio.gather(*(servers.call(k, b"GET", k) for k in keys)) == [b"v"] * 100
            while servers._slot_pipes[key_slot(keys[1])] is not truth[key_slot(keys[1])]:
                await asyncio.sleep(0.01)
        assert [servers._slot_pipes[key_slot(k)] for k in keys] == [
            truth[key_slot(k)] for k in keys
        ]
    finally:
        servers.close()


async def test_redis_rooms_reconnects_on_the_next_start(redis_server: RedisServer) -> None:
    """The publisher's RedisRooms: refused while Redis is gone, working after start() again."""
    rooms = RedisRooms(redis_server.url, timeout=0.5)
    await rooms.start()
    try:
        assert await rooms.publish_seq("p", b'{"seq":') == 1
        redis_server.stop()
        with pytest.raises(BrokerUnavailable):
            await rooms.publish_seq("p", b'{"seq":')
        redis_server.start()
        await rooms.start()
        assert await rooms.publish_seq("p", b'{"seq":') == 1
    finally:
        await rooms.close()


async def test_the_chats_of_one_turn_are_one_script_call_in_the_order_called(
    redis_server: RedisServer,
) -> None:
    """60 chats over 6 rooms issued in one loop turn are one EVALSHA; each room's seqs
    follow the order of the calls, and every message is answered."""
    broker = await started_broker(redis_server.url)
    try:
        async with redis_pipe(redis_server.url) as pipe:
            await pipe.call(b"CONFIG", b"RESETSTAT")
            got: list[tuple[str, int, int]] = []
            for i in range(60):
                room = f"batch{i % 6}"
                broker.publish_seq_nowait(
                    room, b'{"seq":', lambda seq, r=room, i=i: got.append((r, i, seq))
                )
            async with asyncio.timeout(TIMEOUT):
                while len(got) < 60:
                    await asyncio.sleep(0.005)
            stats = (await pipe.call(b"INFO", b"commandstats")).decode()
        assert "cmdstat_evalsha:calls=1," in stats
        for n in range(6):
            assert [
                seq for room, _, seq in sorted(got, key=lambda g: g[1]) if room == f"batch{n}"
            ] == list(range(1, 11))
    finally:
        await broker.close()


async def test_other_commands_between_chats_keep_their_place(redis_server: RedisServer) -> None:
    """chat, typing, chat in one turn: the batch is sent before the typing, so the room's
    subscribers get the three in that order (the second chat in a batch of its own)."""
    deliveries = Deliveries()
    broker = await started_broker(redis_server.url, deliveries)
    try:
        await broker.subscribe("mixed")
        seqs: list[int] = []
        broker.publish_seq_nowait("mixed", b'{"n":1,"seq":', seqs.append)
        typing = asyncio.ensure_future(broker.publish("mixed", b'{"typing":1}'))
        await asyncio.sleep(0)  # the typing's PUBLISH is issued, in this same turn
        broker.publish_seq_nowait("mixed", b'{"n":2,"seq":', seqs.append)
        await asyncio.wait_for(typing, TIMEOUT)
        await broker.flush()
        assert seqs == [1, 2]
        assert [payload[:12] for _, _, payload, _ in deliveries.got] == [
            b'{"n":1,"seq"',
            b'{"typing":1}',
            b'{"n":2,"seq"',
        ]
    finally:
        await broker.close()


async def test_a_flushed_script_is_reloaded_and_a_failed_batch_answers_every_chat(
    redis_server: RedisServer,
) -> None:
    """After SCRIPT FLUSH the batch is retried once with EVAL (every seq allocated once);
    a batch Redis refuses answers each of its chats done(0)."""
    broker = await started_broker(redis_server.url)
    try:
        async with redis_pipe(redis_server.url) as pipe:
            await pipe.call(b"SCRIPT", b"FLUSH")
            seqs: list[int] = []
            for _ in range(5):
                broker.publish_seq_nowait("flushed", b'{"seq":', seqs.append)
            async with asyncio.timeout(TIMEOUT):
                while len(seqs) < 5:
                    await asyncio.sleep(0.005)
            assert seqs == [1, 2, 3, 4, 5]
            await pipe.call(b"SET", b"fastws:{wrong}:seq", b"not a number")
            await pipe.call(b"SET", b"fastws:{wrong}:epoch", b"e")
            refused = broker.health()["refused"]
            failed: list[int] = []
            for room in ("wrong", "fine", "wrong"):
                broker.publish_seq_nowait(room, b'{"seq":', failed.append)
            async with asyncio.timeout(TIMEOUT):
                while len(failed) < 3:
                    await asyncio.sleep(0.005)
            assert failed == [0, 0, 0]
            assert broker.health()["refused"] == refused + 3
    finally:
        await broker.close()


async def test_history_is_trimmed_in_steps_and_read_to_its_size(redis_server: RedisServer) -> None:
    """The list is trimmed once it holds size / 8 more than size (not on every message), and
    history and join read only the newest ``size`` of it."""
    broker = await started_broker(redis_server.url, policy=HistoryPolicy(size=16, ttl=0))
    try:
        for _ in range(40):
            await broker.publish_seq("trim", b'{"seq":')
        async with redis_pipe(redis_server.url) as pipe:
            assert 16 <= await pipe.call(b"LLEN", b"fastws:{trim}:history") <= 18
        last, epoch, kept = await broker.history("trim", 100)
        assert last == 40 and [int(m[7:9]) for m in kept] == list(range(25, 41))
        joined = await broker.join("trim", MemberInfo("c", "u", "n"), since=(20, epoch))
        assert joined.recovered is False and len(joined.replay) == 16
    finally:
        await broker.close()
