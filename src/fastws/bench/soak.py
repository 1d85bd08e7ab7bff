"""The soak, on the generator side: users in many rooms, chat at a fixed total rate spread over
the rooms, and every second a fraction of the users closing their connection and coming back
at once with ``join_room`` + ``since`` (the seq and epoch of the last chat_message they hold),
as fastws.client does after a drop. Half the closes send a close frame, half only drop the
TCP connection, so the server's cleanup is exercised both ways.

Every user keeps a bitmap of the seqs it holds since its first ``room_joined``; at the end a
room's final seq is the highest any of its members saw, and a user lacking a seq up to it is a
loss, a seq held twice a duplicate, a seq arriving below one already held a reorder. Messages
sent into a room but never given a seq (the room's final seq short of what its members sent)
are counted apart as ``unsequenced``. All of a room's members are in one generator process
(scenarios.build_plan puts room r in process r % procs), so rooms are judged here.

Runs inside a generator process (loadgen.Worker.run_soak); connecting and reconnecting (with
jittered backoff) are the reconnect storm's (reconnect.Storm). The coordinator samples the
server's memory meanwhile (scenarios.run_plan).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Sequence
from typing import Any

import orjson
import picows

from .reconnect import Conn, Stats, Storm, User

_TEXT = picows.WSMsgType.TEXT
_NS = 1_000_000_000
# the soak's text "<user>:<n>:<send time_ns>", then the server's seq and epoch (last fields)
_search_chat = re.compile(rb'"message":"\d+:\d+:(\d+).*"seq":(\d+),"epoch":"(\w*)"\}$').search
_time_ns = time.time_ns
_IDLE_NS = 500_000_000  # the drain ends after this long without a chat delivery
_PICKS = 8  # random tries to find a user to cycle (one that is joined, not reconnecting)


def _bump(series: list[int], index: int) -> None:
    if index >= len(series):
        series.extend([0] * (index + 1 - len(series)))
    series[index] += 1


class SoakStats(Stats):
    """One generator process's counters; per-second series count from ``start``."""

    def __init__(self) -> None:
        super().__init__()
        self.start = 0  # the load's start, time_ns
        self.chat_parsed: dict[bytes, tuple[int, str, int]] = {}  # payload -> seq, epoch, sent
        self.latency: dict[int, int] = {}  # us -> count, live deliveries only
        self.deliveries: list[int] = []  # distinct chat_messages received, per second
        self.sent: list[int] = []  # chat_messages sent, per second
        self.cycles: list[int] = []  # users closed and sent back, per second


