"""`fastws serve --workers 2`: one port, two processes, one local bus in the supervisor."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import urllib.request
from collections import Counter

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .utils import TIMEOUT, recv_json, send_json, server_process, ws_url
from .utils import join_across_nodes as join


def _health(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def _worker_pids(port: int, want: int = 2, tries: int = 200) -> set[int]:
    """Ask /healthz over fresh connections until ``want`` distinct worker pids answered."""
    pids: set[int] = set()
    for _ in range(tries):
        try:
            health = await asyncio.to_thread(_health, port)
        except (OSError, http.client.HTTPException):
            # A worker that was just killed may reset connections still in its accept queue.
            await asyncio.sleep(0.01)
            continue
        pids.add(int(health["pid"]))  # type: ignore[arg-type]
        if len(pids) >= want:
            break
    return pids


async def _connect_many(port: int, n: int) -> tuple[list, list[str]]:
    clients, nodes = [], []
    for i in range(n):
        ws = await connect(ws_url(port, f"u{i}"), open_timeout=TIMEOUT, close_timeout=1)
        hello = await recv_json(ws)
        clients.append(ws)
        nodes.append(hello["node"])
    return clients, nodes


async def _close_all(clients: list) -> None:
    await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)


async def test_clients_on_both_workers_receive_every_room_message() -> None:
    """Clients land on both workers; each gets every message once, in one seq order."""
    with server_process("--workers", "2") as (_proc, port):
        clients, nodes = await _connect_many(port, 16)
        try:
            assert len(set(nodes)) == 2, Counter(nodes)
            assert len(await _worker_pids(port)) == 2
            for i, ws in enumerate(clients):
                assert (await join(ws, "all"))["members"] == i + 1
            for i in range(10):
                await send_json(
                    clients[i % 16], "chat_message", {"room": "all", "message": f"m{i}"}
                )
            for ws in clients:
                seqs: list[int] = []
                while len(seqs) < 10:
                    msg = await recv_json(ws)
                    if msg["type"] == "chat_message":
                        seqs.append(msg["seq"])
                    else:
                        assert msg["type"] == "user_joined", msg
                assert seqs == list(range(1, 11))
        finally:
            await _close_all(clients)


async def test_a_killed_worker_is_replaced_and_its_clients_leave_the_room() -> None:
    """SIGKILL one worker: the supervisor starts another; the other worker's clients are told."""
    with server_process("--workers", "2") as (_proc, port):
        clients, _nodes = await _connect_many(port, 12)
        try:
            for ws in clients:
                await join(ws, "r")
            pids = await _worker_pids(port)
            assert len(pids) == 2
            victim = min(pids)
            os.kill(victim, signal.SIGKILL)
            survivors = [ws for ws in clients if ws.protocol.state.name == "OPEN"]
            # The survivor side learns that the victim's connections left.
            await asyncio.sleep(0)
            new_pids: set[int] = set()
            async with asyncio.timeout(TIMEOUT * 2):
                while len(new_pids - {victim}) < 2:
                    new_pids = await _worker_pids(port)
                    new_pids.discard(victim)
            assert victim not in new_pids
            lost = [ws for ws in clients if ws.close_code is not None or ws.state.name != "OPEN"]
            assert lost, "no client was on the killed worker"
            kept = [ws for ws in survivors if ws not in lost]
            if kept:
                seen_left = 0
                async with asyncio.timeout(TIMEOUT):
                    while seen_left < len(lost):
                        msg = await recv_json(kept[0])
                        if msg["type"] == "user_left":
                            seen_left += 1
                await send_json(kept[0], "presence", {"room": "r"})
                reply = await recv_json(kept[0])
                while reply["type"] != "presence":
                    reply = await recv_json(kept[0])
                assert len(reply["members"]) == len(kept)
        finally:
            await _close_all(clients)


async def test_sigterm_drains_both_workers_with_1001_and_exits_0() -> None:
    """SIGTERM to the supervisor closes every client on every worker with 1001, then exit 0."""
    with server_process("--workers", "2", "--drain-timeout", "3") as (proc, port):
        clients, nodes = await _connect_many(port, 10)
        assert len(set(nodes)) == 2
        proc.send_signal(signal.SIGTERM)
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                await recv_json(ws)
            assert ws.close_code == 1001
        assert await asyncio.to_thread(proc.wait, TIMEOUT * 2) == 0
        await _close_all(clients)


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as fh:
            kids.update(int(c) for c in fh.read().split())
    return kids


def _private_dirty_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    raise AssertionError("no Private_Dirty line")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _private_memory_of_workers(*flags: str) -> tuple[set[int], set[int], int]:
    """Start ``--workers 2`` with ``flags``: (worker pids, the supervisor's children, the
    workers' private dirty KiB in all)."""
    with server_process("--workers", "2", *flags) as (proc, port):
        workers = await _worker_pids(port)
        assert len(workers) == 2
        return workers, _children(proc.pid), sum(map(_private_dirty_kib, workers))


async def test_forked_workers_are_the_supervisors_children_and_share_its_pages() -> None:
    """Forked from the zygote, each worker is still the supervisor's own child (re-parented),
    and writes far fewer pages of its own than a worker that is a fresh interpreter."""
    forked, kids, forked_kib = await _private_memory_of_workers()
    assert forked <= kids and len(kids) == 3, (forked, kids)  # the workers and the zygote
    execd, kids, execd_kib = await _private_memory_of_workers("--no-fork-workers")
    assert kids == execd, kids  # no zygote
    assert forked_kib < 0.6 * execd_kib, (forked_kib, execd_kib)


async def test_a_killed_supervisor_takes_the_zygote_and_the_workers_with_it() -> None:
    """SIGKILL to the supervisor: the zygote gets SIGKILL and the workers SIGTERM from the
    kernel (parent-death signals), so nothing is left serving the port."""
    with server_process("--workers", "2") as (proc, port):
        await _worker_pids(port)
        descendants = _children(proc.pid)
        assert len(descendants) == 3
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, TIMEOUT)
        async with asyncio.timeout(TIMEOUT * 2):
            while any(map(_alive, descendants)):
                await asyncio.sleep(0.05)


@pytest.mark.parametrize("start", ["--fork-workers", "--no-fork-workers"])
async def test_a_worker_that_exits_is_restarted_the_same_way(start: str) -> None:
    """A worker that exits on its own (SIGTERM drains it, code 0) is started again, forked or
    as a fresh interpreter, and the port keeps answering from two workers."""
    with server_process("--workers", "2", start) as (proc, port):
        pids = await _worker_pids(port)
        victim = min(pids)
        os.kill(victim, signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT * 2):
            while True:
                now = await _worker_pids(port)
                if victim not in now and len(now) == 2:
                    break
                await asyncio.sleep(0.05)
        assert now <= _children(proc.pid)
