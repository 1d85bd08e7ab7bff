"""Smoke tests of the benchmark harness (``fastws bench``): every scenario at tiny sizes against
a real fastws, the JSON and PNG each run writes, ``--compare``, ``--summarize``, and one run
against the picows baseline. Each run is a subprocess, as a user would start it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastws.cli import main as fastws_main

from .utils import SECRET, server_process

BASELINE = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines" / "picows_server.py"
RUN_TIMEOUT = 40.0


@pytest.fixture(scope="module")
def fastws_target() -> Iterator[list[str]]:
    """One fastws server for the module; the harness is pointed at it with --url."""
    with server_process("--rate-limit", "0", "--ping-interval", "0", "--log-level", "warning") as (
        proc,
        port,
    ):
        yield ["--url", f"ws://127.0.0.1:{port}/ws", "--secret", SECRET,
               "--server-pid", str(proc.pid)]  # fmt: skip


def bench_runs(out: Path, *args: str, timeout: float = RUN_TIMEOUT) -> list[Path]:
    """Run ``python -m fastws.bench`` with tiny defaults (``args`` may override them: the
    last of a repeated flag wins); return the JSON files it wrote."""
    scenario, *rest = args
    cmd = [sys.executable, "-m", "fastws.bench", scenario, "--out", str(out), "--quiet",
           "--warmup", "0", "--duration", "1", "--drain", "3", "--timeout", "20",
           *rest]  # fmt: skip
    before = set(out.glob("*.json")) if out.exists() else set()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return sorted(p for p in out.glob("*.json") if p not in before)


def bench(out: Path, *args: str) -> tuple[dict[str, Any], Path]:
    """One run: its JSON and the file."""
    [path] = bench_runs(out, *args)
    return json.loads(path.read_text()), path


def assert_sane(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    head = doc["headline"]
    assert head["throughput"] > 0
    assert head["throughput_per_cpu_s"] is None or head["throughput_per_cpu_s"] > 0
    assert head.get("losses", 0) == 0
    assert head.get("duplicates", 0) == 0
    assert head.get("reorders", 0) == 0
    assert not head["closes"] and not head["errors"] and not head["unexpected_disconnects"]
    lat = head["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert {"python", "fastws", "picows", "uvloop", "platform"} <= set(doc["versions"])
    assert doc["parameters"]["duration"] == 1.0 and doc["date"] and doc["target"]["url"]
    assert path.with_suffix(".png").stat().st_size > 1000
    return head


def test_roundtrip(tmp_path: Path, fastws_target: list[str]) -> None:
    """roundtrip: each connection gets its own broadcasts back, none lost, reordered or doubled."""
    doc, path = bench(tmp_path, "roundtrip", "--connections", "4", *fastws_target)
    head = assert_sane(doc, path)
    assert doc["scenario"] == "roundtrip" and doc["server"] == "url"
    assert head["server_cpu_s"] is not None and head["server_cpu_s"] > 0
    assert head["messages_per_s"] > 0
    assert len(doc["timeseries"]["deliveries"]) == 10 and sum(doc["timeseries"]["deliveries"])


def test_fanout_window(tmp_path: Path, fastws_target: list[str]) -> None:
    """fanout flat out with a window: every subscriber receives every message once, in order."""
    doc, path = bench(tmp_path, "fanout", "--subscribers", "20", "--window", "8", *fastws_target)
    head = assert_sane(doc, path)
    assert doc["mode"] == "window" and doc["parameters"]["window"] == 8
    # 21 members (20 subscribers + the publisher) receive each message
    assert head["deliveries_per_s"] >= 20 * head["messages_per_s"] * 0.9


def test_fanout_rate(tmp_path: Path, fastws_target: list[str]) -> None:
    """fanout at a fixed offered rate sends about that rate and measures each delivery."""
    doc, path = bench(tmp_path, "fanout", "--subscribers", "20", "--rate", "200", *fastws_target)
    head = assert_sane(doc, path)
    assert doc["mode"] == "rate"
    assert 150 <= head["messages_per_s"] <= 250
    assert head["latency_us"]["count"] >= 21 * 150


def test_join_storm(tmp_path: Path, fastws_target: list[str]) -> None:
    """a 20-client join storm delivers exactly 20*19/2 user_joined messages."""
    doc, path = bench(tmp_path, "fanout", "--join-storm", "--subscribers", "20", *fastws_target)
    head = assert_sane(doc, path)
    assert doc["mode"] == "storm"
    assert head["deliveries"] == head["expected_deliveries"] == 190


def test_flooder_is_closed_while_the_measured_clients_lose_nothing(tmp_path: Path) -> None:
    """roundtrip at a fixed rate beside a flooder: the server (default rate limit) closes the
    flooder with 1008 and every measured round trip still comes back."""
    with server_process("--ping-interval", "0", "--log-level", "warning") as (proc, port):
        doc, path = bench(tmp_path, "roundtrip", "--connections", "8", "--rate", "400",
                          "--flooders", "1", "--url", f"ws://127.0.0.1:{port}/ws",
                          "--secret", SECRET, "--server-pid", str(proc.pid))  # fmt: skip
    head = assert_sane(doc, path)
    assert doc["parameters"]["flooders"] == 1
    flood = head["flood"]
    assert flood["clients"] == 1 and flood["closes"] == {"1008": 1}, flood
    assert flood["sent"] > 200 and flood["refused"] >= 1 and flood["open_at_end"] == 0
    assert head["latency_us"]["count"] >= 300  # 400/s for 1 s, all measured


def test_rooms(tmp_path: Path, fastws_target: list[str]) -> None:
    """rooms: 10 rooms of 3 members, everyone posting, no message lost across rooms."""
    doc, path = bench(tmp_path, "rooms", "--rooms", "10", "--members", "3", *fastws_target)
    head = assert_sane(doc, path)
    assert head["deliveries_per_s"] >= 2.5 * head["messages_per_s"]


def test_soak(tmp_path: Path, fastws_target: list[str]) -> None:
    """soak, small: 2 rooms of 3 while half the users reconnect every second; every re-join
    with since is recovered, no seq is lost or doubled, and the server's memory is sampled
    all along (the JSON's series, the PNG)."""
    doc, path = bench(tmp_path, "soak", "--rooms", "2", "--members", "3", "--rate", "40",
                      "--reconnect-rate", "0.5", "--duration", "2", *fastws_target)  # fmt: skip
    head = doc["headline"]
    assert doc["mode"] == "soak" and doc["parameters"]["connections"] == 6
    assert head["reconnects"] >= 3 and head["recovered"] == head["reconnects"], head
    assert head["losses"] == head["duplicates"] == head["reorders"] == 0, head
    assert head["not_recovered"] == head["error_count"] == 0, head
    assert head["final_seq_total"] >= 60 and not head["closes"], head  # 40 msg/s for 2 s
    series = doc["timeseries"]
    assert len(series["rss_bytes"]) == len(series["rss_t_s"]) >= 10
    assert all(b > 0 for b in series["rss_bytes"]) and series["rss_t_s"][-1] >= 2.0
    assert head["rss_warm_bytes"] > 0 and head["rss_growth_pct"] is not None
    assert sum(series["reconnects"]) >= 3 and sum(series["deliveries"]) > 0
    assert path.with_suffix(".png").stat().st_size > 1000


def test_connections_on_a_started_server(tmp_path: Path) -> None:
    """connections with --server fastws: opens all 50, reports connect rate and memory each."""
    doc, path = bench(tmp_path, "connections", "--connections", "50", "--server", "fastws")
    head = assert_sane(doc, path)
    assert doc["server"] == "fastws" and doc["target"]["started_here"]
    assert head["connections"] == 50 and head["failed"] == 0
    assert head["memory_per_connection_bytes"] > 0
    assert head["server_cpu_s"] is not None


def test_connections_idle_over_two_sources(tmp_path: Path) -> None:
    """connections with --sources 2 --idle 1: every connection opens, half from 127.0.0.2 and
    half from 127.0.0.3, answers the heartbeat while idle, and the JSON has the idle CPU and
    the memory per connection."""
    doc, _ = bench(tmp_path, "connections", "--connections", "50", "--sources", "2",
                   "--idle", "1", "--server", "fastws", "--no-plot",
                   # a heartbeat fast enough to ping every connection inside the second
                   "--server-arg=--ping-interval=0.5",
                   "--server-arg=--ping-timeout=0.5")  # fmt: skip
    head = doc["headline"]
    assert doc["parameters"]["sources"] == 2 and doc["parameters"]["idle"] == 1.0
    assert head["connections"] == 50 and head["failed"] == 0 and head["open_after_idle"] == 50
    assert head["source_addresses"] == {"127.0.0.2": 25, "127.0.0.3": 25}
    assert 1.0 <= head["idle_s"] < 2.0 and head["idle_pings_per_connection"] >= 1, head
    for key in ("idle_cpu_us_per_s_per_connection", "idle_server_cpu_s",
                "memory_per_connection_bytes", "memory_per_connection_kib",
                "server_rss_idle_end_mb"):  # fmt: skip
        assert math.isfinite(head[key]) and head[key] > 0, (key, head[key])
    assert not head["closes"] and not head["errors"] and not head["unexpected_disconnects"]


def test_compare_and_summarize(tmp_path: Path, fastws_target: list[str],
                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """--compare prints A/B ratios of two runs; --summarize writes the README table."""
    a, path_a = bench(tmp_path, "roundtrip", "--connections", "2", "--no-plot", *fastws_target)
    b, path_b = bench(tmp_path, "roundtrip", "--connections", "4", "--no-plot", *fastws_target)
    assert fastws_main(["bench", "--compare", str(path_a), str(path_b)]) == 0
    text = capsys.readouterr().out
    ratio = a["headline"]["throughput"] / b["headline"]["throughput"]
    assert f"{ratio:.2f}x" in text and "latency p99 (us)" in text

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    argv = ["bench", "--summarize", str(path_a), str(path_b), "--readme", str(readme)]
    assert fastws_main(argv) == 0
    written = readme.read_text()
    assert "old" not in written and written.endswith("<!-- results:end -->\ntail\n")
    assert "| run | figure | url |" in written  # one column per server kind ("url": --url runs)
    assert "roundtrip, 4 connections" in written and "round trips/s" in written


@pytest.mark.skipif(not BASELINE.is_file(), reason=f"baseline server not written yet: {BASELINE}")
def test_picows_baseline(tmp_path: Path) -> None:
    """--server picows starts the picows baseline and measures it like fastws."""
    doc, path = bench(tmp_path, "roundtrip", "--connections", "4", "--server", "picows")
    assert_sane(doc, path)
    assert doc["server"] == "picows" and doc["headline"]["server_cpu_s"] is not None


needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@needs_redis
def test_two_nodes_over_redis(tmp_path: Path) -> None:
    """--deployment redis2: the users are spread over two nodes on a redis-server started
    here, whose pid is counted with the nodes' and which is stopped after the run."""
    doc, path = bench(tmp_path, "fanout", "--server", "fastws", "--deployment", "redis2",
                      "--subscribers", "10", "--window", "4", "--concurrency", "4")  # fmt: skip
    head = assert_sane(doc, path)
    target = doc["target"]
    assert doc["deployment"] == "redis2" and len(target["urls"]) == 2
    assert len(target["server_pids"]) == 3  # two fastws nodes and redis-server
    assert target["processes"]["redis-server"] in target["server_pids"]
    assert head["server_cpu_s"] > 0 and head["deliveries_per_s"] >= 10 * head["messages_per_s"]
    assert not any(_alive(pid) for pid in target["server_pids"])


@needs_redis
def test_reconnect_storm(tmp_path: Path) -> None:
    """--reconnect-storm on one process and on Redis: every client of the restarted node
    comes back with no gap, duplicate or error; Redis recovers every re-join, the in-process
    broker reports its documented new epoch (history lost) instead of a loss."""
    paths = bench_runs(tmp_path, "fanout", "--server", "fastws", "--reconnect-storm",
                       "--deployment", "one,redis", "--subscribers", "10", "--rate", "20",
                       # the publisher posts for 3 s from the restart: longer than a restart
                       # on a loaded machine, so chat goes on after it; no presence grace,
                       # which the drain waits out (3 s) when the closed connections' cleanup
                       # registers their grace before the drain looks (seen in 2 CI runs)
                       "--warmup", "0.5", "--duration", "3",
                       "--server-arg=--presence-grace=0",
                       timeout=2 * RUN_TIMEOUT)  # fmt: skip
    docs = {d["deployment"]: d for d in (json.loads(p.read_text()) for p in paths)}
    assert set(docs) == {"one", "redis"}
    for name, doc in docs.items():
        head = doc["headline"]
        assert doc["mode"] == "reconnect", name
        assert head["clients"] == 11 and head["clients_dropped"] == 11, head
        assert head["clients_caught_up"] == 11 and head["storm_s"] > 0, head
        assert head["losses"] == head["duplicates"] == head["error_count"] == 0, head
        assert head["restart_s"] > 0 and head["latency_us"]["count"] == 11
    assert docs["one"]["headline"]["history_lost"] == 11
    assert docs["redis"]["headline"]["recovered"] == 11
    assert docs["redis"]["headline"]["final_seq"] > 10  # chat went on around the restart
