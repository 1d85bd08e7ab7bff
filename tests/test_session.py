"""session.py without sockets: bytes in, replies and node calls out; time is injected."""

from __future__ import annotations

import json
from typing import Any

from fastws.auth import Principal
from fastws.config import load_settings
from fastws.errors import CloseCode
from fastws.session import Session, TokenBucket

from .recorder import Recorder


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**overrides: Any) -> tuple[Session, Recorder, Clock]:
    rec, clock = Recorder(), Clock()
    settings = load_settings(overrides, environ={})
    session = Session("c1", Principal("u1", "alice"), None, rec, rec, settings, clock)
    return session, rec, clock


def msg(type_: str, **payload: Any) -> str:
    return json.dumps({"type": type_, "payload": payload})


def test_valid_messages_become_node_calls() -> None:
    """join, chat, typing, presence and leave reach the node with their fields."""
    s, rec, _ = make()
    s.handle(msg("join_room", room="r"))
    s.handle(msg("chat_message", room="r", message="hi"))
    s.handle(msg("typing", room="r", isTyping=False))
    s.handle(msg("presence", room="r"))
    s.handle(msg("leave_room", room="r"))
    assert rec.calls == [
        ("join", "r", None),
        ("chat", "r", "hi", None),
        ("typing", "r", False, None),
        ("presence", "r", None),
        ("leave", "r", None),
    ]
    assert rec.sent == []


def test_chat_takes_the_synchronous_path_when_the_node_offers_one() -> None:
    """With ``chat_now`` (an in-process broker) a valid chat calls it instead of the ``chat``
    coroutine; a refused chat reaches neither."""
    s, rec, _ = make()
    rec.chat_now = rec.record_chat_now
    s.handle(msg("join_room", room="r"))
    s.handle(msg("chat_message", room="r", message="hi"))
    s.handle(msg("chat_message", room="r", message=" "))
    s.handle(msg("chat_message", room="other", message="hi"))
    assert rec.calls == [("join", "r", None), ("chat_now", "r", "hi", None)]
    assert [m["code"] for m in rec.sent] == ["empty_message", "not_in_room"]


def test_empty_message_is_refused() -> None:
    """A blank chat_message is refused rather than broadcast."""
    s, rec, _ = make()
    s.handle(msg("join_room", room="r"))
    s.handle(msg("chat_message", room="r", message="   "))
    assert rec.sent[-1]["code"] == "empty_message"


def test_max_message_chars_is_configurable() -> None:
    """max_message_chars changes both the limit and the error text."""
    s, rec, _ = make(max_message_chars=5)
    s.handle(msg("join_room", room="r"))
    s.handle(msg("chat_message", room="r", message="123456"))
    assert rec.sent[-1]["error"] == "Message too long (max 5 characters)"


def test_rate_limit_refuses_then_recovers_with_time() -> None:
    """Past the burst, messages get rate_limited errors; tokens return as time passes."""
    s, rec, clock = make(rate_limit=10, rate_burst=3)
    for _ in range(3):
        s.handle('{"type":"pong"}')
    assert rec.sent == []
    s.handle('{"type":"pong"}')
    assert rec.sent == [
        {"type": "error", "error": "Rate limit exceeded, slow down", "code": "rate_limited"}
    ]
    clock.now += 0.15  # one token back at 10/s
    s.handle('{"type":"ping"}')
    assert rec.sent[-1]["type"] == "pong"


def test_flooding_past_the_limit_closes_with_1008() -> None:
    """A client that keeps sending while limited is closed with policy violation (1008)."""
    s, rec, _ = make(rate_limit=1, rate_burst=2)
    for _ in range(10):
        s.handle('{"type":"pong"}')
    assert rec.closed == (CloseCode.POLICY_VIOLATION, "rate limit exceeded")


def test_rate_limit_zero_disables_it() -> None:
    """rate_limit=0 means no limit."""
    s, rec, _ = make(rate_limit=0)
    for _ in range(1000):
        s.handle('{"type":"pong"}')
    assert rec.sent == [] and rec.closed is None


def test_token_bucket_caps_at_burst() -> None:
    """Idle time refills the bucket only up to the burst size."""
    clock = Clock()
    bucket = TokenBucket(5, 2, clock)
    clock.now += 1000
    assert [bucket.take() for _ in range(3)] == [True, True, False]
