"""redis-server CPU per PUBLISH as the number of subscribed connections (nodes) grows.

Starts its own redis-server on a free loopback port (pinned to CPU 0 when taskset exists),
subscribes N plain connections to one channel, pipelines 200,000 PUBLISHes, and divides the
server's CPU time (/proc/<pid>/stat) by them. The figures in docs/deploy.md §9 come from it:

    python benchmarks/redis_publish_cost.py
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess

COUNT = 200_000
BATCH = 1_000
PAYLOAD = b"x" * 200  # about a chat_message


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 20):
        pass


async def cost(pid: int, port: int, subscribers: int) -> float:
    """Microseconds of redis-server CPU per PUBLISH with ``subscribers`` listening."""
    listeners = []
    for _ in range(subscribers):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nroom\r\n")
        await r.readuntil(b":1\r\n")
        listeners.append((asyncio.create_task(drain(r)), w))
    r, w = await asyncio.open_connection("127.0.0.1", port)
    command = b"*3\r\n$7\r\nPUBLISH\r\n$4\r\nroom\r\n$%d\r\n%b\r\n" % (len(PAYLOAD), PAYLOAD)
    reply = b":%d\r\n" % subscribers
    start = cpu_seconds(pid)
    for _ in range(COUNT // BATCH):
        w.write(command * BATCH)
        await r.readexactly(len(reply) * BATCH)
    used = cpu_seconds(pid) - start
    w.close()
    for task, writer in listeners:
        task.cancel()
        writer.close()
    return used / COUNT * 1e6


async def main() -> None:
    port = free_port()
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    proc = subprocess.Popen(
        [
            *pin,
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        for subscribers in (1, 4, 16, 64):
            print(
                f"{subscribers:3d} subscribed: {await cost(proc.pid, port, subscribers):.2f} us "
                "of redis-server CPU per PUBLISH"
            )
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
