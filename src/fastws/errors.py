"""The exception tree and the close-code table.

FastWSError
├── ConfigError      bad settings; the CLI prints it and exits 2
├── AuthError        the upgrade is refused with HTTP 401; ``reason`` is safe to log
└── MessageError     one client message is refused with an ``error`` reply; the
    │                connection stays open. ``code`` is the machine-readable kind.
    └── BrokerUnavailable  the broker is down: the message was not delivered anywhere
"""

from __future__ import annotations

import enum


class FastWSError(Exception):
    """Base of every error fastws raises on purpose."""


class ConfigError(FastWSError):
    """A setting is missing, malformed or inconsistent."""


class AuthError(FastWSError):
    """A connection attempt failed authentication (answered with HTTP 401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MessageError(FastWSError):
    """A client message was refused; the client gets ``{"type": "error", ...}``."""

    def __init__(self, code: str, text: str, msg_id: str | int | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.msg_id = msg_id


class BrokerUnavailable(MessageError):
    """The broker cannot be reached; the node keeps its clients and says so instead of lying."""

    def __init__(self, msg_id: str | int | None = None) -> None:
        super().__init__("unavailable", "Service temporarily unavailable, try again", msg_id)


class CloseCode(enum.IntEnum):
    """Close codes fastws sends: RFC 6455 section 7.4.1 where they fit, 4000-4999 otherwise."""

    NORMAL = 1000
    GOING_AWAY = 1001  # graceful shutdown, or no pong within the heartbeat timeout
    PROTOCOL_ERROR = 1002  # RSV bits, continuation out of order
    INVALID_DATA = 1007  # text message that is not UTF-8
    POLICY_VIOLATION = 1008  # kept flooding past the rate limit
    MESSAGE_TOO_BIG = 1009  # frame or reassembled message over max_message_bytes
    INTERNAL_ERROR = 1011  # a bug on our side; logged with a traceback
    TOKEN_EXPIRED = 4001  # the token expired while connected and no refresh came
    SLOW_CONSUMER = 4008  # unsent output grew past max_send_buffer_bytes
