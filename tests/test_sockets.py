"""The Wire's own socket handling: accepting past the descriptor limit, IPv6, the output that
waits for a slow reader, and a peer that resets."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from websockets.asyncio.client import connect

from .test_slow_consumer import raw_client
from .utils import SECRET, TIMEOUT, client, join, recv_json, running_node, send_json, token

ROOM = "sockets"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _low_descriptor_limit() -> None:  # runs in the server process before exec
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))


async def test_out_of_descriptors_pauses_accepting_and_resumes_when_some_are_freed() -> None:
    """Past RLIMIT_NOFILE the listening socket stays readable while its backlog waits: the
    server pauses accepting instead of spinning on it, keeps serving the connections it has,
    and accepts the waiting ones once descriptors are freed."""
    cmd = [sys.executable, "-m", "fastws", "serve", "--port", "0", "--jwt-secret", SECRET]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_low_descriptor_limit,
    )
    held: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), TIMEOUT * 2)
        port = int(re.search(r"listening on http://[\d.]+:(\d+)", line).group(1))  # type: ignore[union-attr]
        async with client(port, "early") as early:
            for _ in range(60):  # more than the server has descriptors for
                sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                held.append(sock)
            await asyncio.sleep(0.3)  # the server has met EMFILE by now
            cpu = _cpu_seconds(proc.pid)
            await asyncio.sleep(1.0)
            assert _cpu_seconds(proc.pid) - cpu < 0.5, "the server spins on its listener"
            await send_json(early, "ping", id="still-served")
            assert (await recv_json(early))["type"] == "pong"
            for sock in held[:40]:
                sock.close()
            # A connection made now waits behind the backlog's and is accepted in its turn.
            async with connect(
                f"ws://127.0.0.1:{port}/ws?token={token('late')}", open_timeout=TIMEOUT * 2
            ) as late:
                assert (await recv_json(late))["type"] == "connected"
    finally:
        for sock in held:
            sock.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
        assert proc.stderr is not None
        errors = proc.stderr.read()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    assert "accept failed" in errors, errors


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_an_ipv6_listener_sees_its_peers_address() -> None:
    async with running_node(host="::1") as node:
        assert node.server is not None
        assert node.server.sockets[0].family == socket.AF_INET6
        url = f"ws://[::1]:{node.port}/ws?token={token('six')}"
        async with connect(url, open_timeout=TIMEOUT) as ws:
            hello = await recv_json(ws)
            assert hello["type"] == "connected"
            session = node.sessions[hello["clientId"]]
            assert session.ip == "::1"
            peer = session.transport.get_extra_info("peername")
            assert peer[0] == "::1" and peer[1] == ws.local_address[1]


async def test_output_waits_in_the_wire_for_a_slow_reader_and_all_of_it_arrives() -> None:
    """A member that stops reading for a while: what its socket does not take waits in its
    Wire (under the slow-consumer limit), and once it reads again every chat arrives, in
    order; then the Wire holds no output buffer any more."""
    sent = 300
    text = "y" * 500
    async with (
        running_node(rate_limit=0) as node,
        client(node, "talker") as talker,
        raw_client(node, "reader") as reader,
    ):
        hello = await reader.recv_json()
        await reader.send_json({"type": "join_room", "payload": {"room": ROOM}})
        while (await reader.recv_json())["type"] != "room_joined":
            pass
        await join(talker, ROOM)
        wire = node.sessions[hello["clientId"]].transport
        wire.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        most = 0
        for i in range(sent):
            await send_json(talker, "chat_message", {"room": ROOM, "message": text})
            if i % 50 == 49:
                await send_json(talker, "ping", id=str(i))
                while (await recv_json(talker)).get("id") != str(i):
                    pass
                most = max(most, wire.out_size)
        assert most > 0, "the socket took everything: the test did not test the buffer"
        seqs = []
        while len(seqs) < sent:
            msg = await reader.recv_json()
            if msg["type"] == "chat_message":
                seqs.append(msg["seq"])
        assert seqs == list(range(1, sent + 1))
        deadline = time.monotonic() + TIMEOUT
        while wire.out_size and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert wire.out_size == 0
        assert not wire.is_closing()


async def test_a_peer_that_resets_mid_frame_is_dropped_and_the_room_carries_on() -> None:
    """Half a frame, then a TCP reset: that connection is gone (its members told), and the
    room's other members go on chatting."""
    async with running_node() as node, client(node, "stays") as stays:
        await join(stays, ROOM)
        async with raw_client(node, "resets") as resets:
            await resets.send_json({"type": "join_room", "payload": {"room": ROOM}})
            while (await resets.recv_json())["type"] != "room_joined":
                pass
            assert (await recv_json(stays))["type"] == "user_joined"
            resets.sock.setblocking(True)
            resets.sock.send(bytes([0x81, 0xFE, 0x10, 0x00]) + os.urandom(4) + b"partial")
            resets.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        left = await recv_json(stays)
        assert left["type"] == "user_left" and left["username"] == "resets", left
        await send_json(stays, "chat_message", {"room": ROOM, "message": "still here"})
        msg = await recv_json(stays)
        assert msg["type"] == "chat_message" and msg["message"] == "still here"
