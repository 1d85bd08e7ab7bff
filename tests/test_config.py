"""Configuration: the TOML file, its errors, precedence file < FASTWS_* < flags, and
`fastws config --print` (loadable, sources shown, secrets masked), end to end with a server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from fastws.cli import main
from fastws.config import FIELDS, Settings, env_name, load_settings, resolve, section_of
from fastws.errors import ConfigError

from .utils import TIMEOUT, client, recv_json, send_json, server_process, ws_url

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastws.toml"


def write(tmp_path: Path, text: str, name: str = "fastws.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def toml_literal(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def cli_flag(field: str) -> str:
    return "--" + field.replace("_", "-")


# One field of each type: (field, file value, env value, flag value).
TYPED = [
    ("jwt_issuer", "from-file", "from-env", "from-flag"),
    ("max_message_chars", 11, 22, 33),
    ("ping_interval", 41.5, 42.5, 43.5),
    ("json_ping", True, False, True),
]


@pytest.mark.parametrize(("field", "in_file", "in_env", "in_flag"), TYPED)
def test_file_then_environment_then_flag(
    tmp_path: Path, field: str, in_file: Any, in_env: Any, in_flag: Any
) -> None:
    """For str, int, float and bool settings: the file beats the default, a FASTWS_* variable
    beats the file, a flag beats both; each time the source is reported."""
    path = write(tmp_path, f"[{section_of(field)}]\n{field} = {toml_literal(in_file)}\n")
    env = {env_name(field): str(in_env).lower() if isinstance(in_env, bool) else str(in_env)}
    default = getattr(Settings(), field)

    plain = resolve(environ={})
    assert (getattr(plain.settings, field), plain.sources[field]) == (default, "default")
    got = resolve(environ={}, config_file=path)
    assert (getattr(got.settings, field), got.sources[field]) == (in_file, "file")
    got = resolve(environ=env, config_file=path)
    assert (getattr(got.settings, field), got.sources[field]) == (in_env, "env")
    got = resolve({field: in_flag}, environ=env, config_file=path)
    assert (getattr(got.settings, field), got.sources[field]) == (in_flag, "flag")


def test_cli_applies_the_same_precedence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through `fastws config --print --format json`: --config file, env and flags combine."""
    path = write(
        tmp_path,
        "[limits]\nmax_message_chars = 7\nrate_burst = 9\n[heartbeat]\nping_interval = 20\n",
    )
    monkeypatch.setenv("FASTWS_RATE_BURST", "10")
    monkeypatch.setenv("FASTWS_PING_INTERVAL", "25")
    assert (
        main(["config", "--print", "--format", "json", "--config", path, "--ping-interval", "26"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    got = {
        k: (out["settings"][k], out["sources"][k])
        for k in ("max_message_chars", "rate_burst", "ping_interval", "host")
    }
    assert got == {
        "max_message_chars": (7, "file"),
        "rate_burst": (10, "env"),
        "ping_interval": (26.0, "flag"),
        "host": ("127.0.0.1", "default"),
    }


def test_fastws_config_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FASTWS_CONFIG is read when --config is absent; --config wins over it."""
    env_file = write(tmp_path, "[server]\nport = 9101\n", "env.toml")
    flag_file = write(tmp_path, "[server]\nport = 9102\n", "flag.toml")
    assert load_settings(environ={"FASTWS_CONFIG": env_file}).port == 9101
    assert load_settings(environ={"FASTWS_CONFIG": env_file}, config_file=flag_file).port == 9102


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 8080\n", r"fastws\.toml: unknown key server\.prot"),
        (
            '[limits]\nmax_message_chars = "many"\n',
            r"fastws\.toml: limits\.max_message_chars: expected `int`, got `str`",
        ),
        ("[limits]\nmax_message_chars = 1.5\n", r"limits\.max_message_chars: expected `int`"),
        ('[heartbeat]\njson_ping = "yes"\n', r"heartbeat\.json_ping: expected `bool`"),
        (
            "[server]\nmax_message_chars = 5\n",
            r"unknown key server\.max_message_chars: max_message_chars belongs in \[limits\]",
        ),
        ("port = 8080\n", r"'port' must be inside a section: put it under \[server\]"),
        ("[srv]\nport = 8080\n", r"unknown section \[srv\] \(sections: server, auth"),
        ("[server\nport = 8080\n", r"fastws\.toml: not valid TOML"),
        ("[server]\nport = 99999\n", r"port: 99999 is not a TCP port \(port from .*fastws\.toml\)"),
    ],
)
def test_bad_files_are_errors_naming_the_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    """Unknown keys and sections, wrong types, misplaced keys, broken TOML and out-of-range
    values raise ConfigError naming the file and the key."""
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={}, config_file=write(tmp_path, text))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    """A config file that does not exist is an error naming it, not a silent default."""
    missing = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read config file: No such file"):
        load_settings(environ={}, config_file=missing)
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        load_settings(environ={"FASTWS_CONFIG": missing})


def test_serve_with_a_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    """`fastws serve --config bad.toml` exits 2 with a one-line message and no traceback."""
    path = write(tmp_path, "[server]\nprot = 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fastws", "serve", "--config", path],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr == f"fastws: error: {path}: unknown key server.prot "
        "(a typo? `fastws serve --help` lists every setting)\n"
    )
    assert proc.stdout == ""


def test_every_setting_has_a_section_and_is_accepted_by_the_file(tmp_path: Path) -> None:
    """The file layout is generic: each Settings field, with its default, loads from its
    section (so a field added to Settings is configurable from the file without more code)."""
    sections: dict[str, list[str]] = {}
    for name in FIELDS:
        value = getattr(Settings(), name)
        sections.setdefault(section_of(name), []).append(f"{name} = {toml_literal(value)}")
    text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())
    got = resolve(environ={}, config_file=write(tmp_path, text))
    assert got.settings == Settings()
    assert set(got.sources.values()) == {"file"}


def printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["config", "--print", *argv]) == 0
    return capsys.readouterr().out


def test_print_output_loads_back_to_the_same_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fastws config --print` writes TOML that --config reads back to the same settings,
    with each value's source as a comment."""
    path = write(
        tmp_path,
        '[server]\nhost = "0.0.0.0"\n[history]\nhistory_off = "tmp-*"\n'
        "[limits]\nrate_limit = 12.5\n",
    )
    monkeypatch.setenv("FASTWS_JSON_PING", "on")
    out = printed(
        [
            "--config",
            path,
            "--max-message-chars",
            "77",
            "--allowed-origins",
            'https://a.example, "quoted" \\ odd',
        ],
        capsys,
    )
    assert 'host = "0.0.0.0"  # file' in out
    assert "json_ping = true  # env" in out
    assert "max_message_chars = 77  # flag" in out
    assert "port = 8080  # default" in out
    expected = load_settings(
        {"max_message_chars": 77, "allowed_origins": 'https://a.example, "quoted" \\ odd'},
        environ={"FASTWS_JSON_PING": "on"},
        config_file=path,
    )
    again = resolve(environ={}, config_file=write(tmp_path, out, "printed.toml"))
    assert again.settings == expected
    assert set(again.sources.values()) == {"file"}


def test_print_masks_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """jwt_secret, api_key and a password inside redis_url never appear in the output; their
    lines are commented out so that loading the output cannot install '***' as a secret."""
    secret, key, password = "jwt-s3cret-value", "api-k3y-value", "redis-pa55word"
    path = write(tmp_path, f'[auth]\njwt_secret = "{secret}"\n')
    monkeypatch.setenv("FASTWS_API_KEY", key)
    url = f"redis://:{password}@redis.internal:6379/0"
    toml_out = printed(["--config", path, "--redis-url", url], capsys)
    json_out = printed(["--config", path, "--redis-url", url, "--format", "json"], capsys)
    for out in (toml_out, json_out):
        assert secret not in out and key not in out and password not in out
    assert '# jwt_secret = "***"  # file, masked' in toml_out
    assert '# api_key = "***"  # env, masked' in toml_out
    assert '# redis_url = "redis://:***@redis.internal:6379/0"  # flag, masked' in toml_out
    settings = json.loads(json_out)["settings"]
    assert (settings["jwt_secret"], settings["api_key"]) == ("***", "***")
    assert settings["redis_url"] == "redis://:***@redis.internal:6379/0"
    loaded = load_settings(environ={}, config_file=write(tmp_path, toml_out, "printed.toml"))
    assert (loaded.jwt_secret, loaded.api_key, loaded.redis_url) == ("", "", "")


def test_config_without_print_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """`fastws config` alone says what to pass and exits 2."""
    assert main(["config"]) == 2
    assert "--print" in capsys.readouterr().err


def test_example_file_loads() -> None:
    """examples/fastws.toml (the one docs/deploy.md shows) is valid, and sets what it says."""
    got = resolve(environ={}, config_file=str(EXAMPLE))
    assert got.settings.host == "0.0.0.0" and got.settings.workers == 0
    assert got.settings.log_format == "json" and got.settings.trusted_proxies == "127.0.0.1"
    assert got.sources["redis_url"] == "file" and got.settings.jwt_secret == ""


def test_deploy_doc_shows_the_example_file_verbatim() -> None:
    """docs/deploy.md's TOML example is examples/fastws.toml, so the tested file is the
    documented one."""
    doc = (EXAMPLE.parent.parent / "docs" / "deploy.md").read_text()
    assert f"```toml\n{EXAMPLE.read_text()}```" in doc


async def _check_limits(ws: ClientConnection) -> None:
    """max_rooms_per_connection is 1 and max_message_chars is 5 on the node behind ``ws``."""
    await send_json(ws, "join_room", {"room": "a"})
    assert (await recv_json(ws))["type"] == "room_joined"
    await send_json(ws, "join_room", {"room": "b"})
    assert (await recv_json(ws))["code"] == "too_many_rooms"
    await send_json(ws, "chat_message", {"room": "a", "message": "123456"})
    assert (await recv_json(ws))["code"] == "message_too_long"
    await send_json(ws, "chat_message", {"room": "a", "message": "12345"})
    echo = await recv_json(ws)
    assert echo["type"] == "chat_message" and echo["message"] == "12345"


async def test_serve_uses_the_file(tmp_path: Path) -> None:
    """A real `fastws serve` with FASTWS_CONFIG=f.toml enforces the file's max_message_chars,
    and a FASTWS_* variable beats the file's max_rooms_per_connection."""
    path = write(tmp_path, "[limits]\nmax_message_chars = 5\nmax_rooms_per_connection = 3\n")
    env = {"FASTWS_CONFIG": path, "FASTWS_MAX_ROOMS_PER_CONNECTION": "1"}
    with server_process(env=env) as (_proc, port):
        async with client(port) as ws:
            await _check_limits(ws)


async def test_workers_get_the_file_and_the_flags(tmp_path: Path) -> None:
    """With --workers 2, both workers enforce the file's and the flags' settings (workers are
    started with only --host/--port/--workers, so they must inherit the rest)."""
    path = write(tmp_path, "[limits]\nmax_message_chars = 5\n")
    checked: set[str] = set()
    with server_process("--workers", "2", "--config", path, "--max-rooms-per-connection", "1") as (
        _proc,
        port,
    ):
        for i in range(64):  # SO_REUSEPORT spreads connections: both workers show up soon
            async with connect(ws_url(port, f"u{i}"), open_timeout=TIMEOUT, close_timeout=1) as ws:
                node = (await recv_json(ws))["node"]
                if node not in checked:
                    await _check_limits(ws)
                    checked.add(node)
            if len(checked) == 2:
                break
    assert len(checked) == 2, checked
