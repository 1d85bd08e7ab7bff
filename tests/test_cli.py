"""The `fastws` command: help, token minting, settings precedence, first-run demo link."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import msgspec
import pytest

from fastws.auth import Verifier
from fastws.cli import main
from fastws.config import FIELD_HELP, Settings, env_name, load_settings
from fastws.errors import ConfigError

from .utils import SECRET, TIMEOUT, server_process


def test_serve_help_explains_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    """`fastws serve --help` lists a flag and its FASTWS_* variable for every setting."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for f in msgspec.structs.fields(Settings):
        assert "--" + f.name.replace("_", "-") in out
        assert env_name(f.name) in out
        assert f.name in FIELD_HELP


def test_token_command_mints_a_token_the_server_accepts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`fastws token --user alice` prints a token that verifies with the same secret."""
    assert (
        main(
            [
                "token",
                "--user",
                "alice",
                "--username",
                "Alice",
                "--roles",
                "admin,mod",
                "--jwt-secret",
                SECRET,
            ]
        )
        == 0
    )
    tok = capsys.readouterr().out.strip()
    who = Verifier(load_settings({"jwt_secret": SECRET}, environ={}), SECRET).verify(tok)
    assert (who.user_id, who.username, who.roles) == ("alice", "Alice", ("admin", "mod"))


def test_token_without_secret_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a secret, `fastws token` says what to set and exits 2."""
    monkeypatch.delenv("FASTWS_JWT_SECRET", raising=False)
    assert main(["token", "--user", "a"]) == 2
    assert "FASTWS_JWT_SECRET" in capsys.readouterr().err


def test_flags_beat_environment_beat_defaults() -> None:
    """Precedence: CLI flag, then FASTWS_* variable, then the default."""
    env = {"FASTWS_PORT": "9001", "FASTWS_HOST": "0.0.0.0", "FASTWS_JSON_PING": "yes"}
    s = load_settings({"port": 9002}, environ=env)
    assert (s.port, s.host, s.json_ping, s.max_message_chars) == (9002, "0.0.0.0", True, 1000)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FASTWS_PORT": "eighty"}, "port: expected int"),
        ({"FASTWS_PORT": "70000"}, "not a TCP port"),
        ({"FASTWS_JSON_PING": "maybe"}, "expected true or false"),
        ({"FASTWS_PING_TIMEOUT": "60"}, "ping_timeout must not exceed"),
        ({"FASTWS_LOG_FORMAT": "xml"}, "log_format"),
    ],
)
def test_bad_settings_are_clear_errors(env: dict[str, str], message: str) -> None:
    """A malformed setting raises ConfigError naming the setting."""
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env)


def test_bad_setting_exits_2_with_message() -> None:
    """`fastws serve` with a bad value exits 2 with a one-line error, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastws", "serve", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    assert proc.returncode == 2
    assert "fastws: error: port" in proc.stderr and "Traceback" not in proc.stderr


def test_first_run_prints_a_demo_link_and_serves_pages() -> None:
    """With no secret the server prints demo links with tokens; /, /healthz and 404 answer."""
    cmd = [sys.executable, "-m", "fastws", "serve", "--port", "0"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        assert "listening on http://127.0.0.1:" in lines[0]
        assert "/#token=" in lines[2]
        base = lines[2].split("alice: ")[1].split("/#token=")[0]
        with urllib.request.urlopen(base + "/", timeout=TIMEOUT) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        with urllib.request.urlopen(base + "/healthz", timeout=TIMEOUT) as r:
            health = msgspec.json.decode(r.read())
            assert health["status"] == "ok" and health["connections"] == 0
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/nope", timeout=TIMEOUT)
        assert err.value.code == 404
        err.value.close()
    finally:
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0
        if proc.stdout:
            proc.stdout.close()


def test_json_logs_never_contain_the_token() -> None:
    """--log-format json writes one JSON object per line, and no token appears in them."""
    from .utils import token

    with server_process("--log-format", "json", "--log-level", "debug") as (proc, port):
        tok = token("alice")
        import asyncio

        from websockets.asyncio.client import connect

        async def visit() -> None:
            async with connect(f"ws://127.0.0.1:{port}/ws?token={tok}") as ws:
                await ws.recv()

        asyncio.run(visit())
        proc.terminate()
        assert proc.stderr is not None
        _, err = proc.communicate(timeout=TIMEOUT)
    lines = [line for line in err.splitlines() if line.strip()]
    events = [
        msgspec.json.decode(line)["event"]
        for line in lines
        if line.startswith("{") and '"event"' in line
    ]
    assert "connected" in events and "disconnected" in events
    assert tok not in err and tok.split(".")[2] not in err


def test_healthz_says_which_fan_out_runs_and_a_fallback_is_logged_as_an_error() -> None:
    """The compiled fan-out: "compiled". Without it (the extension does not import) the
    server still serves, says "python", and logs an error with the reason at start."""
    with (
        server_process() as (_, port),
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT) as r,
    ):
        assert msgspec.json.decode(r.read())["fanout"] == "compiled"
    blocked = (
        "import sys; sys.modules['fastws._fanout'] = None; from fastws.cli import main; "
        f"sys.exit(main(['serve', '--port', '0', '--jwt-secret', {SECRET!r}]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", blocked], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split()[0].strip("/"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT) as r:
            assert msgspec.json.decode(r.read())["fanout"] == "python"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT * 2)
    assert "ERROR fastws.server: compiled fan-out not loaded" in err and "ModuleNotFound" in err


def test_the_python_fan_out_asked_for_is_a_warning_not_an_error() -> None:
    """FASTWS_FANOUT=python (to compare or debug) says so at start, as a warning."""
    with server_process(env={"FASTWS_FANOUT": "python"}) as (proc, port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT) as r:
            assert msgspec.json.decode(r.read())["fanout"] == "python"
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT * 2)
    assert "WARNING fastws.server: compiled fan-out not loaded" in err
    assert "chosen by FASTWS_FANOUT=python" in err and "ERROR" not in err
