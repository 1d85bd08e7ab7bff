#!/usr/bin/env bash
# Regenerate the two results tables of benchmarks/README.md.
#
# "Results": every scenario at moderate sizes against fastws, the picows baseline and the
# websockets baseline (--server all), each server pinned to CPU 0 and the load generator to the
# other core(s); JSON and PNG files in benchmarks/results/run-<timestamp>/.
#
# "Scale-out": fastws as one process, --workers 2, one node on Redis and two nodes on one Redis
# (--deployment all: the whole server side, redis-server included, pinned to CPU 0 and counted
# in the server CPU seconds), with ratios to one process measured in the same invocation:
# fan-out flat out, round trips, the join storm and the reconnect storm; JSON files in
# benchmarks/results/run-<timestamp>/deployments/.
#
#   benchmarks/run_all.sh                      # about 12 minutes on 2 cores
#   DURATION=5 benchmarks/run_all.sh           # shorter measured windows (default 10 s)
#
# Exit status: 0 when every run was clean, 1 when a run saw losses, duplicates, reorders,
# errors or failed connections (the tables are written anyway; see each run's output), 2 on
# errors.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
SERVER_CPUS=${SERVER_CPUS:-0}
OUT=${OUT:-benchmarks/results/run-$(date +%Y%m%d-%H%M%S)}
TIMING=(--duration "$DURATION" --warmup "$WARMUP" --server-cpus "$SERVER_CPUS")
COMMON=(--server all --out "$OUT" "${TIMING[@]}")
SCALE_OUT=(--server fastws --deployment all --out "$OUT/deployments" "${TIMING[@]}")

status=0
bench() {
    echo
    echo "== fastws bench $*"
    "$PYTHON" -m fastws.bench "$@"
    local rc=$?
    if [ "$rc" -gt "$status" ]; then status=$rc; fi
}
run() { bench "$@" "${COMMON[@]}"; }
scale_out() { bench "$@" "${SCALE_OUT[@]}"; }

run roundtrip --connections 64
run roundtrip --connections 64 --rate 5000
run fanout --subscribers 1000 --window 64
run fanout --subscribers 1000 --rate 50
run fanout --subscribers 1000 --join-storm --storm-concurrency 64
run rooms --rooms 500 --members 4
run connections --connections 10000

scale_out fanout --subscribers 1000 --window 64
scale_out roundtrip --connections 64
scale_out fanout --subscribers 1000 --join-storm --storm-concurrency 64
scale_out fanout --subscribers 1000 --reconnect-storm

echo
shopt -s nullglob
files=("$OUT"/*.json)
scaled=("$OUT"/deployments/*.json)
if [ "${#files[@]}" -eq 0 ] || [ "${#scaled[@]}" -eq 0 ]; then
    echo "run_all.sh: no results in $OUT or $OUT/deployments" >&2
    exit 2
fi
"$PYTHON" -m fastws.bench --summarize "${files[@]}" --readme benchmarks/README.md || exit 2
"$PYTHON" -m fastws.bench --summarize "${scaled[@]}" --by deployment \
    --readme benchmarks/README.md || exit 2
echo "run_all.sh: results in $OUT, tables written to benchmarks/README.md (exit $status)"
exit "$status"
