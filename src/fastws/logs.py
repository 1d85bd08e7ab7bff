"""Logging setup: text or JSON lines, named loggers per layer, and no secrets in either."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# Attributes every LogRecord has; anything else came in through ``extra=`` and is a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

# Nothing logs a credential on purpose; this is the net under that rule for the ones that
# could slip into a message or field: a JWT anywhere (query string, fastws.token.<jwt>
# subprotocol), ?token=/&token= values, and Authorization / X-API-Key header values.
_SECRETS = re.compile(
    r"eyJ[\w-]+\.[\w-]+\.[\w-]*"
    r"|(?<=[?&]token=)[^&\s\"'\\]+"  # a backslash ends it too: JSON escapes stay whole
    r"|(?<=Bearer )[^\s\"'\\]+"
    r"|(?<=X-API-Key: )[^\s\"'\\]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with every credential-shaped part replaced by ``***``."""
    return _SECRETS.sub("***", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str))


class TextFormatter(logging.Formatter):
    """Human-readable line with the extra fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_") and k != "event"
        ]
        return redact(f"{line} {' '.join(extras)}" if extras else line)


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("fastws")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
