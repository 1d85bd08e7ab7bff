"""Structured logs: a real server's --log-format json lines carry event, connection id and
room, and no credential in any of the ways a client can send one."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from fastws.logs import JsonFormatter, TextFormatter, redact

from .utils import TIMEOUT, recv_json, send_json, server_process, token


async def _session(ws: ClientConnection) -> str:
    """Join, chat and leave on ``ws``; its client id."""
    hello = await recv_json(ws)
    await send_json(ws, "join_room", {"room": "general"})
    assert (await recv_json(ws))["type"] == "room_joined"
    await send_json(ws, "chat_message", {"room": "general", "message": "hi"}, id=1)
    while (await recv_json(ws)).get("type") != "ack":
        pass
    await send_json(ws, "leave_room", {"room": "general"}, id=2)
    while (await recv_json(ws)).get("type") != "room_left":
        pass
    return str(hello["clientId"])


async def _visit(port: int, tokens: list[str]) -> list[str]:
    """Three clients, one per way of sending a token, plus one refused bad token."""
    base = f"ws://127.0.0.1:{port}/ws"
    ways: list[dict[str, Any]] = [
        {"uri": f"{base}?token={tokens[0]}"},
        {"uri": base, "additional_headers": {"Authorization": f"Bearer {tokens[1]}"}},
        {"uri": base, "subprotocols": ["fastws.v1", f"fastws.token.{tokens[2]}"]},
    ]
    ids = []
    for way in ways:
        async with connect(**way, open_timeout=TIMEOUT, close_timeout=1) as ws:
            ids.append(await _session(ws))
    with pytest.raises(InvalidStatus):
        await connect(f"{base}?token={tokens[3]}", open_timeout=TIMEOUT)
    return ids


def _server_log(tokens: list[str]) -> tuple[str, list[str]]:
    with server_process("--log-format", "json", "--log-level", "debug") as (proc, port):
        ids = asyncio.run(asyncio.wait_for(_visit(port, tokens), TIMEOUT * 2))
        proc.terminate()  # drain: every log line is written before exit 0
        _, err = proc.communicate(timeout=TIMEOUT * 2)
        assert proc.returncode == 0, err
    return err, ids


def test_json_log_lines_carry_event_connection_and_room_and_no_token() -> None:
    """Every line is a JSON object with an event; connected, join, leave and disconnected
    name the connection (and the room); no token given by query, header or subprotocol, nor
    a rejected one, appears in any form."""
    good = [token("alice"), token("bob"), token("carol")]
    forged = token("mallory")[:-4] + "AAAA"  # bad signature: refused with 401
    err, ids = _server_log([*good, forged])
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines and all(isinstance(line, dict) and line.get("event") for line in lines)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)
    for event in ("connected", "join", "leave", "disconnected"):
        assert sorted(line["client_id"] for line in by_event[event]) == sorted(ids), event
    for event in ("join", "leave"):
        assert {line["room"] for line in by_event[event]} == {"general"}
    assert [line["reason"] for line in by_event["auth_failed"]] == ["bad signature"]
    for tok in [*good, forged]:
        _header, claims, signature = tok.split(".")
        assert tok not in err and claims not in err and signature not in err


@pytest.mark.parametrize("fmt", [JsonFormatter(), TextFormatter()])
@pytest.mark.parametrize(
    "leak",
    [
        "GET /ws?token={t} HTTP/1.1",
        "/ws?room=a&token={t}&x=1",
        "Authorization: Bearer {t}",
        "Sec-WebSocket-Protocol: fastws.v1, fastws.token.{t}",
        'headers {{"x-api-key: {t}"}}',
    ],
)
def test_formatters_redact_credentials_that_slip_into_a_record(
    fmt: logging.Formatter, leak: str
) -> None:
    """A token or key in a log message or an extra field comes out as ***, and a JSON line
    stays valid JSON."""
    tok = token("alice")
    record = logging.LogRecord(
        "fastws.test", logging.INFO, __file__, 1, leak.format(t=tok), None, None
    )
    record.event = "test"
    record.path = leak.format(t=tok)
    line = fmt.format(record)
    assert tok not in line and tok.split(".")[2] not in line
    assert "***" in line
    if isinstance(fmt, JsonFormatter):
        parsed = json.loads(line)
        assert parsed["event"] == "test" and parsed["msg"] == redact(leak.format(t=tok))


def test_redact_leaves_ordinary_text_alone() -> None:
    """Room names, ids and prose without credentials pass through unchanged."""
    text = "joined room=general client_id=1005a237 token bucket empty; eyJ alone"
    assert redact(text) == text
