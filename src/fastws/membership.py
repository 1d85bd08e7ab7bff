"""Room membership on one node: join (with its replay), leave, and the presence grace
of a dropped connection.

The only caller of the hub's ``join`` and ``leave`` and of a session's ``enter_room`` and
``exit_room``: the one writer of who is where. ``server.Node`` answers the sessions' join
and leave with it, and hands it each closed connection (``close``) and the drain's end
(``end_grace``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from . import protocol as p
from .actions import Actions
from .auth import Principal
from .broker import Broker, MemberInfo
from .config import Settings
from .errors import BrokerUnavailable
from .hub import Hub
from .session import Session

log = logging.getLogger("fastws.server")
# What the node's backend event feed records: (kind, client id, principal, room).
EventSink = Callable[[str, str, Principal, "str | None"], None]


async def quietly(action: Any) -> None:
    """Room notices are best effort: an outage is already logged and shown on /healthz."""
    with contextlib.suppress(BrokerUnavailable):
        await action


class Membership:
    """Who is in which room on this node, kept in step with the broker's presence."""

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        broker: Broker,
        actions: Actions,
        counters: Counter[str],
        event: EventSink,
        node_id: str,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.broker = broker
        self.inline = broker.inline
        self.actions = actions
        self.counters = counters
        self._event = event
        self.node_id = node_id
        # Rooms whose subscription is in flight: later local joiners wait for the same answer.
        self._subscribing: dict[str, asyncio.Future[bool]] = {}
        # (room, clientId) of dropped connections in their presence grace -> its timer.
        self._lingering: dict[tuple[str, str], tuple[asyncio.TimerHandle, Principal]] = {}

    async def close(self, session: Session) -> None:
        """``session``'s connection is gone: out of each room (now, or after the presence
        grace), then out of the broker's sessions."""
        grace = self.settings.presence_grace
        for room in list(session.rooms):
            if grace > 0:
                await self._linger(session, room, grace)
            else:
                await self._leave(session, room)
        await quietly(self.broker.session_closed(session.client_id))

    async def _linger(self, session: Session, room: str, grace: float) -> None:
        """A dropped connection stays in the room's presence for ``grace`` seconds; its user
        joining again meanwhile takes its place without a word to the room."""
        await self._drop_local(session, room)
        try:
            await self.broker.linger(room, session.client_id, session.principal.user_id)
        except BrokerUnavailable:
            await self._announce_left(room, session.client_id, session.principal)
            return
        who = session.principal
        self._lingering[(room, session.client_id)] = (
            asyncio.get_running_loop().call_later(
                grace, self._grace_over, room, session.client_id, who
            ),
            who,
        )

    def _grace_over(self, room: str, client_id: str, who: Principal) -> None:
        self._lingering.pop((room, client_id), None)
        self.actions.spawn(self._announce_left(room, client_id, who))

    async def _announce_left(self, room: str, client_id: str, who: Principal) -> None:
        """The connection leaves the room's presence; the room hears it if it was still there
        (a join of its user may have taken its place)."""
        try:
            left = await self.broker.leave(room, client_id, who.user_id)
        except BrokerUnavailable:
            return
        if left.removed:
            self._event("leave", client_id, who, room)
        if left.removed and left.members:
            await self._publish(
                room,
                p.encode(p.UserLeft(room, who.username, p.now_ms(), who.user_id, left.members)),
                "",
                -left.version,
            )

    async def end_grace(self, within: float) -> None:
        """Drain: the presence grace of the connections just closed runs out (their users
        may be joining elsewhere) for at most ``within`` seconds; the rest leave now."""
        deadline = time.monotonic() + within
        while self._lingering and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        for (room, client_id), (handle, who) in list(self._lingering.items()):
            handle.cancel()
            self._grace_over(room, client_id, who)

    async def join(
        self,
        session: Session,
        room: str,
        since: p.Since | None,
        msg_id: p.MsgId,
        presence: str = "each",
    ) -> None:
        """Join, and with ``since`` replay what was missed: room_joined, then the replay, then
        the chats the room was sent while the broker answered (held by the hub), each once.
        ``presence`` "diff": the room's presence changes come as presence_diff."""
        fresh = room not in session.rooms
        diffs = presence == "diff"
        if fresh:
            session.enter_room(room)
            # Pending: the subscription must be live before the broker's join, so that every
            # message after its seq reaches this node; until then the hub holds them for us.
            joined_room = self.hub.join(room, session, pending=True)
            if diffs:
                self.hub.want_diffs(room, session)
            if len(joined_room) == 1:
                await self._subscribe(session, room, msg_id)
            elif room in self._subscribing and not await asyncio.shield(
                self._subscribing[room]
            ):  # every joiner shares the subscription's outcome
                await self._drop_local(session, room)
                raise BrokerUnavailable(msg_id)
        try:
            result = await self.broker.join(
                room, self.member(session), (since.seq, since.epoch) if since else None
            )
        except BrokerUnavailable:
            if fresh:
                await self._drop_local(session, room)
            raise BrokerUnavailable(msg_id) from None
        # Presence marks only matter where notices travel apart from the join's answer.
        version = 0 if self.inline else result.version
        held = self.hub.activate(room, session, result.seq, version) if fresh else []
        members = result.members
        session.send(
            p.RoomJoined(room, members, result.seq, result.epoch, result.recovered, msg_id)
        )
        for payload in result.replay:
            session.outlet.send(payload)  # already encoded by whoever published it
        for seq, data in held:
            # Chats after our seq follow the replay; older ones are in it or predate us.
            # Presence notices after our version are news; older ones are counted in
            # room_joined. Without a version (or for typing) they may predate us: dropped.
            if seq > result.seq or (seq < 0 and version and -seq > version and not diffs):
                self.hub.send_frame(session.sink, data)
        if result.recovered is not None:
            self.counters["recoveries" if result.recovered else "recoveries_incomplete"] += 1
        if fresh and result.resumed:  # back within the presence grace: the room saw no gap
            self.counters["presence_resumed"] += 1
        elif fresh:
            who = session.principal
            self._event("join", session.client_id, who, room)
            log.debug(
                "joined", extra={"event": "join", "client_id": session.client_id, "room": room}
            )
            await self._publish(
                room,
                p.encode(p.UserJoined(room, who.username, p.now_ms(), who.user_id, members)),
                session.client_id,
                -result.version,
            )

    async def leave(self, session: Session, room: str, msg_id: p.MsgId) -> None:
        await self._leave(session, room)
        if msg_id is not None:
            session.send(p.RoomLeft(room, msg_id))

    async def _subscribe(self, session: Session, room: str, msg_id: p.MsgId) -> None:
        if self.inline:  # answered in place: nobody can be waiting
            await self.broker.subscribe(room)
            return
        outcome = self._subscribing[room] = asyncio.get_running_loop().create_future()
        try:
            await self.broker.subscribe(room)
        except BrokerUnavailable:
            outcome.set_result(False)
            await self._drop_local(session, room)
            raise BrokerUnavailable(msg_id) from None
        except BaseException:
            outcome.set_result(False)
            raise
        else:
            outcome.set_result(True)
        finally:
            if self._subscribing.get(room) is outcome:
                del self._subscribing[room]

    async def _drop_local(self, session: Session, room: str) -> None:
        session.exit_room(room)
        r = self.hub.leave(room, session)
        if r is not None and not len(r):
            await quietly(self.broker.unsubscribe(room))

    async def _leave(self, session: Session, room: str) -> None:
        """Leave locally at once; then tell the broker and the room (best effort if it is down)."""
        await self._drop_local(session, room)
        log.debug("left", extra={"event": "leave", "client_id": session.client_id, "room": room})
        await self._announce_left(room, session.client_id, session.principal)

    async def _publish(self, room: str, payload: bytes, exclude: str = "", seq: int = 0) -> None:
        await quietly(self.broker.publish(room, payload, exclude, seq))

    def member(self, session: Session) -> MemberInfo:
        who = session.principal
        return MemberInfo(session.client_id, who.user_id, who.username, self.node_id)
