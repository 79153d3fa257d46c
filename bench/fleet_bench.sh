#!/usr/bin/env bash
# The fleet's GPU target: the main tuning grid with workload buckets (tune --seq 128..4096 --head-dim 64,128
# --dtype fp16,bf16 --both, default buckets: 144 keys) on one GPU (single) or every GPU of the host
# (multi: tune --gpus all), each on a fresh SQLite database under OUTDIR.
#   bash bench/fleet_bench.sh OUTDIR single|multi
# Writes OUTDIR/MODE.db, MODE.json (tune's --json), MODE.log (its stderr) and MODE.wall (seconds per
# invocation), and prints the wall time. Each invocation stops cleanly after BUDGET (default 510s,
# so that one call fits a 9-minute command); if it stopped, run the same command again: it resumes
# on the same database and the wall times add up. Then: python3 bench/fleet_compare.py OUTDIR.
# TUNE_ARGS adds tune options to both modes, e.g. TUNE_ARGS="--compile-procs 0" to compile in the
# worker's threads alone (no compile pool) for an A/B run.
set -uo pipefail
out=${1:?usage: bench/fleet_bench.sh OUTDIR single|multi}
mode=${2:?usage: bench/fleet_bench.sh OUTDIR single|multi}
case "$mode" in
  single) extra=() ;;
  multi) extra=(--gpus all) ;;
  *) echo "fleet_bench.sh: MODE must be single or multi, got '$mode'" >&2; exit 2 ;;
esac
budget=${BUDGET:-510s}
read -r -a tune_args <<< "${TUNE_ARGS:-}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Each mode compiles into its own Triton cache (unless TRITON_CACHE_DIR is given): tuning is
# compile-bound, and a mode run after the other must not load the other's kernels. A resumed
# invocation keeps its mode's cache, as a resumed tune run would.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$out/triton_cache_$mode}
part=$(( $(cat "$out/$mode.wall" 2>/dev/null | wc -l) + 1 ))
echo "== $mode, invocation $part, $(date -u +%FT%TZ), budget $budget, TUNE_ARGS '${TUNE_ARGS:-}'," \
  "TRITON_CACHE_DIR $TRITON_CACHE_DIR" >> "$out/$mode.log"
start=$(date +%s.%N)
tune --seq 128..4096 --head-dim 64,128 --dtype fp16,bf16 --both --db "sqlite:///$out/$mode.db" \
  --budget "$budget" --json "${extra[@]}" "${tune_args[@]}" > "$out/$mode.part$part.json" 2>> "$out/$mode.log"
rc=$?
end=$(date +%s.%N)
python3 - "$out" "$mode" "$part" "$rc" "$start" "$end" <<'PY'
import json, shutil, sys
out, mode, part, rc, start, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
with open(f"{out}/{mode}.wall", "a") as f:
    f.write(f"{end - start:.1f}\n")
walls = [float(x) for x in open(f"{out}/{mode}.wall").read().split()]
try:
    summary = json.load(open(f"{out}/{mode}.part{part}.json"))
except (OSError, ValueError):
    print(f"{mode}: tune exited {rc} without a JSON summary (see {out}/{mode}.log)")
    sys.exit(1)
status = summary.get("status")
keys = summary.get("keys", [])
print(f"{mode}: exit {rc}, status {status}, {len(keys)} keys, this invocation {walls[-1]:.1f} s, "
      f"wall time so far {sum(walls):.1f} s over {len(walls)} invocation(s)")
if status == "done":
    shutil.copy(f"{out}/{mode}.part{part}.json", f"{out}/{mode}.json")
    print(f"{mode} wall time: {sum(walls):.1f} s")
else:
    print(f"{mode}: stopped ({status}); run the same command again to resume")
PY
