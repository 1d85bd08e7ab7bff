"""One frozen settings struct, filled from defaults, ``FASTWS_*`` variables and CLI flags.

Every field's help says its unit, default and what 0 means; the CLI builds its flags
and ``--help`` from ``FIELD_HELP`` so the three never drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

from .errors import ConfigError


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    jwt_secret: str = ""
    jwt_algorithms: str = "HS256"
    jwt_public_key_file: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway: float = 5.0
    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    json_ping: bool = False
    max_message_bytes: int = 65536
    max_message_chars: int = 1000
    max_rooms_per_connection: int = 100
    max_send_buffer_bytes: int = 1048576
    rate_limit: float = 100.0
    rate_burst: int = 200
    handshake_timeout: float = 5.0
    close_timeout: float = 2.0
    drain_timeout: float = 10.0
    log_level: str = "info"
    log_format: str = "text"
    allowed_origins: str = ""
    max_connections: int = 0
    max_connections_per_ip: int = 0
    trusted_proxies: str = ""
    history_size: int = 100
    history_ttl: float = 3600.0
    history_off: str = ""
    workers: int = 1
    redis_url: str = ""
    redis_node_ttl: float = 15.0
    redis_cluster: bool = False

    @property
    def algorithms(self) -> list[str]:
        return [a.strip() for a in self.jwt_algorithms.split(",") if a.strip()]

    @property
    def origins(self) -> frozenset[str]:
        parts = self.allowed_origins.split(",")
        return frozenset(o.strip().rstrip("/") for o in parts if o.strip())

    @property
    def proxies(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.trusted_proxies.split(",") if p.strip())


FIELD_HELP: dict[str, str] = {
    "host": "address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    "port": "TCP port (default 8080; 0 picks a free port and logs it)",
    "jwt_secret": "HS256/384/512 secret for tokens (default: a random one for this run, "
    "printed with a ready demo link)",
    "jwt_algorithms": "comma-separated accepted JWT algorithms (default HS256; "
    "RS256/ES256 need --jwt-public-key-file)",
    "jwt_public_key_file": "PEM public key file for RS*/ES*/PS* algorithms (default none)",
    "jwt_audience": "required 'aud' claim (default: not checked)",
    "jwt_issuer": "required 'iss' claim (default: not checked)",
    "jwt_leeway": "seconds of clock skew allowed on exp/nbf (default 5)",
    "ping_interval": "seconds without incoming data before a protocol ping (default 30; "
    "0 disables the heartbeat)",
    "ping_timeout": "seconds to wait for the pong before closing with 1001 (default 10)",
    "json_ping": "heartbeat with the seed's JSON {'type':'ping'} and expect "
    "{'type':'pong'} instead of protocol pings (default off)",
    "max_message_bytes": "largest frame or reassembled message in bytes; bigger closes "
    "with 1009 (default 65536)",
    "max_message_chars": "longest chat_message text in characters (default 1000, as in "
    "the seed)",
    "max_rooms_per_connection": "rooms one connection may be in (default 100; 0 = no limit)",
    "max_send_buffer_bytes": "unsent output in bytes after which a client is a slow "
    "consumer and is closed with 4008 (default 1048576)",
    "rate_limit": "messages per second a connection may send, sustained (default 100; "
    "0 = no limit)",
    "rate_burst": "messages a connection may send in a burst above the rate (default 200)",
    "handshake_timeout": "seconds a client has to finish the HTTP upgrade (default 5)",
    "close_timeout": "seconds to flush a close frame before the socket is dropped (default 2)",
    "drain_timeout": "seconds graceful shutdown waits for clients to close (default 10)",
    "log_level": "debug, info, warning or error (default info)",
    "log_format": "text or json (one JSON object per line) (default text)",
    "allowed_origins": "comma-separated browser origins allowed to connect besides the "
    "server's own host, e.g. https://chat.example.com; '*' allows any (default: own host only; "
    "requests without Origin, i.e. non-browser clients, are always allowed)",
    "max_connections": "open WebSocket connections this process accepts; more get HTTP 503 "
    "(default 0 = bounded only by the file limit)",
    "max_connections_per_ip": "open connections per client IP; more are closed with 1008 "
    "(default 0 = no limit; behind NAT many users share an IP)",
    "trusted_proxies": "comma-separated proxy IPs whose X-Forwarded-For names the client IP "
    "(default none: the socket's peer is the client)",
    "history_size": "chat messages kept per room for recovery and `history` (default 100; "
    "0 = none)",
    "history_ttl": "seconds a room's messages are kept (default 3600; 0 = until pushed out by "
    "history_size)",
    "history_off": "rooms matching this fnmatch pattern keep no history, e.g. 'tmp-*' "
    "(default none)",
    "workers": "worker processes sharing the port (default 1; 0 = one per core); with more "
    "than one and no Redis, workers talk over a local bus in the supervisor",
    "redis_url": "redis://host:port/db to span rooms across hosts (default none: this host "
    "only)",
    "redis_cluster": "treat --redis-url as a Redis Cluster node and use sharded pub/sub "
    "(SSUBSCRIBE/SPUBLISH) (default off)",
    "redis_node_ttl": "seconds after which a node that stopped refreshing its Redis liveness "
    "key is presumed dead and its connections are removed from presence (default 15)",
}

ENV_PREFIX = "FASTWS_"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _convert(field: str, raw: Any, kind: type) -> Any:
    if kind is bool and isinstance(raw, str):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{field}: expected true or false, got {raw!r}")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: expected {kind.__name__}, got {raw!r}") from None


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then ``FASTWS_*`` variables, then ``overrides`` (CLI flags; None = unset)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in msgspec.structs.fields(Settings):
        kind = type(f.default)
        if env_name(f.name) in environ:
            values[f.name] = _convert(f.name, environ[env_name(f.name)], kind)
        if overrides and overrides.get(f.name) is not None:
            values[f.name] = _convert(f.name, overrides[f.name], kind)
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"port: {s.port} is not a TCP port")
    if s.ping_interval < 0 or s.ping_timeout < 0:
        raise ConfigError("ping_interval and ping_timeout must be >= 0")
    if s.ping_interval and s.ping_timeout > s.ping_interval:
        raise ConfigError("ping_timeout must not exceed ping_interval")
    if s.max_message_bytes < 128:
        raise ConfigError("max_message_bytes must be at least 128")
    if s.max_message_chars < 1:
        raise ConfigError("max_message_chars must be at least 1")
    if s.rate_limit < 0 or s.rate_burst < 1:
        raise ConfigError("rate_limit must be >= 0 and rate_burst >= 1")
    if not s.algorithms:
        raise ConfigError("jwt_algorithms: at least one algorithm is required")
    if s.redis_node_ttl < 1:
        raise ConfigError("redis_node_ttl must be at least 1 second")
    if s.max_connections < 0 or s.max_connections_per_ip < 0:
        raise ConfigError("max_connections and max_connections_per_ip must be >= 0")
    if s.history_size < 0 or s.history_ttl < 0:
        raise ConfigError("history_size and history_ttl must be >= 0")
    if s.workers < 0:
        raise ConfigError("workers must be >= 0 (0 = one per core)")
    if s.redis_url and not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis_url must start with redis://, rediss:// or unix://")
    if s.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {s.log_format!r}")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {s.log_level!r}")
