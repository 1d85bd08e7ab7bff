"""The local bus's server: the host's seq counters and presence, in the supervisor.

``BusServer`` listens on a Unix stream socket in the run directory (``buswire.socket_path``);
each worker's ``LocalBusBroker`` holds one connection to it. The wire format is in
``buswire``. The server holds the only copy of the host's per-room ``seq`` counters and
presence (a ``Ledger``, the same rules as ``MemoryBroker``) and which connection subscribed to
which room.

Order: the server handles each worker's requests in the order they arrive on its stream, all
of one read in that read's callback, and each publication is queued for every subscribed
worker while its request is handled, so every worker sees one global order. A ``sub`` is
recorded before it is answered, so every publication after the reply follows on the stream.

Batching: what is queued for a worker in one loop turn leaves as one frame, in one write
(flushed by ``call_soon``), so N requests read in one turn cost one reply write per worker.

Leases (see ``buswire``): a room with one subscribed worker lends that worker its seq, so its
chats cost the server one ``record`` each and no reply. A request that needs the seq of a room
leased to another worker (``seq``) holds its worker's stream, in order, until the lessee
releases; ``record`` and ``release`` are never held. A lessee that does not release within
``lease_timeout`` is cut off. When a lease ends with its connection, the records are complete
if the worker closed it (they precede every delivery: the worker delivers a leased chat only
once its record is in the socket); if the server cut it off, unread records may be lost, so
the room starts a new epoch.

A slow worker cannot stall or bloat the server: writes never wait, and a connection whose
unsent bytes pass ``max_buffer`` is dropped (logged). Dropping a connection forgets its
subscriptions but keeps its presence: the worker process is alive, and it reconnects and
sends ``resync`` with its members. Only ``forget_node`` (the supervisor saw the process die)
removes a node's presence and tells the rooms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, cast

import msgspec

from .. import protocol as p
from .buswire import (
    FAILED,
    OK,
    Acquire,
    Deadline,
    Deframer,
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
    Request,
    Resync,
    Revoke,
    Sequenced,
    Subscribe,
    Unsubscribe,
    socket_path,
)
from .ledger import Ledger, SweepTimer
from .types import HistoryPolicy, LeaveResult, MemberInfo

log = logging.getLogger("fastws.bus")

#: Unsent bytes a worker's connection may hold before the server drops it as too slow.
MAX_BUFFER = 64 * 1024 * 1024
#: Seconds a lessee has to release a revoked lease before its connection is cut.
LEASE_TIMEOUT = 2.0


class _Link(asyncio.Protocol):
    """The server's end of one worker's connection: its read side, and its frame per turn."""

    def __init__(self, server: BusServer) -> None:
        self.server = server
        self.node = ""  # from the worker's resync; for logs
        self.rooms: set[str] = set()  # rooms this worker subscribed to
        self.leases: set[str] = set()  # rooms whose seq is lent to this worker
        # Requests held until ``waiting``'s lessee releases (None: not held).
        self.held: list[Request] | None = None
        self.waiting = ""
        self.cut = False  # the server closed this connection: unread records may be lost
        self.transport: asyncio.Transport | None = None
        self._deframer = Deframer(Request)
        self._framer = Framer()
        self._queued: list[msgspec.Struct] = []
        self._call_soon = asyncio.get_running_loop().call_soon

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        # Never pause_writing below our own bound: the server does not wait for anyone.
        transport.set_write_buffer_limits(high=MAX_BUFFER)
        self.server.links.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._queued.clear()
        self.server.drop(self)

    def data_received(self, data: bytes) -> None:
        server = self.server
        server.reads += 1
        try:
            frames = self._deframer.feed(data)
        except (ValueError, msgspec.DecodeError) as exc:
            log.warning(
                "broken bus stream from %s: %s",
                self.node or "a worker",
                exc,
                extra={"event": "bus_bad_request", "node": self.node},
            )
            self.close()
            return
        for requests in frames:
            server.serve(self, requests)
        # The requester's replies leave now, at the end of its read (the Outbox's flush_if_last);
        # what this read published to other workers stays corked until the turn ends.
        self._flush()

    def queue(self) -> list[msgspec.Struct]:
        """This turn's outgoing messages (a flush is scheduled): append to it in order."""
        if not self._queued and self.transport is not None:
            self._call_soon(self._flush)
        return self._queued

    def send(self, message: msgspec.Struct) -> None:
        """Queue ``message`` for this worker; the turn's messages leave in one write."""
        if not self._queued:
            if self.transport is None:
                return
            self._call_soon(self._flush)
        self._queued.append(message)

    def _flush(self) -> None:
        transport, queued = self.transport, self._queued
        if transport is None or not queued:
            return
        self._queued = []
        transport.write(self._framer.frame(queued))
        self.server.writes += 1
        if transport.get_write_buffer_size() > self.server.max_buffer:
            log.warning(
                "worker %s is too slow: dropping its bus connection",
                self.node,
                extra={
                    "event": "bus_slow_worker",
                    "node": self.node,
                    "buffered": transport.get_write_buffer_size(),
                },
            )
            self.server.slow_drops += 1
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.cut = True
            self.transport.abort()


