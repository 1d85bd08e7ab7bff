"""The admin listener: POST /api/publish, GET /api/rooms/{room}/presence, auth, typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from fastws.config import load_settings
from fastws.server import Node

from .redisutil import free_port, redis_node
from .utils import (
    SECRET,
    TIMEOUT,
    client,
    join,
    join_across_nodes,
    recv_json,
    running_node,
    send_json,
    server_process,
    ws_url,
)

KEY = "admin-key-for-tests-0123456789"


def admin_url(node: Node) -> str:
    assert node.admin is not None
    return f"http://127.0.0.1:{node.admin.port}"


@contextlib.asynccontextmanager
async def http(key: str | None = KEY) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession(
        headers=headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
    ) as session:
        yield session


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, dict[str, Any], Any]:
    async with session.request(method, url, **kw) as r:
        return r.status, json.loads(await r.read()), r.headers


async def next_of(ws: Any, kind: str) -> dict[str, Any]:
    """The next message of type ``kind``, skipping presence notices."""
    while True:
        msg = await recv_json(ws)
        if msg["type"] == kind:
            return msg
        assert msg["type"] in ("user_joined", "user_left"), msg


async def test_publish_reaches_every_member_with_seq_and_history() -> None:
    """An API publish is a chat_message with the room's next seq: every member gets it, the
    ack carries the seq, history and recovery include it."""
    async with (
        running_node(admin_port=0, api_key=KEY) as node,
        client(node, "alice") as alice,
        client(node, "bob") as bob,
        http() as h,
    ):
        await join(alice, "general")
        await join(bob, "general")
        await send_json(alice, "chat_message", {"room": "general", "message": "hi"})
        first = await next_of(alice, "chat_message")
        assert (await next_of(bob, "chat_message"))["seq"] == first["seq"] == 1
        status, body, _ = await call(
            h,
            "POST",
            admin_url(node) + "/api/publish",
            json={"room": "general", "text": "deploy at 5"},
        )
        assert (status, body) == (200, {"room": "general", "seq": 2})
        for ws in (alice, bob):
            msg = await next_of(ws, "chat_message")
            assert msg["message"] == "deploy at 5" and msg["seq"] == 2, msg
            assert msg["username"] == "system" and msg["userId"] == "system", msg
            assert msg["epoch"] == first["epoch"]
        await send_json(alice, "history", {"room": "general", "limit": 10}, id="h")
        history = await next_of(alice, "history")
        assert [m["message"] for m in history["messages"]] == ["hi", "deploy at 5"]
        async with client(node, "carol") as carol:
            await send_json(
                carol,
                "join_room",
                {"room": "general", "since": {"seq": 1, "epoch": first["epoch"]}},
            )
            joined = await next_of(carol, "room_joined")
            assert joined["recovered"] is True and joined["seq"] == 2
            assert (await next_of(carol, "chat_message"))["message"] == "deploy at 5"
        assert node.stats()["api_messages_in"] == 1


async def test_publish_names_its_sender() -> None:
    """username and userId in the body become the chat_message's; a room with no member
    still counts the seq."""
    async with running_node(admin_port=0, api_key=KEY) as node, client(node) as ws, http() as h:
        url = admin_url(node) + "/api/publish"
        status, body, _ = await call(h, "POST", url, json={"room": "empty", "text": "x"})
        assert (status, body["seq"]) == (200, 1)
        await join(ws, "news")
        status, body, _ = await call(
            h,
            "POST",
            url,
            json={"room": "news", "text": "breaking", "username": "Newsroom", "userId": "bot-7"},
        )
        assert status == 200
        msg = await next_of(ws, "chat_message")
        assert (msg["username"], msg["userId"], msg["seq"]) == ("Newsroom", "bot-7", 1)


async def test_presence_lists_each_user_once() -> None:
    """The presence endpoint lists every user in the room once and counts connections."""
    async with (
        running_node(admin_port=0, api_key=KEY) as node,
        http() as h,
        client(node, "alice") as a1,
        client(node, "alice") as a2,
        client(node, "bob") as b,
    ):
        for ws in (a1, a2, b):
            await join(ws, "lobby")
        status, body, _ = await call(h, "GET", admin_url(node) + "/api/rooms/lobby/presence")
        assert status == 200
        assert body["room"] == "lobby" and body["connections"] == 3
        assert sorted(m["userId"] for m in body["members"]) == ["alice", "bob"]
        status, body, _ = await call(h, "GET", admin_url(node) + "/api/rooms/nobody/presence")
        assert (status, body) == (200, {"room": "nobody", "connections": 0, "members": []})
        status, body, _ = await call(h, "GET", admin_url(node) + "/api/rooms/a%0Ab/presence")
        assert (status, body["code"]) == (422, "invalid_room")


async def test_api_key_is_required_and_compared() -> None:
    """/api/* needs the key (Bearer or X-API-Key): 401 without it or with a wrong one;
    /metrics and /healthz need none."""
    async with running_node(admin_port=0, api_key=KEY) as node:
        base = admin_url(node)
        publish = {"room": "r", "text": "t"}
        for key in (None, "", "wrong", KEY + "x", KEY[:-1]):
            async with http(key) as h:
                status, body, headers = await call(h, "POST", base + "/api/publish", json=publish)
                assert (status, body["code"]) == (401, "unauthorized"), key
                assert headers["WWW-Authenticate"].startswith("Bearer")
                status, body, _ = await call(h, "GET", base + "/api/rooms/r/presence")
                assert (status, body["code"]) == (401, "unauthorized")
        async with http(None) as h:
            status, _, _ = await call(
                h, "POST", base + "/api/publish", json=publish, headers={"X-API-Key": KEY}
            )
            assert status == 200
            async with h.get(base + "/metrics") as r:
                assert r.status == 200 and b"fastws_connections" in await r.read()
            status, health, _ = await call(h, "GET", base + "/healthz")
            assert status == 200 and health["node"] == node.node_id
        assert node.stats()["api_messages_in"] == 1  # only the authorized one went out


async def test_api_is_off_without_a_key() -> None:
    """With no api_key configured every /api request is refused with 403 api_disabled."""
    async with running_node(admin_port=0) as node, http("anything") as h:
        status, body, _ = await call(
            h, "POST", admin_url(node) + "/api/publish", json={"room": "r", "text": "t"}
        )
        assert (status, body["code"]) == (403, "api_disabled")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"not json", 400, "invalid_body"),
        (b"[1, 2]", 400, "invalid_body"),
        (b'{"room": "r"}', 400, "invalid_body"),
        (b'{"room": "r", "text": 5}', 400, "invalid_body"),
        (b'{"room": "r", "text": "t", "txet": "typo"}', 400, "invalid_body"),
        (b'{"room": "bad\\nroom", "text": "t"}', 422, "invalid_room"),
        (b'{"room": "", "text": "t"}', 422, "invalid_room"),
        (b'{"room": "r", "text": "   "}', 422, "empty_message"),
        (b'{"room": "r", "text": "' + b"x" * 1001 + b'"}', 422, "message_too_long"),
        (b'{"room": "r", "text": "t", "username": ""}', 422, "invalid_user"),
        (b'{"room": "r", "text": "t", "username": "' + b"u" * 65 + b'"}', 422, "invalid_user"),
        (b'{"room": "r", "text": "t", "userId": " "}', 422, "invalid_user"),
        (b'{"room": "r", "text": "' + b"x" * 70000 + b'"}', 413, "too_large"),
    ],
)
async def test_bad_bodies_get_typed_errors(body: bytes, status: int, code: str) -> None:
    """Every malformed or invalid publish gets its status and JSON code; nothing is sent."""
    async with running_node(admin_port=0, api_key=KEY) as node, http() as h:
        got, reply, headers = await call(
            h,
            "POST",
            admin_url(node) + "/api/publish",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        assert (got, reply["code"]) == (status, code), reply
        assert reply["error"] and headers["Content-Type"].startswith("application/json")
        assert node.stats().get("api_messages_in", 0) == 0


async def test_oversize_chunked_body_is_413() -> None:
    """A body without Content-Length that grows past the limit is cut off with 413."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"room": "r", "text": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'

    async with running_node(admin_port=0, api_key=KEY) as node, http() as h:
        status, reply, _ = await call(h, "POST", admin_url(node) + "/api/publish", data=chunks())
        assert (status, reply["code"]) == (413, "too_large")


async def test_unknown_routes_and_methods_are_json() -> None:
    """Unknown /api paths are 404 and wrong methods 405, both as typed JSON."""
    async with running_node(admin_port=0, api_key=KEY) as node, http() as h:
        status, body, _ = await call(h, "GET", admin_url(node) + "/api/publish")
        assert (status, body["code"]) == (405, "method_not_allowed")
        status, body, _ = await call(h, "POST", admin_url(node) + "/api/nothing", json={})
        assert (status, body["code"]) == (404, "not_found")


async def test_admin_listener_is_off_by_default() -> None:
    """By default there is no admin listener: nothing beyond the WebSocket port is opened."""
    assert load_settings(environ={}).admin_port == -1
    async with running_node() as node:
        assert node.admin is None


async def test_publish_with_redis_down_is_503(redis_server: Any) -> None:
    """When the broker is unavailable the publish fails with 503 unavailable, not a false 200;
    once Redis is back it goes through again."""
    async with redis_node(redis_server.url, "n1", admin_port=0, api_key=KEY) as node, http() as h:
        url = admin_url(node) + "/api/publish"
        status, _, _ = await call(h, "POST", url, json={"room": "r", "text": "one"})
        assert status == 200
        redis_server.stop()
        status, body, _ = await call(h, "POST", url, json={"room": "r", "text": "two"})
        assert (status, body["code"]) == (503, "unavailable")
        status, body, _ = await call(h, "GET", admin_url(node) + "/api/rooms/r/presence")
        assert (status, body["code"]) == (503, "unavailable")
        redis_server.start()
        for _ in range(100):
            status, body, _ = await call(h, "POST", url, json={"room": "r", "text": "three"})
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200, body


async def test_publish_reaches_clients_on_every_worker() -> None:
    """Under --workers 2 an API publish, whichever worker takes it, reaches the room's
    members on both workers once, with one seq; presence counts them all."""
    admin = free_port()
    with server_process(
        "--workers", "2", "--admin-port", str(admin), env={"FASTWS_API_KEY": KEY}
    ) as (_proc, port):
        from websockets.asyncio.client import connect

        clients, nodes = [], []
        try:
            for i in range(12):
                ws = await connect(ws_url(port, f"u{i}"), open_timeout=TIMEOUT, close_timeout=1)
                nodes.append((await recv_json(ws))["node"])
                clients.append(ws)
                await join_across_nodes(ws, "all")
            assert len(set(nodes)) == 2, Counter(nodes)
            base = f"http://127.0.0.1:{admin}"
            async with http() as h:
                seqs = []
                for i in range(4):  # fresh connections: both workers' admin listeners answer
                    async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as fresh:
                        status, body, _ = await call(
                            fresh,
                            "POST",
                            base + "/api/publish",
                            json={"room": "all", "text": f"n{i}"},
                        )
                    assert status == 200, body
                    seqs.append(body["seq"])
                assert seqs == [1, 2, 3, 4]
                status, body, _ = await call(h, "GET", base + "/api/rooms/all/presence")
                assert body["connections"] == 12 and len(body["members"]) == 12
            for ws in clients:
                got = [(await next_of(ws, "chat_message"))["message"] for _ in range(4)]
                assert got == ["n0", "n1", "n2", "n3"]
        finally:
            await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)


def test_busy_admin_port_is_a_clear_error() -> None:
    """An admin port already taken stops `fastws serve` with exit code 2 and says which."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fastws",
                "serve",
                "--port",
                "0",
                "--jwt-secret",
                SECRET,
                "--admin-port",
                str(taken),
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 3,
        )
    assert done.returncode == 2, done.stderr
    assert f"admin listener: cannot listen on 127.0.0.1:{taken}" in done.stderr
    assert "Traceback" not in done.stderr
