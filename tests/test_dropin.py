"""Clients written for the seed work unchanged: they connect to ``ws://host:port/?token=...``
(any path upgrades by default), with HS512 tokens (tests/test_auth.py), and chat."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .utils import TIMEOUT, recv_json, running_node, send_json, token


@pytest.mark.parametrize("path", ["/", "/chat", "/ws", "/any/deeper/path"])
async def test_a_seed_client_connects_on_any_path_and_chats(path: str) -> None:
    async with running_node() as node, connect(
            f"ws://127.0.0.1:{node.port}{path}?token={token('alice')}",
            open_timeout=TIMEOUT) as ws:
        assert (await recv_json(ws))["type"] == "connected"
        await send_json(ws, "join_room", {"room": "general"})
        assert (await recv_json(ws))["type"] == "room_joined"
        await send_json(ws, "chat_message", {"room": "general", "message": "hello"})
        assert (await recv_json(ws))["message"] == "hello"


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        return r.status, r.read()


async def test_plain_gets_still_serve_the_page_and_health() -> None:
    async with running_node() as node:
        base = f"http://127.0.0.1:{node.port}"
        status, body = await asyncio.to_thread(_get, base + "/")  # the node runs in this loop
        assert status == 200 and b"<html" in body.lower()
        assert (await asyncio.to_thread(_get, base + "/healthz"))[0] == 200


async def test_ws_paths_restricts_the_upgrade_to_the_listed_paths() -> None:
    async with running_node(ws_paths="/ws,/chat") as node:
        for path in ("/ws", "/chat"):
            async with connect(f"ws://127.0.0.1:{node.port}{path}?token={token('a')}",
                               open_timeout=TIMEOUT) as ws:
                assert (await recv_json(ws))["type"] == "connected"
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{node.port}/?token={token('a')}",
                          open_timeout=TIMEOUT)
        assert refused.value.response.status_code == 404
