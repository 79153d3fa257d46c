#!/usr/bin/env bash
# The acceptance runs of "never slower than torch" on one GPU, after the install preamble of the device
# README, in modes that each fit a 10-minute command; each prints a short summary last.
#   bash bench/gpu_accept.sh check OUT     # the GPU tests, host time per call (kernel, each routed SDPA backend,
#                                          # decode with and without lengths), a bucket's winner across its lengths
#   bash bench/gpu_accept.sh holdout OUT   # the hold-out: record, tune --recorded (fwd, train, kvcache), report
#   bash bench/gpu_accept.sh models OUT    # the model-level table: GQA, MQA D=256, BERT, ViT, each recorded and tuned
#   bash bench/gpu_accept.sh packed OUT    # packed and paged attention: their tests on the GPU, then packed_bench.py
#   bash bench/gpu_accept.sh hopper OUT    # the Gluon and fp8 forwards: their tests, gluon_bench.py, fp8_bench.py
#   bash bench/gpu_accept.sh bundle OUT    # this GPU model's bundled winners (make_bundle.sh; run again to resume)
# Time limits (seconds): TESTS_S, HOST_S, DECODE_S, MODELS_S, BENCH_S; BUDGET: the tune budget; MODELS_ARGS: more
# options of models.py (e.g. --models gqa,bert); QUICK=1: the benches' --quick grids. Results: bench/results/<gpu>/ (docs/results/ says which file came from which mode).
set -uo pipefail
mode=${1:?usage: bench/gpu_accept.sh check|holdout|models|packed|hopper|bundle OUT}
out=${2:?usage: bench/gpu_accept.sh check|holdout|models|packed|hopper|bundle OUT}
quick=${QUICK:+--quick}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")" && pwd)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu_$mode.txt"
case "$mode" in
  check)
    timeout ${TESTS_S:-300} python3 -m pytest -q -p no:cacheprovider -m gpu tests/ > "$out/pytest_gpu.txt" 2>&1
    echo "pytest -m gpu: exit $?"
    timeout ${HOST_S:-150} python3 "$here/host_bench.py" --out "$out" > "$out/host_bench.txt" 2>&1; echo "host_bench: exit $?"
    timeout ${DECODE_S:-100} python3 "$here/decode_bench.py" --bucket --out "$out" > "$out/decode_bucket.txt" 2>&1
    echo "decode_bench --bucket: exit $?"
    for f in pytest_gpu host_bench decode_bucket; do echo "== $f"; tail -n 20 "$out/$f.txt"; done
    ;;
  holdout)
    bash "$here/h200_holdout.sh" "$out" "${BUDGET:-300s}" > "$out/holdout.txt" 2>&1
    tail -n 45 "$out/holdout.txt"
    ;;
  models)
    timeout ${MODELS_S:-560} python3 "$here/models.py" --out "$out" --budget "${BUDGET:-30}" ${MODELS_ARGS:-} > "$out/models.txt" 2>&1
    echo "models.py: exit $?"
    tail -n 40 "$out/models.txt"
    ;;
  packed)
    timeout ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider tests/kernel/test_varlen.py tests/kernel/test_paged.py \
      tests/kernel/test_nn_mha.py tests/kernel/test_integration_packed.py > "$out/pytest_packed.txt" 2>&1
    echo "pytest (packed, paged): exit $?"
    timeout ${BENCH_S:-330} python3 "$here/packed_bench.py" --out "$out" $quick > "$out/packed_bench.txt" 2>&1
    echo "packed_bench: exit $?"
    for f in pytest_packed packed_bench; do echo "== $f"; tail -n 40 "$out/$f.txt"; done
    ;;
  hopper)
    # A kernel that waits on a barrier can hang the GPU: every run here is under a timeout, and gluon_bench
    # runs each config first in a child of its own with a kill.
    timeout ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider tests/kernel/test_fwd_gluon.py tests/kernel/test_fp8.py \
      > "$out/pytest_hopper.txt" 2>&1
    echo "pytest (gluon, fp8): exit $?"
    timeout ${BENCH_S:-300} python3 "$here/gluon_bench.py" --out "$out" $quick > "$out/gluon_bench.txt" 2>&1
    echo "gluon_bench: exit $?"
    timeout 120 python3 "$here/fp8_bench.py" --out "$out" $quick > "$out/fp8_bench.txt" 2>&1; echo "fp8_bench: exit $?"
    for f in pytest_hopper gluon_bench fp8_bench; do echo "== $f"; tail -n 25 "$out/$f.txt"; done
    ;;
  bundle)
    BUDGET_S=${BUDGET_S:-540} bash "$here/make_bundle.sh" "$out" 2>&1 | tee "$out/bundle.txt" | tail -n 20
    ;;
  *) echo "unknown mode $mode: check, holdout, models, packed, hopper or bundle" >&2; exit 2 ;;
esac
