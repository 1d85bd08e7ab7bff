"""One frozen settings struct, filled from defaults, a TOML file, ``FASTWS_*`` variables and
CLI flags, in that order (flags win).

Every field's help says its unit, default and what 0 means; the CLI builds its flags
and ``--help`` from ``FIELD_HELP`` so the three never drift apart. The TOML file groups the
same fields into sections (``SECTIONS``); ``render_toml`` writes the format ``read_file`` reads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from .errors import ConfigError


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    jwt_secret: str = ""
    jwt_algorithms: str = "HS256,HS384,HS512"
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
    presence_grace: float = 3.0
    presence_diff_interval: float = 0.1
    presence_diff_names: int = 100
    log_level: str = "info"
    log_format: str = "text"
    allowed_origins: str = ""
    max_connections: int = 0
    max_connections_per_ip: int = 0
    trusted_proxies: str = ""
    history_size: int = 100
    history_ttl: float = 3600.0
    history_off: str = ""
    history_max_bytes: int = 48 * 1024 * 1024
    ws_paths: str = ""
    max_room_chars: int = 128
    private_rooms: str = ""
    direct_rooms: str = ""
    room_post: str = ""
    room_presence: str = ""
    join_hook_url: str = ""
    events_url: str = ""
    events_secret: str = ""
    events_batch: int = 100
    events_interval: float = 0.5
    events_queue: int = 10_000
    join_hook_timeout: float = 2.0
    join_hook_cache: float = 10.0
    workers: int = 1
    fork_workers: bool = True
    redis_url: str = ""
    redis_node_ttl: float = 15.0
    redis_cluster: bool = False
    redis_leases: bool = True
    admin_host: str = "127.0.0.1"
    admin_port: int = -1
    api_key: str = ""

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
    "jwt_algorithms": "comma-separated accepted JWT algorithms (default HS256,HS384,HS512 "
    "with the shared secret, as the seed signs HS512; RS256/ES256 need --jwt-public-key-file, "
    "and never mix with HS*)",
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
    "max_message_chars": "longest chat_message text in characters (default 1000, as in the seed)",
    "max_rooms_per_connection": "rooms one connection may be in (default 100; 0 = no limit)",
    "max_send_buffer_bytes": "unsent output in bytes after which a client is a slow "
    "consumer and is closed with 4008 (default 1048576)",
    "rate_limit": "messages per second a connection may send, sustained (default 100; "
    "0 = no limit)",
    "rate_burst": "messages a connection may send in a burst above the rate (default 200)",
    "handshake_timeout": "seconds a client has to finish the HTTP upgrade (default 5)",
    "close_timeout": "seconds to flush a close frame before the socket is dropped (default 2)",
    "drain_timeout": "seconds graceful shutdown waits for clients to close (default 10)",
    "presence_grace": "seconds a dropped connection stays in its rooms' presence: if its user "
    "joins the room again within them (on any node), the room hears neither user_left nor "
    "user_joined (default 3; 0 = user_left at once)",
    "presence_diff_interval": "seconds of presence changes one presence_diff gathers, for "
    'members that join with "presence": "diff" (default 0.1)',
    "presence_diff_names": "rooms up to this many connections get names in presence_diff; "
    "bigger ones get only the counts (default 100)",
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
    "history_max_bytes": "bytes of history one process (or the --workers supervisor) keeps in "
    "all rooms; past it the least recently used empty rooms lose theirs first (default "
    "50331648 = 48 MiB; 0 = no cap; with Redis, set Redis' maxmemory instead)",
    "max_room_chars": "longest room name in Unicode code points (default 128); any text "
    "without control characters is a name",
    "ws_paths": "comma-separated paths that accept a WebSocket upgrade, e.g. '/ws,/chat' "
    "(default any path, as the seed's server; pages and /healthz answer plain GETs)",
    "private_rooms": "comma-separated glob patterns of private rooms, e.g. 'private:*': joining "
    "one needs it in the token's rooms claim, a room token, or the join hook's yes "
    "(default none: every room is open)",
    "direct_rooms": "comma-separated prefixes of direct rooms, e.g. 'dm:': <prefix><a>:<b> is "
    "joinable by users a and b only (default none)",
    "room_post": "who may post and type in matching rooms: 'pattern=role:x|user:y;...' "
    "(default everyone)",
    "room_presence": "who may see presence in matching rooms, same form as room_post "
    "(default everyone)",
    "join_hook_url": "POST {user, room} here to ask allow/deny for a private room the tokens do "
    "not open; any failure denies (default none)",
    "join_hook_timeout": "seconds the join hook may take before the join is denied (default 2)",
    "events_url": "POST connect, disconnect, join and leave events here, in batches, signed "
    "with events_secret (default none)",
    "events_secret": "HMAC-SHA256 key of the X-Fastws-Signature header of backend events "
    "(required with events_url)",
    "events_batch": "backend events per POST at most (default 100)",
    "events_interval": "seconds backend events wait to fill a batch (default 0.5)",
    "events_queue": "backend events kept while the endpoint is down; past it the oldest are "
    "dropped and counted (default 10000)",
    "join_hook_cache": "seconds a join hook answer is reused for the same user and room "
    "(default 10)",
    "workers": "worker processes sharing the port (default 1; 0 = one per core); with more "
    "than one and no Redis, workers talk over a local bus in the supervisor",
    "fork_workers": "with --workers, fork each worker from one process that has imported "
    "fastws once, so the workers share its memory (default on, Linux; off: each worker is a "
    "fresh interpreter, which also loads code upgraded on disk when it restarts)",
    "redis_url": "redis://host:port/db to span rooms across hosts (default none: this host only)",
    "redis_cluster": "treat --redis-url as a Redis Cluster node and use sharded pub/sub "
    "(SSUBSCRIBE/SPUBLISH) (default off)",
    "redis_leases": "sequence a room whose members are all on this node here, writing its "
    "history through to Redis (one call per loop turn) instead of a seq script and a PUBLISH "
    "per chat; another node that joins takes the room over (default on; one Redis server, "
    "not a cluster)",
    "redis_node_ttl": "seconds after which a node that stopped refreshing its Redis liveness "
    "key is presumed dead and its connections are removed from presence (default 15)",
    "admin_host": "address of the admin listener: /api/publish, /api/rooms/ROOM/presence, "
    "/metrics, /healthz (default 127.0.0.1: keep it off public interfaces)",
    "admin_port": "TCP port of the admin listener (default -1 = off; 0 picks a free port and "
    "logs it; 8081 is the usual choice)",
    "api_key": "key that /api/* requests must send as 'Authorization: Bearer KEY' or "
    "'X-API-Key: KEY' (default none: /api/* answers 403; /metrics and /healthz need no key)",
}

ENV_PREFIX = "FASTWS_"
CONFIG_ENV = "FASTWS_CONFIG"  # path of the TOML file when --config is not given


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
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Defaults, then the TOML file (``config_file``, else ``$FASTWS_CONFIG``), then
    ``FASTWS_*`` variables, then ``overrides`` (CLI flags; None = unset)."""
    return resolve(overrides, environ, config_file).settings


