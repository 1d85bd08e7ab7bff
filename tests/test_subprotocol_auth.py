"""The token as a Sec-WebSocket-Protocol value (what browsers can send), over real sockets.

The client offers ``fastws.v1`` and ``fastws.token.<jwt>``; the server must answer with
exactly ``fastws.v1`` (never the token), refuse a bad or missing token with 401, and refuse a
token offered without ``fastws.v1`` with 400 (a browser would fail that handshake anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import picows
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from fastws.auth import PROTOCOL, TOKEN_PROTOCOL_PREFIX, extract_token, mint, offered_protocols
from fastws.server import Node

from .utils import (
    TIMEOUT,
    Collector,
    close_picows,
    recv_json,
    running_node,
    server_process,
    token,
    ws_url,
)


def offer(jwt: str) -> list[str]:
    return [PROTOCOL, TOKEN_PROTOCOL_PREFIX + jwt]


def test_offered_protocols_splits_every_header_line() -> None:
    """Comma lists over one or several header lines become one list, blanks dropped."""
    assert offered_protocols(["fastws.v1, fastws.token.a.b.c", " x ,,"]) == [
        "fastws.v1",
        "fastws.token.a.b.c",
        "x",
    ]
    assert offered_protocols([]) == []


def test_extract_token_reads_the_subprotocol_last() -> None:
    """The subprotocol token is used only when neither query nor header has one."""
    offered = [PROTOCOL, TOKEN_PROTOCOL_PREFIX + "a.b.c"]
    assert extract_token("/ws", None, offered) == "a.b.c"
    assert extract_token("/ws?token=q", "Bearer h", offered) == "q"
    assert extract_token("/ws", "Bearer h", offered) == "h"
    assert extract_token("/ws", "Bearer ", offered) == "a.b.c"
    assert extract_token("/ws", None, [PROTOCOL, TOKEN_PROTOCOL_PREFIX]) is None
    assert extract_token("/ws", None, [PROTOCOL, "fastws.tokenX"]) is None


async def test_websockets_client_connects_with_the_token_as_subprotocol() -> None:
    """websockets with subprotocols=[fastws.v1, fastws.token.<jwt>]: accepted, fastws.v1 chosen."""
    async with (
        running_node() as node,
        connect(ws_url(node, None), subprotocols=offer(token("alice")), open_timeout=TIMEOUT) as ws,
    ):
        assert ws.subprotocol == PROTOCOL
        hello = await recv_json(ws)
        assert hello["type"] == "connected" and hello["userId"] == "alice"
        await ws.send(json.dumps({"type": "join_room", "payload": {"room": "r"}, "id": 1}))
        assert (await recv_json(ws))["type"] == "room_joined"


async def test_picows_client_sees_exactly_the_protocol_echoed_never_the_token() -> None:
    """The 101 names exactly one protocol, fastws.v1; the JWT appears nowhere in its headers."""
    jwt = token("bob")
    async with running_node() as node:
        transport, listener = await picows.ws_connect(
            Collector,
            ws_url(node, None),
            extra_headers={"Sec-WebSocket-Protocol": ", ".join(offer(jwt))},
        )
        try:
            headers = transport.response.headers
            assert headers.getall("Sec-WebSocket-Protocol") == [PROTOCOL]
            assert all(jwt not in value for value in headers.values())
            hello = await listener.next()
            assert hello["type"] == "connected" and hello["userId"] == "bob"
        finally:
            await close_picows(listener)


async def test_protocols_in_separate_headers_are_read_too() -> None:
    """Two Sec-WebSocket-Protocol header lines are one list (RFC 6455 section 4.1)."""
    async with running_node() as node:
        transport, listener = await picows.ws_connect(
            Collector,
            ws_url(node, None),
            extra_headers=[
                ("Sec-WebSocket-Protocol", PROTOCOL),
                ("Sec-WebSocket-Protocol", TOKEN_PROTOCOL_PREFIX + token("carol")),
            ],
        )
        try:
            assert transport.response.headers.getall("Sec-WebSocket-Protocol") == [PROTOCOL]
            assert (await listener.next())["userId"] == "carol"
        finally:
            await close_picows(listener)


async def refused(node: Node, subprotocols: list[str]) -> Any:
    """The HTTP response of an upgrade offering ``subprotocols`` that the node refuses."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url(node, None), subprotocols=subprotocols, open_timeout=TIMEOUT):
            pass
    return info.value.response


