"""Baseline: the fastws chat protocol subset on plain picows, written the usual way.

One ``WSListener`` per connection, rooms as ``dict[str, set[listener]]``, JSON with orjson,
and a broadcast that encodes once and then calls ``transport.send`` for each member. Nothing
here is tuned: it is the comparison point for fastws' compiled fan-out.

    python benchmarks/baselines/picows_server.py --host 127.0.0.1 --port 0 --jwt-secret SECRET
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time
import uuid
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import orjson
import uvloop
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

NAME = "picows_server"
MAX_MESSAGE_BYTES = 64 * 1024


def now_ms() -> int:
    return int(time.time() * 1000)


def verify(token: str | None, secret: str) -> tuple[str, str] | None:
    """``(user_id, username)`` from a valid HS256 token with ``exp``, else ``None``."""
    if not token:
        return None
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.PyJWTError:
        return None
    user_id = claims.get("userId", claims.get("sub"))
    if user_id is None or user_id == "":
        return None
    return str(user_id), str(claims.get("username", user_id))


class ChatServer:
    """Room membership and the protocol; the listeners only move bytes."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.clients: set[ChatClient] = set()
        self.rooms: dict[str, set[ChatClient]] = {}
        self.seqs: dict[str, int] = {}

    def listener_factory(self, request: WSUpgradeRequest) -> Any:
        query = urlsplit(request.path.decode("latin-1")).query
        tokens = parse_qs(query).get("token")
        user = verify(tokens[0] if tokens else None, self.secret)
        if user is None:
            response = WSUpgradeResponse.create_error_response(
                HTTPStatus.UNAUTHORIZED, b"Unauthorized\n"
            )
            return WSUpgradeResponseWithListener(response, None)
        return ChatClient(self, *user)

    def broadcast(self, room: str, msg: dict[str, Any], exclude: ChatClient | None = None) -> None:
        payload = orjson.dumps(msg)
        for member in self.rooms.get(room, ()):
            if member is not exclude:
                member.transport.send(WSMsgType.TEXT, payload)

    def handle(self, client: ChatClient, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            client.send({"type": "error", "error": "Invalid message format"})
            return
        kind = msg["type"]
        if kind == "ping":
            client.send({"type": "pong", "timestamp": now_ms()})
            return
        if kind not in ("join_room", "leave_room", "chat_message"):
            client.send({"type": "error", "error": f"Unknown message type: {kind}"})
            return
        payload = msg.get("payload")
        room = payload.get("room") if isinstance(payload, dict) else None
        text = payload.get("message") if isinstance(payload, dict) else None
        if not isinstance(room, str) or (kind == "chat_message" and not isinstance(text, str)):
            client.send({"type": "error", "error": f"Invalid {kind} message"})
            return
        if kind == "join_room":
            self.join(client, room, msg.get("id"))
        elif room not in client.rooms:
            client.send({"type": "error", "error": f"Not a member of room: {room}"})
        elif kind == "leave_room":
            self.leave(client, room)
        else:
            self.chat(client, room, text)  # type: ignore[arg-type]

    def join(self, client: ChatClient, room: str, msg_id: Any) -> None:
        fresh = room not in client.rooms
        members = self.rooms.setdefault(room, set())
        members.add(client)
        client.rooms.add(room)
        reply: dict[str, Any] = {
            "type": "room_joined",
            "room": room,
            "members": len(members),
            "seq": self.seqs.get(room, 0),
        }
        if msg_id is not None:
            reply["id"] = msg_id
        client.send(reply)
        if fresh:
            self.broadcast(
                room,
                {
                    "type": "user_joined",
                    "room": room,
                    "username": client.username,
                    "timestamp": now_ms(),
                    "userId": client.user_id,
                    "members": len(members),
                },
                exclude=client,
            )

    def leave(self, client: ChatClient, room: str) -> None:
        client.rooms.discard(room)
        members = self.rooms.get(room)
        if members is None:
            return
        members.discard(client)
        if not members:
            del self.rooms[room]
            self.seqs.pop(room, None)
            return
        self.broadcast(
            room,
            {
                "type": "user_left",
                "room": room,
                "username": client.username,
                "timestamp": now_ms(),
                "userId": client.user_id,
                "members": len(members),
            },
        )

    def chat(self, client: ChatClient, room: str, text: str) -> None:
        seq = self.seqs[room] = self.seqs.get(room, 0) + 1
        self.broadcast(
            room,
            {
                "type": "chat_message",
                "room": room,
                "username": client.username,
                "message": text,
                "timestamp": now_ms(),
                "userId": client.user_id,
                "seq": seq,
            },
        )


class ChatClient(WSListener):  # type: ignore[misc]
    """One connection: frames in, ``handle`` out."""

    def __init__(self, server: ChatServer, user_id: str, username: str) -> None:
        super().__init__()
        self.server = server
        self.user_id = user_id
        self.username = username
        self.client_id = str(uuid.uuid4())
        self.rooms: set[str] = set()
        self.transport: WSTransport = None  # type: ignore[assignment]
        self._frags: bytearray | None = None

    def send(self, msg: dict[str, Any]) -> None:
        self.transport.send(WSMsgType.TEXT, orjson.dumps(msg))

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.server.clients.add(self)
        self.send({"type": "connected", "clientId": self.client_id, "timestamp": now_ms()})

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind in (WSMsgType.TEXT, WSMsgType.BINARY):
            if frame.fin:
                self.server.handle(self, frame.get_payload_as_bytes())
            else:
                self._frags = bytearray(frame.get_payload_as_memoryview())
        elif kind == WSMsgType.CONTINUATION and self._frags is not None:
            self._frags += frame.get_payload_as_memoryview()
            if len(self._frags) > MAX_MESSAGE_BYTES:
                transport.send_close(WSCloseCode.MESSAGE_TOO_BIG)
                transport.disconnect()
            elif frame.fin:
                data, self._frags = bytes(self._frags), None
                self.server.handle(self, data)
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.server.clients.discard(self)
        for room in list(self.rooms):
            self.server.leave(self, room)


async def main(host: str, port: int, secret: str) -> None:
    chat = ChatServer(secret)
    server = await ws_create_server(
        chat.listener_factory, host, port, max_frame_size=MAX_MESSAGE_BYTES
    )
    actual = server.sockets[0].getsockname()[1]
    print(f"{NAME} listening on http://{host}:{actual} (pid {os.getpid()})", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    server.close()
    clients = list(chat.clients)
    for client in clients:
        client.transport.send_close(WSCloseCode.GOING_AWAY, b"server shutting down")
    if clients:
        waits = [asyncio.ensure_future(c.transport.wait_disconnected()) for c in clients]
        _, pending = await asyncio.wait(waits, timeout=2.0)
        for fut in pending:
            fut.cancel()
        for client in clients:
            client.transport.disconnect(False)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2.0)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--jwt-secret", required=True)
    args = parser.parse_args()
    uvloop.run(main(args.host, args.port, args.jwt_secret))


if __name__ == "__main__":
    cli()
