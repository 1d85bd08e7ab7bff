"""What the load is aimed at: a server started here (fastws or a baseline) or a given URL;
and what can be read about that server from /proc (CPU seconds, resident memory)."""

from __future__ import annotations

import collections
import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ..errors import FastWSError

_LISTENING = re.compile(r"listening on http://([\w.\-\[\]:]+?):(\d+)\b.*?pid (\d+)")
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 15.0


class BenchError(FastWSError):
    """The benchmark could not run (bad options, a server that would not start, a generator
    process that failed); the message says which."""


@dataclass
class Target:
    """Where the clients connect, and how they get tokens. ``pid`` is known when the server
    runs on this machine (started here, or given with ``--server-pid``)."""

    kind: str  # fastws | picows | websockets | url
    url: str  # ws://host:port/path, without a token
    secret: str | None = None
    token: str | None = None
    pid: int | None = None
    command: list[str] = field(default_factory=list)
    started: bool = False
    server_cpus: str = ""
    log: collections.deque[str] | None = None  # a started server's last output lines
    # A deployment of several processes (deployment.py): every node's URL (the generator
    # spreads its users over them) and every pid whose CPU and memory are the server's.
    urls: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    deployment: str | None = None
    processes: dict[str, object] = field(default_factory=dict)

    @property
    def node_urls(self) -> list[str]:
        return self.urls or [self.url]

    @property
    def server_pids(self) -> list[int]:
        """Every process counted as the server (with its live descendants)."""
        if self.pids:
            return self.pids
        return [self.pid] if self.pid is not None else []

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "kind": self.kind,
            "url": self.url,
            "server_pid": self.pid,
            "started_here": self.started,
            "server_cpus": self.server_cpus or None,
            "command": [_redact(a, self.secret) for a in self.command] or None,
            "auth": "secret" if self.secret else "token",
        }
        if self.deployment:
            out.update(deployment=self.deployment, urls=self.node_urls,
                       server_pids=self.server_pids, processes=self.processes)  # fmt: skip
        return out


def _redact(arg: str, secret: str | None) -> str:
    return arg.replace(secret, "<secret>") if secret else arg


def parse_cpus(text: str) -> list[int]:
    """``"0,2-3"`` -> ``[0, 2, 3]`` (taskset's list syntax)."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def baselines_dir(given: str | None) -> Path:
    """The folder holding the baseline servers: ``--baselines``, else this checkout's
    ``benchmarks/baselines`` (found from the source tree, then from the working directory)."""
    if given:
        return Path(given)
    here = Path(__file__).resolve().parents[3] / "benchmarks" / "baselines"
    if here.is_dir():
        return here
    return Path.cwd() / "benchmarks" / "baselines"


def bun_binary(baselines: str | None) -> str:
    """Bun: $FASTWS_BUN, else the one ``npm install --prefix benchmarks/baselines bun``
    put there, else one on PATH."""
    found = os.environ.get("FASTWS_BUN") or str(
        baselines_dir(baselines) / "node_modules" / ".bin" / "bun"
    )
    if os.access(found, os.X_OK):
        return found
    on_path = shutil.which("bun")
    if on_path is None:
        raise BenchError(
            "bun not found: npm install --prefix benchmarks/baselines bun@1.4.4 "
            "(or set FASTWS_BUN to a bun binary)"
        )
    return on_path


def server_command(
    kind: str, secret: str, extra: list[str], baselines: str | None, port: int = 0
) -> list[str]:
    if kind == "fastws":
        # --log-level warning: fastws logs every connect/disconnect at INFO, the baselines log
        # nothing; the benchmark compares fan-out, not logging.
        launcher = [sys.executable, "-m", "fastws", "serve"]
        extra = ["--rate-limit", "0", "--ping-interval", "0", "--log-level", "warning", *extra]
    elif kind == "bun":
        launcher = [bun_binary(baselines), str(baselines_dir(baselines) / "bun_server.ts")]
    else:
        script = baselines_dir(baselines) / f"{kind}_server.py"
        if not script.is_file():
            raise BenchError(f"baseline server not found: {script} (use --baselines DIR)")
        launcher = [sys.executable, str(script)]
    # --jwt-secret=... as one word: a secret may start with "-"
    return [*launcher, "--host", "127.0.0.1", "--port", str(port), f"--jwt-secret={secret}", *extra]


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


# Descriptors a process needs besides its connections: listening sockets, pipes, log files,
# epoll, the Redis connections of a deployment.
FD_HEADROOM = 256


def ensure_nofile(needed: int, hint: str = "") -> tuple[int, int]:
    """Make this process's RLIMIT_NOFILE at least ``needed`` (soft and hard) and return
    (soft, hard); processes started after this inherit it, servers and generators alike.
    Only root with CAP_SYS_RESOURCE may raise the hard limit, and only up to fs.nr_open.
    Raises BenchError, saying how many descriptors are needed (``hint``: how else to get
    there), when the limit cannot be had."""
    soft, hard = raise_nofile()
    if soft >= needed:
        return soft, hard
    if os.geteuid() == 0 and needed <= _nr_open():
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(needed, hard)))
            soft, hard = needed, max(needed, hard)
    if soft < needed:
        raise BenchError(
            f"this run needs {needed:,} file descriptors per process (the connections it holds and "
            f"{FD_HEADROOM} more), but RLIMIT_NOFILE is {soft:,} (hard {hard:,}) and cannot "
            f"be raised here (raising the hard limit takes CAP_SYS_RESOURCE): run `ulimit -n "
            f"{needed}` first (as root, up to /proc/sys/fs/nr_open), or spread the connections "
            f"over more processes{hint}, or open fewer"
        )
    return soft, hard


def _nr_open() -> int:
    """The kernel's ceiling on RLIMIT_NOFILE (fs.nr_open)."""
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


