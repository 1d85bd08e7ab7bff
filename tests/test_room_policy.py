"""Room authorization (policy.py), tried as a hostile authenticated user would, on every
broker: private rooms, direct rooms, read-only rooms, presence rules, token refresh, and the
join hook against a real HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import time
import unicodedata
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from fastws.auth import mint
from fastws.policy import FORBIDDEN
from fastws.server import Node

from .nodes import Backend, enter, next_of, room_name, settle
from .utils import SECRET, TIMEOUT, expect_silence, recv_json, running_node, send_json

POLICY = {
    "private_rooms": "private:*",
    "direct_rooms": "dm:",
    "room_post": "announce:*=role:staff",
    "room_presence": "staff:*=role:staff",
}


@contextlib.asynccontextmanager
async def connected(node: Node | int, user: str, **claims: Any) -> AsyncIterator[ClientConnection]:
    """A client of ``user`` whose token carries ``claims`` (rooms, roles...)."""
    port = node if isinstance(node, int) else node.port
    roles = tuple(claims.pop("roles", ()))
    token = mint(SECRET, user, roles=roles, extra=claims)
    async with connect(
        f"ws://127.0.0.1:{port}/ws?token={token}", open_timeout=TIMEOUT, close_timeout=1
    ) as ws:
        assert (await recv_json(ws))["type"] == "connected"
        yield ws


def room_token(room: str, user: str, secret: str = SECRET, ttl: float = 60, **extra: Any) -> str:
    claims = {"room": room, "sub": user, "exp": int(time.time() + ttl), **extra}
    return jwt.encode(claims, secret, algorithm="HS256")


async def refused(ws: ClientConnection, type_: str, payload: dict[str, Any]) -> None:
    """``type_`` is answered ``forbidden`` with its id and the one message, nothing else."""
    await send_json(ws, type_, payload, id="no")
    assert await recv_json(ws) == {
        "type": "error",
        "error": FORBIDDEN,
        "code": "forbidden",
        "id": "no",
    }


def forbidden(nodes: list[Node]) -> int:
    return sum(n.counters["forbidden"] for n in {id(n): n for n in nodes}.values())


async def test_every_way_into_a_private_room_is_refused(backend: Backend) -> None:
    """Alice holds private:<x> through her token's rooms claim; mallory tries every way in:
    plain, with since, forged, expired, other-user and other-room room tokens, and claims
    that nearly match. Each is refused the same way as a room that does not exist, counted,
    and alice sees nothing of it."""
    room = room_name("private:x")
    # Claims that nearly name it: a prefix, another case, a trailing space, another Unicode
    # form of a longer name, a punctuation swap, and the pattern's own prefix.
    near = [
        room[:-1],
        room.upper(),
        room + " ",
        unicodedata.normalize("NFD", room + "é"),
        room.replace("-", "_"),
        "private:",
    ]
    async with (
        backend.nodes(2, **POLICY) as nodes,
        connected(nodes[0], "alice", rooms=[room]) as alice,
        connected(nodes[1], "mallory", rooms=near) as mallory,
    ):
        await enter(alice, room, nodes)
        attempts = [
            {"room": room},
            {"room": room, "since": {"seq": 0, "epoch": "x"}},
            {"room": room, "token": room_token(room, "mallory", secret="not-the-secret" * 3)},
            {"room": room, "token": room_token(room, "mallory", ttl=-60)},
            {"room": room, "token": room_token(room, "alice")},  # alice's, not hers
            {"room": room, "token": room_token(room + "2", "mallory")},  # another room's
            {"room": room, "token": "garbage"},
            {"room": room_name("private:nobody")},  # no such room: the same answer
        ]
        for payload in attempts:
            await refused(mallory, "join_room", payload)
        for kind, payload in (
            ("history", {"room": room, "limit": 10}),
            ("presence", {"room": room}),
            ("chat_message", {"room": room, "message": "hi"}),
            ("typing", {"room": room, "isTyping": True}),
        ):
            await send_json(mallory, kind, payload, id="n")
            assert (await recv_json(mallory))["code"] == "not_in_room"
        assert forbidden(nodes) == len(attempts)
        await settle(nodes)
        await expect_silence(alice, 0.1)
        # The rightful ways in: a room token made for her, and a glob in the claim.
        await send_json(
            mallory, "join_room", {"room": room, "token": room_token(room, "mallory")}, id="ok"
        )
        assert (await next_of(mallory, "room_joined"))["members"] == 2
    async with (
        backend.nodes(1, **POLICY) as nodes,
        connected(nodes[0], "carol", rooms=["private:team-*"]) as carol,
    ):
        await enter(carol, "private:team-x", nodes)
        await refused(carol, "join_room", {"room": "private:teams"})


async def test_a_room_token_opens_no_connection(backend: Backend) -> None:
    async with backend.nodes(1, **POLICY) as nodes:
        with pytest.raises(InvalidStatus) as refused_upgrade:
            await connect(
                f"ws://127.0.0.1:{nodes[0].port}/ws?token={room_token('private:x', 'mallory')}",
                open_timeout=TIMEOUT,
            )
        assert refused_upgrade.value.response.status_code == 401


async def test_direct_rooms_are_for_their_two_users_only(backend: Backend) -> None:
    async with (
        backend.nodes(2, **POLICY) as nodes,
        connected(nodes[0], "alice") as alice,
        connected(nodes[1], "bob") as bob,
        connected(nodes[1], "mallory") as mallory,
    ):
        dm = "dm:alice:bob"
        await enter(alice, dm, nodes)
        await enter(bob, dm, nodes)
        await next_of(alice, "user_joined")
        await refused(mallory, "join_room", {"room": dm})
        await refused(mallory, "join_room", {"room": "dm:bob:alice"})  # the pair, reversed
        await refused(alice, "join_room", {"room": "dm:Alice:bob"})  # another user id
        for malformed in ("dm:alice:bob:x", "dm:alice", "dm::bob", "dm:alice:"):
            await refused(alice, "join_room", {"room": malformed})  # nobody's
        await expect_silence(alice, 0.05)
        await expect_silence(bob, 0.05)


async def test_only_staff_post_and_type_in_an_announcement_room(backend: Backend) -> None:
    room = room_name("announce:news")
    async with (
        backend.nodes(2, **POLICY) as nodes,
        connected(nodes[0], "boss", roles=["staff"]) as boss,
        connected(nodes[1], "reader") as reader,
    ):
        await enter(boss, room, nodes)
        await enter(reader, room, nodes)
        await next_of(boss, "user_joined")
        await refused(reader, "chat_message", {"room": room, "message": "spam"})
        await refused(reader, "typing", {"room": room, "isTyping": True})
        await settle(nodes)
        await expect_silence(boss, 0.05)
        await send_json(boss, "chat_message", {"room": room, "message": "news"})
        assert (await next_of(reader, "chat_message"))["message"] == "news"
        assert (await next_of(boss, "chat_message"))["message"] == "news"


async def test_presence_of_a_staff_room_is_for_staff(backend: Backend) -> None:
    room = room_name("staff:ops")
    async with (
        backend.nodes(2, **POLICY) as nodes,
        connected(nodes[0], "boss", roles=["staff"]) as boss,
        connected(nodes[1], "guest") as guest,
    ):
        await enter(boss, room, nodes)
        await enter(guest, room, nodes)
        await refused(guest, "presence", {"room": room})
        await send_json(boss, "presence", {"room": room}, id="p")
        reply = await next_of(boss, "presence")
        assert sorted(m["userId"] for m in reply["members"]) == ["boss", "guest"]


async def test_a_refresh_that_no_longer_grants_a_room_takes_the_connection_out(
    backend: Backend,
) -> None:
    room = room_name("private:club")
    async with (
        backend.nodes(2, **POLICY) as nodes,
        connected(nodes[0], "alice", rooms=[room]) as alice,
        connected(nodes[1], "bob", rooms=[room]) as bob,
    ):
        await enter(alice, room, nodes)
        await enter(bob, room, nodes)
        await next_of(alice, "user_joined")
        await send_json(alice, "refresh", {"token": mint(SECRET, "alice")}, id="r")
        assert (await recv_json(alice))["type"] == "refreshed"
        assert await recv_json(alice) == {
            "type": "room_left",
            "room": room,
            "reason": "access_revoked",
        }
        assert (await next_of(bob, "user_left"))["username"] == "alice"
        await send_json(alice, "chat_message", {"room": room, "message": "still?"}, id="c")
        assert (await recv_json(alice))["code"] == "not_in_room"
        await send_json(alice, "ping")
        assert (await recv_json(alice))["type"] == "pong"  # the connection stays
        # A refresh that keeps the claim keeps the room.
        await send_json(bob, "refresh", {"token": mint(SECRET, "bob", extra={"rooms": [room]})})
        assert (await recv_json(bob))["type"] == "refreshed"
        await expect_silence(bob, 0.1)


# ---- the join hook, against a real HTTP server ----------------------------------------------


@contextlib.asynccontextmanager
async def hook_server(behaviour: dict[str, Any]) -> AsyncIterator[tuple[str, list[dict]]]:
    """A backend answering the join hook: allow for users in behaviour["allow"]; "slow" and
    "status" make it misbehave. Yields its URL and the requests it got."""
    seen: list[dict] = []

    async def decide(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if behaviour.get("slow"):
            await asyncio.sleep(behaviour["slow"])
        if behaviour.get("status", 200) != 200:
            return web.Response(status=behaviour["status"])
        return web.json_response({"allow": body["userId"] in behaviour.get("allow", ())})

    app = web.Application()
    app.router.add_post("/join", decide)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/join", seen
    finally:
        await runner.cleanup()


async def test_the_join_hook_allows_denies_and_caches() -> None:
    behaviour: dict[str, Any] = {"allow": {"hooky"}}
    async with (
        hook_server(behaviour) as (url, seen),
        running_node(**POLICY, join_hook_url=url, join_hook_timeout=0.3) as node,
        connected(node, "hooky") as hooky,
        connected(node, "other") as other,
    ):
        await send_json(hooky, "join_room", {"room": "private:h"}, id="j")
        assert (await next_of(hooky, "room_joined"))["room"] == "private:h"
        assert seen == [{"userId": "hooky", "username": "hooky", "roles": [], "room": "private:h"}]
        await refused(other, "join_room", {"room": "private:h"})
        await refused(other, "join_room", {"room": "private:h"})  # cached: no second call
        assert len(seen) == 2


@pytest.mark.parametrize("fault", ["slow", "500", "down"])
async def test_a_failing_join_hook_denies(fault: str) -> None:
    """A backend slower than join_hook_timeout, answering 500, or not there at all: the
    user the backend would allow is denied, and the failure counted."""
    behaviour: dict[str, Any] = {
        "allow": {"hooky"},
        "slow": 1.0 if fault == "slow" else 0,
        "status": 500 if fault == "500" else 200,
    }
    async with contextlib.AsyncExitStack() as stack:
        url, _ = await stack.enter_async_context(hook_server(behaviour))
        if fault == "down":
            await stack.aclose()  # the backend is gone; its URL stays
        async with (
            running_node(**POLICY, join_hook_url=url, join_hook_timeout=0.3) as node,
            connected(node, "hooky") as hooky,
        ):
            await refused(hooky, "join_room", {"room": "private:h"})
            assert node.join_hook is not None and node.join_hook.failures == 1


def test_the_startup_banner_says_which_rules_are_in_force() -> None:
    from .utils import server_process

    with server_process() as (proc, _):
        assert proc.stdout is not None
        assert "rooms: open" in proc.stdout.readline()
    with server_process("--private-rooms", "private:*", "--direct-rooms", "dm:") as (proc, _):
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(
            "rooms: private private:*; direct dm:<user>:<user>"
        )


async def test_rooms_are_open_by_default_and_the_banner_says_so(caplog: Any) -> None:
    with caplog.at_level("INFO"):
        async with running_node() as node, connected(node, "anyone") as ws:
            await send_json(ws, "join_room", {"room": "private:x"}, id="j")
            assert (await recv_json(ws))["type"] == "room_joined"
    assert any("rooms: open" in r.getMessage() for r in caplog.records)