class Resolved(NamedTuple):
    settings: Settings
    sources: dict[str, str]  # field -> "default" | "file" | "env" | "flag": who set it last


def resolve(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Resolved:
    """``load_settings``, also saying where each value came from (for ``fastws config``)."""
    environ = os.environ if environ is None else environ
    path = config_file or environ.get(CONFIG_ENV) or None
    layers = [
        ("file", read_file(path) if path else {}),
        ("env", {f: environ[env_name(f)] for f in FIELDS if env_name(f) in environ}),
        ("flag", {f: v for f, v in (overrides or {}).items() if f in FIELDS and v is not None}),
    ]
    values: dict[str, Any] = {}
    sources = dict.fromkeys(FIELDS, "default")
    for source, layer in layers:
        for name, raw in layer.items():
            values[name] = _convert(name, raw, FIELDS[name])
            sources[name] = source
    settings = Settings(**values)
    try:
        validate(settings)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{_origins(str(exc), sources, path)}") from None
    return Resolved(settings, sources)


def _origins(message: str, sources: dict[str, str], path: str | None) -> str:
    """ " (port from fastws.toml)": where the settings a range error names were set."""
    where = {
        "file": path,
        "env": "the environment",
        "flag": "the command line",
        "default": "default",
    }
    named = dict.fromkeys(w for w in re.findall(r"\w+", message) if w in FIELDS)
    parts = [f"{name} from {where[sources[name]]}" for name in named]
    return f" ({', '.join(parts)})" if parts else ""


def validate(s: Settings) -> None:
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"port: {s.port} is not a TCP port")
    if not -1 <= s.admin_port <= 65535:
        raise ConfigError(f"admin_port: {s.admin_port} is not a TCP port (-1 = off)")
    if s.admin_port > 0 and s.admin_port == s.port:
        raise ConfigError("admin_port must differ from port")
    if s.ping_interval < 0 or s.ping_timeout < 0:
        raise ConfigError("ping_interval and ping_timeout must be >= 0")
    if s.ping_interval and s.ping_timeout > s.ping_interval:
        raise ConfigError("ping_timeout must not exceed ping_interval")
    if s.presence_grace < 0:
        raise ConfigError("presence_grace must be >= 0")
    if s.presence_diff_interval <= 0 or s.presence_diff_names < 0:
        raise ConfigError("presence_diff_interval must be > 0 and presence_diff_names >= 0")
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
    if s.history_max_bytes < 0:
        raise ConfigError("history_max_bytes must be >= 0")
    if s.history_size < 0 or s.history_ttl < 0:
        raise ConfigError("history_size and history_ttl must be >= 0")
    if s.workers < 0:
        raise ConfigError("workers must be >= 0 (0 = one per core)")
    if s.redis_url and not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis_url must start with redis://, rediss:// or unix://")
    if s.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {s.log_format!r}")
    if s.join_hook_timeout <= 0 or s.join_hook_cache < 0:
        raise ConfigError("join_hook_timeout must be > 0 and join_hook_cache >= 0")
    if s.events_url and not s.events_url.startswith(("http://", "https://")):
        raise ConfigError("events_url must start with http:// or https://")
    if s.events_url and not s.events_secret:
        raise ConfigError("events_url needs events_secret (the receiver checks the signature)")
    if s.events_batch < 1 or s.events_interval <= 0 or s.events_queue < 1:
        raise ConfigError("events_batch and events_queue must be >= 1, events_interval > 0")
    if s.join_hook_url and not s.join_hook_url.startswith(("http://", "https://")):
        raise ConfigError("join_hook_url must start with http:// or https://")
    from .policy import Policy

    Policy(s)  # a malformed room_post / room_presence rule is refused at start
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {s.log_level!r}")


