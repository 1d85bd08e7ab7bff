"""What a fastws process holds in memory: per connection, per room, per retained message, and
what a client churning through rooms does to it.

Starts ``fastws serve`` (pinned to CPU 0 when taskset exists) and reads its RSS from
/proc/<pid>/status around each step:

- **idle connections**: N authenticated connections, joined to nothing;
- **rooms**: one connection joins R rooms (no messages);
- **retained messages**: one room gets M chat messages of 1,000 characters (history kept);
- **churn** (the fault report's): C clients each loop join a new room, post 100 messages of
  1,000 characters, leave -- until ``--churn-rooms`` rooms have been used.

The figures in docs/deploy.md ("Memory") come from it:

    python benchmarks/memory_cost.py --steps connections,rooms,churn   # default settings
    python benchmarks/memory_cost.py --steps messages --server-arg=--history-size=5000
    python benchmarks/memory_cost.py --steps churn --server-arg=--history-max-bytes=0

``--server-arg`` passes a flag to ``fastws serve`` (repeatable); the rate limit is turned off
so the churn runs at full speed (it bounds time, not memory).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys

import orjson
from websockets.asyncio.client import ClientConnection, connect

from fastws.auth import mint
from fastws.bench.targets import rss_bytes

SECRET = "memory-cost-secret-0123456789abcdef0123456789"
TEXT = "x" * 1000


def rss_kib(pid: int) -> int:
    return (rss_bytes(pid) or 0) // 1024  # the harness' reading: the process and its children


def token(user: str) -> str:
    return mint(SECRET, user)


def start_server(extra: list[str]) -> tuple[subprocess.Popen[str], int]:
    cmd = [
        sys.executable,
        "-m",
        "fastws",
        "serve",
        "--port",
        "0",
        "--jwt-secret",
        SECRET,
        "--rate-limit",
        "0",
        "--max-rooms-per-connection",
        "0",
        *extra,
    ]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on http://[\d.]+:(\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(match.group(1))


async def request(ws: ClientConnection, type_: str, payload: dict, msg_id: str) -> None:
    """Send and wait for the answer carrying ``msg_id`` (skipping broadcasts)."""
    await ws.send(orjson.dumps({"type": type_, "payload": payload, "id": msg_id}).decode())
    while True:
        msg = orjson.loads(await ws.recv())
        if msg.get("id") == msg_id:
            if msg["type"] == "error":
                raise RuntimeError(msg)
            return


async def post(ws: ClientConnection, room: str, count: int, tag: str) -> None:
    for i in range(count):
        await ws.send(
            orjson.dumps(
                {
                    "type": "chat_message",
                    "id": f"{tag}-{i}",
                    "payload": {"room": room, "message": TEXT},
                }
            ).decode()
        )
    acks = 0
    while acks < count:
        acks += orjson.loads(await ws.recv()).get("type") == "ack"


async def settle(pid: int) -> int:
    await asyncio.sleep(0.5)
    return rss_kib(pid)


async def idle_connections(url: str, pid: int, count: int) -> float:
    before = await settle(pid)
    conns = [await connect(f"{url}?token={token(f'u{i}')}", max_size=None) for i in range(count)]
    for ws in conns:
        await ws.recv()  # connected
    after = await settle(pid)
    for ws in conns:
        await ws.close()
    return (after - before) / count


async def rooms(url: str, pid: int, count: int) -> float:
    async with connect(f"{url}?token={token('roomer')}", max_size=None) as ws:
        await ws.recv()
        before = await settle(pid)
        for r in range(count):
            await request(ws, "join_room", {"room": f"room-{r}"}, f"j{r}")
        after = await settle(pid)
    return (after - before) / count


async def messages(url: str, pid: int, count: int) -> float:
    async with connect(f"{url}?token={token('poster')}", max_size=None) as ws:
        await ws.recv()
        room = "history-room"
        await request(ws, "join_room", {"room": room}, "j")
        before = await settle(pid)
        for batch in range(0, count, 100):  # read the echoes as we go: no slow consumer
            await post(ws, room, min(100, count - batch), f"m{batch}")
        after = await settle(pid)
    return (after - before) / count


async def churn(url: str, pid: int, clients: int, total_rooms: int) -> tuple[int, int, int]:
    """RSS before, after, and the megabytes of text posted."""
    before = await settle(pid)
    next_room = iter(range(total_rooms))

    async def one(c: int) -> int:
        sent = 0
        async with connect(f"{url}?token={token(f'churn{c}')}", max_size=None) as ws:
            await ws.recv()
            for r in next_room:
                room = f"churn-{r}"
                await request(ws, "join_room", {"room": room}, f"j{r}")
                await post(ws, room, 100, f"{r}")
                sent += 100 * len(TEXT)
                await request(ws, "leave_room", {"room": room}, f"l{r}")
        return sent

    sent = sum(await asyncio.gather(*(one(c) for c in range(clients))))
    after = await settle(pid)
    return before, after, sent // 1_000_000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="connections,rooms,messages,churn")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rooms", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--churn-clients", type=int, default=8)
    parser.add_argument("--churn-rooms", type=int, default=2000)
    parser.add_argument("--server-arg", action="append", default=[])
    args = parser.parse_args()
    steps = args.steps.split(",")
    for step in steps:
        proc, port = start_server(args.server_arg)  # a fresh process per step
        url = f"ws://127.0.0.1:{port}/ws"
        try:
            if step == "connections":
                kib = await idle_connections(url, proc.pid, args.connections)
                print(f"idle connection: {kib:.2f} KiB each ({args.connections} connections)")
            elif step == "rooms":
                kib = await rooms(url, proc.pid, args.rooms)
                print(f"room with one member: {kib * 1024:.0f} bytes each ({args.rooms} rooms)")
            elif step == "messages":
                kib = await messages(url, proc.pid, args.messages)
                print(
                    f"retained message of 1,000 characters: {kib * 1024:.0f} bytes each "
                    f"({args.messages} in one room's history: --history-size permitting)"
                )
            elif step == "churn":
                before, after, mb = await churn(url, proc.pid, args.churn_clients, args.churn_rooms)
                print(
                    f"churn: {mb} MB of text through {args.churn_rooms} rooms by "
                    f"{args.churn_clients} clients: RSS {before / 1024:.1f} -> "
                    f"{after / 1024:.1f} MiB (+{(after - before) / 1024:.1f} MiB)"
                )
        finally:
            proc.terminate()
            proc.wait(10)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
