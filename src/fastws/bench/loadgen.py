"""The load generator: one process's share of the simulated users, on picows + uvloop.

A generator process is started (spawn) by the coordinator in scenarios.py with a plan (a plain
dict: which users, which rooms, which mode) and talks back over a multiprocessing Queue:

    ("ready", i, info)   connected (and joined): waiting at the barrier
    ("done", i, info)    the measured phase is over (the coordinator reads server CPU/RSS now)
    ("result", i, dict)  counts, the latency histogram (HdrHistogram encode()), time series
    ("error", i, text)   a traceback; the barrier is aborted so nobody waits for us

Start and end are absolute ``time.time_ns()`` instants written by the coordinator into a shared
array before it joins the barrier, so every process measures the same window.

Chat texts are ``"<publisher>:<n>:<send time_ns>"``: every receiver parses them to get the
latency (send -> this delivery) and checks that each publisher's ``n`` arrives exactly once and
in order. The per-delivery path is ``on_ws_frame`` below: one regex search (memoised per
payload, since a fan-out delivers the very same bytes to every member), a bitmap test, a few
integer updates; no JSON parsing, no histogram call (latencies are counted in a dict and folded
into the HdrHistogram once at the end).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import re
import time
import traceback
from typing import Any

import orjson
import picows

_TEXT = picows.WSMsgType.TEXT
_CLOSE = picows.WSMsgType.CLOSE
_PING = picows.WSMsgType.PING
_search_chat = re.compile(rb'"message": ?"(\d+):(\d+):(\d+)').search
_search_members = re.compile(rb'"members": ?(\d+)').search
_search_notice = re.compile(rb'"userId": ?"([^"]*)", ?"members": ?(\d+)').search
_time_ns = time.time_ns
_BUCKET_NS = 100_000_000  # time series resolution: 100 ms
_IDLE_NS = 500_000_000  # drain ends after this long without a delivery
_HIST_LOW, _HIST_HIGH, _HIST_DIGITS = 1, 60_000_000, 3  # 1 us .. 60 s, 3 significant digits

# parsed chat texts by payload; cleared when big (a fan-out repeats each payload S times).
_parsed: dict[bytes, tuple[int, int, int]] = {}
_notices: dict[bytes, tuple[bytes, int]] = {}  # user_joined payload -> (userId, members)


def new_histogram() -> Any:
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(_HIST_LOW, _HIST_HIGH, _HIST_DIGITS)


class Gen:
    """What one generator process counts. Times are ``time.time_ns()``."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.t_start = 0  # load starts (warmup included)
        self.m0 = 0  # measured window [m0, m1)
        self.m1 = 0
        self.deliveries = 0  # chat deliveries received inside the window
        self.duplicates = 0
        self.reorders = 0
        self.sent_window = 0  # chat messages sent inside the window
        self.sent_total = 0
        self.series: list[int] = [0] * (int(plan["duration"] * 10) + 2)
        self.sent_series: list[int] = [0] * (int(plan["duration"] * 10) + 2)
        self.latency: dict[int, int] = {}  # microseconds -> count
        self.last_delivery = 0
        self.closes: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.disconnects = 0
        self.storm = False
        self.storm_received = 0  # distinct user_joined about a later joiner
        self.storm_duplicates = 0  # the same user announced twice to one client
        self.storm_stale = 0  # about a member its room_joined.members already counted
        self.storm_diffs = 0  # presence_diff messages (a storm joined with presence diffs)
        self.storm_last = 0
        self.storm_expected: int | None = None
        self.storm_size = plan.get("storm_size", 0)
        self.presence_diff = bool(plan.get("presence_diff"))
        # heartbeat pings answered, by 100 ms bucket of time.time_ns(): the idle phase
        # counts those inside its window
        self.pings: collections.Counter[int] = collections.Counter()

    def pings_between(self, start: int, end: int) -> int:
        """Pings answered from ``start`` to ``end`` (time.time_ns(), to the bucket)."""
        first, last = start // _BUCKET_NS, end // _BUCKET_NS
        return sum(n for bucket, n in self.pings.items() if first <= bucket <= last)