class SoakUser(User):
    """One user across its connections: which seqs of its room it holds."""

    stats: SoakStats

    def __init__(self, stats: Stats, cid: int, room: str, url: str, publisher: bool) -> None:
        super().__init__(stats, cid, room, url, publisher)
        self.base = 0  # owed every seq after this one (its first room_joined's seq)
        self.held = bytearray(32)  # bit per seq held
        self.distinct = 0  # seqs held (all above base)
        self.reorders = 0
        self.recoveries = 0  # re-joins answered recovered: true
        self.unrecovered = 0  # ... recovered: false (history too short, or a new epoch)
        room_json = orjson.dumps(room).decode()
        self.chat_prefix = (
            f'{{"type":"chat_message","payload":{{"room":{room_json},"message":"'.encode()
        )

    def restart_epoch(self, epoch: str, base: int) -> None:
        """A new run of seqs (the first join, or history lost): owed everything after base."""
        self.epoch, self.base, self.last = epoch, base, base
        self.held = bytearray(32)
        self.distinct = 0

    def on_joined(self, msg: dict[str, Any]) -> None:
        epoch, head = str(msg.get("epoch", "")), int(msg.get("seq", 0))
        recovered = msg.get("recovered")
        if not self.epoch:
            self.restart_epoch(epoch, head)
        elif epoch != self.epoch:
            self.epoch_changes += 1
            self.restart_epoch(epoch, head)
        if recovered is True:
            self.recoveries += 1
        elif recovered is False:
            self.unrecovered += 1
        self.recovered = recovered
        self.head = head
        self.joined = True

    def on_chat(self, data: bytes) -> None:
        stats = self.stats
        parsed = stats.chat_parsed.get(data)
        if parsed is None:
            match = _search_chat(data)
            if match is None:
                stats.errors["chat_message without the soak's text, seq or epoch"] += 1
                return
            parsed = (int(match[2]), match[3].decode(), int(match[1]))
            if len(stats.chat_parsed) > 8192:
                stats.chat_parsed.clear()
            stats.chat_parsed[data] = parsed
        seq, epoch, sent = parsed
        stats.last_chat = now = _time_ns()
        stats.chats += 1
        if epoch != self.epoch:
            self.epoch_changes += 1  # history lost under us: a new run of seqs starts here
            self.restart_epoch(epoch, seq - 1)
        if seq <= self.base:
            stats.errors["chat_message at or before the seq of the user's first join"] += 1
            return
        held = self.held
        byte, bit = seq >> 3, 1 << (seq & 7)
        if byte >= len(held):
            held.extend(bytes(max(len(held), byte + 1 - len(held))))
        if held[byte] & bit:
            self.duplicates += 1
            return
        held[byte] |= bit
        self.distinct += 1
        if seq < self.last:
            self.reorders += 1
        else:
            self.last = seq
        _bump(stats.deliveries, (now - stats.start) // _NS)
        if seq > self.head:  # live; a replay's latency would be the time the user was away
            us = (now - sent) // 1000
            stats.latency[us] = stats.latency.get(us, 0) + 1

    def missing(self, final: int) -> int:
        """Seqs up to the room's ``final`` this user never received."""
        return max(0, final - self.base - self.distinct)


class Soak(Storm):
    """One generator process's users through the soak."""

    user_class = SoakUser
    stats_class = SoakStats
    users: Sequence[SoakUser]
    stats: SoakStats

    def __init__(self, plan: dict[str, Any], schedule: Any, url_for: Any) -> None:
        super().__init__(plan, schedule, url_for)
        self.rate: float = plan["rate"]  # msg/s from this process
        self.churn_rate: float = plan["reconnect_rate"] * len(self.users)  # users cycled / s
        self.drain: float = plan["drain"]
        self.suffix = ((":" + "x" * plan["pad"] if plan["pad"] else "") + '"}}').encode()
        self.pacer_lag = 0  # ns: the furthest behind schedule a send went out
        self.cycles = 0  # users closed and sent back
        self.drops = 0  # connections lost that the soak did not close
        self.skipped = 0  # churn ticks that found nobody to close (everyone away)
        self.unsent = 0  # pacer ticks that found nobody joined to post

    async def run(self) -> bool:
        """The load from the schedule's start to its end, then the drain; True when every
        user is back and caught up and nothing has arrived for a while, False when --drain
        ran out first."""
        start, end = self.schedule[0], self.schedule[2]
        self.stats.start = start
        await asyncio.sleep(max(0.0, (start - _time_ns()) / _NS))
        await asyncio.gather(self.pace(start, end), self.churn(start, end))
        deadline = end + int(self.drain * _NS)
        settled = False
        while _time_ns() < deadline:
            if self.settled():
                settled = True
                break
            await asyncio.sleep(0.05)
        self.stopping = True
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return settled

    def settled(self) -> bool:
        return (
            not self.tasks
            and all(u.caught_up or u.failed for u in self.users)
            and _time_ns() - self.stats.last_chat > _IDLE_NS
        )

    async def pace(self, start: int, end: int) -> None:
        """Open loop, as loadgen.Worker.pace: the k-th message at start + k/rate, from one
        member of every room in turn (so each room's messages are spread over the run)."""
        order = _interleaved(self.users)
        if not order or self.rate <= 0:
            return
        interval = _NS / self.rate
        k = 0
        while True:
            now = _time_ns()
            if now >= end:
                return
            due = int((now - start) / interval) + 1
            if k < due:
                self.pacer_lag = max(self.pacer_lag, now - (start + int(k * interval)))
            while k < due:
                self.post(order, k, now)
                k += 1
            await asyncio.sleep(max(0.0, (start + k * interval - _time_ns()) / _NS))

    def post(self, order: list[SoakUser], k: int, now: int) -> None:
        """A message from ``order[k]``, or from the next member in the order when that one is
        away (reconnecting), so the total rate holds."""
        count = len(order)
        for i in range(count):
            user = order[(k + i) % count]
            conn = user.conn
            if user.joined and conn is not None and conn.transport is not None:
                if conn.closing:
                    continue
                text = b"%d:%d:%d" % (user.cid, user.sent, now)
                conn.transport.send(_TEXT, user.chat_prefix + text + self.suffix)
                user.sent += 1
                _bump(self.stats.sent, (now - self.stats.start) // _NS)
                return
        self.unsent += 1

    async def churn(self, start: int, end: int) -> None:
        """Close one user every 1/churn_rate seconds, each coming straight back with since."""
        if self.churn_rate <= 0:
            return
        interval = _NS / self.churn_rate
        k = 1
        while True:
            due = start + int(k * interval)
            if due >= end:
                return
            await asyncio.sleep(max(0.0, (due - _time_ns()) / _NS))
            k += 1
            user = self.pick()
            if user is None:
                self.skipped += 1
            else:
                self.cycle(user, clean=k % 2 == 0)

    def pick(self) -> SoakUser | None:
        for _ in range(_PICKS):
            user = random.choice(self.users)
            conn = user.conn
            if user.joined and not user.reconnecting and conn is not None and not conn.closing:
                return user
        return None

    def cycle(self, user: SoakUser, clean: bool) -> None:
        """Close ``user``'s connection (with a close frame when ``clean``, else only the TCP
        connection) and reconnect it at once, as a client would after a drop."""
        conn = user.conn
        assert conn is not None and conn.transport is not None
        conn.closing = True  # ours: not a drop for Storm.dropped
        if clean:
            conn.transport.send_close(picows.WSCloseCode.OK)
        conn.transport.disconnect()
        user.joined = False
        self.cycles += 1
        _bump(self.stats.cycles, (_time_ns() - self.stats.start) // _NS)
        task = asyncio.get_running_loop().create_task(self.reconnect(user))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def dropped(self, conn: Conn) -> None:
        user = conn.user
        if not self.stopping and conn is user.conn and not user.reconnecting:
            self.drops += 1
        super().dropped(conn)

    def result(self, settled: bool) -> dict[str, Any]:
        """Counts over this process's users and rooms (rooms: final seq, sent, losses,
        unsequenced, duplicates, reorders)."""
        by_room: dict[str, list[SoakUser]] = {}
        for user in self.users:
            by_room.setdefault(user.room, []).append(user)
        rooms: dict[str, list[int]] = {}
        for room, members in by_room.items():
            final = max(max(u.last, u.head) for u in members)
            sent = sum(u.sent for u in members)
            rooms[room] = [
                final,
                sent,
                sum(u.missing(final) for u in members),
                max(0, sent - final),
                sum(u.duplicates for u in members),
                sum(u.reorders for u in members),
            ]
        users = list(self.users)
        stats = self.stats
        return {
            "users": len(users),
            "cycles": self.cycles,
            "reconnects": sum(u.reconnects for u in users),
            "drops": self.drops,
            "recovered": sum(u.recoveries for u in users),
            "not_recovered": sum(u.unrecovered for u in users),
            "epoch_changes": sum(u.epoch_changes for u in users),
            "failed": sum(1 for u in users if u.failed),
            "distinct": sum(u.distinct for u in users),
            "duplicates": sum(u.duplicates for u in users),
            "reorders": sum(u.reorders for u in users),
            "losses": sum(r[2] for r in rooms.values()),
            "unsequenced": sum(r[3] for r in rooms.values()),
            "sent": sum(u.sent for u in users),
            "skipped": self.skipped,
            "unsent": self.unsent,
            "settled": settled,
            "pacer_max_lag_us": self.pacer_lag // 1000,
            "rooms": rooms,
            "latency": stats.latency,
            "deliveries_series": stats.deliveries,
            "sent_series": stats.sent,
            "cycles_series": stats.cycles,
            "errors": dict(stats.errors),
            "closes": dict(stats.closes),
        }


def _interleaved(users: Sequence[SoakUser]) -> list[SoakUser]:
    """One member of every room, then the next member of every room, ..."""
    rooms: dict[str, list[SoakUser]] = {}
    for user in users:
        rooms.setdefault(user.room, []).append(user)
    groups = list(rooms.values())
    depth = max((len(g) for g in groups), default=0)
    return [g[i] for i in range(depth) for g in groups if i < len(g)]
