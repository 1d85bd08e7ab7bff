"""/metrics: a scrape's counters match exactly what real clients sent, on one node and summed
over ``--workers 2``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from fastws.auth import mint
from fastws.server import Node

from .redisutil import free_port, redis_node
from .utils import (
    SECRET,
    TIMEOUT,
    client,
    close_picows,
    join,
    picows_client,
    recv_json,
    running_node,
    send_json,
    server_process,
    ws_url,
)

KEY = "metrics-test-key-0123456789"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

EVERY_METRIC = [
    "fastws_connections",
    "fastws_rooms",
    "fastws_messages_in",
    "fastws_messages_out",
    "fastws_fanout_deliveries",
    "fastws_slow_consumers",
    "fastws_rate_limited_messages",
    "fastws_auth_failures",
    "fastws_broker_up",
    "fastws_broker_publish_seconds",
    "fastws_event_loop_lag_seconds",
    "fastws_event_loop_lag_last_seconds",
    "fastws_connections_opened",
    "fastws_api_requests",
    "fastws_broker_pauses",
]


async def scrape_text(port: int) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as h,
        h.get(f"http://127.0.0.1:{port}/metrics") as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return (await r.read()).decode()


async def scrape(port: int) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(await scrape_text(port)):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def admin_port(node: Node) -> int:
    assert node.admin is not None
    return int(node.admin.port)


async def test_scrape_under_load_matches_what_was_sent() -> None:
    """Six clients post 600 messages and a backend 5 more: messages in/out, fan-out deliveries,
    connections and rooms in the scrape are exactly what the clients saw."""
    async with running_node(admin_port=0, api_key=KEY) as node:
        clients = [await picows_client(node, f"u{i}") for i in range(6)]
        try:
            for i, c in enumerate(clients):
                c.send_json({"type": "join_room", "payload": {"room": "load"}})
                while (await c.next())["type"] != "room_joined":
                    pass
                for earlier in clients[:i]:  # each earlier member gets this one's user_joined
                    assert (await earlier.next())["type"] == "user_joined"
            for n in range(100):
                for c in clients:
                    c.send_json(
                        {"type": "chat_message", "payload": {"room": "load", "message": f"m{n}"}}
                    )
            for c in clients:
                got = [await c.next() for _ in range(600)]
                assert all(m["type"] == "chat_message" for m in got)
            async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as h:
                for n in range(5):
                    async with h.post(
                        f"http://127.0.0.1:{admin_port(node)}/api/publish",
                        json={"room": "load", "text": f"api{n}"},
                    ) as r:
                        assert r.status == 200
            for c in clients:
                assert [(await c.next())["message"] for _ in range(5)] == [
                    f"api{n}" for n in range(5)
                ]
            s = await scrape(admin_port(node))
            assert value(s, "fastws_messages_in_total", source="websocket") == 600
            assert value(s, "fastws_messages_in_total", source="api") == 5
            joins = 0 + 1 + 2 + 3 + 4 + 5  # user_joined copies
            assert value(s, "fastws_fanout_deliveries_total") == 605 * 6 + joins
            assert value(s, "fastws_messages_out_total") == 605 + 6  # + six user_joined
            assert value(s, "fastws_connections") == 6
            assert value(s, "fastws_connections_opened_total") == 6
            assert value(s, "fastws_rooms") == 1
            assert value(s, "fastws_api_requests_total", route="/api/publish", status="200") == 5
            assert value(s, "fastws_broker_up", broker="memory") == 1
        finally:
            await close_picows(*clients)
        for _ in range(100):  # the gauges follow the disconnects
            s = await scrape(admin_port(node))
            if value(s, "fastws_connections") == 0:
                break
            await asyncio.sleep(0.02)
        assert value(s, "fastws_connections") == 0 and value(s, "fastws_rooms") == 0
        assert value(s, "fastws_connections_opened_total") == 6


async def test_every_metric_has_help_and_type() -> None:
    """Each documented metric is in the scrape with HELP and TYPE lines; the event-loop lag
    probe has run."""
    async with running_node(admin_port=0) as node:
        await asyncio.sleep(0.6)  # let the 0.25 s lag probe fire (what is measured is time)
        text = await scrape_text(admin_port(node))
        for name in EVERY_METRIC:
            kind = "counter" if f"# TYPE {name}_total counter" in text else None
            shown = f"{name}_total" if kind else name  # counters are shown with _total
            assert f"# HELP {shown} " in text, name
            assert f"# TYPE {shown} " in text, name
        s = await scrape(admin_port(node))
        assert value(s, "fastws_event_loop_lag_seconds_count") >= 1


async def test_rate_limited_messages_are_counted() -> None:
    """Every message refused by the rate limit is counted: as many as rate_limited errors."""
    async with running_node(admin_port=0, rate_limit=1, rate_burst=4) as node, client(node) as ws:
        await join(ws, "r")  # one token
        for n in range(6):
            await send_json(ws, "chat_message", {"room": "r", "message": f"m{n}"})
        kinds = Counter()
        for _ in range(6):
            msg = await recv_json(ws)
            kinds[msg.get("code") or msg["type"]] += 1
        assert kinds["rate_limited"] >= 2 and kinds["chat_message"] >= 3, kinds
        s = await scrape(admin_port(node))
        assert value(s, "fastws_rate_limited_messages_total") == kinds["rate_limited"]
        assert value(s, "fastws_messages_in_total", source="websocket") == kinds["chat_message"]


async def test_auth_failures_are_counted_by_reason() -> None:
    """Refused upgrades show up under their reason: no token, bad signature, expired."""
    async with running_node(admin_port=0) as node:
        bad = [
            ws_url(node, None),
            ws_url(node, None) + "?token=" + mint("another-secret-also-long-enough-32b", "x"),
            ws_url(node, None) + "?token=" + mint("another-secret-also-long-enough-32b", "y"),
            ws_url(node, None) + "?token=" + mint(SECRET, "z", ttl=-60),
        ]
        for url in bad:
            try:
                async with connect(url, open_timeout=TIMEOUT):
                    raise AssertionError("the upgrade should have been refused")
            except InvalidStatus as exc:
                assert exc.response.status_code == 401
        s = await scrape(admin_port(node))
        assert value(s, "fastws_auth_failures_total", reason="no token") == 1
        assert value(s, "fastws_auth_failures_total", reason="bad signature") == 2
        assert value(s, "fastws_auth_failures_total", reason="token expired") == 1
        assert sum(v for (name, _), v in s.items() if name == "fastws_auth_failures_total") == 4


async def test_redis_broker_state_and_latency(redis_server: Any) -> None:
    """With Redis: one publish round trip observed per chat message; broker_up goes to 0
    when Redis stops."""
    async with redis_node(redis_server.url, "m1", admin_port=0) as node, client(node) as ws:
        await join(ws, "r")
        for n in range(7):
            await send_json(ws, "chat_message", {"room": "r", "message": f"m{n}"})
        for _ in range(7):
            assert (await recv_json(ws))["type"] == "chat_message"
        s = await scrape(admin_port(node))
        assert value(s, "fastws_broker_publish_seconds_count", broker="redis") == 7
        assert value(s, "fastws_broker_publish_seconds_sum", broker="redis") > 0
        assert value(s, "fastws_broker_up", broker="redis") == 1
        redis_server.stop()
        for _ in range(200):
            s = await scrape(admin_port(node))
            if value(s, "fastws_broker_up", broker="redis") == 0:
                break
            await asyncio.sleep(0.02)
        assert value(s, "fastws_broker_up", broker="redis") == 0


async def _join_counting(ws: ClientConnection, room: str) -> int:
    """join_room; returns how many user_joined arrived before room_joined (another worker's
    notice may overtake our reply)."""
    await send_json(ws, "join_room", {"room": room})
    early = 0
    while (msg := await recv_json(ws))["type"] != "room_joined":
        assert msg["type"] == "user_joined", msg
        early += 1
    return early


async def test_scrape_sums_both_workers(tmp_path: Path) -> None:
    """Under --workers 2, whichever worker answers, the scrape is the sum over both: 16
    connections split between them, every message counted once in, delivered by each worker
    (messages_out twice), one fan-out copy per member. The metrics directory is removed on
    exit."""
    admin = free_port()
    with server_process(
        "--workers", "2", "--admin-port", str(admin), env={"TMPDIR": str(tmp_path)}
    ) as (proc, port):
        [metrics_dir] = tmp_path.glob("fastws-metrics-*")
        clients: list[ClientConnection] = []
        nodes: list[str] = []
        try:
            for i in range(16):
                ws = await connect(ws_url(port, f"u{i}"), open_timeout=TIMEOUT, close_timeout=1)
                nodes.append((await recv_json(ws))["node"])
                clients.append(ws)
            per_worker = Counter(nodes)
            assert len(per_worker) == 2 and max(per_worker.values()) < 16, per_worker
            joined = [await _join_counting(ws, "all") for ws in clients]
            for n in range(20):
                await send_json(
                    clients[n % 16], "chat_message", {"room": "all", "message": f"m{n}"}
                )
            for i, ws in enumerate(clients):
                chats = 0
                while chats < 20:
                    kind = (await recv_json(ws))["type"]
                    chats += kind == "chat_message"
                    joined[i] += kind == "user_joined"
            # Every user_joined was published before the first chat (each one left its worker
            # before that joiner saw room_joined), so all of them have arrived by now.
            expected = {
                ("fastws_messages_in_total", "source=websocket"): 20,
                # one local-bus round trip timed per chat, by the worker that took it
                ("fastws_broker_publish_seconds_count", "broker=localbus"): 20,
                ("fastws_fanout_deliveries_total", ""): 20 * 16 + sum(joined),
                ("fastws_connections", ""): 16,
                ("fastws_connections_opened_total", ""): 16,
                ("fastws_rooms", ""): 2,  # the room has members on both workers
            }
            pids: set[int] = set()
            got: dict[tuple[str, str], float] = {}
            labels = {k: dict([k[1].split("=")]) if k[1] else {} for k in expected}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + TIMEOUT * 2
            # Other workers' values are at most SYNC_INTERVAL old; fresh connections let both
            # workers answer, and each must give the whole sum.
            # Each worker fans out each chat; a user_joined reaches the workers that had
            # members by then (joins are one after another), and possibly one more: the
            # second worker's first joiner subscribes while the previous user_joined may still
            # be on the bus (its joiner already had room_joined), so that worker gets it too.
            out_min = 2 * 20 + sum(len(set(nodes[: i + 1])) for i in range(16))
            out = -1.0
            while (
                got != expected or not out_min <= out <= out_min + 1 or len(pids) < 2
            ) and loop.time() < deadline:
                s = await scrape(admin)
                got = {key: value(s, key[0], **labels[key]) for key in expected}
                out = value(s, "fastws_messages_out_total")
                async with (
                    aiohttp.ClientSession() as h,
                    h.get(f"http://127.0.0.1:{admin}/healthz") as r,
                ):
                    pids.add(json.loads(await r.read())["pid"])
                await asyncio.sleep(0.05)
            assert got == expected and len(pids) == 2, (got, pids)
            assert out_min <= out <= out_min + 1, (out, out_min)
            for _ in range(6):  # and it stays so, whoever answers
                s = await scrape(admin)
                assert value(s, "fastws_messages_in_total", source="websocket") == 20
            assert len(list(metrics_dir.glob("*.db"))) >= 2  # values of both workers
        finally:
            await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, TIMEOUT * 2) == 0
        assert not metrics_dir.exists()


async def _node_pids(admin: int) -> dict[str, int]:
    """node id -> pid of each worker, asked of /healthz on the admin port until both answered."""
    found: dict[str, int] = {}
    for _ in range(200):
        async with aiohttp.ClientSession() as h, h.get(f"http://127.0.0.1:{admin}/healthz") as r:
            health = json.loads(await r.read())
        found[health["node"]] = health["pid"]
        if len(found) == 2:
            break
    return found


async def test_dead_worker_keeps_its_counts_and_drops_its_gauges() -> None:
    """A worker killed with SIGKILL: its counters stay in the totals (they never go back), its
    connections leave the gauge; its replacement starts from zero beside them."""
    admin = free_port()
    with server_process("--workers", "2", "--admin-port", str(admin)) as (_proc, port):
        clients: list[ClientConnection] = []
        nodes: list[str] = []
        try:
            for i in range(10):
                ws = await connect(ws_url(port, f"u{i}"), open_timeout=TIMEOUT, close_timeout=1)
                nodes.append((await recv_json(ws))["node"])
                clients.append(ws)
            pids = await _node_pids(admin)
            assert set(pids) == set(nodes), (pids, nodes)
            victim = nodes[0]
            survivors = sum(n != victim for n in nodes)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + TIMEOUT
            while loop.time() < deadline:
                s = await scrape(admin)
                if value(s, "fastws_connections_opened_total") == 10:
                    break
                await asyncio.sleep(0.05)
            assert value(s, "fastws_connections") == 10
            os.kill(pids[victim], signal.SIGKILL)
            deadline = loop.time() + TIMEOUT * 2
            while loop.time() < deadline:
                try:
                    s = await scrape(admin)
                except (aiohttp.ClientError, AssertionError):
                    continue  # the dead worker's queued admin connections are reset
                if value(s, "fastws_connections") == survivors:
                    break
                await asyncio.sleep(0.05)
            assert value(s, "fastws_connections") == survivors
            assert value(s, "fastws_connections_opened_total") == 10
        finally:
            await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)


async def test_slow_consumer_is_counted() -> None:
    """A member that stops reading is closed as a slow consumer, and the scrape says so once."""
    from .test_slow_consumer import raw_client

    async with running_node(
        admin_port=0, max_send_buffer_bytes=65536, close_timeout=0.5, rate_limit=0
    ) as node:
        sender = await picows_client(node, "sender")
        try:
            sender.send_json({"type": "join_room", "payload": {"room": "busy"}})
            assert (await sender.next())["type"] == "room_joined"
            async with raw_client(node, "slow") as slow:
                hello = await slow.recv_json()
                await slow.send_json({"type": "join_room", "payload": {"room": "busy"}})
                while (await slow.recv_json())["type"] != "room_joined":
                    pass
                assert (await sender.next())["type"] == "user_joined"
                session = node.sessions[hello["clientId"]]
                # A small kernel buffer, so the 64 KiB limit is what the test runs into.
                sock = session.transport.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                for _ in range(40):  # at most 2000 messages of 900 characters
                    for _ in range(50):
                        sender.send_json(
                            {
                                "type": "chat_message",
                                "payload": {"room": "busy", "message": "x" * 900},
                            }
                        )
                    for _ in range(50):
                        while (await sender.next())["type"] != "chat_message":
                            pass
                    if node.counters["slow_consumers"]:
                        break
                s = await scrape(admin_port(node))
                assert value(s, "fastws_slow_consumers_total") == 1
        finally:
            await close_picows(sender)
