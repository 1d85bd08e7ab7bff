"""``fastws.Publisher``: post into rooms from a backend, without holding a WebSocket.

Two ways in, one interface (``publish``, ``presence``, ``close``; an async context manager):

- ``Publisher(url, api_key)`` calls a node's admin API (``POST /api/publish``,
  ``GET /api/rooms/{room}/presence``) over HTTP with aiohttp;
- ``Publisher.over_redis(redis_url)`` writes straight into the Redis broker with the nodes'
  own Lua script and keys (``broker.redis.RedisRooms``), for when no node is reachable. Give
  it the nodes' history settings so it keeps history as they do.

Either way the message is a ``chat_message`` with its room's next ``seq``: every member on
every node receives it, and history and recovery include it.
"""

from __future__ import annotations

import asyncio
import json
from types import TracebackType
from typing import Any
from urllib.parse import quote

import msgspec

from .errors import BrokerUnavailable, FastWSError


class PublishError(FastWSError):
    """The publish or presence request was refused: ``status`` is the HTTP status (503 when
    the broker is unavailable), ``code`` the machine-readable kind, e.g. ``invalid_room``."""

    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(f"{status} {code}: {text}")
        self.status = status
        self.code = code
        self.text = text


class Member(msgspec.Struct, frozen=True):
    userId: str
    username: str


class Publisher:
    """Posts chat messages into rooms. Close it (or use ``async with``) when done."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 5.0) -> None:
        """``url`` is the admin listener's base, e.g. ``http://127.0.0.1:8081``."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._http: Any = None  # aiohttp.ClientSession, made on first use (needs a loop)
        self._rooms: Any = None  # broker.redis.RedisRooms with over_redis
        self._max_chars = 0  # over_redis: the text limit it enforces

    @classmethod
    def over_redis(
        cls,
        redis_url: str,
        *,
        history_size: int = 100,
        history_ttl: float = 3600.0,
        history_off: str = "",
        cluster: bool = False,
        max_message_chars: int = 1000,
        timeout: float = 2.0,
    ) -> Publisher:
        """Publish through Redis directly. ``history_*``, ``cluster`` and ``max_message_chars``
        should match the nodes' settings (their defaults are the nodes' defaults): no node
        checks these messages, so the publisher applies the nodes' rules itself."""
        from .broker.redis import RedisRooms
        from .broker.types import HistoryPolicy

        publisher = cls("", "", timeout=timeout)
        publisher._max_chars = max_message_chars
        publisher._rooms = RedisRooms(
            redis_url,
            timeout=timeout,
            cluster=cluster,
            policy=HistoryPolicy(history_size, history_ttl, history_off),
        )
        return publisher

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._rooms is not None and self._rooms.state == "ok":
            await self._rooms.close()
            self._rooms.state = "down"

    async def publish(
        self, room: str, text: str, *, username: str = "system", user_id: str = "system"
    ) -> int:
        """Post ``text`` to ``room`` as a chat_message from ``username``/``user_id``; return its
        seq. Raises ``PublishError`` (status 422 for a bad room or text, 503 if the broker is
        unavailable, 401 for a wrong key)."""
        if self._rooms is not None:
            return await self._publish_redis(room, text, username, user_id)
        reply = await self._request(
            "POST",
            "/api/publish",
            {"room": room, "text": text, "username": username, "userId": user_id},
        )
        return int(reply["seq"])

    async def presence(self, room: str) -> list[Member]:
        """Who is in ``room``, once per user, wherever connected."""
        if self._rooms is not None:
            from .publishrules import check_room, unique_members

            self._check(check_room, room)
            rooms = await self._redis()
            try:
                entries = await rooms.presence(room)
            except BrokerUnavailable:
                raise PublishError(503, "unavailable", "Redis unavailable") from None
            return [Member(**m) for m in unique_members(entries)]
        # Room names may hold '#' and ':', which must not end or split the path.
        reply = await self._request("GET", f"/api/rooms/{quote(room, safe='')}/presence")
        return [Member(m["userId"], m["username"]) for m in reply["members"]]

    # ---- HTTP -------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        try:
            async with self._http.request(method, self.url + path, json=body) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # not builtin on 3.10
            raise PublishError(503, "unreachable", f"{self.url}: {exc!r}") from exc
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = {}
        if status != 200 or not isinstance(reply, dict):
            error = reply if isinstance(reply, dict) else {}
            raise PublishError(
                status,
                str(error.get("code", "http_error")),
                str(error.get("error", raw[:200].decode(errors="replace"))),
            )
        return reply

    # ---- Redis ------------------------------------------------------------------------------

    async def _redis(self) -> Any:
        if self._rooms.state != "ok":
            await self._rooms.start()
        return self._rooms

    @staticmethod
    def _check(check: Any, *args: Any) -> None:
        from .publishrules import ApiError

        try:
            check(*args)
        except ApiError as exc:
            raise PublishError(exc.status, exc.code, exc.text) from None

    async def _publish_redis(self, room: str, text: str, username: str, user_id: str) -> int:
        from . import protocol as p
        from .publishrules import PublishBody, check_publish

        self._check(check_publish, PublishBody(room, text, username, user_id), self._max_chars)
        rooms = await self._redis()
        try:
            return int(await rooms.publish_seq(room, p.chat_head(room, username, text, user_id)))
        except BrokerUnavailable:
            raise PublishError(503, "unavailable", "Redis unavailable") from None