class BusServer:
    """The host's seq counters and presence, served to the workers over a Unix socket."""

    def __init__(
        self,
        directory: str,
        policy: HistoryPolicy | None = None,
        max_buffer: int = MAX_BUFFER,
        lease_timeout: float = LEASE_TIMEOUT,
    ) -> None:
        self.directory = directory
        self.path = socket_path(directory)
        self.max_buffer = max_buffer
        self.lease_timeout = lease_timeout
        self.ledger = Ledger(policy)
        self.links: set[_Link] = set()
        self._subscribers: dict[str, list[_Link]] = {}
        self._nodes: set[str] = set()
        self._forgotten: set[str] = set()
        self._server: asyncio.AbstractServer | None = None
        self._leases: dict[str, _Link] = {}  # room -> its lessee
        self._revoked: dict[str, float] = {}  # room -> when its lessee was told to release
        self._waiters: dict[str, list[_Link]] = {}  # room -> links held until it is released
        self._revoke_timer: asyncio.TimerHandle | None = None
        self._sweeper = SweepTimer(self.ledger)
        # Counters for stats() and the batching tests.
        self.requests = self.reads = self.frames = self.writes = self.slow_drops = 0
        self.records = self.leases_granted = self.revokes = self.leases_cut = 0
        self.expired = 0  # requests read past their frame's deadline, refused

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket of a previous run
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _Link(self), self.path
        )
        self._sweeper.start()
        log.info("local bus listening", extra={"event": "bus_listening", "endpoint": self.path})

    async def close(self) -> None:
        self._sweeper.stop()
        if self._revoke_timer is not None:
            self._revoke_timer.cancel()
            self._revoke_timer = None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self.links):
            link.close()
        if server is not None:
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def stats(self) -> dict[str, Any]:
        """Rooms with presence (connections each), seq counters, known nodes, counters."""
        rooms = self.ledger.rooms
        return {
            "rooms": {name: len(r.members) for name, r in rooms.items() if r.members},
            "seq": {name: r.seq for name, r in rooms.items() if r.seq},
            "nodes": sorted(self._nodes),
            "links": len(self.links),
            "requests": self.requests,
            "reads": self.reads,
            "frames": self.frames,
            "writes": self.writes,
            "slow_drops": self.slow_drops,
            "leases": len(self._leases),
            "records": self.records,
            "leases_granted": self.leases_granted,
            "revokes": self.revokes,
            "leases_cut": self.leases_cut,
            "expired": self.expired,
            "history_bytes": self.ledger.bytes,
            "evicted_rooms": self.ledger.evicted_rooms,
        }

    def forget_node(self, node_id: str) -> None:
        """Drop a dead worker's presence; tell each room, once per connection it lost.

        Node ids are unique per worker process, so the id is also refused from now on: a join
        the dead worker sent just before dying, still unread here, leaves no ghost behind.
        """
        self._nodes.discard(node_id)
        self._forgotten.add(node_id)
        gone = self.ledger.forget_node(node_id)
        self._tell_left(gone)
        if gone:
            log.info(
                "forgot node's members",
                extra={"event": "bus_forget", "node": node_id, "connections": len(gone)},
            )

    def drop(self, link: _Link) -> None:
        """A connection ended: forget its subscriptions and leases (its presence stays; see
        above) and whatever it had held."""
        self.links.discard(link)
        if link.held is not None:
            waiters = self._waiters[link.waiting]
            waiters.remove(link)
            if not waiters:
                del self._waiters[link.waiting]
            link.held, link.waiting = None, ""
        rooms, link.rooms = link.rooms, set()
        for room in rooms:
            subs = self._subscribers.get(room)
            if subs is not None and link in subs:
                subs.remove(link)
                if not subs:
                    del self._subscribers[room]
        for room in list(link.leases):
            self._end_lease(room, reset=link.cut)
        for room in rooms:
            self._offer(room)

    # ---- serving ------------------------------------------------------------------------------

    def publish(self, room: str, payload: bytes, exclude: str = "", seq: int = 0) -> None:
        links = self._subscribers.get(room)
        if links:
            pub = Publication(room, exclude, payload, seq)
            for link in links:
                link.send(pub)

    def serve(self, link: _Link, requests: list[Request]) -> None:
        """Answer one frame of ``link``'s requests in order, making their publications."""
        self.frames += 1
        self.requests += len(requests)
        if link.held is not None:  # waiting for a release: only records and releases go by
            for req in requests:
                if type(req) is Record:
                    self._record(link, req)
                elif type(req) is Release:
                    self._release(link, req.room)
                else:
                    link.held.append(req)
            return
        self._serve(link, requests, 0)

    def _serve(self, link: _Link, requests: list[Request], start: int) -> None:
        out = link.queue()  # the link's own messages, in order, appended in place
        mine = link.rooms
        subscribers = self._subscribers
        leases = self._leases
        publish_seq = self.ledger.publish_seq
        expired = False
        for i in range(start, len(requests)):
            req = requests[i]
            if type(req) is Record:  # the leased chat path: no reply
                self._record(link, req)
                continue
            if type(req) is Deadline:
                expired = time.monotonic() > req.at
                continue
            if expired and type(req) is not Release:  # the worker gave up on it: refuse
                self.expired += 1
                if self.expired & (self.expired - 1) == 0:  # 1st, 2nd, 4th...: rate-limited
                    log.warning(
                        "refused a request read past its deadline from %s (%d so far)",
                        link.node or "a worker",
                        self.expired,
                        extra={"event": "bus_expired", "node": link.node},
                    )
                out.append(FAILED)
                continue
            if type(req) is not PublishSeq:
                if type(req) is Release:
                    self._release(link, req.room)
                    continue
                try:
                    out.append(self._answer(link, req))
                except Exception:
                    log.exception("bus request failed", extra={"event": "bus_error"})
                    out.append(FAILED)
                continue
            room = req.room
            lessee = leases.get(room)
            if lessee is not None:
                if lessee is not link:  # hold the rest of the stream until it is released
                    self._hold(link, room, requests[i:])
                    return
                self._end_lease(room)  # its lessee asks: it has given the lease up
            # The chat hot path, inline: seq, the others' copies, then the requester's copy,
            # which is its reply too (a plain reply if it is not subscribed).
            seq, payload = publish_seq(room, req.head)
            links = subscribers.get(room)
            if links is not None and (len(links) > 1 or room not in mine):
                pub = Publication(room, "", payload, seq)
                for other in links:
                    if other is not link:
                        other.send(pub)
            out.append(Sequenced(room, payload, seq) if room in mine else Reply(a=seq))

    def _answer(self, link: _Link, req: Request) -> Reply:
        ledger = self.ledger
        if isinstance(req, Publish):
            self.publish(req.room, req.payload, req.exclude, req.seq)
            return OK
        if isinstance(req, Join):
            if req.member.node in self._forgotten:  # sent just before its worker died
                return FAILED
            if req.member.node:
                self._nodes.add(req.member.node)
            since = (req.since_seq, req.since_epoch) if req.since_seq >= 0 else None
            result = ledger.join(req.room, req.member, since)
            recovered = -1 if result.recovered is None else int(result.recovered)
            return Reply(
                a=result.members,
                b=result.seq,
                epoch=result.epoch,
                recovered=recovered,
                messages=result.replay,
                version=result.version,
                c=int(result.resumed),
            )
        if isinstance(req, Leave):
            left = ledger.leave(req.room, req.client_id)
            return Reply(a=left.members, version=left.version, c=int(not left.removed))
        if isinstance(req, Linger):
            ledger.linger(req.room, req.client_id, req.user_id)
            return OK
        if isinstance(req, Subscribe):
            if req.room not in link.rooms:
                link.rooms.add(req.room)
                self._subscribers.setdefault(req.room, []).append(link)
                lessee = self._leases.get(req.room)
                if lessee is not None and lessee is not link:
                    self._revoke(req.room)
            if req.after >= 0:  # back after a drop: what it missed, ahead of what follows
                first, missed = self.ledger.after(req.room, req.after)
                if missed:
                    return Reply(a=first, messages=missed)
            return OK
        if isinstance(req, Unsubscribe):
            if req.room in link.rooms:
                link.rooms.discard(req.room)
                subs = self._subscribers[req.room]
                subs.remove(link)
                if not subs:
                    del self._subscribers[req.room]
                if self._leases.get(req.room) is link:  # behind its last record
                    self._end_lease(req.room)
                self._offer(req.room)
            return OK
        if isinstance(req, Acquire):
            return self._grant(link, req.room)
        if isinstance(req, Presence):
            return Reply(members=ledger.presence(req.room))
        if isinstance(req, History):
            seq, epoch, messages = ledger.history(req.room, req.limit)
            return Reply(b=seq, epoch=epoch, messages=messages)
        if isinstance(req, Ping):
            return OK
        if isinstance(req, Resync):
            return self._resync(link, req)
        raise TypeError(f"unknown bus request {req!r}")

    # ---- leases -------------------------------------------------------------------------------

    def _grant(self, link: _Link, room: str) -> Reply:
        subs = self._subscribers.get(room)
        if (
            subs is None
            or len(subs) != 1
            or subs[0] is not link
            or room in self._leases
            or room in self._waiters
        ):
            return Reply(a=0)
        seq, epoch = self.ledger.lease(room)
        self._leases[room] = link
        link.leases.add(room)
        self.leases_granted += 1
        return Reply(a=1, b=seq, epoch=epoch)

    def _record(self, link: _Link, req: Record) -> None:
        room = req.room
        if self._leases.get(room) is not link:
            log.warning(
                "record for a room not leased to %s: %s",
                link.node or "a worker",
                room,
                extra={"event": "bus_bad_request", "node": link.node, "room": room},
            )
            return
        self.records += 1
        self.ledger.record(room, req.seq, req.payload)
        links = self._subscribers.get(room)
        if links is not None and len(links) > 1:
            pub = Publication(room, "", req.payload, req.seq)
            for other in links:
                if other is not link:
                    other.send(pub)

    def _release(self, link: _Link, room: str) -> None:
        if self._leases.get(room) is link:
            self._end_lease(room)
            self._offer(room)

    def _hold(self, link: _Link, room: str, rest: list[Request]) -> None:
        link.held, link.waiting = list(rest), room
        self._waiters.setdefault(room, []).append(link)
        self._revoke(room)

    def _revoke(self, room: str) -> None:
        if room in self._revoked:
            return
        self.revokes += 1
        self._revoked[room] = asyncio.get_running_loop().time()
        self._leases[room].send(Revoke(room))
        if self._revoke_timer is None:
            self._revoke_timer = asyncio.get_running_loop().call_later(
                self.lease_timeout / 4, self._check_revoked
            )

    def _check_revoked(self) -> None:
        """Cut off every lessee that has not released within ``lease_timeout``."""
        self._revoke_timer = None
        now = asyncio.get_running_loop().time()
        for room, since in list(self._revoked.items()):
            lessee = self._leases.get(room)
            if lessee is not None and not lessee.cut and now - since > self.lease_timeout:
                log.warning(
                    "worker %s did not release room %s within %g s: cut off",
                    lessee.node,
                    room,
                    self.lease_timeout,
                    extra={"event": "bus_lease_cut", "node": lessee.node, "room": room},
                )
                self.leases_cut += 1
                lessee.close()  # connection_lost ends its leases (new epochs) right away
        if self._revoked:
            self._revoke_timer = asyncio.get_running_loop().call_later(
                self.lease_timeout / 4, self._check_revoked
            )

    def _end_lease(self, room: str, reset: bool = False) -> None:
        """The room's seq is back here; the requests held for it go on, in order."""
        lessee = self._leases.pop(room)
        lessee.leases.discard(room)
        self._revoked.pop(room, None)
        self.ledger.unlease(room, reset)
        for link in self._waiters.pop(room, []):
            held, link.held, link.waiting = link.held, None, ""
            assert held is not None
            self._serve(link, held, 0)

    def _offer(self, room: str) -> None:
        """A room down to one subscriber, with no lease and no one held: offer it the lease."""
        subs = self._subscribers.get(room)
        if (
            subs is not None
            and len(subs) == 1
            and room not in self._leases
            and room not in self._waiters
        ):
            subs[0].send(Offer(room))

    def _resync(self, link: _Link, req: Resync) -> Reply:
        """A (re)connected worker states its presence: it is added, and members the bus had
        for that node but the worker no longer has (their leave was lost) leave, with notice."""
        link.node = req.node
        if req.node in self._forgotten:
            return FAILED
        ledger = self.ledger
        for room, member in req.members:
            ledger.join(room, member, None)
        if req.members:
            self._nodes.add(req.node)
        kept = {(room, m.clientId) for room, m in req.members}
        ghosts = [
            (name, m)
            for name, r in ledger.rooms.items()
            for m in r.members.values()
            if m.node == req.node and (name, m.clientId) not in kept
        ]
        self._tell_left([(name, m, ledger.leave(name, m.clientId)) for name, m in ghosts])
        return OK

    def _tell_left(self, gone: list[tuple[str, MemberInfo, LeaveResult]]) -> None:
        """user_left for each (room, member, what is left), where anyone is left to tell."""
        for room, member, left in gone:
            if left.members:
                notice = p.UserLeft(room, member.username, p.now_ms(), member.userId, left.members)
                self.publish(room, p.encode(notice), "", -left.version)
