"""What one idle connection is made of: the objects and allocations a fastws node holds per
authenticated connection that has joined nothing.

Runs a node in this process (uvloop, 127.0.0.1, port 0) with tracemalloc on, opens N picows
connections from a child process, and prints per connection: bytes traced by tracemalloc,
the allocation sites (grouped by traceback; allocations made from C with no Python frame in
between, such as uvloop's and picows' own, land under the event loop's frame), and the
gc-tracked objects by type with their ``sys.getsizeof``. tracemalloc's own bookkeeping makes
the RSS figure here larger than without it: for RSS alone use
``fastws bench connections --server fastws``.

    python benchmarks/connection_memory.py --connections 5000
    PYTHONPATH=/other/tree/src python benchmarks/connection_memory.py   # another build
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import subprocess
import sys
import time
import tracemalloc

import uvloop

from fastws.config import load_settings
from fastws.server import Node

SECRET = "memory-secret-" + "x" * 24

# The child: N picows clients, each until its `connected` message; then it waits.
_CLIENTS = r"""
import asyncio, sys, time, jwt, uvloop
from picows import WSListener, ws_connect
port, n, secret = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
class Hello(WSListener):
    def __init__(self):
        self.seen = asyncio.get_running_loop().create_future()
    def on_ws_frame(self, transport, frame):
        if not self.seen.done():
            self.seen.set_result(None)
async def one(i, gate):
    async with gate:
        token = jwt.encode({"sub": f"u{i}", "exp": int(time.time()) + 3600}, secret, "HS256")
        transport, hello = await ws_connect(Hello, f"ws://127.0.0.1:{port}/ws?token={token}")
        await hello.seen
        return transport
async def main():
    gate = asyncio.Semaphore(200)
    held = await asyncio.gather(*(one(i, gate) for i in range(n)))
    print("open", len(held), flush=True)
    await asyncio.sleep(3600)
uvloop.run(main())
"""


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def census() -> collections.Counter[str]:
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


async def measure(n: int, sites: int) -> None:
    settings = load_settings(
        {"host": "127.0.0.1", "port": 0, "jwt_secret": SECRET, "admin_port": -1}, environ={}
    )
    node = Node(settings, SECRET)
    await node.start()
    gc.collect()
    tracemalloc.start(25)
    before, objects_before, rss_before = tracemalloc.take_snapshot(), census(), rss_bytes()
    clients = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CLIENTS,
        str(node.port),
        str(n),
        SECRET,
        stdout=subprocess.PIPE,
    )
    try:
        assert clients.stdout is not None
        line = await asyncio.wait_for(clients.stdout.readline(), 600)
        if not line.startswith(b"open"):
            raise SystemExit(f"the clients did not connect: {line!r}")
        await asyncio.sleep(1.0)
        gc.collect()
        rss_after, after, objects_after = rss_bytes(), tracemalloc.take_snapshot(), census()
        report(n, before, after, objects_before, objects_after, rss_after - rss_before, sites)
    finally:
        clients.kill()
        await clients.wait()
        await node.drain()


def report(
    n: int,
    before: tracemalloc.Snapshot,
    after: tracemalloc.Snapshot,
    objects_before: collections.Counter[str],
    objects_after: collections.Counter[str],
    rss_delta: int,
    sites: int,
) -> None:
    stats = after.compare_to(before, "traceback")
    print(f"{n} idle connections, per connection:")
    traced = sum(s.size_diff for s in stats) / n
    print(f"  RSS {rss_delta / n:,.0f} B (tracemalloc on), traced {traced:,.0f} B")
    print("allocation sites (bytes and objects per connection, innermost frames last):")
    for stat in stats[:sites]:
        if stat.size_diff / n < 16:
            break
        print(f"  {stat.size_diff / n:7,.0f} B {stat.count_diff / n:5.1f} objects")
        for frame in stat.traceback.format()[-4:]:
            print(f"      {frame.strip()[:140]}")
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        sizes[type(obj).__name__] += sys.getsizeof(obj)
    print("gc-tracked objects per connection (type, count, getsizeof each):")
    for name, extra in (objects_after - objects_before).most_common(40):
        if extra / n >= 0.5 and name not in ("tuple", "list", "dict"):  # tracemalloc's own
            print(f"  {name:24s} {extra / n:5.2f} x {sizes[name] / objects_after[name]:5.0f} B")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--sites", type=int, default=20, help="allocation sites to print")
    args = ap.parse_args()
    started = time.monotonic()
    uvloop.run(measure(args.connections, args.sites))
    print(f"({time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
