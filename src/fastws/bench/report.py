"""Everything a run leaves behind: the JSON document, the terminal tables, the PNG (latency by
percentile, throughput per 100 ms), ``--compare`` of two runs and the Markdown results table
that ``benchmarks/run_all.sh`` writes into ``benchmarks/README.md``."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

SCHEMA = "fastws-bench/1"
SERVER_ORDER = ("fastws", "picows", "websockets", "bun")
DEPLOYMENT_ORDER = ("one", "workers2", "redis", "redis2")  # as deployment.DEPLOYMENTS

# (path in "headline", label, True if higher is better, None if neither)
FIGURES: list[tuple[str, str, bool | None]] = [
    ("throughput", "throughput", True),
    ("throughput_per_cpu_s", "per server CPU-second", True),
    ("server_cpu_s", "server CPU seconds", None),
    ("messages_per_s", "messages sent/s", True),
    ("latency_us.p50", "latency p50 (us)", False),
    ("latency_us.p90", "latency p90 (us)", False),
    ("latency_us.p99", "latency p99 (us)", False),
    ("latency_us.p99.9", "latency p99.9 (us)", False),
    ("latency_us.max", "latency max (us)", False),
    ("memory_per_connection_bytes", "server bytes per connection", False),
    ("memory_per_connection_kib", "server KiB per connection", False),
    ("idle_cpu_us_per_s_per_connection", "idle CPU per connection (us per second)", False),
    ("idle_server_cpu_s", "server CPU seconds while idle", False),
    ("server_pss_after_mb", "server memory connected, shared pages once (PSS, MB)", False),
    ("server_rss_idle_end_mb", "server RSS at the idle window's end (MB)", False),
    ("server_pss_idle_end_mb", "server PSS at the idle window's end (MB)", False),
    ("idle_pings_per_connection", "pings answered per connection while idle", None),
    ("rss_warm_bytes", "server RSS after warm-up (bytes)", False),
    ("rss_end_bytes", "server RSS at the end (bytes)", False),
    ("rss_growth_pct", "server RSS growth after warm-up (%)", False),
    ("reconnects", "reconnects (re-joins with since)", None),
    ("storm_s", "storm time (s)", False),
    ("restart_s", "node down -> listening again (s)", False),
    ("clients_dropped", "clients dropped", None),
    ("clients_caught_up", "clients caught up", True),
    ("recovered", "re-joins recovered", None),
    ("history_lost", "re-joins with history lost (new epoch)", None),
    ("not_recovered", "re-joins not recovered", False),
    ("error_count", "errors (error replies, failed reconnects)", False),
    ("stale_notices", "stale user_joined (about a member already counted)", False),
    ("losses", "losses", False),
    ("unsequenced", "of which sent but never given a seq", False),
    ("duplicates", "duplicates", False),
    ("reorders", "reorders", False),
]


class Progress:
    """A tqdm bar when ``enabled`` (interactive and long enough), otherwise nothing."""

    def __init__(self, enabled: bool, total: float, desc: str, unit: str) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} "
                "{unit} [{elapsed}<{remaining}]",
            )

    def update_to(self, value: float) -> None:
        if self.bar is not None:
            self.bar.n = max(0.0, min(value, self.bar.total))
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --- the document ------------------------------------------------------------------------


def get(doc_or_head: dict[str, Any], path: str) -> Any:
    """``get(head, "latency_us.p99")``; keys may themselves contain dots (``p99.9``)."""
    value: Any = doc_or_head
    rest = path
    while rest:
        if not isinstance(value, dict):
            return None
        if rest in value:
            return value[rest]
        key, _, rest = rest.partition(".")
        value = value.get(key)
    return value


def document(
    *,
    scenario: str,
    mode: str,
    title: str,
    parameters: dict[str, Any],
    target: dict[str, Any],
    server: str,
    deployment: str = "one",
    versions: dict[str, str],
    headline: dict[str, Any],
    timeseries: dict[str, Any],
    histogram: Any,
    details: dict[str, Any],
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "scenario": scenario,
        "mode": mode,
        "title": title,
        "server": server,
        "deployment": deployment,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": parameters,
        "target": target,
        "versions": versions,
        "headline": headline,
        "details": details,
        "timeseries": timeseries,
        # HdrHistogram.encode() of the latencies (1 us .. 60 s, 3 digits), for re-analysis:
        # HdrHistogram(1, 60_000_000, 3).decode_and_add(doc["histogram"])
        "histogram": histogram.encode().decode("ascii"),
    }


def run_label(doc: dict[str, Any]) -> str:
    """``fastws``, or ``fastws/redis2`` for a deployment other than one process."""
    deployment = doc.get("deployment") or "one"
    return doc["server"] if deployment == "one" else f"{doc['server']}/{deployment}"


def column_of(doc: dict[str, Any], by: str) -> str:
    """The column a run goes in when runs are compared ``by`` server or by deployment."""
    return str(doc.get(by) or "one")


def output_paths(out_dir: str, doc: dict[str, Any], stamp: str) -> tuple[Path, Path]:
    mode = {"storm": "-joinstorm", "rate": "-rate", "reconnect": "-reconnect"}.get(doc["mode"], "")
    deployment = doc.get("deployment") or "one"
    tail = "" if deployment == "one" else f"-{deployment}"
    base = f"{stamp}-{doc['scenario']}{mode}-{doc['server']}{tail}"
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{base}.json"
    i = 2
    while path.exists():
        path = folder / f"{base}-{i}.json"
        i += 1
    return path, path.with_suffix(".png")


def write_json(doc: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a fastws bench result ({SCHEMA})")
    return doc


# --- numbers -------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return a / b


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(rows: list[list[str]], right_from: int = 1) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            c.ljust(w) if i < right_from else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _label(doc: dict[str, Any], key: str, label: str) -> str:
    if key == "throughput":
        return f"throughput ({doc['headline']['throughput_unit']})"
    if key == "throughput_per_cpu_s":
        return f"{doc['headline']['throughput_unit'].split('/')[0]} per server CPU-second"
    return label


def _present(docs: list[dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    return [f for f in FIGURES if any(get(d["headline"], f[0]) is not None for d in docs)]


def run_table(doc: dict[str, Any]) -> str:
    """The table printed after one run."""
    head = doc["headline"]
    rows = [["figure", "value"]]
    for key, label, _ in _present([doc]):
        rows.append([_label(doc, key, label), fmt(get(head, key))])
    extra = []
    if head.get("latency_of"):
        extra.append(f"latency is {head['latency_of']}; {fmt(head.get('wall_s'))} s measured")
    if head.get("expected_deliveries") is not None:
        extra.append(
            f"deliveries {fmt(head['deliveries'])} of {fmt(head['expected_deliveries'])} expected"
        )
    if head.get("connections") is not None:
        extra.append(f"connections open {fmt(head['connections'])}, failed {fmt(head['failed'])}")
    if head.get("idle_s") is not None:
        extra.append(
            f"idle {fmt(head['idle_s'])} s: {fmt(head['open_after_idle'])} connections still "
            f"open at its end, {fmt(head['idle_pings'])} heartbeat pings answered; "
            "server CPU to the ns (schedstat)"
        )
    if len(head.get("source_addresses") or ()) > 1:
        extra.append(f"source addresses: {head['source_addresses']} (address: connections)")
    if head.get("listen_overflows"):
        extra.append(
            f"listen backlog overflows (system-wide TcpExtListenOverflows): "
            f"{fmt(head['listen_overflows'])}; each delays its client by a 1 s SYN retry"
        )
    flood = head.get("flood")
    if flood:
        extra.append(
            f"flooders: {flood['clients']} wrote {flood['sent']:,} messages; "
            f"{flood['refused']:,} error replies; closed by the server: {flood['closes']}; "
            f"{flood['open_at_end']} still open at the end"
        )
    if head.get("clients_dropped") is not None:
        extra.append(
            f"restart ({head['restart']['how']}): {head['clients_dropped']} of "
            f"{head['clients']} clients dropped, {head['clients_caught_up']} caught up; "
            f"re-joins recovered {head['recovered']}, history lost {head['history_lost']}; "
            f"{head['messages_sent']} messages sent, final seq {head['final_seq']}"
        )
    if head.get("rss_warm_bytes") is not None:
        extra.append(
            f"server RSS: {_mib(head.get('server_rss_before_bytes'))} MiB connected, "
            f"{_mib(head['rss_warm_bytes'])} MiB after warm-up ({fmt(head['rss_warm_at_s'])} s), "
            f"{_mib(head['rss_end_bytes'])} MiB at the end ({head['rss_growth_pct']:+.2f} %; "
            f"slope {_mib(head['rss_slope_bytes_per_min'], signed=True)} MiB/min), peak "
            f"{_mib(head['rss_peak_bytes'])} MiB, {_mib(head.get('server_rss_closed_bytes'))} "
            "MiB once the clients had gone"
        )
    if head.get("reconnects_per_s") is not None:
        extra.append(
            f"{head['clients']:,} connections; {head['reconnects']:,} reconnects "
            f"({head['reconnects_per_s']:g}/s), re-joins recovered {head['recovered']:,}, "
            f"not recovered {head['not_recovered']:,}; rooms with losses "
            f"{head['rooms_with_losses']}; seqs given {head['final_seq_total']:,}"
        )
    if head.get("closes"):
        extra.append(f"closed by the server: {head['closes']} (close code: count)")
    if head.get("unexpected_disconnects"):
        extra.append(f"unexpected disconnects: {head['unexpected_disconnects']}")
    if head.get("errors"):
        extra.append(f"error replies: {head['errors']}")
    if head.get("pacer_max_lag_us", 0) > 20_000:
        extra.append(
            f"the generator fell up to {head['pacer_max_lag_us'] / 1000:.0f} ms behind "
            "its send schedule (generator overloaded or descheduled)"
        )
    if head.get("drain_timed_out"):
        extra.append("the drain timed out: some messages never arrived (counted as losses)")
    title = f"{doc['title']} -- {run_label(doc)} ({doc['target']['url']})"
    return "\n".join([title, _table(rows), *("  " + e for e in extra)])


def _mib(value: Any, signed: bool = False) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value / 2**20:+.3f}" if signed else f"{value / 2**20:.1f}"


def _columns(seen: set[str], by: str) -> tuple[list[str], list[tuple[str, int, int]]]:
    """The columns in their order, and the ratio columns as (label, numerator index,
    denominator index): fastws / each other server, or each deployment / one process."""
    order = SERVER_ORDER if by == "server" else DEPLOYMENT_ORDER
    columns = [c for c in order if c in seen] + sorted(seen - set(order))
    base = order[0]
    if base not in columns:
        return columns, []
    b = columns.index(base)
    others = [i for i, c in enumerate(columns) if c != base]
    if by == "server":
        return columns, [(f"{base} / {columns[i]}", b, i) for i in others]
    return columns, [(f"{columns[i]} / {base}", i, b) for i in others]


def ratios_table(docs: list[dict[str, Any]], by: str = "server") -> str:
    """Runs side by side ``by`` server (fastws / each other server) or by deployment (each
    deployment / one process, measured in the same invocation)."""
    runs = {column_of(d, by): d for d in docs}
    columns, ratios = _columns(set(runs), by)
    rows = [["figure", *columns, *(r[0] for r in ratios)]]
    for key, label, _better in _present(docs):
        values = [get(runs[c]["headline"], key) for c in columns]
        rows.append(
            [
                _label(docs[0], key, label),
                *(fmt(v) for v in values),
                *(fmt_ratio(ratio(values[n], values[d])) for _, n, d in ratios),
            ]
        )
    return f"{docs[0]['title']}: {by}s compared\n{_table(rows)}"


def compare(path_a: str, path_b: str) -> str:
    """``--compare``: the headline figures of two runs and their ratio A / B."""
    a, b = load(path_a), load(path_b)
    rows = [["figure", "A", "B", "A / B"]]
    for key, label, better in _present([a, b]):
        va, vb = get(a["headline"], key), get(b["headline"], key)
        r = ratio(va, vb)
        note = ""
        if r is not None and better is not None and abs(r - 1) > 0.005:
            note = " (A better)" if (r > 1) == better else " (B better)"
        rows.append([_label(a, key, label), fmt(va), fmt(vb), fmt_ratio(r) + note])
    lines = [
        f"A: {path_a}\n   {a['title']} -- {a['server']}, {a['date']}",
        f"B: {path_b}\n   {b['title']} -- {b['server']}, {b['date']}",
    ]
    if (a["scenario"], a["mode"]) != (b["scenario"], b["mode"]):
        lines.append("warning: the two runs are of different scenarios or modes")
    return "\n".join([*lines, _table(rows)])


# --- the README table ------------------------------------------------------------------

_SUMMARY = [
    ("throughput", None),
    ("throughput_per_cpu_s", None),
    ("storm_s", "storm time (s)"),
    ("latency_us.p50", "latency p50 (us)"),
    ("latency_us.p99", "latency p99 (us)"),
    ("memory_per_connection_bytes", "server bytes per connection"),
    ("idle_cpu_us_per_s_per_connection", "idle CPU per connection (us per second)"),
    ("rss_growth_pct", "server RSS growth after warm-up (%)"),
    ("history_lost", "re-joins with history lost (new epoch)"),
    ("error_count", "errors"),
    ("stale_notices", "stale user_joined"),
    ("losses", "losses + duplicates + reorders"),
]
# no ratio for these: the goal is an exact number
_COUNTS = {"losses", "error_count", "history_lost", "stale_notices", "rss_growth_pct"}


def summarize(paths: list[str], by: str = "server") -> str:
    """A Markdown table of these runs: one row per (run, figure), one column per server
    (then fastws / picows and fastws / websockets), or ``by="deployment"`` one column per
    deployment (then each / one process)."""
    docs = sorted((load(p) for p in paths), key=lambda d: d["date"])
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for d in docs:
        groups.setdefault(d["title"], {})[column_of(d, by)] = d  # the latest run wins
    columns, ratios = _columns({c for g in groups.values() for c in g}, by)
    header = ["run", "figure", *columns, *(r[0] for r in ratios)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for title, runs in groups.items():
        first = True
        sample = next(iter(runs.values()))
        for key, label in _SUMMARY:
            values = []
            for c in columns:
                head = runs[c]["headline"] if c in runs else {}
                if key == "losses":
                    parts = [head.get(k) for k in ("losses", "duplicates", "reorders")]
                    counts = [p for p in parts if isinstance(p, int)]
                    values.append(sum(counts) if isinstance(parts[0], int) else None)
                else:
                    values.append(get(head, key))
            if all(v is None for v in values):
                continue
            name = label or _label(sample, key, "")
            row = [title if first else "", name, *(fmt(v) for v in values)]
            if key in _COUNTS:
                row += ["" for _ in ratios]
            else:
                row += [fmt_ratio(ratio(values[n], values[d])) for _, n, d in ratios]
            lines.append("| " + " | ".join(row) + " |")
            first = False
    v = docs[-1]["versions"] if docs else {}
    target = docs[-1]["target"] if docs else {}
    timed = [d for d in docs if d["mode"] in ("window", "rate")] or docs
    params = timed[-1]["parameters"] if timed else {}
    pinned = (
        f"server pinned to CPU {target.get('server_cpus') or '-'}"
        if by == "server"
        else f"every server process (fastws nodes, supervisor, redis-server) pinned to CPU "
        f"{target.get('server_cpus') or '-'} and counted in the server's CPU seconds"
    )
    favour = (
        "Ratios above 1 favour fastws for throughput, below 1 for latency and memory."
        if by == "server"
        else "Ratios are each deployment over one process in the same run: above 1 is more "
        "throughput, below 1 lower latency."
    )
    intro = (
        f"Measured {docs[-1]['date'][:10] if docs else '-'} on {v.get('cpu', '?')} "
        f"({v.get('cores', '?')} cores, {v.get('platform', '?')}); {pinned}, load generator "
        f"on the other core(s). "
        f"Python {v.get('python')}, fastws {v.get('fastws')}, picows {v.get('picows')}, "
        f"uvloop {v.get('uvloop')}, websockets {v.get('websockets')}. Timed runs: "
        f"{fmt(params.get('warmup'))} s warmup then {fmt(params.get('duration'))} s measured. "
        f"{favour}"
    )
    return intro + "\n\n" + "\n".join(lines) + "\n"


def write_readme(readme: str, table: str, marker: str = "results") -> None:
    """Replace what is between ``<!-- MARKER:start -->`` and ``<!-- MARKER:end -->``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    path = Path(readme)
    text = path.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme}: no {start} ... {end} markers")
    path.write_text(pattern.sub(lambda _: f"{start}\n{table}{end}", text))


