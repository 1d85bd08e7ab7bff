"""One upgraded connection's listener: its messages to the session, the session's replies out
through the fan-out sink, its close. The WebSocket protocol itself is ``_wire`` (Cython); the
door is gateway.py, liveness and token expiry heartbeat.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from typing import TYPE_CHECKING

from ._wire import Wire
from .accel import fanout
from .auth import Principal
from .errors import CloseCode
from .session import Session

if TYPE_CHECKING:
    from .server import Node


class Connection(fanout.Listener):
    """One upgraded socket's listener: hands its messages to the session, sends its replies.

    Framing, reassembly, UTF-8, pings and the close handshake are the ``Wire``'s (Cython);
    this object sees whole messages only, and those go through the fan-out module's
    ``Listener.on_message`` (compiled: no Python call for a common chat_message) to the
    node's chat path.
    """

    # Slots, not a __dict__: one of these lives per connection (see the memory target). What
    # the session holds (client id, principal, sink, the Wire) is read from it, not copied.
    # ``session`` and ``chat`` are the Listener's.
    __slots__ = ("_abort_handle", "_admission", "node")

    def __init__(self, node: Node, principal: Principal, forwarded_for: str = "") -> None:
        self.node = node
        # Needed only until on_connected makes the session.
        self._admission: tuple[Principal, str] | None = (principal, forwarded_for)
        self.session = None
        self.chat = node.chat_path
        self._abort_handle: asyncio.TimerHandle | None = None

    # ---- Wire callbacks ---------------------------------------------------------------

    def on_connected(self, transport: Wire) -> None:
        node = self.node
        settings = node.settings
        assert self._admission is not None
        principal, forwarded_for = self._admission
        self._admission = None
        peer = transport.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if peer else ""
        ip = peer[0] if peer else ""
        if forwarded_for and ip in settings.proxies:
            # The nearest hop the trusted proxy saw is the last entry it appended.
            ip = forwarded_for.split(",")[-1].strip() or ip
        if not node.admit(ip):
            transport.send_close(int(CloseCode.POLICY_VIOLATION), b"too many connections")
            transport.disconnect()
            return
        session = Session(str(uuid.uuid4()), principal, transport, self, node, settings)
        session.sink = node.hub.sink(transport, session)
        self.session = session
        # Paused (pause_writing) at half the send-buffer cap: where typing starts to wait.
        with contextlib.suppress(AttributeError, ValueError):
            transport.set_write_buffer_limits(high=max(1, settings.max_send_buffer_bytes // 2))
        # Many connections share an address (a proxy, a NAT): one string for all of them.
        node.connect(session, remote, sys.intern(ip))

    def before_close(self) -> None:
        """The Wire is about to send a close frame: replies already queued go out first."""
        session = self.session
        if session is not None and not session.sink.closed:
            self.node.hub.flush(session.sink)

    def pause_writing(self) -> None:
        """The socket's buffer passed its high-water mark: typing notices wait (conflated)."""
        if self.session is not None:
            self.session.sink.congested = True

    def resume_writing(self) -> None:
        session = self.session
        if session is not None:
            session.sink.congested = False
            self.node.hub.outbox.release(session.sink)

    def on_disconnected(self) -> None:
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        session = self.session
        if session is not None:
            self.session = None
            self.node.disconnect(session, session.transport.close_code)

    # ---- Outlet: how the session's replies leave --------------------------------------

    def send(self, payload: bytes) -> None:
        # Through the sink, so replies keep their order with the room traffic it is corking.
        if self.session is not None:
            self.node.hub.send(self.session.sink, payload)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; drop the socket if the peer has not closed within close_timeout."""
        session = self.session
        if session is None:
            return
        t = session.transport
        if t.is_disconnected:
            return
        if not t.is_close_frame_sent:
            if not session.sink.closed:
                self.node.hub.flush(session.sink)  # what was queued goes before the close frame
            t.send_close(int(code), reason.encode()[:123])
        if self._abort_handle is None:
            loop = asyncio.get_running_loop()
            self._abort_handle = loop.call_later(
                self.node.settings.close_timeout, t.disconnect, False
            )


__all__ = ["Connection"]
