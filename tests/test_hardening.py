"""Defences at the door and while connected: Origin, connection limits, token expiry, refresh."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .rawws import OP_CONT, OP_TEXT, raw_connect
from .utils import TIMEOUT, client, recv_json, running_node, send_json, token, ws_url


async def _status(url: str, **headers: str) -> int:
    try:
        async with connect(url, additional_headers=headers, open_timeout=TIMEOUT):
            return 101
    except InvalidStatus as exc:
        return int(exc.response.status_code)


@pytest.mark.parametrize(
    ("allowed", "origin", "status"),
    [
        ("", "https://evil.example", 403),
        ("", "http://127.0.0.1:{port}", 101),  # the server's own host
        ("https://chat.example", "https://chat.example", 101),
        ("https://chat.example", "https://chat.example.evil", 403),
        ("https://a.example,https://b.example", "https://b.example", 101),
        ("*", "https://anything.example", 101),
    ],
)
async def test_origin_is_checked_at_the_upgrade(allowed: str, origin: str, status: int) -> None:
    """A browser Origin that is neither our host nor allowed gets 403 (CSWSH)."""
    async with running_node(allowed_origins=allowed) as node:
        got = await _status(ws_url(node), Origin=origin.format(port=node.port))
        assert got == status
        assert node.stats().get("refused_origin", 0) == (status == 403)


async def test_requests_without_origin_are_allowed() -> None:
    """Non-browser clients send no Origin and are not refused for it."""
    async with running_node() as node, client(node):
        assert node.stats()["sessions"] == 1


async def test_max_connections_answers_503() -> None:
    """Past max_connections, the upgrade is answered 503 and nothing is opened."""
    async with running_node(max_connections=2) as node, client(node, "a"), client(node, "b"):
        assert await _status(ws_url(node, "c")) == 503
        assert node.stats()["refused_full"] == 1 and node.stats()["sessions"] == 2


async def test_per_ip_limit_closes_the_extra_connection_with_1008() -> None:
    """max_connections_per_ip: the next connection from that IP is closed with 1008."""
    async with running_node(max_connections_per_ip=2) as node, client(node, "a"), client(node, "b"):
        async with connect(ws_url(node, "c"), open_timeout=TIMEOUT) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 1008
        assert node.stats()["refused_per_ip"] == 1 and node.stats()["sessions"] == 2


async def test_forwarded_for_counts_only_from_trusted_proxies() -> None:
    """X-Forwarded-For names the client only when the peer is a trusted proxy."""
    first = {"X-Forwarded-For": "10.0.0.1"}
    second = {"X-Forwarded-For": "10.0.0.2"}
    async with (
        running_node(max_connections_per_ip=1, trusted_proxies="127.0.0.1") as node,
        connect(ws_url(node, "a"), additional_headers=first),
        connect(ws_url(node, "b"), additional_headers=second) as b,
    ):
        assert (await recv_json(b))["type"] == "connected"
        assert node.stats()["ips"] == 2
    async with (
        running_node(max_connections_per_ip=1) as node,  # untrusted: the peer counts
        connect(ws_url(node, "a"), additional_headers=first),
        connect(ws_url(node, "b"), additional_headers=second) as b,
    ):
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(b.recv(), TIMEOUT)
        assert b.close_code == 1008


async def test_expired_token_closes_the_connection_with_4001() -> None:
    """When its token expires (past the leeway), a connection is closed with 4001."""
    async with running_node(jwt_leeway=5) as node, client(node) as ws:
        (session,) = node.sessions.values()
        node.heartbeat.beat(time.monotonic(), session.principal.expires_at + 4)
        await send_json(ws, "ping")
        assert (await recv_json(ws))["type"] == "pong"  # still within the leeway
        node.heartbeat.beat(time.monotonic(), session.principal.expires_at + 6)
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 4001 and ws.close_reason == "token expired"


async def test_refresh_with_a_new_token_keeps_the_connection() -> None:
    """A refresh with a later token for the same user moves the expiry; the old one passes."""
    async with running_node(jwt_leeway=0) as node, client(node, "alice") as ws:
        (session,) = node.sessions.values()
        old_exp = session.principal.expires_at
        await send_json(ws, "refresh", {"token": token("alice", ttl=7200)}, id="r")
        reply = await recv_json(ws)
        assert reply["type"] == "refreshed" and reply["id"] == "r"
        assert reply["expiresAt"] >= int((old_exp + 3000) * 1000)
        node.heartbeat.beat(time.monotonic(), old_exp + 60)
        await send_json(ws, "ping")
        assert (await recv_json(ws))["type"] == "pong"


@pytest.mark.parametrize(
    ("tok", "code"),
    [
        (lambda: token("mallory", ttl=7200), "wrong_user"),
        (lambda: "garbage", "invalid_token"),
        (lambda: token("alice", ttl=-100), "invalid_token"),
    ],
)
async def test_refresh_is_refused_for_another_user_or_a_bad_token(tok, code: str) -> None:
    """refresh only accepts a valid token for the same user; the old expiry stays."""
    async with running_node() as node, client(node, "alice") as ws:
        (session,) = node.sessions.values()
        before = session.principal.expires_at
        await send_json(ws, "refresh", {"token": tok()})
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["code"] == code
        assert session.principal.expires_at == before


async def test_invalid_utf8_fails_at_the_fragment_that_has_it() -> None:
    """Fail fast: a bad byte in the first fragment closes 1007 before the message ends."""
    async with running_node() as node:
        ws = await raw_connect(node.port, token("alice"))
        try:
            await ws.send_frame(OP_TEXT, b'{"type":"ping","x":"\xff', fin=False)
            assert await ws.expect_close() == 1007
        finally:
            await ws.close()
        ws = await raw_connect(node.port, token("alice"))
        try:  # a character split across fragments is fine
            await ws.send_frame(OP_TEXT, b'{"type":"ping","x":"\xe2\x82', fin=False)
            await ws.send_frame(OP_CONT, b'\xac"}', fin=True)
            _, payload = await ws.read_frame()
            assert b'"pong"' in payload
        finally:
            await ws.close()


async def test_auth_failures_are_counted_by_reason() -> None:
    """Each refused upgrade is counted under its reason."""
    async with running_node() as node:
        base = ws_url(node, None)
        for url in (base, base + "?token=garbage", f"{base}?token={token('x', ttl=-100)}"):
            assert await _status(url) == 401
        reasons = node.stats()["auth_failures_by_reason"]
        assert reasons == {"no token": 1, "invalid token": 1, "token expired": 1}