class LocalServer:
    """A server subprocess on 127.0.0.1 port 0, pinned with ``taskset -c CPUS`` when taskset
    exists. Its output is drained by a thread (so a chatty server never blocks on a full pipe)
    and its last lines are kept for error messages."""

    def __init__(
        self,
        kind: str,
        secret: str,
        cpus: str,
        extra: list[str],
        baselines: str | None,
        port: int = 0,
    ) -> None:
        self.kind = kind
        self.secret = secret
        self.extra = extra
        self.baselines = baselines
        self.command = server_command(kind, secret, extra, baselines, port)
        self.cpus = cpus if cpus and shutil.which("taskset") else ""
        self.pid: int | None = None  # the listening process (a supervisor under --workers)
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._lines: list[str] = []
        self._cond = threading.Condition()

    def start(self) -> Target:
        cmd = (["taskset", "-c", self.cpus] if self.cpus else []) + self.command
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # The server inherits our RLIMIT_NOFILE: raise it so 10k connections fit on its side.
        raise_nofile()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + _START_TIMEOUT
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    match = _LISTENING.search(line)
                    if match:
                        host, port, pid = match.group(1), int(match.group(2)), int(match.group(3))
                        self._lines.clear()
                        self.pid, self.port = pid, port
                        return Target(
                            self.kind,
                            f"ws://{host}:{port}/ws",
                            secret=self.secret,
                            pid=pid,
                            command=cmd,
                            started=True,
                            server_cpus=self.cpus,
                            log=self.tail,
                        )
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self.proc.poll() is not None or left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
        self.stop()
        raise BenchError(
            f"{self.kind} server did not start: {' '.join(cmd[:4])} ...\n" + "".join(self.tail)
        )

    def restart(self) -> Target:
        """Stop the server and start it again on the same port (a node restart)."""
        self.stop()
        self.command = server_command(self.kind, self.secret, self.extra, self.baselines, self.port)
        return self.start()

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.tail.append(line)
                if len(self._lines) < 1000:
                    self._lines.append(line)
                self._cond.notify_all()

    def stop(self) -> int | None:
        """SIGTERM (the servers drain and exit 0), SIGKILL after a grace period."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout:
            with contextlib.suppress(OSError):
                proc.stdout.close()
        return proc.returncode


@contextlib.contextmanager
def local_server(
    kind: str, secret: str, cpus: str, extra: list[str], baselines: str | None
) -> Iterator[Target]:
    server = LocalServer(kind, secret, cpus, extra, baselines)
    target = server.start()
    try:
        yield target
    finally:
        server.stop()


# --- /proc readers -------------------------------------------------------------------------
# CPU: utime + stime of the server process (all its threads) plus, for a supervisor with
# --workers, of every live descendant found through /proc/<pid>/task/<tid>/children. A child
# that exits inside the measured window takes its CPU time with it (it moves to the parent's
# cutime only once reaped), so restarts during a run are under-counted.

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def descendants(pid: int) -> list[int]:
    """``pid`` and its live descendants (children of every thread), depth first."""
    found = [pid]
    i = 0
    while i < len(found):
        p = found[i]
        i += 1
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    found.extend(int(c) for c in fh.read().split())
            except OSError:
                continue
    return found


def _cpu_one(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def _tree(pids: int | Iterable[int] | None) -> list[int]:
    """Every live process of a deployment: each of ``pids`` and its descendants, once."""
    if pids is None:
        return []
    roots = [pids] if isinstance(pids, int) else list(pids)
    return list(dict.fromkeys(p for root in roots for p in descendants(root)))


def cpu_by_pid(pids: int | Iterable[int] | None) -> dict[int, float]:
    """CPU seconds of each live process of ``pids`` and their descendants, by pid (to count
    across a restart: a new process's time is all inside the window, an old one's is gone)."""
    found = {}
    for p in _tree(pids):
        value = _cpu_one(p)
        if value is not None:
            found[p] = value
    return found


def cpu_seconds(pids: int | Iterable[int] | None) -> float | None:
    """User + system CPU seconds of ``pids`` (one or several: every process of a deployment)
    and their live descendants, or None if unreadable."""
    found = cpu_by_pid(pids)
    return sum(found.values()) if found else None


def _runtime_one(pid: int) -> float | None:
    """CPU seconds the live threads of ``pid`` have run, to the nanosecond: the first field
    of each thread's schedstat (utime + stime only count whole clock ticks)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total, found = 0, False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        found = True
    return total / 1e9 if found else None