# ---- the TOML file ---------------------------------------------------------------------------

# Every setting by name, with the type its default has (str, int, float or bool).
FIELDS: dict[str, type] = {f.name: type(f.default) for f in msgspec.structs.fields(Settings)}

# The file's sections, mapped onto fields by name prefix: the only place that knows the layout.
# A key inside a section is the field's own name (= the flag without dashes = FASTWS_<NAME>),
# so nothing is renamed; the first matching prefix wins and a field matching none is in
# [server]. New Settings fields thereby get a section without touching this table.
SECTIONS: dict[str, tuple[str, ...]] = {
    "server": (),
    "auth": ("jwt_",),
    "heartbeat": ("ping_", "json_ping"),
    "limits": ("max_", "rate_"),
    "history": ("history_",),
    "redis": ("redis_",),
    "log": ("log_",),
    "admin": ("admin_", "api_key"),
    "rooms": ("private_rooms", "direct_rooms", "room_", "join_hook_"),
    "events": ("events_",),
}


def section_of(field: str) -> str:
    for section, prefixes in SECTIONS.items():
        if prefixes and field.startswith(prefixes):
            return section
    return "server"


def _file_struct() -> Any:
    """A msgspec struct per section (every field optional, unknown keys refused) under one
    file struct, so decoding checks names and types and says where a mistake is."""
    sections: dict[str, list[tuple[str, Any, Any]]] = {name: [] for name in SECTIONS}
    for name, kind in FIELDS.items():
        sections[section_of(name)].append((name, kind | msgspec.UnsetType, msgspec.UNSET))
    return msgspec.defstruct(
        "ConfigFile",
        [
            (
                section,
                msgspec.defstruct(section, fields, forbid_unknown_fields=True, kw_only=True)
                | msgspec.UnsetType,
                msgspec.UNSET,
            )
            for section, fields in sections.items()
            if fields
        ],
        forbid_unknown_fields=True,
        kw_only=True,
    )


