"""A closed connection leaves no reference cycle behind: with the cyclic GC off, its Session
and everything it held are freed as soon as it is gone (a full GC pass over many live
connections is a loop pause; garbage that waits for one makes it come sooner)."""

from __future__ import annotations

import asyncio
import gc

from fastws.session import Session

from .utils import client, join, running_node


def live_sessions() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is Session)


async def test_closed_connections_are_freed_without_the_cyclic_gc() -> None:
    async with running_node() as node:
        async with client(node, "warm") as ws:  # imports and caches made once
            await join(ws, "r")
        gc.collect()
        gc.disable()
        try:
            for i in range(20):
                async with client(node, f"u{i}") as ws:
                    await join(ws, "r")
                    await ws.send('{"type":"chat_message","payload":{"room":"r","message":"hi"}}')
            async with asyncio.timeout(5):
                while node.sessions:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the cleanup of the last one
            assert live_sessions() == 0
        finally:
            gc.enable()
