#!/usr/bin/env bash
# The installed package on a GPU machine, as a user gets it: console scripts, a small tune of every op
# into a fresh SQLite file (each candidate validated into NaN-filled outputs), the outcomes of its trials,
# the per-op kernel versions, the GPU tests of packaging, validation, versions and dispatch, and the
# kernels' output fingerprints (bench/output_hashes.py).
# Run from the repository root after the install preamble of ../shared/device/README.md:
#   bash bench/gpu_release_check.sh OUT
set -uo pipefail
out=${1:?usage: gpu_release_check.sh OUT}
mkdir -p "$out"
cd /tmp
tune --help > "$out/tune_help.txt" 2>&1 && echo "tune --help: ok" || echo "tune --help: FAILED"
flashtune --help > /dev/null 2>&1 && echo "flashtune --help: ok" || echo "flashtune --help: FAILED"
tune --dry-run --arch sm_86 > /dev/null 2>&1 && echo "tune --dry-run --arch sm_86: ok" || echo "tune --dry-run: FAILED"
cd - > /dev/null
python3 -c "from flashtune.kernel.version import OP_VERSIONS, KERNEL_VERSION; print('versions', OP_VERSIONS, KERNEL_VERSION)"
db="sqlite:///$out/check.db"
timeout 420 tune --seq 1024,4096 --head-dim 128 --dtype bf16 --causal --batch-heads 64 --op fwd,bwd --db "$db" \
  --json > "$out/tune_fwd_bwd.json" 2> "$out/tune_fwd_bwd.log"; echo "tune fwd,bwd rc=$?"
timeout 240 tune --decode --kv-len 4096 --q-len 1 --head-dim 128 --dtype bf16 --causal --batch-heads 256 \
  --group 4 --db "$db" --json > "$out/tune_kvcache.json" 2> "$out/tune_kvcache.log"; echo "tune kvcache rc=$?"
python3 - "$out/check.db" <<'PY'
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
print("trial outcomes per op:")
for op, outcome, n in con.execute("select op, outcome, count(*) from flashtune_trials group by op, outcome order by op"):
    print(f"  {op:8s} {outcome:18s} {n}")
for row in con.execute("select op, seq_len, kernel_version from flashtune_winners order by op, seq_len"):
    print("  winner", *row)
PY
python3 bench/output_hashes.py --out "$out/output_hashes.json"
timeout 900 python3 -m pytest -q -p no:cacheprovider tests/tuner/test_tuner_poison.py tests/kernel/test_version.py \
  tests/test_packaging.py tests/kernel/test_dispatch_gpu.py tests/kernel/test_kernel_variants.py tests/kernel/test_autograd.py \
  2>&1 | tee "$out/pytest_gpu.txt" | tail -15
