#!/usr/bin/env bash
# Regenerate the "Results" table of benchmarks/README.md: every scenario at moderate sizes
# against fastws, the picows baseline and the websockets baseline (--server all), each server
# pinned to CPU 0 and the load generator to the other core(s). JSON and PNG files go to
# benchmarks/results/run-<timestamp>/; the table is rewritten between the README's markers.
#
#   benchmarks/run_all.sh                      # about 4 minutes on 2 cores
#   DURATION=5 benchmarks/run_all.sh           # shorter measured windows (default 10 s)
#
# Exit status: 0 when every run was clean, 1 when a run saw losses, duplicates, reorders or
# failed connections (the table is written anyway; see each run's output), 2 on errors.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
SERVER_CPUS=${SERVER_CPUS:-0}
OUT=${OUT:-benchmarks/results/run-$(date +%Y%m%d-%H%M%S)}
COMMON=(--server all --out "$OUT" --duration "$DURATION" --warmup "$WARMUP"
        --server-cpus "$SERVER_CPUS")

status=0
run() {
    echo
    echo "== fastws bench $*"
    "$PYTHON" -m fastws.bench "$@" "${COMMON[@]}"
    local rc=$?
    if [ "$rc" -gt "$status" ]; then status=$rc; fi
}

run roundtrip --connections 64
run roundtrip --connections 64 --rate 5000
run fanout --subscribers 1000 --window 64
run fanout --subscribers 1000 --rate 50
run fanout --subscribers 1000 --join-storm --storm-concurrency 64
run rooms --rooms 500 --members 4
run connections --connections 10000

echo
shopt -s nullglob
files=("$OUT"/*.json)
if [ "${#files[@]}" -eq 0 ]; then
    echo "run_all.sh: no results in $OUT" >&2
    exit 2
fi
"$PYTHON" -m fastws.bench --summarize "${files[@]}" --readme benchmarks/README.md || exit 2
echo "run_all.sh: results in $OUT, table written to benchmarks/README.md (exit $status)"
exit "$status"