class Client(picows.WSListener):
    """One simulated user. Control messages resolve ``waiter`` when their type is ``want``;
    chat messages go through the fast path in ``on_ws_frame``."""

    def __init__(
        self, gen: Gen, cid: int, room: str | None, publisher: bool, window: int, pad: int
    ) -> None:
        super().__init__()
        self.gen = gen
        self.cid = cid
        self.room = room
        self.publisher = publisher
        self.window = window  # 0: paced by the generator, not by our own echoes
        self.transport: picows.WSTransport | None = None
        self.n = 0  # next message number = messages sent
        self.outstanding = 0
        # per publisher: [highest n seen, bitmap of n seen, distinct messages received]
        self.tracks: dict[int, list[Any]] = {}
        self.want = "connected"
        self.waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.closing = False
        self.close_code = 0
        self.gone = False  # disconnected: its in-flight messages will never come back
        self.joined_members = 0  # room_joined.members: who was there before us
        self.announced: set[bytes] = set()  # join storm: users announced to us
        self.final = False  # join storm with diffs: a presence_diff gave the room's final count
        self.suffix = ((":" + "x" * pad if pad else "") + '"}}').encode()
        if room is not None:
            self.prefix = (
                f'{{"type":"chat_message","payload":{{"room":"{room}","message":"{cid}:'
            ).encode()
            join: dict[str, Any] = {"room": room}
            if gen.presence_diff:
                join["presence"] = "diff"
            self.join_msg = orjson.dumps({"type": "join_room", "payload": join})

    # -- picows callbacks --------------------------------------------------------------------

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self.gone = True
        if not self.closing:
            self.gen.disconnects += 1
        if not self.waiter.done():
            how = f"closed by the server with {self.close_code}" if self.close_code else "dropped"
            self.waiter.set_exception(
                ConnectionError(
                    f"user {self.cid} disconnected while waiting for {self.want}: {how}"
                )
            )

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type != _TEXT:
            self._frame(transport, frame)
            return
        data = frame.get_payload_as_bytes()
        parsed = _parsed.get(data)
        if parsed is None:
            match = _search_chat(data)
            if match is None:
                self._control(data)
                return
            parsed = (int(match[1]), int(match[2]), int(match[3]))
            if len(_parsed) > 8192:
                _parsed.clear()
            _parsed[data] = parsed
        pub, n, sent = parsed
        g = self.gen
        now = _time_ns()
        g.last_delivery = now
        track = self.tracks.get(pub)
        if track is None:
            track = self.tracks[pub] = [-1, bytearray(256), 0]
        bitmap = track[1]
        byte = n >> 3
        if byte >= len(bitmap):
            bitmap.extend(bytes(max(len(bitmap), byte + 1 - len(bitmap))))
        bit = 1 << (n & 7)
        if bitmap[byte] & bit:
            g.duplicates += 1
            return
        bitmap[byte] |= bit
        track[2] += 1
        if n < track[0]:
            g.reorders += 1  # arrived after a later message of the same publisher
        else:
            track[0] = n
        if g.m0 <= now < g.m1:
            g.deliveries += 1
            g.series[(now - g.m0) // _BUCKET_NS] += 1
        if g.m0 <= sent < g.m1:
            us = (now - sent) // 1000
            g.latency[us] = g.latency.get(us, 0) + 1
        if pub == self.cid:
            self.outstanding -= 1
            if self.window and now < g.m1:
                self.send_chat()

    def _frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == _PING:  # answered here, not by picows, to be counted
            transport.send_pong(frame.get_payload_as_bytes())
            self.gen.pings[_time_ns() // _BUCKET_NS] += 1
        elif frame.msg_type == _CLOSE:
            code = self.close_code = frame.get_close_code().value
            if not self.closing:
                self.gen.closes[code] += 1
            self.closing = True
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def _control(self, data: bytes) -> None:
        g = self.gen
        if b'"user_joined"' in data:  # the join storm's deliveries: parsed once per payload
            if g.storm:
                self._notice(data)
            return
        if b'"presence_diff"' in data:
            if g.storm:
                self._diff(data)
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            g.errors["unparsable message from server"] += 1
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "room_joined":
            self.joined_members = int(msg.get("members") or 0)
        if kind == self.want and not self.waiter.done():
            self.waiter.set_result(msg)
        elif kind == "error":
            text = str(msg.get("error"))[:120]
            g.errors[text] += 1
            if not self.waiter.done():
                self.waiter.set_exception(RuntimeError(f"server error: {text}"))

    def _notice(self, data: bytes) -> None:
        """A join storm's user_joined: a later joiner (counted once per user), or a stale
        notice about a member that our room_joined already counted (a multi-node broker can
        deliver one: it is reported apart, neither a delivery nor a duplicate)."""
        g = self.gen
        notice = _notices.get(data)
        if notice is None:
            match = _search_notice(data)
            notice = (match[1], int(match[2])) if match else (data, 1 << 62)
            if len(_notices) > 8192:
                _notices.clear()
            _notices[data] = notice
        user, members = notice
        now = _time_ns()
        g.storm_last = now
        if members <= self.joined_members:
            g.storm_stale += 1
            return
        if user in self.announced:
            g.storm_duplicates += 1
            return
        self.announced.add(user)
        g.storm_received += 1
        _bump(g.series, (now - g.t_start) // _BUCKET_NS)

    def _diff(self, data: bytes) -> None:
        """A join storm's presence_diff: counted; the first with the room's final count
        completes this client."""
        g = self.gen
        g.storm_diffs += 1
        now = g.storm_last = _time_ns()
        match = _search_members(data)
        if match and int(match[1]) >= g.storm_size and not self.final:
            self.final = True
            g.storm_received += 1
            _bump(g.series, (now - g.t_start) // _BUCKET_NS)

    # -- actions -------------------------------------------------------------------------

    def expect(self, kind: str) -> asyncio.Future[dict[str, Any]]:
        self.want = kind
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def send_join(self) -> None:
        assert self.transport is not None
        self.transport.send(_TEXT, self.join_msg)

    def send_chat(self) -> None:
        g = self.gen
        now = _time_ns()
        n = self.n
        self.n = n + 1
        self.outstanding += 1
        self.transport.send(_TEXT, self.prefix + b"%d:%d%s" % (n, now, self.suffix))  # type: ignore[union-attr]
        g.sent_total += 1
        if g.m0 <= now < g.m1:
            g.sent_window += 1
            g.sent_series[(now - g.m0) // _BUCKET_NS] += 1

    def fill(self) -> None:
        while self.outstanding < self.window:
            self.send_chat()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send_close(picows.WSCloseCode.OK)
            self.transport.disconnect()


def _bump(series: list[int], index: int) -> None:
    if index >= len(series):
        series.extend([0] * (index + 1 - len(series)))
    series[index] += 1


async def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - _time_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


class Worker:
    """One generator process: connect, wait at the barrier, run the plan's mode, report."""

    def __init__(
        self, plan: dict[str, Any], queue: Any, barrier: Any, schedule: Any, counter: Any
    ) -> None:
        self.plan = plan
        self.queue = queue
        self.barrier = barrier
        self.schedule = schedule
        self.counter = counter
        self.index: int = plan["index"]
        self.gen = Gen(plan)
        self.clients: list[Client] = []
        self.connect_failures = 0
        self.connect_first = 0
        self.connect_last = 0
        self.join_latency: dict[int, int] = {}
        self.storm_first = 0
        self.pacer_lag = 0  # ns: the furthest behind schedule a paced send went out
        self.drain_timed_out = False
        self.window: int = plan["window"]
        self.pad: int = plan["pad"]
        self.urls: dict[int, str] = {}  # pre-minted, so minting is not measured
        self.node_of: dict[int, int] = {m[0]: m[3] for m in plan["members"]}
        self.flood_sent = 0
        self.sources: int = plan.get("sources", 1)
        self.source_ips: collections.Counter[str] = collections.Counter()  # as connected
        self.idle_pings = 0
        self.open_after_idle = 0

    # -- setup --------------------------------------------------------------------------

    def url_for(self, cid: int) -> str:
        """The user's node URL (the plan's members name a node each) with its token."""
        plan = self.plan
        token = plan["token"]
        if token is None:
            from ..auth import mint

            token = mint(plan["secret"], f"u{cid}", ttl=plan["ttl"])
        urls = plan.get("urls") or [plan["url"]]
        url = urls[self.node_of.get(cid, 0) % len(urls)]
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}token={token}"

    async def connect(self, cid: int, room: str | None, publisher: bool) -> Client:
        window = self.window if publisher else 0
        client = Client(self.gen, cid, room, publisher, window, self.pad)
        await picows.ws_connect(
            lambda: client,
            self.urls.get(cid) or self.url_for(cid),
            websocket_handshake_timeout=self.plan["timeout"],
            max_frame_size=1 << 20,
            enable_auto_pong=False,  # Client._frame answers and counts the pings
            **self.bind_for(cid),
        )
        self.clients.append(client)
        await asyncio.wait_for(client.waiter, self.plan["timeout"])
        return client

    def bind_for(self, cid: int) -> dict[str, Any]:
        """The user's loopback source address (create_connection's ``local_addr``) when the
        plan spreads connections over several: each (source, server port) pair has only
        ~28k ephemeral ports. Nothing with one source: the kernel picks, as for any client."""
        if self.sources <= 1:
            return {}
        return {"local_addr": (f"127.0.0.{2 + cid % self.sources}", 0)}

    async def join(self, client: Client) -> dict[str, Any]:
        waiter = client.expect("room_joined")
        client.send_join()
        return await asyncio.wait_for(waiter, self.plan["timeout"])

    def tick(self) -> None:
        with self.counter.get_lock():
            self.counter.value += 1

    async def setup(self, join: bool) -> None:
        sem = asyncio.Semaphore(self.plan["concurrency"])
        # publishers keep the plan's order (the pacing spreads messages over them in turn)

        async def one(cid: int, room: str | None, publisher: bool, _node: int) -> None:
            async with sem:
                client = await self.connect(cid, room, publisher)
                if join and room is not None:
                    await self.join(client)
                self.tick()

        await asyncio.gather(*(one(*m) for m in self.plan["members"]))
        order = {m[0]: i for i, m in enumerate(self.plan["members"])}
        self.clients.sort(key=lambda c: order[c.cid])

    async def wait_barrier(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.barrier.wait, self.plan["barrier_timeout"])

    # -- modes --------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        plan = self.plan
        mode = plan["mode"]
        if mode == "reconnect":
            return await self.run_reconnect()
        if mode == "soak":
            return await self.run_soak()
        t0 = time.monotonic()
        if mode == "connect":
            self.urls = {m[0]: self.url_for(m[0]) for m in plan["members"]}
        else:
            await self.setup(join=mode != "storm")
        self.queue.put(("ready", self.index, {"setup_s": time.monotonic() - t0}))
        gc.collect()
        gc.freeze()
        gc.disable()  # no cyclic garbage on the hot path; a collection would be a latency spike
        await self.wait_barrier()
        g = self.gen
        g.t_start, g.m0, g.m1 = self.schedule[0], self.schedule[1], self.schedule[2]
        try:
            if plan.get("flood"):
                await self.run_flood()
            elif mode in ("window", "rate"):
                await self.run_chat(mode)
            elif mode == "storm":
                await self.run_storm()
            else:
                await self.run_connect()
        finally:
            gc.enable()
        result = self.result()
        for client in self.clients:
            client.close()
        await asyncio.sleep(0.05)  # let the close frames go out
        return result

    async def run_reconnect(self) -> dict[str, Any]:
        """The reconnect storm (reconnect.py): its users have their own connection class."""
        from .reconnect import Storm

        storm = Storm(self.plan, self.schedule, self.url_for)
        t0 = time.monotonic()
        await storm.setup(self.plan["concurrency"], self.tick)
        self.queue.put(("ready", self.index, {"setup_s": time.monotonic() - t0}))
        await self.wait_barrier()
        settled = await storm.run()
        self.queue.put(("done", self.index, None))
        storm_result = storm.result(settled)
        storm.close()
        await asyncio.sleep(0.05)  # let the close frames go out
        return {
            **self.empty_result(),
            "closes": storm_result.pop("closes"),
            "errors": storm_result.pop("errors"),
            "drain_timed_out": not settled,
            "reconnect": storm_result,
        }

    async def run_soak(self) -> dict[str, Any]:
        """The soak (soak.py): its users reconnect all along, so they have the reconnect
        storm's connection class and their own seq bookkeeping."""
        from .soak import Soak

        soak = Soak(self.plan, self.schedule, self.url_for)
        t0 = time.monotonic()
        await soak.setup(self.plan["concurrency"], self.tick)
        self.queue.put(("ready", self.index, {"setup_s": time.monotonic() - t0}))
        gc.collect()
        gc.freeze()  # the set-up's objects are never collected; collection stays on for the
        # minutes of a soak, whose reconnections leave cyclic garbage behind
        await self.wait_barrier()
        settled = await soak.run()
        self.queue.put(("done", self.index, None))
        out = soak.result(settled)
        soak.close()
        await asyncio.sleep(0.05)  # let the close frames go out
        hist = new_histogram()
        for us, count in out.pop("latency").items():
            hist.record_value(min(max(us, _HIST_LOW), _HIST_HIGH), count)
        return {
            **self.empty_result(),
            "histogram": hist.encode(),
            "deliveries": out["distinct"],
            "duplicates": out["duplicates"],
            "reorders": out["reorders"],
            "sent_window": out["sent"],
            "sent_total": out["sent"],
            "series": out.pop("deliveries_series") or [0],
            "sent_series": out.pop("sent_series") or [0],
            "closes": out.pop("closes"),
            "errors": out.pop("errors"),
            "disconnects": out["drops"],
            "drain_timed_out": not settled,
            "pacer_max_lag_us": out["pacer_max_lag_us"],
            "soak": out,
        }

    async def run_chat(self, mode: str) -> None:
        g = self.gen
        pubs = [c for c in self.clients if c.publisher]
        await _sleep_until(g.t_start)
        pacer = None
        if mode == "window":
            for client in pubs:
                client.fill()
        elif pubs and self.plan["rate"] > 0:
            pacer = asyncio.ensure_future(self.pace(pubs, self.plan["rate"]))
        await _sleep_until(g.m1)
        if pacer is not None:
            await pacer
        self.queue.put(("done", self.index, None))
        deadline = g.m1 + int(self.plan["drain"] * 1e9)
        while True:
            now = _time_ns()
            if now >= deadline:
                self.drain_timed_out = True
                break
            waiting = any(c.outstanding > 0 and not c.gone for c in pubs)
            if not waiting and now - g.last_delivery > _IDLE_NS:
                break
            await asyncio.sleep(0.05)

    async def run_flood(self) -> None:
        """Write chat_messages from every flooder as fast as the event loop turns, from the
        load's start to the window's end or until the server closes them. The message is not
        the measured format, so echoes and refusals are only parsed, never counted as load."""
        g = self.gen
        burst = 256  # frames per flooder per loop turn: enough to outrun any rate limit
        await _sleep_until(g.t_start)
        while _time_ns() < g.m1:
            alive = [c for c in self.clients if not c.gone and c.transport is not None]
            if not alive:
                break
            for c in alive:
                message = c.prefix + b'flood"}}'
                for _ in range(burst):
                    c.transport.send(_TEXT, message)  # type: ignore[union-attr]
                self.flood_sent += burst
            await asyncio.sleep(0)
        self.queue.put(("done", self.index, None))
        await _sleep_until(g.m1)

    async def pace(self, pubs: list[Client], rate: float) -> None:
        """Open loop: the k-th message of this process goes out at t_start + k/rate, to the
        publishers in turn, whatever the replies do; a late tick catches up in a burst. Each
        message carries its actual send time, so a stall of this process shows up as
        ``pacer_max_lag_us`` (how far behind schedule a send went out), not as latency."""
        g = self.gen
        interval = 1e9 / rate
        count = len(pubs)
        k = 0
        while True:
            now = _time_ns()
            if now >= g.m1:
                return
            due = int((now - g.t_start) / interval) + 1
            if k < due and now >= g.m0:
                lag = now - (g.t_start + int(k * interval))
                if lag > self.pacer_lag:
                    self.pacer_lag = lag
            while k < due:
                pubs[k % count].send_chat()
                k += 1
            await asyncio.sleep(max(0.0, (g.t_start + k * interval - _time_ns()) / 1e9))

    async def run_storm(self) -> None:
        g = self.gen
        g.storm = True
        size = self.plan["storm_size"]
        deadline = g.t_start + int(self.plan["timeout"] * 1e9)
        await _sleep_until(g.t_start)
        g.storm_last = _time_ns()
        expected: int | None = 0
        first = _time_ns()
        gate = asyncio.Semaphore(self.plan.get("storm_concurrency", 1))

        async def one(client: Any) -> Any:
            async with gate:
                t = _time_ns()
                reply = await self.join(client)
                us = max(1, (_time_ns() - t) // 1000)
                self.join_latency[us] = self.join_latency.get(us, 0) + 1
                return reply.get("members")

        for members in await asyncio.gather(*(one(c) for c in self.clients)):
            if expected is not None and isinstance(members, int):
                expected += size - members  # this client hears of everyone after it
            else:
                expected = None
        if self.plan.get("presence_diff"):
            expected = len(self.clients)  # each sees the final count once
        g.storm_expected = expected
        self.storm_first = first
        idle_since = _time_ns()
        while True:
            now = _time_ns()
            if now >= deadline:
                self.drain_timed_out = True
                break
            if expected is not None and g.storm_received >= expected:
                break
            # a server without room_joined.members: wait for a second of silence
            if expected is None and now - max(g.storm_last, idle_since) > 1_000_000_000:
                break
            await asyncio.sleep(0.005)
        self.queue.put(("done", self.index, None))

    async def run_connect(self) -> None:
        g = self.gen
        sem = asyncio.Semaphore(self.plan["concurrency"])
        timeout = self.plan["timeout"]
        await _sleep_until(g.t_start)

        async def one(cid: int) -> None:
            async with sem:
                t = _time_ns()
                self.connect_first = self.connect_first or t
                try:
                    client = await self.connect(cid, None, False)
                except Exception as exc:
                    self.connect_failures += 1
                    g.errors[f"connect: {type(exc).__name__}: {exc}"[:120]] += 1
                else:
                    now = _time_ns()
                    self.count_source(client)
                    self.connect_last = now
                    us = max(1, (now - t) // 1000)
                    g.latency[us] = g.latency.get(us, 0) + 1
                    _bump(g.series, (now - g.t_start) // _BUCKET_NS)
                self.tick()

        tasks = [asyncio.ensure_future(one(m[0])) for m in self.plan["members"]]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            self.drain_timed_out = True
            self.connect_failures += len(pending)
        self.queue.put(("done", self.index, {"open": len(self.clients)}))
        await self.wait_barrier()  # the coordinator reads the server's memory, idles meanwhile
        idle_start, idle_end = self.schedule[3], self.schedule[4]
        if idle_end:
            self.idle_pings = g.pings_between(idle_start, idle_end)
            self.open_after_idle = sum(1 for c in self.clients if not c.gone)

    def count_source(self, client: Client) -> None:
        """Count the source address the kernel gave the connection (proves --sources)."""
        assert client.transport is not None
        sockname = client.transport.underlying_transport.get_extra_info("sockname")
        self.source_ips[sockname[0] if sockname else "?"] += 1

    # -- report -------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        g = self.gen
        if self.plan.get("flood"):
            return self.flood_result()
        hist = new_histogram()
        for us, count in g.latency.items():
            hist.record_value(min(max(us, _HIST_LOW), _HIST_HIGH), count)
        rooms: dict[str, list[int]] = {}
        for client in self.clients:
            if client.room is None:
                continue
            entry = rooms.setdefault(client.room, [0, 0, 0])
            entry[0] += 1  # receivers
            entry[1] += sum(t[2] for t in client.tracks.values())  # distinct deliveries
            entry[2] += client.n  # messages sent
        out: dict[str, Any] = {
            "index": self.index,
            "histogram": hist.encode(),
            "deliveries": g.deliveries,
            "duplicates": g.duplicates,
            "reorders": g.reorders,
            "sent_window": g.sent_window,
            "sent_total": g.sent_total,
            "series": g.series,
            "sent_series": g.sent_series,
            "rooms": rooms,
            "closes": dict(g.closes),
            "errors": dict(g.errors),
            "disconnects": g.disconnects,
            "drain_timed_out": self.drain_timed_out,
            "pacer_max_lag_us": self.pacer_lag // 1000,
        }
        if g.storm:
            join_hist = new_histogram()
            for us, count in self.join_latency.items():
                join_hist.record_value(min(us, _HIST_HIGH), count)
            out["storm"] = {
                "first": self.storm_first,
                "last": g.storm_last,
                "received": g.storm_received,
                "duplicates": g.storm_duplicates,
                "stale": g.storm_stale,
                "diffs": g.storm_diffs,
                "expected": g.storm_expected,
                "join_histogram": join_hist.encode(),
            }
        if self.plan["mode"] == "connect":
            out["connect"] = {
                "first": self.connect_first,
                "last": self.connect_last,
                "open": len(self.clients),
                "failed": self.connect_failures,
                "open_after_idle": self.open_after_idle,
                "idle_pings": self.idle_pings,
                "sources": dict(self.source_ips),
            }
        return out

    def empty_result(self) -> dict[str, Any]:
        """A result that counts nothing of the chat load (flooders, the reconnect storm)."""
        return {
            "index": self.index,
            "histogram": new_histogram().encode(),
            **dict.fromkeys(
                (
                    "deliveries",
                    "duplicates",
                    "reorders",
                    "sent_window",
                    "sent_total",
                    "disconnects",
                    "pacer_max_lag_us",
                ),
                0,
            ),
            "series": [0],
            "sent_series": [0],
            "rooms": {},
            "closes": {},
            "errors": {},
            "drain_timed_out": False,
        }

    def flood_result(self) -> dict[str, Any]:
        """The flooders' fate, apart from the measured load (which they are not part of)."""
        g = self.gen
        return {
            **self.empty_result(),
            "flood": {
                "clients": len(self.clients),
                "sent": self.flood_sent,
                "refused": sum(g.errors.values()),
                "closes": dict(g.closes),
                "open_at_end": sum(1 for c in self.clients if not c.gone),
            },
        }


def worker_main(
    plan: dict[str, Any], queue: Any, barrier: Any, schedule: Any, counter: Any
) -> None:
    """Entry point of a generator process (multiprocessing, spawn start method)."""
    index = plan["index"]
    try:
        import uvloop

        from .targets import raise_nofile

        if plan["cpus"]:
            os.sched_setaffinity(0, plan["cpus"])
        soft, _ = raise_nofile()
        if soft < len(plan["members"]) + 64:
            queue.put(
                (
                    "warning",
                    index,
                    f"generator {index}: RLIMIT_NOFILE {soft} is below "
                    f"its {len(plan['members'])} connections",
                )
            )
        result = uvloop.run(Worker(plan, queue, barrier, schedule, counter).run())
        queue.put(("result", index, result))
    except BaseException:
        queue.put(("error", index, traceback.format_exc()))
        barrier.abort()
