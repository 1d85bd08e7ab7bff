"""fastws.client against real servers: requests, events, and recovery across reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import picows
import pytest

from fastws import client as client_module
from fastws.auth import mint
from fastws.client import Client, ClientError, Disconnected, EventStream
from fastws.server import Node

from .utils import TIMEOUT, running_node, server_process, token

pytestmark = pytest.mark.both_loops  # applications run the client on either loop

FAST = {"backoff_initial": 0.05, "backoff_max": 0.2, "request_timeout": TIMEOUT}


def url_of(node_or_port: Node | int) -> str:
    port = node_or_port if isinstance(node_or_port, int) else node_or_port.port
    return f"ws://127.0.0.1:{port}/ws"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def next_event(stream: EventStream, timeout: float = TIMEOUT) -> dict[str, Any]:
    return await asyncio.wait_for(stream.__anext__(), timeout)


async def until(stream: EventStream, type_: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next event of ``type_``; fails if a chat_message is skipped on the way."""
    while True:
        event = await next_event(stream, timeout)
        if event["type"] == type_:
            return event
        assert event["type"] != "chat_message", f"chat before {type_}: {event}"


async def chats(stream: EventStream, n: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """The next ``n`` chat_message events (other events are skipped)."""
    got: list[dict[str, Any]] = []
    while len(got) < n:
        event = await next_event(stream, timeout)
        if event["type"] == "chat_message":
            got.append(event)
    return got


async def no_more_chats(stream: EventStream, seconds: float = 0.2) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        while True:
            event = await next_event(stream, seconds)
            assert event["type"] != "chat_message", f"unexpected: {event}"


def drop(node: Node, c: Client) -> None:
    """Abort ``c``'s connection from the server side: no close frame (the client sees 1006)."""
    assert c.client_id is not None
    node.sessions[c.client_id].transport.disconnect(False)


def fixed_backoff(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Make the jitter deterministic (always its upper bound); return the bounds asked for."""
    calls: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        calls.append((a, b))
        return b

    monkeypatch.setattr(client_module.random, "uniform", uniform)
    return calls


# ---- requests and events ------------------------------------------------------------------


async def test_round_trip_between_two_clients() -> None:
    """join, send (ack seq), events, typing, presence, history, ping and leave all work."""
    async with (
        running_node() as node,
        Client(url_of(node), token("alice"), **FAST) as a,
        Client(url_of(node), token("bob"), **FAST) as b,
    ):
        assert a.connected and a.user_id == "alice" and a.client_id in node.sessions
        ea, eb = a.events(), b.events()
        joined = await a.join("r")
        assert joined["type"] == "room_joined" and joined["members"] == 1 and joined["seq"] == 0
        assert (await b.join("r"))["members"] == 2
        seen = await until(ea, "user_joined")
        assert seen["userId"] == "bob" and seen["members"] == 2

        assert await b.send("r", "hello") == 1
        assert await a.send("r", "hi bob") == 2
        for stream in (ea, eb):
            got = await chats(stream, 2)
            assert [(m["seq"], m["message"]) for m in got] == [(1, "hello"), (2, "hi bob")]

        await a.typing("r")
        typing = await until(eb, "typing")
        assert typing["userId"] == "alice" and typing["isTyping"] is True
        await a.typing("r", is_typing=False)
        assert (await until(eb, "typing"))["isTyping"] is False

        members = await b.presence("r")
        assert sorted(m["userId"] for m in members) == ["alice", "bob"]
        history = await b.history("r", limit=1)
        assert [(m["seq"], m["message"]) for m in history] == [(2, "hi bob")]
        assert len(await b.history("r")) == 2
        assert 0 < await a.ping() < TIMEOUT

        await b.leave("r")
        left = await until(ea, "user_left")
        assert left["userId"] == "bob" and left["members"] == 1
        with pytest.raises(ClientError) as info:
            await b.presence("r")
        assert info.value.code == "not_in_room"


async def test_error_reply_raises_client_error() -> None:
    """An error reply raises ClientError with the server's code; the connection stays usable."""
    async with running_node() as node, Client(url_of(node), token(), **FAST) as a:
        events = a.events()
        with pytest.raises(ClientError) as info:
            await a.send("nowhere", "hello")
        assert info.value.code == "not_in_room"
        assert "nowhere" in info.value.text
        with pytest.raises(ClientError) as info:
            await a.join("bad\nroom")
        assert info.value.code == "invalid_room"
        await a.join("r")
        with pytest.raises(ClientError) as info:
            await a.send("r", "   ")
        assert info.value.code == "empty_message"
        with pytest.raises(ClientError) as info:
            await a.history("r", limit=0)
        assert info.value.code == "invalid_payload"
        assert await a.send("r", "fine") == 1
        # The refused requests' errors were replies, not events.
        assert (await next_event(events))["type"] == "connected"
        assert (await next_event(events))["type"] == "chat_message"


async def test_callbacks_get_events_by_type() -> None:
    """on(type, cb) calls plain and coroutine callbacks; the returned function unregisters."""
    async with running_node() as node, Client(url_of(node), token(), **FAST) as a:
        plain: list[int] = []
        done = asyncio.Event()
        every: list[str] = []

        async def coro(event: dict[str, Any]) -> None:
            if event["seq"] == 2:
                done.set()

        remove = a.on("chat_message", lambda e: plain.append(e["seq"]))
        a.on("chat_message", coro)
        a.on("*", lambda e: every.append(e["type"]))
        await a.join("r")
        await a.send("r", "one")
        remove()
        await a.send("r", "two")
        await asyncio.wait_for(done.wait(), TIMEOUT)
        assert plain == [1]
        assert every == ["chat_message", "chat_message"]


async def test_auth_failure_at_connect_raises() -> None:
    """A refused token at connect() raises AuthFailed (HTTP 401); nothing is left running."""
    async with running_node() as node:
        bad = mint("another-secret-that-is-long-enough-for-hs256", "alice")
        c = Client(url_of(node), bad, **FAST)
        with pytest.raises(client_module.AuthFailed):
            await c.connect()
        assert not c.connected
        assert node.counters["auth_failures"] == 1


# ---- recovery -------------------------------------------------------------------------------


async def test_recovery_after_drop_yields_missed_messages_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After an abort, the client reconnects, recovers the 50 it missed in order, then live."""
    fixed_backoff(monkeypatch)  # the reconnect waits exactly backoff_initial: B posts meanwhile
    async with (
        running_node() as node,
        Client(url_of(node), token("alice"), backoff_initial=0.5) as a,
        Client(url_of(node), token("bob"), reconnect=False) as b,
    ):
        events = a.events()
        first = await a.join("r")
        await b.join("r")
        assert await b.send("r", "before") == 1
        assert [m["seq"] for m in await chats(events, 1)] == [1]

        old_id = a.client_id
        drop(node, a)
        gone = await until(events, "disconnected")
        assert gone["code"] is None and not a.connected
        sent = [await b.send("r", f"m{i}") for i in range(50)]
        assert sent == list(range(2, 52))
        assert not a.connected  # still away: the replay has to bring all 50

        await until(events, "reconnected")
        assert a.connected and a.client_id != old_id
        rejoined = await until(events, "room_joined")
        assert rejoined["recovered"] is True and rejoined["epoch"] == first["epoch"]
        got = await chats(events, 50)
        assert [m["seq"] for m in got] == sent
        assert [m["message"] for m in got] == [f"m{i}" for i in range(50)]

        live = [await b.send("r", f"live{i}") for i in range(3)]
        assert [m["seq"] for m in await chats(events, 3)] == live == [52, 53, 54]
        await no_more_chats(events)
        assert await a.send("r", "back") == 55  # the re-joined room is usable at once


async def test_incomplete_recovery_reports_recovered_false_without_duplicates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """History shorter than the gap: room_joined says recovered False; no seq is seen twice."""
    fixed_backoff(monkeypatch)
    async with (
        running_node(history_size=10) as node,
        Client(url_of(node), token("alice"), backoff_initial=0.5) as a,
        Client(url_of(node), token("bob"), reconnect=False) as b,
    ):
        events = a.events()
        await a.join("r")
        await b.join("r")
        for i in range(2):
            await b.send("r", f"early{i}")
        assert [m["seq"] for m in await chats(events, 2)] == [1, 2]

        drop(node, a)
        await until(events, "disconnected")
        for i in range(30):
            await b.send("r", f"m{i}")  # seqs 3..32; the server keeps 23..32
        assert not a.connected
        rejoined = await until(events, "room_joined")
        assert rejoined["recovered"] is False and rejoined["seq"] == 32

        assert await b.send("r", "live") == 33
        seqs: list[int] = []
        while not seqs or seqs[-1] != 33:
            seqs += [m["seq"] for m in await chats(events, 1)]
        assert seqs == sorted(set(seqs)), seqs  # in order, no duplicate
        assert all(23 <= s <= 33 for s in seqs), seqs  # only what the server still had
        await no_more_chats(events)


async def test_repeated_drops_under_traffic_deliver_every_message_once() -> None:
    """Ten drops while another client posts nonstop: every seq arrives exactly once, in order."""
    async with (
        running_node(rate_limit=0, history_size=100_000) as node,
        Client(url_of(node), token("alice"), backoff_initial=0.01, backoff_max=0.02) as a,
        Client(url_of(node), token("bob"), reconnect=False) as b,
    ):
        seqs: list[int] = []
        recovered: list[bool] = []
        dropped = asyncio.Event()
        a.on("chat_message", lambda e: seqs.append(e["seq"]))
        a.on("room_joined", lambda e: recovered.append(e["recovered"]))
        a.on("disconnected", lambda e: dropped.set())
        await a.join("r")
        await b.join("r")
        posting = True

        async def post() -> int:
            n = 0
            while posting:
                await b.send("r", f"m{n}")
                n += 1
            return n

        async def reconnected() -> None:
            while not a.connected:
                await asyncio.sleep(0.005)

        poster = asyncio.create_task(post())
        for _ in range(10):
            await asyncio.sleep(0.03)
            await asyncio.wait_for(reconnected(), TIMEOUT)
            dropped.clear()
            drop(node, a)
            await asyncio.wait_for(dropped.wait(), TIMEOUT)
        await asyncio.wait_for(reconnected(), TIMEOUT)
        posting = False
        total = await asyncio.wait_for(poster, TIMEOUT)
        await asyncio.wait_for(a.ping(), TIMEOUT)  # B's last message reached A before this
        assert recovered == [True] * 10
        assert seqs == list(range(1, total + 1))


async def test_server_close_1001_triggers_reconnect() -> None:
    """A server close frame (1001, as on shutdown) reconnects, with a fresh token, and recovers."""
    minted: list[str] = []

    def fresh_token() -> str:
        minted.append(token("alice"))
        return minted[-1]

    async with (
        running_node() as node,
        Client(url_of(node), fresh_token, **FAST) as a,
        Client(url_of(node), token("bob"), reconnect=False) as b,
    ):
        events = a.events()
        await a.join("r")
        await b.join("r")
        assert a.client_id is not None
        node.sessions[a.client_id].outlet.close(1001, "server shutting down")
        gone = await until(events, "disconnected")
        assert gone["code"] == 1001
        await b.send("r", "while away, maybe")
        rejoined = await until(events, "room_joined")
        assert rejoined["recovered"] is True and len(minted) == 2
        assert [m["seq"] for m in await chats(events, 1)] == [1]
        await no_more_chats(events)


async def test_server_restart_reconnects_with_recovered_false() -> None:
    """A restarted server (new epoch, history lost): the client re-joins, recovered False."""
    port = free_port()
    url = url_of(port)
    with server_process("--port", str(port)) as (proc, _):
        async with (
            Client(url, token("alice"), **FAST) as a,
            Client(url, token("bob"), reconnect=False) as b,
        ):
            events = a.events()
            first = await a.join("r")
            await b.join("r")
            for i in range(3):
                await b.send("r", f"m{i}")
            assert [m["seq"] for m in await chats(events, 3)] == [1, 2, 3]

            proc.kill()
            await asyncio.to_thread(proc.wait, TIMEOUT)
            assert (await until(events, "disconnected"))["code"] is None
            with server_process("--port", str(port)):
                await until(events, "reconnected", TIMEOUT * 2)
                rejoined = await until(events, "room_joined")
                assert rejoined["recovered"] is False
                assert rejoined["epoch"] != first["epoch"] and rejoined["seq"] == 0
                # The new epoch's messages are not mistaken for ones already delivered.
                assert await a.send("r", "after restart") == 1
                got = await chats(events, 1)
                assert got[0]["message"] == "after restart" and got[0]["seq"] == 1


async def test_401_on_reconnect_emits_auth_failed_and_stops() -> None:
    """Restarted with another secret, the server answers 401: auth_failed, no more retries."""
    port = free_port()
    url = url_of(port)
    with server_process("--port", str(port)) as (proc, _):
        async with Client(url, token("alice"), **FAST) as a:
            events = a.events()
            await a.join("r")
            proc.kill()
            await asyncio.to_thread(proc.wait, TIMEOUT)
            await until(events, "disconnected")
            other = "a-different-secret-that-is-long-enough-too"
            with server_process("--port", str(port), "--jwt-secret", other) as (proc2, _):
                await until(events, "auth_failed", TIMEOUT * 2)
                with pytest.raises(StopAsyncIteration):
                    await next_event(events)  # the client stopped: the stream ends
                await asyncio.sleep(0.5)  # at 0.05-0.2 s per retry, several would show
                assert not a.connected
                proc2.kill()
                await asyncio.to_thread(proc2.wait, TIMEOUT)
                assert proc2.stderr is not None
                log = proc2.stderr.read()
                assert log.count("auth failed") == 1, log
            with pytest.raises(Disconnected):
                await a.send("r", "nobody hears this")


async def test_close_during_backoff_stops_reconnecting(monkeypatch: pytest.MonkeyPatch) -> None:
    """close() while the client waits to reconnect returns at once; it never connects again."""
    calls = fixed_backoff(monkeypatch)
    async with running_node() as node:
        a = Client(url_of(node), token(), backoff_initial=30.0, backoff_max=30.0)
        await a.connect()
        events = a.events()
        await a.join("r")
        drop(node, a)
        await until(events, "disconnected")
        await asyncio.sleep(0.05)  # let the client enter its backoff sleep
        assert calls == [(0, 30.0)]
        connections = node.counters["connections_total"]
        started = time.monotonic()
        await asyncio.wait_for(a.close(), TIMEOUT)
        assert time.monotonic() - started < 1.0
        with pytest.raises(StopAsyncIteration):
            await next_event(events)
        await asyncio.sleep(0.2)
        assert node.counters["connections_total"] == connections and not node.sessions
        mine = [t for t in asyncio.all_tasks() if "Client." in t.get_coro().__qualname__]
        assert mine == []


async def test_backoff_is_exponential_with_full_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry n sleeps uniform(0, min(backoff_max, backoff_initial * 2**n))."""
    calls: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        calls.append((a, b))
        return 0.0

    monkeypatch.setattr(client_module.random, "uniform", uniform)
    async with running_node() as node:
        a = Client(url_of(node), token(), backoff_initial=0.1, backoff_max=1.0)
        await a.connect()
        events = a.events()
    try:
        # The node drained (close 1001) and its port is closed: every retry is refused.
        assert (await until(events, "disconnected"))["code"] == 1001
        for _ in range(100):
            if len(calls) >= 7:
                break
            await asyncio.sleep(0.01)
        assert calls[:7] == [(0, 0.1), (0, 0.2), (0, 0.4), (0, 0.8), (0, 1.0), (0, 1.0), (0, 1.0)]
        assert not a.connected
    finally:
        await asyncio.wait_for(a.close(), TIMEOUT)


# ---- against a scripted server --------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_server(
    handle: Callable[[int, picows.WSTransport, dict[str, Any]], None],
) -> AsyncIterator[int]:
    """A scripted picows server: ``handle(n, transport, message)`` for connection n's messages."""
    numbers = itertools.count()

    class Listener(picows.WSListener):  # type: ignore[misc]
        def on_ws_connected(self, transport: picows.WSTransport) -> None:
            self.n = next(numbers)
            hello = dict(clientId=f"c{self.n}", timestamp=0, userId="u", username="u")
            send(transport, {"type": "connected", **hello})

        def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
            if frame.msg_type == picows.WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            elif frame.msg_type == picows.WSMsgType.TEXT:
                handle(self.n, transport, json.loads(frame.get_payload_as_bytes()))

    server = await picows.ws_create_server(lambda _request: Listener(), "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


def send(transport: picows.WSTransport, message: dict[str, Any]) -> None:
    transport.send(picows.WSMsgType.TEXT, json.dumps(message).encode())


def chat(seq: int) -> dict[str, Any]:
    body = dict(room="r", username="u", message=f"m{seq}", timestamp=0, userId="u", seq=seq)
    return {"type": "chat_message", **body, "epoch": "e1"}


def room_joined(msg_id: int, seq: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "room_joined",
        "room": "r",
        "members": 1,
        "seq": seq,
        "epoch": "e1",
        "id": msg_id,
        **extra,
    }


async def test_overlapping_replay_is_deduplicated() -> None:
    """A replay that repeats delivered seqs: the client yields each seq exactly once."""
    sinces: list[Any] = []

    def handle(n: int, t: picows.WSTransport, msg: dict[str, Any]) -> None:
        if msg["type"] != "join_room":
            return
        if n == 0:
            send(t, room_joined(msg["id"], 0))
            for seq in (1, 2, 3):
                send(t, chat(seq))
            t.disconnect()  # no close frame
        else:
            sinces.append(msg["payload"].get("since"))
            send(t, room_joined(msg["id"], 5, recovered=True))
            for seq in (2, 3, 4, 5, 6):  # 2 and 3 were delivered before the drop
                send(t, chat(seq))

    async with fake_server(handle) as port, Client(url_of(port), "tok", **FAST) as c:
        events = c.events()
        await c.join("r")
        assert [m["seq"] for m in await chats(events, 3)] == [1, 2, 3]
        assert (await until(events, "disconnected"))["code"] is None
        rejoined = await until(events, "room_joined")
        assert rejoined["recovered"] is True and "id" not in rejoined
        assert sinces == [{"seq": 3, "epoch": "e1"}]
        assert [m["seq"] for m in await chats(events, 3)] == [4, 5, 6]
        await no_more_chats(events)


async def test_unanswered_request_times_out_and_drop_fails_pending() -> None:
    """No reply within request_timeout raises TimeoutError; a drop fails a pending request."""

    def handle(n: int, t: picows.WSTransport, msg: dict[str, Any]) -> None:
        if msg["type"] == "presence":
            t.disconnect()  # never answers ping; drops on presence

    async with fake_server(handle) as port:
        c = Client(url_of(port), "tok", request_timeout=0.2, backoff_initial=0.05)
        async with c:
            with pytest.raises(asyncio.TimeoutError):
                await c.ping()
            with pytest.raises(Disconnected):
                await c.presence("r")
            await until(c.events(), "reconnected")
            assert c.connected
