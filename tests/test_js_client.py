"""The JavaScript client's own suite (clients/js, `node --test`), run from pytest.

Its tests start real `fastws serve` processes with this interpreter and drive them with the
client over the `ws` package. node and npm are required: a missing tool fails, never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent.parent / "clients" / "js"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required for the JavaScript client tests (install nodejs and npm)"
    return path


@pytest.mark.timeout(240)
def test_js_client_suite_passes() -> None:
    """`node --test` in clients/js passes (npm ci first when node_modules is missing)."""
    node, npm = _tool("node"), _tool("npm")
    if not (JS / "node_modules" / "ws").is_dir():
        ci = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True,
                            text=True, timeout=180)
        assert ci.returncode == 0, f"npm ci failed:\n{ci.stdout}\n{ci.stderr}"
    env = {**os.environ, "FASTWS_PYTHON": sys.executable}
    run = subprocess.run([node, "--test"], cwd=JS, capture_output=True, text=True, timeout=200,
                         env=env)
    summary = "\n".join(line for line in run.stdout.splitlines() if line.startswith("# "))
    assert run.returncode == 0, f"node --test failed:\n{run.stdout}\n{run.stderr}"
    assert "# fail 0" in summary and "# pass 0" not in summary, summary
