"""Baseline: the fastws chat protocol subset on the `websockets` library, written idiomatically.

A handler coroutine per connection, a ``process_request`` hook that answers 401 without a
valid token, rooms as ``dict[str, set[connection]]``, JSON with the standard library, and
fan-out with ``websockets.broadcast``. Nothing here is tuned.

    python benchmarks/baselines/websockets_server.py --host 127.0.0.1 --port 0 --jwt-secret SECRET
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
import uuid
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import uvloop
from websockets import broadcast
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

NAME = "websockets_server"
MAX_MESSAGE_BYTES = 64 * 1024

rooms: dict[str, set[ServerConnection]] = {}
seqs: dict[str, int] = {}


def now_ms() -> int:
    return int(time.time() * 1000)


def make_process_request(secret: str) -> Any:
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        tokens = parse_qs(urlsplit(request.path).query).get("token")
        if not tokens:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
        try:
            claims = jwt.decode(
                tokens[0], secret, algorithms=["HS256"], options={"require": ["exp"]}
            )
        except jwt.PyJWTError:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
        user_id = claims.get("userId", claims.get("sub"))
        if user_id is None or user_id == "":
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
        connection.user_id = str(user_id)  # type: ignore[attr-defined]
        connection.username = str(claims.get("username", user_id))  # type: ignore[attr-defined]
        return None

    return process_request


async def join(ws: Any, joined: set[str], room: str, msg_id: Any) -> None:
    fresh = room not in joined
    members = rooms.setdefault(room, set())
    members.add(ws)
    joined.add(room)
    reply: dict[str, Any] = {
        "type": "room_joined",
        "room": room,
        "members": len(members),
        "seq": seqs.get(room, 0),
    }
    if msg_id is not None:
        reply["id"] = msg_id
    await ws.send(json.dumps(reply))
    if fresh:
        others = [m for m in members if m is not ws]
        broadcast(
            others,
            json.dumps(
                {
                    "type": "user_joined",
                    "room": room,
                    "username": ws.username,
                    "timestamp": now_ms(),
                    "userId": ws.user_id,
                    "members": len(members),
                }
            ),
        )


def leave(ws: Any, joined: set[str], room: str) -> None:
    joined.discard(room)
    members = rooms.get(room)
    if members is None:
        return
    members.discard(ws)
    if not members:
        del rooms[room]
        seqs.pop(room, None)
        return
    broadcast(
        members,
        json.dumps(
            {
                "type": "user_left",
                "room": room,
                "username": ws.username,
                "timestamp": now_ms(),
                "userId": ws.user_id,
                "members": len(members),
            }
        ),
    )


def chat(ws: Any, room: str, text: str) -> None:
    seq = seqs[room] = seqs.get(room, 0) + 1
    broadcast(
        rooms[room],
        json.dumps(
            {
                "type": "chat_message",
                "room": room,
                "username": ws.username,
                "message": text,
                "timestamp": now_ms(),
                "userId": ws.user_id,
                "seq": seq,
            }
        ),
    )


async def handler(ws: Any) -> None:
    joined: set[str] = set()
    try:
        await ws.send(
            json.dumps({"type": "connected", "clientId": str(uuid.uuid4()), "timestamp": now_ms()})
        )
        async for raw in ws:
            try:
                msg = json.loads(raw)
            except (ValueError, RecursionError):
                msg = None
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                await ws.send(json.dumps({"type": "error", "error": "Invalid message format"}))
                continue
            kind = msg["type"]
            if kind == "ping":
                await ws.send(json.dumps({"type": "pong", "timestamp": now_ms()}))
                continue
            if kind not in ("join_room", "leave_room", "chat_message"):
                error = f"Unknown message type: {kind}"
                await ws.send(json.dumps({"type": "error", "error": error}))
                continue
            payload = msg.get("payload")
            room = payload.get("room") if isinstance(payload, dict) else None
            text = payload.get("message") if isinstance(payload, dict) else None
            if not isinstance(room, str) or (kind == "chat_message" and not isinstance(text, str)):
                await ws.send(json.dumps({"type": "error", "error": f"Invalid {kind} message"}))
            elif kind == "join_room":
                await join(ws, joined, room, msg.get("id"))
            elif room not in joined:
                error = f"Not a member of room: {room}"
                await ws.send(json.dumps({"type": "error", "error": error}))
            elif kind == "leave_room":
                leave(ws, joined, room)
            else:
                chat(ws, room, text)  # type: ignore[arg-type]
    except ConnectionClosed:
        pass
    finally:
        for room in list(joined):
            leave(ws, joined, room)


async def main(host: str, port: int, secret: str) -> None:
    async with serve(
        handler,
        host,
        port,
        process_request=make_process_request(secret),
        ping_interval=None,
        compression=None,
        max_size=MAX_MESSAGE_BYTES,
    ) as server:
        actual = server.sockets[0].getsockname()[1]
        print(f"{NAME} listening on http://{host}:{actual} (pid {os.getpid()})", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.close)
        await server.wait_closed()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--jwt-secret", required=True)
    args = parser.parse_args()
    uvloop.run(main(args.host, args.port, args.jwt_secret))


if __name__ == "__main__":
    cli()