_ConfigFile = _file_struct()


def read_file(path: str) -> dict[str, Any]:
    """The settings a TOML file sets (typed), by field name; ``ConfigError`` naming the file
    and the key when the file is missing, is not TOML, or has an unknown or mistyped key."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        parsed = msgspec.toml.decode(data, type=_ConfigFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_explain(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for section in msgspec.structs.asdict(parsed).values():
        if section is not msgspec.UNSET:
            values.update(
                {k: v for k, v in msgspec.structs.asdict(section).items() if v is not msgspec.UNSET}
            )
    return values


def _explain(error: str) -> str:
    """msgspec's "Object contains unknown field `x` - at `$.s`" -> "unknown key s.x", with a
    hint when the key is a setting in the wrong place."""
    match = re.fullmatch(r"(.*?)(?: - at `\$(.*)`)?", error)
    assert match is not None
    detail, where = match.group(1), (match.group(2) or "").lstrip(".")
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", detail)
    if not unknown:
        return f"{where}: {detail[0].lower()}{detail[1:]}" if where else detail
    key = unknown.group(1)
    if not where and key in FIELDS:
        return f"key {key!r} must be inside a section: put it under [{section_of(key)}]"
    if not where:
        used = dict.fromkeys(section_of(name) for name in FIELDS)
        return f"unknown section [{key}] (sections: {', '.join(s for s in SECTIONS if s in used)})"
    if key in FIELDS:
        return f"unknown key {where}.{key}: {key} belongs in [{section_of(key)}]"
    return f"unknown key {where}.{key} (a typo? `fastws serve --help` lists every setting)"


# ---- showing the effective configuration ------------------------------------------------------

MASK = "***"
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")


def is_secret(field: str) -> bool:
    return field.endswith(("secret", "password", "_key", "token"))


def masked(field: str, value: Any) -> Any:
    """``value`` fit to show: secrets become ``***``, and so does a password inside a URL."""
    if isinstance(value, str) and value and is_secret(field):
        return MASK
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", value)
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    return repr(value)


def render_toml(resolved: Resolved) -> str:
    """The effective settings as a file ``--config`` reads, each line saying who set it.

    A masked line is commented out, so that loading the output never installs ``***`` as a
    secret: secrets stay wherever they came from (env, flag or the original file)."""
    lines = [
        "# fastws effective configuration: `fastws serve --config` reads this file.",
        "# Precedence: defaults < this file < FASTWS_* variables < command-line flags.",
    ]
    by_section: dict[str, list[str]] = {name: [] for name in SECTIONS}
    for name, value in msgspec.structs.asdict(resolved.settings).items():
        shown = masked(name, value)
        line = f"{name} = {_toml_value(shown)}"
        note = resolved.sources[name]
        if shown != value:
            line, note = f"# {line}", f"{note}, masked"
        by_section[section_of(name)].append(f"{line}  # {note}")
    for section, body in by_section.items():
        if body:
            lines += ["", f"[{section}]", *body]
    return "\n".join(lines) + "\n"


def render_json(resolved: Resolved) -> str:
    settings = {k: masked(k, v) for k, v in msgspec.structs.asdict(resolved.settings).items()}
    return json.dumps({"settings": settings, "sources": resolved.sources}, indent=2)


def environ_for(settings: Settings) -> dict[str, str]:
    """Every setting as a ``FASTWS_*`` variable: how worker processes inherit the
    supervisor's effective settings, whatever file, variable or flag they came from."""
    return {
        env_name(name): str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in msgspec.structs.asdict(settings).items()
        if name in FIELDS
    }
