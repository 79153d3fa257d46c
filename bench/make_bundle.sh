#!/usr/bin/env bash
# The bundled winners of this machine's GPU model (docs/bundled.md): tune the standard grid into a SQLite file of
# its own, then write the model's bundle file with `flashtune export --bundle` (winners only, with provenance).
#   bash bench/make_bundle.sh [OUT]        # OUT: where the bundle goes (default db/bundled/, what the wheel ships)
# Steps, in order, each one `tune` command; together they stop after BUDGET_S seconds (default 500: one run of the
# script fits a 10-minute command), a step that would start with less than a minute left waits for the next run:
#   fwd       --op fwd,bwd --seq 256..16384 --head-dim 64,128 --dtype fp16,bf16 --both --batch-heads 16,64,256
#   train     --op train --seq 256..8192  --head-dim 64,128 --dtype fp16,bf16 --both --batch-heads 16,64,256
#   kvcache   --op kvcache --decode --kv-len 1024..131072 --q-len 1 --head-dim 64,128 --dtype fp16,bf16 --group 1,4,8 --batch-heads 16,64,256
# GRID=small tunes a sparser grid in about a sixth of the time (--seq 512..8192, --batch-heads 64, --kv-len
# 2048..32768, --group 1,8; the nearest rule reaches between its keys): about 200 keys instead of about 1,300.
# STEPS picks some (e.g. STEPS=fwd,train; default fwd,train,kvcache); TUNE_ARGS adds options to every step. The database is kept in WORK
# (default build/bundle/<model>.db): a step stopped by its budget resumes when the script runs again, and the
# bundle is rewritten from everything tuned so far. The last line says "bundle complete" or what is left.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=${1:-$repo/db/bundled}
budget_s=${BUDGET_S:-500}
t0=$(date +%s)
steps=${STEPS:-fwd,train,kvcache}
export PYTHONUNBUFFERED=1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0))") || { echo "no CUDA GPU" >&2; exit 2; }
model=$(python3 -c "import sys; from flashtune.db.bundled import file_name; print(file_name(sys.argv[1])[:-5])" "$gpu")
work=${WORK:-$repo/build/bundle}
mkdir -p "$work" "$out"
db="sqlite:///$work/$model.db"
echo "GPU: $gpu -> $out/$model.json (database $work/$model.db)"
if [ "${GRID:-full}" = small ]; then
  seq=512..8192 train_seq=512..8192 bh=64 kv=2048..32768 groups=1,8
else
  seq=256..16384 train_seq=256..8192 bh=16,64,256 kv=1024..131072 groups=1,4,8
fi
common=(--head-dim 64,128 --dtype fp16,bf16 --batch-heads "$bh" --db "$db")
left=()
step() {  # name, tune options...
  local name=$1; shift
  case ",$steps," in *",$name,"*) ;; *) return ;; esac
  local start=$(date +%s)
  local budget=$(( budget_s - (start - t0) ))
  if [ $budget -lt 60 ]; then left+=("$name"); echo "tune $name: not started (budget spent)"; return; fi
  flashtune tune "$@" "${common[@]}" --budget "${budget}s" ${TUNE_ARGS:-} > "$work/tune_$name.log" 2>&1
  local rc=$?
  echo "tune $name: exit $rc, $(( $(date +%s) - start )) s"
  if [ $rc -ne 0 ] || grep -q "run the same command again to resume" "$work/tune_$name.log"; then left+=("$name"); fi
  tail -n 2 "$work/tune_$name.log"
}
step fwd --op fwd,bwd --seq "$seq" --both
step train --op train --seq "$train_seq" --both
step kvcache --op kvcache --decode --kv-len "$kv" --q-len 1 --group "$groups"
# The bundle holds this model's winners only, whatever else the database holds.
tmp=$(mktemp -d)
flashtune export --db "$db" --bundle "$tmp" || exit 2
cp "$tmp/$model.json" "$out/$model.json" && rm -rf "$tmp"
FLASHTUNE_BUNDLED_DIR="$out" flashtune show --bundled --json > /dev/null || exit 2  # the file reads back as the dispatcher and import read it
echo "wrote $out/$model.json: $(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['winners']))" "$out/$model.json") winner(s), $(stat -c %s "$out/$model.json") bytes"
if [ ${#left[@]} -eq 0 ]; then echo "bundle complete"; else echo "bundle incomplete (${left[*]} stopped by the budget): run again"; fi
