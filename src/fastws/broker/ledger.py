"""Room-wide facts held in one process: seq, epoch, bounded history and presence.

Shared by ``MemoryBroker`` (one process) and the local bus's ``BusServer`` (the supervisor of
``--workers N``), so both keep exactly the same rules:

- ``seq`` counts a room's chat messages from 1; ``epoch`` names one unbroken run of them. When a
  room's state is dropped (emptied with nothing worth keeping, history expired, a restart),
  the next message starts a new epoch at seq 1, so a client can tell "nothing missed" from
  "history gone".
- history keeps the last ``history_size`` chat payloads of a room for ``history_ttl`` seconds;
  an empty room keeps its state until its newest message is that old.
- the presence version moves up with every join and leave. One counter serves every room of
  the ledger: it only has to grow within a room, and a room dropped and made again must not
  start it over (a notice from before would look new).
- all rooms' history together is capped at ``policy.max_bytes`` (payloads plus about
  ``ENTRY_COST`` bytes of bookkeeping each): past it, the least recently used empty rooms are
  dropped whole (their next message starts a new epoch), then, if every room with history has
  members, the oldest messages of the room being written. So memory stays bounded whatever
  clients do.
- a room may be *leased* (the local bus lends a room's seq to the one worker subscribed to it):
  the lessee allocates the seqs and ``record`` keeps what it published. A leased room is never
  dropped; ``unlease(reset=True)`` starts a new epoch when records may have been lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from ..accel import fanout
from .types import CHAT_TAIL, HistoryPolicy, JoinResult, LeaveResult, MemberInfo, new_epoch

__all__ = ["HistoryPolicy", "JoinResult", "LeaveResult", "Ledger", "new_epoch"]

#: Bytes a kept message costs beyond its payload: its (seq, time, payload) tuple, the float, the
#: bytes object's header and the deque's slot (CPython 3.11, 64-bit).
ENTRY_COST = 150


class SweepTimer:
    """Sweeps a ledger on the running loop (expired empty rooms go even when no chat comes):
    every quarter of the history ttl, at least every minute, at most every 0.05 s."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        ttl = ledger.policy.ttl
        self.interval = min(max(ttl / 4, 0.05), 60.0) if ttl else 60.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.ledger.sweep()
        self._handle = asyncio.get_running_loop().call_later(self.interval, self.start)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


#: One room's facts (seq, epoch, history, members): a compiled class the chat path reads.
_Room = fanout.LedgerRoom


