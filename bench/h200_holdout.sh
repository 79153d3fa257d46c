#!/usr/bin/env bash
# The hold-out on a GPU machine, the way a user tunes: record the app's shapes (forward, training and
# decode calls), tune exactly those, then time attention() against SDPA's backends per shape.
#   bash bench/h200_holdout.sh OUTDIR [TUNE_BUDGET]
# OPS: the recorded ops to tune (default fwd,train,kvcache); HOLDOUT_ARGS: extra options of holdout.py
# for both steps (e.g. --kinds fwd,train).
# Writes OUTDIR/holdout.db (recorded keys, trials, winners), tune_recorded.json, holdout_report.json
# and the logs. A tune stopped by its budget resumes when the script runs again on the same OUTDIR.
set -uo pipefail
out=${1:?usage: bench/h200_holdout.sh OUTDIR [TUNE_BUDGET]}
budget=${2:-420s}
ops=${OPS:-fwd,train,kvcache}
mkdir -p "$out"
export FLASHTUNE_DB="sqlite:///$out/holdout.db" PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -s "$out/holdout.db" ]; then
  python3 "$here/holdout.py" record ${HOLDOUT_ARGS:-} 2>&1 | tee "$out/record_log.txt"
fi
start=$(date +%s)
tune --recorded --op "$ops" --budget "$budget" --json > "$out/tune_recorded.json" 2> "$out/tune_recorded_log.txt"
echo "tune --recorded: exit $?, $(( $(date +%s) - start )) s wall" | tee -a "$out/tune_recorded_log.txt"
tail -3 "$out/tune_recorded_log.txt"
python3 "$here/holdout.py" report --out "$out" ${HOLDOUT_ARGS:-} 2>&1 | tee "$out/holdout_report_log.txt"