def cpu_runtime(pids: int | Iterable[int] | None) -> float | None:
    """Like :func:`cpu_seconds`, to the nanosecond (schedstat), for windows of little CPU such
    as an idle phase, where a few clock ticks would be all there is to count. A thread that
    exits inside the window takes its time with it. Falls back to :func:`cpu_seconds`."""
    values = [v for v in map(_runtime_one, _tree(pids)) if v is not None]
    return sum(values) if values else cpu_seconds(pids)


def _rss_one(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes(pids: int | Iterable[int] | None) -> int | None:
    """Resident memory (VmRSS) of ``pids`` plus their live descendants, in bytes."""
    total = None
    for p in _tree(pids):
        value = _rss_one(p)
        if value is not None:
            total = (total or 0) + value
    return total


def _pss_one(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pss_bytes(pids: int | Iterable[int] | None) -> int | None:
    """Proportional memory (Pss) of ``pids`` plus their live descendants, in bytes: a page
    that n of them share counts 1/n in each, so the sum is the deployment's memory with
    shared pages (libraries, a forked worker's inherited heap) counted once. Summed RSS
    counts them once per process."""
    total = None
    for p in _tree(pids):
        value = _pss_one(p)
        if value is not None:
            total = (total or 0) + value
    return total


def versions() -> dict[str, str]:
    from .. import __version__

    out = {
        "python": platform.python_version(),
        "fastws": __version__,
        "platform": platform.platform(),
    }
    for name in ("picows", "uvloop", "websockets", "msgspec", "orjson"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    out["cpu"] = _cpu_model()
    out["cores"] = str(os.cpu_count())
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def listen_overflows() -> int | None:
    """The system-wide TcpExt ListenOverflows counter (SYNs dropped because a listen backlog
    was full: the client retries after 1 s), from /proc/net/netstat."""
    try:
        with open("/proc/net/netstat") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            value = table.get("ListenOverflows")
            return int(value) if value is not None else None
    return None