class Ledger(fanout.LedgerCore):
    """The rooms' facts; sequencing and keeping are ``LedgerCore``'s (compiled), so the chat
    path and every broker keep history by the same code."""

    def __init__(
        self, policy: HistoryPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or HistoryPolicy()
        self.clock = clock
        self.rooms = {}
        self.version = 0  # presence version of the last join or leave, of any room
        self.bytes = 0  # history kept, all rooms (see ENTRY_COST)
        self.max_bytes = self.policy.max_bytes or float("inf")
        self.entry_cost = ENTRY_COST
        # Rooms kept with no members, least recently used first: evicted first.
        self._empty: OrderedDict[str, None] = OrderedDict()
        self.evicted_rooms = self.evicted_messages = 0

    def _room(self, name: str) -> _Room:
        room = self.rooms.get(name)
        if room is None:
            size = self.policy.size_for(name)
            room = self.rooms[name] = _Room(deque(maxlen=size) if size else None, new_epoch())
            self._empty[name] = None  # until someone joins
        return room

    def _fresh(self, room: _Room, now: float) -> list[tuple[int, float, bytes]]:
        """The room's history within ttl (expired entries are dropped on the way)."""
        if room.history is None:
            return []
        ttl = self.policy.ttl
        if ttl:
            history = room.history
            while history and now - history[0][1] > ttl:
                cost = len(history.popleft()[2]) + ENTRY_COST
                room.bytes -= cost
                self.bytes -= cost
        return list(room.history)

    def publish_seq(self, name: str, head: bytes) -> tuple[int, bytes]:
        """Allocate the next seq; return it and the payload to publish (kept in history)."""
        room = self.rooms.get(name) or self._room(name)  # hot: no call when it exists
        seq = room.seq = room.seq + 1
        payload = CHAT_TAIL % (head, seq, room.epoch_bytes)  # types.chat_payload without a call
        room.stamp = now = self.clock()
        if room.history is not None:
            self.keep(name, room, (seq, now, payload))
        return seq, payload

    def _kept(self, name: str, room: _Room) -> None:
        """After ``keep`` put the room past the bytes in all, or the room is empty."""
        if not room.members and name in self._empty:
            self._empty.move_to_end(name)
        if self.bytes > self.max_bytes:
            self._evict(name, room)

    def _evict(self, name: str, room: _Room) -> None:
        """Back under max_bytes: least recently used empty rooms first, then ``room``'s
        oldest messages (every other room with history has members)."""
        empty, kept = self._empty, set()
        while self.bytes > self.max_bytes and empty:
            victim = next(iter(empty))  # the least recently used: no copy of them all
            if victim in kept:
                break  # every empty room left is this one or leased
            if victim == name or self.rooms[victim].leased:  # a lessee still writes
                kept.add(victim)
                empty.move_to_end(victim)
                continue
            self._drop(victim)
            self.evicted_rooms += 1
        history = room.history
        while self.bytes > self.max_bytes and history is not None and len(history) > 1:
            cost = len(history.popleft()[2]) + ENTRY_COST
            room.bytes -= cost
            self.bytes -= cost
            self.evicted_messages += 1

    def _drop(self, name: str) -> None:
        room = self.rooms.pop(name)
        self.bytes -= room.bytes
        self._empty.pop(name, None)

    def _emptied(self, name: str, room: _Room) -> None:
        """The room has no member left: dropped, or kept as the most recently used empty one."""
        if self._worth_keeping(room):
            self._empty[name] = None
            self._empty.move_to_end(name)
        else:
            self._drop(name)

    def lease(self, name: str) -> tuple[int, str]:
        """Lend the room's seq: (last seq, epoch) for the lessee to go on from."""
        room = self._room(name)
        room.leased = True
        return room.seq, room.epoch

    def record(self, name: str, seq: int, payload: bytes) -> None:
        """Keep a chat the lessee sequenced and published (``payload`` is its chat_payload)."""
        room = self.rooms.get(name) or self._room(name)
        room.seq = seq
        room.stamp = now = self.clock()
        if room.history is not None:
            self.keep(name, room, (seq, now, payload))

    def unlease(self, name: str, reset: bool = False) -> None:
        """The seq is back here; ``reset``: the lessee's last records may be lost (new epoch)."""
        room = self.rooms.get(name)
        if room is None:
            return
        room.leased = False
        if reset:
            self.bytes -= room.bytes
            room.restart(new_epoch())
        if not room.members:
            self._emptied(name, room)

    def join(self, name: str, member: MemberInfo, since: tuple[int, str] | None) -> JoinResult:
        room = self._room(name)
        resumed = False
        if room.lingering:
            dropped = room.lingering.pop(member.userId, None)
            if dropped is not None and dropped != member.clientId:
                resumed = room.members.pop(dropped, None) is not None
        room.members[member.clientId] = member
        self._empty.pop(name, None)
        self.version += 1
        recovered: bool | None = None
        replay: list[bytes] = []
        if since is not None:
            recovered, replay = self._recover(room, since)
        return JoinResult(
            len(room.members), room.seq, room.epoch, recovered, replay, self.version, resumed
        )

    def linger(self, name: str, client_id: str, user_id: str) -> None:
        room = self.rooms.get(name)
        if room is not None and client_id in room.members:
            if room.lingering is None:
                room.lingering = {}
            room.lingering[user_id] = client_id

    @staticmethod
    def _unlinger(room: _Room, member: MemberInfo) -> None:
        if room.lingering and room.lingering.get(member.userId) == member.clientId:
            del room.lingering[member.userId]

    def _recover(self, room: _Room, since: tuple[int, str]) -> tuple[bool, list[bytes]]:
        seq, epoch = since
        if epoch != room.epoch or seq > room.seq or seq < 0:
            return False, []
        if seq == room.seq:
            return True, []
        kept = self._fresh(room, self.clock())
        missed = [(s, payload) for s, _, payload in kept if s > seq]
        # Complete only if history still reaches back to the first message missed.
        complete = bool(missed) and missed[0][0] == seq + 1
        return complete, [payload for _, payload in missed]

    def leave(self, name: str, client_id: str) -> LeaveResult:
        room = self.rooms.get(name)
        if room is None:
            return LeaveResult(0, self.version)
        member = room.members.pop(client_id, None)
        if member is not None:
            self.version += 1
            self._unlinger(room, member)
        if not room.members:
            self._emptied(name, room)
        return LeaveResult(len(room.members), self.version, member is not None)

    def _worth_keeping(self, room: _Room) -> bool:
        if room.leased:
            return True
        if room.history is None or not room.history:
            return False
        return not self.policy.ttl or self.clock() - room.stamp <= self.policy.ttl

    def presence(self, name: str) -> list[MemberInfo]:
        room = self.rooms.get(name)
        return list(room.members.values()) if room is not None else []

    def after(self, name: str, seq: int) -> tuple[int, list[bytes]]:
        """(seq of the first, payloads) of the chats kept after ``seq``, oldest first: what a
        worker whose connection dropped missed (nothing if the room started over since)."""
        room = self.rooms.get(name)
        if room is None or seq >= room.seq:
            return 0, []
        kept = [(s, payload) for s, _, payload in self._fresh(room, self.clock()) if s > seq]
        return (kept[0][0], [payload for _, payload in kept]) if kept else (0, [])

    def history(self, name: str, limit: int) -> tuple[int, str, list[bytes]]:
        """(last seq, epoch, up to ``limit`` newest chat payloads oldest first)."""
        room = self.rooms.get(name)
        if room is None:
            return 0, "", []
        kept = self._fresh(room, self.clock())
        return room.seq, room.epoch, [payload for _, _, payload in kept[-limit:]] if limit else []

    def forget_node(self, node_id: str) -> list[tuple[str, MemberInfo, LeaveResult]]:
        """Drop every member of ``node_id``; (room, member, what is left) for each."""
        gone: list[tuple[str, MemberInfo, LeaveResult]] = []
        for name in list(self.rooms):
            room = self.rooms[name]
            for member in [m for m in room.members.values() if m.node == node_id]:
                del room.members[member.clientId]
                self._unlinger(room, member)
                self.version += 1
                gone.append((name, member, LeaveResult(len(room.members), self.version)))
            if not room.members:
                self._emptied(name, room)
        return gone

    def sweep(self) -> int:
        """Drop empty rooms whose history has expired; return how many."""
        dead = [n for n, r in self.rooms.items() if not r.members and not self._worth_keeping(r)]
        for name in dead:
            self._drop(name)
        return len(dead)
