"""What a publish must satisfy, as the admin API answers it: shared by the admin listener
and ``fastws.Publisher`` (which checks before it sends), so neither needs the other."""

from __future__ import annotations

import msgspec

from .broker import MemberInfo
from .errors import MessageError
from .session import check_chat_text, check_room_name

MAX_USERNAME_CHARS = 64  # as a token's username claim
MAX_USER_ID_CHARS = 128


class PublishBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/publish``. Unknown fields are refused: a typo must not pass silently."""

    room: str
    text: str
    username: str = "system"
    userId: str = "system"


class ApiError(Exception):
    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.code = code
        self.text = text


def check_room(room: str, max_room_chars: int = 128) -> None:
    """The WebSocket path's rule (session.check_room_name), with its message, as a 422."""
    try:
        check_room_name(room, None, max_room_chars)
    except MessageError as exc:
        raise ApiError(422, exc.code, exc.text) from None


def check_publish(body: PublishBody, max_chars: int, max_room_chars: int = 128) -> None:
    """The checks a chat_message gets on the WebSocket path, with the same codes and texts."""
    check_room(body.room, max_room_chars)
    try:
        check_chat_text(body.text, max_chars)
    except MessageError as exc:
        raise ApiError(422, exc.code, exc.text) from None
    if not 1 <= len(body.username) <= MAX_USERNAME_CHARS or not body.username.strip():
        raise ApiError(
            422, "invalid_user", f"username must be 1-{MAX_USERNAME_CHARS} characters, not blank"
        )
    if not 1 <= len(body.userId) <= MAX_USER_ID_CHARS or not body.userId.strip():
        raise ApiError(
            422, "invalid_user", f"userId must be 1-{MAX_USER_ID_CHARS} characters, not blank"
        )


def unique_members(entries: list[MemberInfo]) -> list[dict[str, str]]:
    """One entry per user (a user with two tabs is two connections), first seen first."""
    seen: dict[str, dict[str, str]] = {}
    for entry in entries:
        seen.setdefault(entry.userId, {"userId": entry.userId, "username": entry.username})
    return list(seen.values())


__all__ = ["ApiError", "PublishBody", "check_publish", "check_room", "unique_members"]
