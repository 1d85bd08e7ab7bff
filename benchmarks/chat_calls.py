"""The Python functions a chat message goes through on the server: ``sys.setprofile`` counts
every Python-level call in a node (in this process, uvloop) over N chat round trips of one
member, sent one at a time by a picows client in a child process; C functions (the Wire's
parsing, msgspec, the fan-out) are not counted.

    python benchmarks/chat_calls.py
    python benchmarks/chat_calls.py --rate-limit 100   # with the server's default rate limit
    PYTHONPATH=/other/tree/src python benchmarks/chat_calls.py   # another build
"""

import argparse
import asyncio
import collections
import subprocess
import sys

import uvloop

from fastws.config import load_settings
from fastws.server import Node

SECRET = "hops-secret-" + "x" * 24
CHILD = r"""
import asyncio, sys, time, json, jwt, uvloop
from picows import WSListener, ws_connect, WSMsgType
port, n, secret = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
class C(WSListener):
    def __init__(self): self.q = asyncio.Queue()
    def on_ws_frame(self, t, f): self.q.put_nowait(f.get_payload_as_bytes())
async def main():
    tok = jwt.encode({"sub": "u1", "exp": int(time.time()) + 3600}, secret, "HS256")
    t, c = await ws_connect(C, f"ws://127.0.0.1:{port}/ws?token={tok}")
    await c.q.get()
    t.send(WSMsgType.TEXT, b'{"type":"join_room","payload":{"room":"r"}}')
    await c.q.get()
    for mode in ("warm", "go"):
        for i in range(n):
            t.send(WSMsgType.TEXT, b'{"type":"chat_message","payload":{"room":"r","message":"hi"}}')
            await c.q.get()
        print(mode, flush=True); sys.stdin.readline()
uvloop.run(main())
"""
counts = collections.Counter()


def prof(frame, event, arg):
    if event == "call":
        counts[(frame.f_code.co_filename.split("/src/")[-1], frame.f_code.co_name)] += 1


async def main(rate_limit: float):
    n = 1000
    s = load_settings(
        {
            "host": "127.0.0.1",
            "port": 0,
            "jwt_secret": SECRET,
            "admin_port": -1,
            "rate_limit": rate_limit,
            "rate_burst": 2 * n + 10,  # one member sends them all at once: none refused
        },
        environ={},
    )
    node = Node(s, SECRET)
    await node.start()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(node.port),
        str(n),
        SECRET,
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    assert (await child.stdout.readline()).startswith(b"warm")
    sys.setprofile(prof)
    child.stdin.write(b"\n")
    await child.stdin.drain()
    assert (await child.stdout.readline()).startswith(b"go")
    sys.setprofile(None)
    total = sum(counts.values())
    print(f"Python calls per chat round trip: {total / n:.1f}")
    for (f, name), c in counts.most_common(30):
        if c >= n / 2:
            print(f"  {c / n:5.2f}  {f}:{name}")
    child.kill()
    await child.wait()
    await node.drain()


ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--rate-limit", type=float, default=0, help="the server's (0: none)")
uvloop.run(main(ap.parse_args().rate_limit))
