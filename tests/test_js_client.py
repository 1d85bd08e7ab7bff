"""The JavaScript client's own suite (clients/js, `node --test`), run from pytest.

Its tests start real `fastws serve` processes with this interpreter and drive them with the
client over the `ws` package. node and npm are required: a missing tool fails, never skips.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .utils import TIMEOUT, running_node

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required for the JavaScript client tests (install nodejs and npm)"
    return path


@pytest.mark.timeout(240)
def test_js_client_suite_passes() -> None:
    """`node --test` in clients/js passes (npm ci first when node_modules is missing)."""
    node, npm = _tool("node"), _tool("npm")
    if not (JS / "node_modules" / "ws").is_dir():
        ci = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert ci.returncode == 0, f"npm ci failed:\n{ci.stdout}\n{ci.stderr}"
    env = {**os.environ, "FASTWS_PYTHON": sys.executable}
    run = subprocess.run(
        [node, "--test"], cwd=JS, capture_output=True, text=True, timeout=200, env=env
    )
    summary = "\n".join(line for line in run.stdout.splitlines() if line.startswith("# "))
    assert run.returncode == 0, f"node --test failed:\n{run.stdout}\n{run.stderr}"
    assert "# fail 0" in summary and "# pass 0" not in summary, summary


async def test_server_serves_the_client_module() -> None:
    """GET /fastws.js answers the canonical client file as text/javascript, not cached."""
    async with running_node() as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        try:
            writer.write(b"GET /fastws.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), TIMEOUT)  # the server closes after it
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert lines[0] == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["cache-control"] == "no-store"
    assert body == (ROOT / "src" / "fastws" / "static" / "fastws.js").read_bytes()
    assert b"export class FastWS" in body


def test_node_package_reexports_the_canonical_file() -> None:
    """clients/js holds no second copy of the client: index.js re-exports the served file."""
    index = (JS / "index.js").read_text()
    assert 'from "../../src/fastws/static/fastws.js"' in index
    assert "class " not in index