@pytest.mark.parametrize(
    "jwt",
    [
        mint("another-secret-that-is-long-enough-for-hs256", "alice"),  # bad signature
        token("alice", ttl=-3600),  # expired
        "not.a.jwt",
    ],
    ids=["bad-signature", "expired", "garbage"],
)
async def test_bad_token_in_subprotocol_is_refused_with_401(jwt: str) -> None:
    """A refused token in the subprotocol gets HTTP 401 before any WebSocket exists."""
    async with running_node() as node:
        assert (await refused(node, offer(jwt))).status_code == 401
        assert node.counters["auth_failures"] == 1


async def test_no_token_with_the_protocol_offered_is_refused_with_401() -> None:
    """fastws.v1 alone is no credential: 401."""
    async with running_node() as node:
        assert (await refused(node, [PROTOCOL])).status_code == 401


async def test_empty_token_subprotocol_is_no_token() -> None:
    """`fastws.token.` with nothing after it is treated as no token: 401."""
    async with running_node() as node:
        assert (await refused(node, offer(""))).status_code == 401


async def test_token_without_the_protocol_is_refused_with_400() -> None:
    """A token offered without fastws.v1 gets 400 saying what to offer (no echo possible)."""
    async with running_node() as node:
        response = await refused(node, [TOKEN_PROTOCOL_PREFIX + token()])
        assert response.status_code == 400
        assert PROTOCOL.encode() in response.body


async def test_query_token_wins_over_subprotocol_token() -> None:
    """Precedence: ?token= first, then Authorization, then the subprotocol."""
    async with running_node() as node:
        async with connect(
            ws_url(node, "alice"), subprotocols=offer(token("bob")), open_timeout=TIMEOUT
        ) as ws:
            assert ws.subprotocol == PROTOCOL
            assert (await recv_json(ws))["userId"] == "alice"
        async with connect(
            ws_url(node, None),
            subprotocols=offer(token("bob")),
            additional_headers={"Authorization": f"Bearer {token('carol')}"},
            open_timeout=TIMEOUT,
        ) as ws:
            assert (await recv_json(ws))["userId"] == "carol"
        # A bad query token is not rescued by a good subprotocol one.
        bad = ws_url(node, None) + "?token=bad"
        with pytest.raises(InvalidStatus) as info:
            async with connect(bad, subprotocols=offer(token("bob")), open_timeout=TIMEOUT):
                pass
        assert info.value.response.status_code == 401


async def test_query_token_clients_get_no_protocol_unless_they_offer_it() -> None:
    """Seed clients (no subprotocol) still get a 101 without Sec-WebSocket-Protocol."""
    async with running_node() as node:
        async with connect(ws_url(node, "alice"), open_timeout=TIMEOUT) as ws:
            assert ws.subprotocol is None
            assert "Sec-WebSocket-Protocol" not in ws.response.headers
            assert (await recv_json(ws))["type"] == "connected"
        async with connect(
            ws_url(node, "alice"), subprotocols=[PROTOCOL], open_timeout=TIMEOUT
        ) as ws:
            assert ws.subprotocol == PROTOCOL


def test_subprotocol_token_is_never_logged() -> None:
    """With debug logs on, neither an accepted nor a refused subprotocol token is logged."""
    good = token("alice")
    bad = mint("another-secret-that-is-long-enough-for-hs256", "mallory")

    async def talk(port: int) -> None:
        url = f"ws://127.0.0.1:{port}/ws"
        async with connect(url, subprotocols=offer(good), open_timeout=TIMEOUT) as ws:
            assert (await recv_json(ws))["type"] == "connected"
        with pytest.raises(InvalidStatus):
            async with connect(url, subprotocols=offer(bad), open_timeout=TIMEOUT):
                pass

    with server_process("--log-level", "debug") as (proc, port):
        asyncio.run(asyncio.wait_for(talk(port), TIMEOUT * 2))
        time.sleep(0.2)  # let the server write its log lines
        proc.terminate()
        with contextlib.suppress(Exception):
            proc.wait(TIMEOUT)
        assert proc.stderr is not None
        logged = proc.stderr.read()
    assert "auth failed" in logged  # the log is there, and it is the real one
    for jwt in (good, bad):
        for part in jwt.split("."):
            assert part not in logged