# --- plots -----------------------------------------------------------------------------


def _percentile_curve(encoded: str) -> tuple[list[float], list[float]]:
    from .loadgen import new_histogram

    hist = new_histogram()
    hist.decode_and_add(encoded)
    xs: list[float] = []
    ys: list[float] = []
    if hist.get_total_count() == 0:
        return xs, ys
    for item in hist.get_percentile_iterator(5):
        # HdrHistogram's plot: x = 1 / (1 - percentile), so 90, 99, 99.9 are evenly spaced.
        level = min(item.percentile_level_iterated_to, 99.9999)
        xs.append(1.0 / (1.0 - level / 100.0))
        ys.append(item.value_iterated_to)
    return xs, ys


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _percentile_axis(ax: Any) -> None:
    ticks = [2, 10, 100, 1000, 10000, 100000]
    ax.set_xscale("log")
    ax.set_xlim(left=1)
    ax.set_xticks(ticks)
    ax.set_xticklabels(["50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.minorticks_off()
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (us)")
    ax.grid(True, which="major", alpha=0.3)


def plot_run(doc: dict[str, Any], path: Path) -> None:
    """Latency by percentile (left) and throughput per 100 ms (right); a soak's own plot."""
    if doc["mode"] == "soak":
        plot_soak(doc, path)
        return
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    head = doc["headline"]
    xs, ys = _percentile_curve(doc["histogram"])
    if xs:
        ax1.plot(xs, ys, drawstyle="steps-post")
        ax1.set_yscale("log")
    _percentile_axis(ax1)
    ax1.set_title(f"latency: {head.get('latency_of', '')}", fontsize=10)
    series = doc["timeseries"]
    key = next(k for k in ("deliveries", "connections", "clients") if k in series)
    values = [v / series["interval_s"] for v in series[key]]
    ax2.plot([i * series["interval_s"] for i in range(len(values))], values, label=key)
    ax2.set_xlabel(f"seconds from {series['origin']}")
    ax2.set_ylabel(f"{key} per second (100 ms buckets)")
    ax2.set_ylim(bottom=0)
    ax2.grid(True, alpha=0.3)
    if series.get("sent") and series["sent"] != series.get("deliveries"):
        sent = [v / series["interval_s"] for v in series["sent"]]
        ax3 = ax2.twinx()  # a fan-out sends far fewer messages than it delivers
        ax3.plot(
            [i * series["interval_s"] for i in range(len(sent))],
            sent,
            color="tab:orange",
            alpha=0.7,
        )
        ax3.set_ylabel("messages sent per second", color="tab:orange")
        ax3.set_ylim(bottom=0)
    ax2.set_title(f"throughput: {fmt(head['throughput'])} {head['throughput_unit']}", fontsize=10)
    fig.suptitle(f"{doc['title']} -- {run_label(doc)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_servers(docs: list[dict[str, Any]], path: Path) -> None:
    """``--server all``: the servers' latency curves and throughput over time overlaid."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for doc in docs:
        xs, ys = _percentile_curve(doc["histogram"])
        if xs:
            ax1.plot(xs, ys, drawstyle="steps-post", label=run_label(doc))
        series = doc["timeseries"]
        key = next(k for k in ("deliveries", "connections", "clients") if k in series)
        values = [v / series["interval_s"] for v in series[key]]
        ax2.plot(
            [i * series["interval_s"] for i in range(len(values))], values, label=run_label(doc)
        )
    if any(ax1.get_lines()):
        ax1.set_yscale("log")
    _percentile_axis(ax1)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("seconds")
    ax2.set_ylabel(f"{docs[0]['headline']['throughput_unit']} (100 ms buckets)")
    ax2.set_ylim(bottom=0)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(docs[0]["title"], fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_soak(doc: dict[str, Any], path: Path) -> None:
    """The server's resident memory over the soak, warm-up marked (left); deliveries and
    reconnects per second (right)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    head = doc["headline"]
    series = doc["timeseries"]
    points = [(t, b / 2**20) for t, b in zip(series["rss_t_s"], series["rss_bytes"], strict=True)
              if b is not None]  # fmt: skip
    if points:
        ax1.plot([t for t, _ in points], [m for _, m in points], marker=".", markersize=3)
    if head.get("rss_warm_at_s") is not None:
        ax1.axvline(head["rss_warm_at_s"], color="tab:gray", linestyle="--", linewidth=1)
        ax1.set_title(
            f"server RSS: {_mib(head['rss_warm_bytes'])} MiB after warm-up (dashed) -> "
            f"{_mib(head['rss_end_bytes'])} MiB ({head['rss_growth_pct']:+.2f} %)",
            fontsize=10,
        )
    ax1.set_xlabel("seconds from the start of the load")
    ax1.set_ylabel("server RSS (MiB, every server process)")
    # from zero, so a growth looks as large as it is; headroom so the line is not the frame
    ax1.set_ylim(0, max((m for _, m in points), default=1) * 1.15)
    ax1.grid(True, alpha=0.3)
    seconds = range(len(series["deliveries"]))
    ax2.plot(seconds, series["deliveries"], drawstyle="steps-post")
    ax2.set_xlabel("seconds from the start of the load")
    ax2.set_ylabel("deliveries per second")
    ax2.set_ylim(bottom=0)
    ax2.grid(True, alpha=0.3)
    ax3 = ax2.twinx()
    ax3.plot(range(len(series["reconnects"])), series["reconnects"], color="tab:orange",
             alpha=0.7, drawstyle="steps-post")  # fmt: skip
    ax3.set_ylabel("reconnects started per second", color="tab:orange")
    ax3.set_ylim(bottom=0)
    ax2.set_title(
        f"losses {head['losses']}, duplicates {head['duplicates']}, reorders {head['reorders']}",
        fontsize=10,
    )
    fig.suptitle(f"{doc['title']} -- {run_label(doc)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
