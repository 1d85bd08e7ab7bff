"""Where the node's coroutines run: each session's in the order its client sent them.

``Session`` decides (a message in, the coroutine of the node action out) and does no I/O
and creates no task; this runs what it decided. With an inline broker (in-process: its
coroutines never suspend) an action runs to completion in place; otherwise it becomes the
session's one task, and what the client sends meanwhile waits in the session's backlog
(at most ``rate_burst`` messages), so one client's messages take effect in order.

The only writer of a session's ``_task`` and ``_backlog``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from . import protocol as p
from .errors import CloseCode, MessageError

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("fastws.session")
Action = Coroutine[Any, Any, None]


class Actions:
    """The node's runner: sessions' actions (``run``, ``queue``, ``cancel``) and its own
    background work (``spawn``, awaited by the drain through ``tasks``)."""

    __slots__ = ("inline", "tasks")

    def __init__(self, inline: bool) -> None:
        self.inline = inline
        self.tasks: set[asyncio.Task[None]] = set()

    def run(self, session: Session, action: Action, waits: bool = False) -> None:
        """Run ``session``'s ``action`` (no other pending): in place when nothing it awaits
        can suspend, else as a task. ``waits``: it awaits I/O even with an inline broker."""
        if self.inline and not waits:
            _run_inline(session, action)
        else:
            session._task = asyncio.get_running_loop().create_task(self._chain(session, action))

    def queue(self, session: Session, data: bytes | str) -> None:
        """Keep ``data`` until the pending action is done; close past ``rate_burst``."""
        backlog = session._backlog
        if backlog is None:
            backlog = session._backlog = deque()
        if len(backlog) >= session.settings.rate_burst:
            session.outlet.close(CloseCode.POLICY_VIOLATION, "too many pending messages")
            return
        backlog.append(data)

    def cancel(self, session: Session) -> None:
        """Drop ``session``'s pending work: its connection is gone."""
        session._backlog = None
        task = session._task
        if task is not None:
            task.cancel()
            session._task = None

    def spawn(self, action: Action) -> None:
        """Run a node-internal coroutine: in place when the broker is inline, else as a task
        the drain waits for."""
        if self.inline:
            _drive_inline(action)
            return
        task = asyncio.get_running_loop().create_task(action)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _chain(self, session: Session, action: Action | None) -> None:
        try:
            while action is not None:
                try:
                    await action
                except MessageError as exc:
                    session.outlet.send(p.error_bytes(exc))
                action = None
                while action is None and session._backlog:
                    action = session.decide(session._backlog.popleft())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("action failed", extra={"client_id": session.client_id})
            session.outlet.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            session._task = None


def _run_inline(session: Session, action: Action) -> None:
    try:
        _drive_inline(action)
    except MessageError as exc:
        session.outlet.send(p.error_bytes(exc))


def _drive_inline(action: Action) -> None:
    """Run a coroutine that must not suspend (an inline broker's) to its end, in place."""
    try:
        action.send(None)
    except StopIteration:
        return
    action.close()
    raise RuntimeError("an inline broker suspended")
