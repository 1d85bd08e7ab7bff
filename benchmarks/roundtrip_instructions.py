"""The server's instructions per chat round trip, counted by callgrind (repeatable, where
timings on a shared 2-core VM are not).

Starts ``fastws serve`` (or the picows baseline) under ``valgrind --tool=callgrind`` twice,
drives it with ``fastws bench roundtrip --connections 8 --window 1`` for a short and a long
run, and prints the slope: (instructions of the long run - the short run) / (round trips of
the long run - the short run). Start-up, warm-up and shutdown cancel out.

    python benchmarks/roundtrip_instructions.py                   # this checkout's fastws
    python benchmarks/roundtrip_instructions.py --server picows   # the plain picows loop
    PYTHONPATH=/other/tree/src python benchmarks/roundtrip_instructions.py   # another build
    python benchmarks/roundtrip_instructions.py --keep /tmp/cg   # and keep the profiles

Needs valgrind (``apt-get install valgrind``); a run takes about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from fastws.bench.targets import server_command

SECRET = "callgrind-secret-" + "x" * 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Until the server answers on its port (valgrind makes start-up take seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("server did not start")


def instructions(out_file: str) -> int:
    """The total Ir of a callgrind output file (its ``summary:`` or ``totals:`` line)."""
    text = Path(out_file).read_text()
    found = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if found is None:
        raise SystemExit(f"no totals in {out_file}")
    return int(found.group(1))


def one_run(kind: str, duration: float, work: str, connections: int) -> tuple[int, int]:
    """(server instructions, round trips) for one run of ``duration`` seconds."""
    port = free_port()
    out = os.path.join(work, f"callgrind.{kind}.{duration:g}.%p")
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--quiet",
            *server_command(kind, SECRET, [], None, port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(port, proc)
        results = os.path.join(work, f"bench-{kind}-{duration:g}")
        subprocess.run(
            [
                "fastws",
                "bench",
                "roundtrip",
                "--url",
                f"ws://127.0.0.1:{port}/ws",
                "--secret",
                SECRET,
                "--connections",
                str(connections),
                "--window",
                "1",
                "--warmup",
                "1",
                "--duration",
                str(duration),
                "--timeout",
                "60",
                "--out",
                results,
                "--no-plot",
                "--quiet",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (report,) = glob.glob(os.path.join(results, "*.json"))
        # Every message sent, warm-up included (window 1: each is one round trip): the
        # server's instructions cover the warm-up too, whatever its rate was.
        trips = int(json.loads(Path(report).read_text())["details"]["sent_total"])
    finally:
        proc.send_signal(2)
        proc.wait(timeout=120)
    (counted,) = glob.glob(out.replace("%p", "*"))
    return instructions(counted), trips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", choices=["fastws", "picows"], default="fastws")
    ap.add_argument("--short", type=float, default=2.0, help="seconds of the short run")
    ap.add_argument("--long", type=float, default=8.0, help="seconds of the long run")
    ap.add_argument(
        "--connections",
        type=int,
        default=8,
        help="each with one message in flight; 1 makes every round trip a loop turn of its own",
    )
    ap.add_argument(
        "--keep",
        metavar="DIR",
        help="keep the callgrind files here (for callgrind_annotate --inclusive=yes)",
    )
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        work = args.keep or stack.enter_context(tempfile.TemporaryDirectory())
        os.makedirs(work, exist_ok=True)
        short_ir, short_trips = one_run(args.server, args.short, work, args.connections)
        long_ir, long_trips = one_run(args.server, args.long, work, args.connections)
    per_trip = (long_ir - short_ir) / max(1, long_trips - short_trips)
    print(
        json.dumps(
            {
                "server": args.server,
                "connections": args.connections,
                "runs": [
                    {"seconds": args.short, "instructions": short_ir, "round_trips": short_trips},
                    {"seconds": args.long, "instructions": long_ir, "round_trips": long_trips},
                ],
                "instructions_per_round_trip": round(per_trip),
            }
        )
    )


if __name__ == "__main__":
    main()
