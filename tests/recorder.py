"""A stand-in for both ends of a Session in sans-I/O tests: its outlet (what would go to the
socket) and its node (the actions it asks for), recording everything."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from fastws.actions import Actions
from fastws.auth import Verifier
from fastws.config import load_settings
from fastws.policy import Policy
from fastws.session import Session

from .utils import SECRET


class Recorder:
    """Outlet and NodeActions that record replies and calls; node actions succeed in place."""

    def __init__(self) -> None:
        self.actions = Actions(inline=True)
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.calls: list[tuple[Any, ...]] = []
        self.counters: Counter[str] = Counter()
        settings = load_settings({}, environ={})
        self.verifier = Verifier(settings, SECRET)
        self.policy = Policy(settings)  # open: every room, as the seed
        self.join_hook = None
        self.chat_now: Any = None  # chats go through the ``chat`` coroutine

    def send(self, payload: bytes) -> None:
        self.sent.append(json.loads(payload))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    async def join(
        self, session: Session, room: str, since: Any, msg_id: Any, presence: str = "each"
    ) -> None:
        session.enter_room(room)
        self.calls.append(("join", room, msg_id))

    async def leave(self, session: Session, room: str, msg_id: Any) -> None:
        session.exit_room(room)
        self.calls.append(("leave", room, msg_id))

    async def chat(self, session: Session, room: str, text: str, msg_id: Any) -> None:
        self.calls.append(("chat", room, text, msg_id))

    def record_chat_now(self, session: Session, room: str, text: str, msg_id: Any) -> None:
        """Set as ``chat_now`` to take the synchronous chat path (an in-process broker)."""
        self.calls.append(("chat_now", room, text, msg_id))

    async def typing(self, session: Session, room: str, is_typing: bool, msg_id: Any) -> None:
        self.calls.append(("typing", room, is_typing, msg_id))

    async def presence(self, session: Session, room: str, msg_id: Any) -> None:
        self.calls.append(("presence", room, msg_id))

    async def history(self, session: Session, room: str, limit: int, msg_id: Any) -> None:
        self.calls.append(("history", room, limit, msg_id))
