"""The admin listener (aiohttp): what backends and monitoring ask of a node, never browsers.

    POST /api/publish                   post a chat_message into a room (API key)
    GET  /api/rooms/{room}/presence     who is in a room, cluster-wide (API key)
    GET  /metrics                       Prometheus text (no key: loopback by default)
    GET  /healthz                       the node's health, as on the public port

It listens on ``admin_host:admin_port``, apart from the WebSocket port, so it can stay on
loopback or a private interface while ``/ws`` faces the internet. aiohttp parses the HTTP:
the public port only reads request heads, and a hand-written parser of bodies is not worth
its bugs here.
Under ``--workers N`` every worker listens on the same admin port (SO_REUSEPORT); whichever
answers gives the same result: publishes and presence go through the broker shared by all
workers, and ``/metrics`` reads every worker's values (see metrics.py).

Every ``/api`` error is JSON ``{"error": text, "code": code}`` with a 4xx/5xx status:
400 ``invalid_body``, 401 ``unauthorized``, 403 ``api_disabled``, 413 ``too_large``,
422 ``invalid_room``/``message_too_long``/``empty_message``/``invalid_user``,
503 ``unavailable``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from .errors import BrokerUnavailable, ConfigError
from .metrics import CONTENT_TYPE, Metrics
from .publishrules import ApiError, PublishBody, check_publish, check_room, unique_members

if TYPE_CHECKING:
    from .server import Node

log = logging.getLogger("fastws.admin")

_decode_body = msgspec.json.Decoder(PublishBody).decode
_encode = msgspec.json.Encoder().encode
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=_encode(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


class Admin:
    """The admin web app of one node. ``start()`` binds it; ``close()`` stops it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        self.metrics = Metrics(node)
        self._key = self.settings.api_key.encode()
        # The body limit is the WebSocket message limit: an API publish is no bigger a message.
        app = web.Application(
            client_max_size=self.settings.max_message_bytes, middlewares=[self._errors]
        )
        app.router.add_post("/api/publish", self.api_publish)
        app.router.add_get("/api/rooms/{room}/presence", self.api_presence)
        app.router.add_get("/metrics", self.serve_metrics)
        app.router.add_get("/healthz", self.serve_health)
        # Shutdown waits for requests in flight at most close_timeout, never aiohttp's 60 s.
        self.runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=self.settings.close_timeout
        )
        self._site: web.TCPSite | None = None

    async def start(self, reuse_port: bool = False) -> None:
        await self.runner.setup()
        self._site = web.TCPSite(
            self.runner,
            self.settings.admin_host,
            self.settings.admin_port,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        try:
            await self._site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise ConfigError(
                f"admin listener: cannot listen on {self.settings.admin_host}:"
                f"{self.settings.admin_port}: {exc.strerror}"
            ) from None
        self.metrics.start()
        log.info(
            "admin listening on %s:%d",
            self.settings.admin_host,
            self.port,
            extra={"event": "admin_listening", "port": self.port},
        )
        if not self._key:
            log.warning("no api_key: /api/* answers 403", extra={"event": "api_disabled"})

    @property
    def port(self) -> int:
        address = self.runner.addresses[0]
        return int(address[1])

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.metrics.stop()

    # ---- middleware -------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every refusal as typed JSON, and every /api answer counted by route and status."""
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        try:
            response = await handler(request)
        except ApiError as exc:
            headers = (
                {"WWW-Authenticate": 'Bearer realm="fastws-admin"'} if (exc.status == 401) else {}
            )
            response = _json({"error": exc.text, "code": exc.code}, exc.status)
            response.headers.update(headers)
        except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413 ...
            if not request.path.startswith("/api/"):
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
                exc.status, "bad_request"
            )
            response = _json({"error": exc.reason, "code": code}, exc.status)
        if request.path.startswith("/api/"):
            self.metrics.api_requests.labels(name, str(response.status)).inc()
        return response

    def _authorize(self, request: web.Request) -> None:
        if not self._key:
            raise ApiError(403, "api_disabled", "The API is off: start the server with --api-key")
        given = request.headers.get("X-API-Key", "")
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if not given and scheme.lower() == "bearer":
            given = credentials.strip()
        # Constant time: the key must not leak one byte at a time through response timing.
        if not given or not hmac.compare_digest(given.encode(), self._key):
            raise ApiError(401, "unauthorized", "Missing or wrong API key")

    # ---- routes -----------------------------------------------------------------------------

    async def api_publish(self, request: web.Request) -> web.Response:
        self._authorize(request)
        limit = self.settings.max_message_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "too_large", f"Body over {limit} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "too_large", f"Body over {limit} bytes") from None
        try:
            body = _decode_body(raw)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise ApiError(400, "invalid_body", f"Invalid publish body: {exc}") from None
        check_publish(body, self.settings.max_message_chars, self.settings.max_room_chars)
        try:
            seq = await self.node.publish_system(body.room, body.text, body.username, body.userId)
        except BrokerUnavailable:
            raise ApiError(503, "unavailable", "Broker unavailable, try again") from None
        return _json({"room": body.room, "seq": seq})

    async def api_presence(self, request: web.Request) -> web.Response:
        self._authorize(request)
        room = request.match_info["room"]
        check_room(room, self.settings.max_room_chars)
        try:
            entries = await self.node.broker.presence(room)
        except BrokerUnavailable:
            raise ApiError(503, "unavailable", "Broker unavailable, try again") from None
        return _json(
            {"room": room, "connections": len(entries), "members": unique_members(entries)}
        )

    async def serve_metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def serve_health(self, request: web.Request) -> web.Response:
        return _json(self.node.health())


async def start_admin(node: Node, reuse_port: bool = False) -> Admin:
    """Serve ``node``'s admin listener on ``admin_host:admin_port``; ``close()`` it after drain."""
    admin = Admin(node)
    await admin.start(reuse_port)
    return admin
