"""The join hook: ask the backend whether a user may join a private room the tokens do not open.

``POST join_hook_url`` with ``{"userId", "username", "roles", "room"}`` (and the API key as a
bearer token when one is set); the answer ``{"allow": true}`` with status 200 allows. Anything
else denies: another status, another body, a timeout (``join_hook_timeout``), a refused
connection. Answers, yes or no, are kept ``join_hook_cache`` seconds per (user, room), at most
``MAX_CACHED`` of them, so a reconnect storm costs the backend one call per user and room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import aiohttp

from .auth import Principal
from .config import Settings

log = logging.getLogger("fastws.joinhook")

MAX_CACHED = 10_000


class JoinHook:
    def __init__(self, settings: Settings) -> None:
        self.url = settings.join_hook_url
        self.timeout = settings.join_hook_timeout
        self.ttl = settings.join_hook_cache
        self.api_key = settings.api_key
        self._answers: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self.calls = self.failures = 0

    def known(self, who: Principal, room: str) -> bool | None:
        """A cached answer, or None if the backend must be asked."""
        key = (who.user_id, room)
        answer = self._answers.get(key)
        if answer is None:
            return None
        if answer[1] < time.monotonic():
            del self._answers[key]
            return None
        return answer[0]

    async def ask(self, who: Principal, room: str) -> bool:
        """The backend's answer; False on any failure (logged)."""
        self.calls += 1
        allowed = False
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            body = {
                "userId": who.user_id,
                "username": who.username,
                "roles": list(who.roles),
                "room": room,
            }
            async with (
                asyncio.timeout(self.timeout),
                self._session.post(self.url, json=body, headers=headers) as response,
            ):
                if response.status == 200:
                    answer = await response.json(content_type=None)
                    allowed = isinstance(answer, dict) and answer.get("allow") is True
                else:
                    self._failed(f"status {response.status}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._failed(f"{type(exc).__name__}: {exc}"[:200])
        self._answers[(who.user_id, room)] = (allowed, time.monotonic() + self.ttl)
        while len(self._answers) > MAX_CACHED:
            self._answers.popitem(last=False)
        return allowed

    def _failed(self, cause: str) -> None:
        self.failures += 1
        log.warning(
            "join hook failed (join denied): %s",
            cause,
            extra={"event": "join_hook_failed", "cause": cause},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
