"""Backend events: connect, disconnect, join and leave, posted to ``events_url`` in batches.

Each node posts the events of its own connections, so each event leaves the deployment once:
a join that took the place of a connection in its presence grace is no join, and the grace's
end posts a leave only if the room heard one (``user_left``). A batch is ``POST events_url``
with ``{"events": [...]}``, each event ``{"id", "type", "clientId", "userId", "username",
"node", "ts"}`` (``room`` for join and leave; ``ts`` in unix ms), and the headers
``X-Fastws-Timestamp`` (unix s) and ``X-Fastws-Signature: sha256=<hex HMAC-SHA256 of
"<timestamp>.<body>" with events_secret>``. A 2xx answer delivers the batch. A refused
connection, a timeout or a 5xx is retried with backoff (0.25 s doubling to 10 s) until it
goes; another status drops the batch (the receiver refused it: logged). Delivery is at least
once: a receiver that answered but whose answer was lost gets the batch again, and tells the
two apart by the events' ``id``. At most ``events_queue`` events wait; past it the oldest go,
counted in ``dropped`` (``fastws_events_dropped_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from collections import deque
from typing import Any

import aiohttp
import msgspec

log = logging.getLogger("fastws.events")

_BACKOFF_FIRST, _BACKOFF_MAX = 0.25, 10.0
_encoder = msgspec.json.Encoder()


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Fastws-Signature value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class BackendEvents:
    def __init__(
        self,
        url: str,
        secret: str,
        node: str,
        batch: int = 100,
        interval: float = 0.5,
        queue: int = 10_000,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.secret = secret
        self.node = node
        self.batch = batch
        self.interval = interval
        self.timeout = timeout
        self._queue: deque[dict[str, Any]] = deque()
        self._limit = queue
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self.delivered = self.dropped = self.failures = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def add(
        self, kind: str, client_id: str, user_id: str, username: str, room: str | None = None
    ) -> None:
        event = {
            "id": uuid.uuid4().hex,
            "type": kind,
            "clientId": client_id,
            "userId": user_id,
            "username": username,
            "node": self.node,
            "ts": int(time.time() * 1000),
        }
        if room is not None:
            event["room"] = room
        if len(self._queue) >= self._limit:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1st, 2nd, 4th...: rate-limited
                log.warning(
                    "backend events queue full: dropped the oldest (%d so far)",
                    self.dropped,
                    extra={"event": "events_dropped"},
                )
        self._queue.append(event)
        if len(self._queue) >= self.batch:
            self._wake.set()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def _run(self) -> None:
        delay = _BACKOFF_FIRST
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                continue
            if len(self._queue) < self.batch and not self._closing:
                # gather a batch for up to an interval
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
            batch = [self._queue[i] for i in range(min(self.batch, len(self._queue)))]
            outcome = await self._post(batch)
            if outcome == "retry":  # (at shutdown too: close() bounds the wait)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            delay = _BACKOFF_FIRST
            sent = {id(event) for event in batch}  # delivered or refused: out of the queue
            while self._queue and id(self._queue[0]) in sent:
                self._queue.popleft()

    async def _post(self, batch: list[dict[str, Any]]) -> str:
        body = _encoder.encode({"events": batch})
        stamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Fastws-Timestamp": stamp,
            "X-Fastws-Signature": signature(self.secret, stamp, body),
        }
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            async with (
                asyncio.timeout(self.timeout),
                self._session.post(self.url, data=body, headers=headers) as response,
            ):
                status = response.status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return "retry"
        if 200 <= status < 300:
            self.delivered += len(batch)
            return "done"
        if status >= 500:
            self._failed(f"HTTP {status}")
            return "retry"
        self.dropped += len(batch)
        log.warning(
            "backend events refused with HTTP %d: %d dropped",
            status,
            len(batch),
            extra={"event": "events_refused", "status": status},
        )
        return "done"

    def _failed(self, cause: str) -> None:
        self.failures += 1
        if self.failures & (self.failures - 1) == 0:
            log.warning(
                "backend events not delivered (%s), retrying (%d failures so far)",
                cause,
                self.failures,
                extra={"event": "events_failed"},
            )

    async def close(self, within: float) -> None:
        """Deliver what is queued for up to ``within`` seconds; what is left is dropped."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), within)
            except asyncio.TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._queue:
            self.dropped += len(self._queue)
            log.warning(
                "backend events dropped at shutdown: %d",
                len(self._queue),
                extra={"event": "events_dropped"},
            )
            self._queue.clear()
        if self._session is not None:
            await self._session.close()
