"""``fastws bench``: a load generator and benchmark scenarios for fastws-protocol servers.

    fastws bench SCENARIO [options]        (or: python -m fastws.bench SCENARIO [options])

Layout (each module one job; loadgen.py, reconnect.py and soak.py run inside the generator
processes):

    options.py    the command line (argparse only: the fastws CLI imports it at start-up)
    runner.py     main(): targets -> scenario runs -> reports; --compare, --summarize
    targets.py    start/stop a server here (fastws or a baseline); /proc CPU and memory readings
    deployment.py the server side as one process, --workers 2, or nodes on a redis-server
    scenarios.py  plans per generator process, the coordinator and barrier, the figures
    loadgen.py    a generator process: picows clients, pacing, per-delivery accounting
    reconnect.py  the reconnect storm's users: re-joins with since, checked by seq
    soak.py       the soak's users: chat in many rooms while some reconnect, every seq checked
    report.py     JSON document, terminal tables, PNG plots, the README results table

Importing this package is cheap; the heavy modules load when a benchmark actually runs.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fastws bench`` with ``argv`` (default: sys.argv[1:]); return the exit status."""
    from .runner import main as _main

    return _main(argv)
