"""The benchmark baselines (plain picows, plain websockets, Bun) serve fastws' protocol subset."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fastws.auth import mint
from fastws.bench.targets import bun_binary

from .utils import SECRET, TIMEOUT, _readline, recv_json, send_json

BASELINES = Path(__file__).resolve().parent.parent / "benchmarks" / "baselines"
NAMES = ["picows_server", "websockets_server", "bun_server"]

assert len(SECRET.encode()) >= 32


@pytest.fixture(params=NAMES)
def baseline(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A baseline server subprocess on a free port; killed on teardown if still running."""
    name = request.param
    # Bun comes from npm (.ci/run installs it into benchmarks/baselines), not from PyPI.
    start = (
        [bun_binary(None), str(BASELINES / "bun_server.ts")]
        if name == "bun_server"
        else [sys.executable, str(BASELINES / f"{name}.py")]
    )
    cmd = [
        *start,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--jwt-secret",
        SECRET,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _readline(proc, TIMEOUT * 2)
        match = re.search(r"listening on http://[\d.]+:(\d+)", line)
        assert match, f"no listening line: {line!r}"
        assert line.startswith(f"{name} listening on http://127.0.0.1:"), line
        assert f"(pid {proc.pid})" in line, line
        yield proc, int(match.group(1))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def url(port: int, user: str | None) -> str:
    base = f"ws://127.0.0.1:{port}/ws"
    return f"{base}?token={mint(SECRET, user)}" if user else base


async def test_join_and_chat(baseline: tuple[subprocess.Popen[str], int]) -> None:
    """connected, room_joined/user_joined, and a chat_message with seq 1 reaching both."""
    _, port = baseline
    async with (
        connect(url(port, "alice"), open_timeout=TIMEOUT, close_timeout=1) as a,
        connect(url(port, "bob"), open_timeout=TIMEOUT, close_timeout=1) as b,
    ):
        for ws in (a, b):
            hello = await recv_json(ws)
            assert hello["type"] == "connected"
            assert len(hello["clientId"]) == 36 and isinstance(hello["timestamp"], int)

        await send_json(a, "join_room", {"room": "general"}, id="j1")
        assert await recv_json(a) == {
            "type": "room_joined",
            "room": "general",
            "members": 1,
            "seq": 0,
            "id": "j1",
        }
        await send_json(b, "join_room", {"room": "general"})
        assert await recv_json(b) == {
            "type": "room_joined",
            "room": "general",
            "members": 2,
            "seq": 0,
        }
        joined = await recv_json(a)
        assert list(joined) == ["type", "room", "username", "timestamp", "userId", "members"]
        assert joined["type"] == "user_joined" and joined["username"] == "bob"
        assert joined["userId"] == "bob" and joined["members"] == 2

        await send_json(a, "chat_message", {"room": "general", "message": "hello"})
        for ws in (a, b):
            msg = await recv_json(ws)
            assert list(msg) == [
                "type",
                "room",
                "username",
                "message",
                "timestamp",
                "userId",
                "seq",
            ]
            assert msg["type"] == "chat_message" and msg["message"] == "hello"
            assert msg["username"] == "alice" and msg["userId"] == "alice"
            assert msg["seq"] == 1

        await send_json(a, "ping")
        assert (await recv_json(a))["type"] == "pong"
        await asyncio.wait_for(a.send("{not json"), TIMEOUT)
        assert await recv_json(a) == {"type": "error", "error": "Invalid message format"}
        await send_json(a, "fly")
        assert await recv_json(a) == {"type": "error", "error": "Unknown message type: fly"}

        await asyncio.wait_for(b.close(), TIMEOUT)
        left = await recv_json(a)
        assert left["type"] == "user_left" and left["userId"] == "bob" and left["members"] == 1


@pytest.mark.parametrize("user", [None, "bad"])
async def test_bad_token_gets_401(
    baseline: tuple[subprocess.Popen[str], int], user: str | None
) -> None:
    """A missing or badly signed token is refused with HTTP 401 at the upgrade."""
    _, port = baseline
    target = url(port, None)
    if user:
        target += f"?token={mint('another-secret-that-is-also-32-bytes-long', user)}"
    with pytest.raises(InvalidStatus) as info:
        async with connect(target, open_timeout=TIMEOUT, close_timeout=1):
            pass
    assert info.value.response.status_code == 401


async def test_sigterm_closes_1001_and_exits_0(
    baseline: tuple[subprocess.Popen[str], int],
) -> None:
    """SIGTERM closes clients with 1001 and the process exits 0 within 5 s."""
    proc, port = baseline
    async with connect(url(port, "alice"), open_timeout=TIMEOUT, close_timeout=1) as a:
        assert (await recv_json(a))["type"] == "connected"
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            await recv_json(a)
        assert a.close_code == 1001
    assert await asyncio.to_thread(proc.wait, 5.0) == 0
