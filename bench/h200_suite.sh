#!/usr/bin/env bash
# The GPU suite on a host with two H200s: the fleet pair, the host path, decode and backward tuning, the
# transformers model, the model example and the GPU tests, in modes that each fit a 10-minute command.
# Each mode writes its output under OUT, packs it into one archive and prints a short summary last.
#   bash bench/h200_suite.sh single OUT   # GPU 0: the single-GPU fleet baseline (cores 0-23);
#                                         # GPU 1 meanwhile (cores 24-31): host path, decode tuning, GPU tests
#   bash bench/h200_suite.sh multi OUT    # both GPUs: tune --gpus all on the same grid, then the comparison;
#                                         # then backward tuning (GPU 0) beside the transformers 1B run (GPU 1)
#   bash bench/h200_suite.sh model OUT    # the model example (GPU 0) beside decode and backward timing
#                                         # and the decode/head-dim GPU tests (GPU 1)
#   bash bench/h200_suite.sh pair OUT     # the fleet pair in one command (single beside host/transformers, then multi)
# Results: bench/results/h200/ (docs/results/h200.md says which file came from which mode).
set -uo pipefail
mode=${1:?usage: bench/h200_suite.sh single|multi|model|pair OUT}
out=${2:?usage: bench/h200_suite.sh single|multi|model|pair OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name --format=csv,noheader > "$out/gpus_$mode.txt"
case "$mode" in
  single)
    # The baseline gets 24 cores (its worker compiles with 16 threads), the other work 8: the compiles
    # of the two sides do not compete for cores.
    CUDA_VISIBLE_DEVICES=0 BUDGET=${BUDGET:-500s} taskset -c 0-23 bash bench/fleet_bench.sh "$out/fleet" single \
      > "$out/fleet_single.txt" 2>&1 &
    fleet=$!
    export CUDA_VISIBLE_DEVICES=1
    taskset -c 24-31 timeout 90 python3 bench/host_bench.py --out "$out/host" > "$out/host.txt" 2>&1
    taskset -c 24-31 timeout 330 python3 bench/decode_tune_bench.py "$out/decode_tune" > "$out/decode.txt" 2>&1
    taskset -c 24-31 timeout 100 python3 -m pytest -q -x tests/kernel/test_host_path.py tests/kernel/test_integration_torch.py \
      tests/kernel/test_integration_transformers.py > "$out/pytest_host_integrations_gpu.txt" 2>&1
    wait $fleet
    for f in host decode pytest_host_integrations_gpu fleet_single; do echo "== $f"; tail -n 25 "$out/$f.txt"; done
    ;;
  multi)
    BUDGET=${BUDGET:-360s} bash bench/fleet_bench.sh "$out/fleet" multi > "$out/fleet_multi.txt" 2>&1
    # The comparison needs the single run's database in the same folder (the remote command that ran it brings back at
    # most 8 files, so the single mode's did not come back): only where both are present.
    [ -f "$out/fleet/single.json" ] && python3 bench/fleet_compare.py "$out/fleet" > "$out/fleet_compare.txt" 2>&1
    CUDA_VISIBLE_DEVICES=0 taskset -c 0-15 timeout ${BWD_S:-200} python3 bench/bwd_tune_bench.py "$out/bwd_tune" \
      --budget ${BWD_BUDGET:-120s} > "$out/bwd.txt" 2>&1 &
    bwd=$!
    CUDA_VISIBLE_DEVICES=1 taskset -c 16-31 timeout ${HF_S:-200} python3 bench/transformers_bench.py \
      --out "$out/transformers" > "$out/transformers.txt" 2>&1
    wait $bwd
    for f in fleet_multi fleet_compare bwd transformers; do [ -f "$out/$f.txt" ] || continue; echo "== $f"; tail -n 30 "$out/$f.txt"; done
    ;;
  model)
    CUDA_VISIBLE_DEVICES=0 taskset -c 0-15 timeout 280 python3 bench/model_example.py --db "sqlite:///$out/example.db" \
      --budget ${EXAMPLE_BUDGET:-90s} --out "$out/model_example" > "$out/model_example.txt" 2>&1 &
    example=$!
    export CUDA_VISIBLE_DEVICES=1
    taskset -c 16-31 timeout 120 python3 bench/decode_tune_bench.py "$out/decode_tune" --no-tests > "$out/decode.txt" 2>&1
    # The backward timing again on the multi mode's tuned database (one row's autograd time disagreed with its
    # hand launch there).
    mkdir -p "$out/bwd_tune" && cp bench/results/h200/bwd_tune_h200.db "$out/bwd_tune/bwd_tune.db"
    taskset -c 16-31 timeout 100 python3 bench/bwd_tune_bench.py "$out/bwd_tune" --skip-tune > "$out/bwd.txt" 2>&1
    taskset -c 16-31 timeout 150 python3 -m pytest -q -rf --tb=line -p no:cacheprovider tests/kernel/test_decode.py \
      tests/kernel/test_head_dims.py > "$out/pytest_decode_head_dims_gpu.txt" 2>&1
    wait $example
    for f in model_example decode bwd pytest_decode_head_dims_gpu; do echo "== $f"; tail -n 30 "$out/$f.txt"; done
    ;;
  pair)
    # The fleet pair again, on one machine in one call: single (GPU 0, 24 cores) while GPU 1 (8 other
    # cores) runs the decode checks, the host path, the transformers model and the head-dim GPU tests; then both GPUs.
    CUDA_VISIBLE_DEVICES=0 BUDGET=${BUDGET:-330s} taskset -c 0-23 bash bench/fleet_bench.sh "$out/fleet" single \
      > "$out/fleet_single.txt" 2>&1 &
    fleet=$!
    export CUDA_VISIBLE_DEVICES=1
    # The decode relaunch's GPU tests first: a relaunch that picked the wrong compiled variant would be
    # silently wrong, and only these bitwise checks on Triton 3.6 would show it.
    taskset -c 24-31 timeout 100 python3 -m pytest -q -rf --tb=line -p no:cacheprovider -m gpu \
      tests/kernel/test_decode_host.py tests/kernel/test_host_path.py > "$out/pytest_decode_host_gpu.txt" 2>&1
    taskset -c 24-31 timeout 40 python3 -m pytest -q -rf --tb=line -p no:cacheprovider tests/kernel/test_decode.py \
      -k "bad_input or lengths or ragged" >> "$out/pytest_decode_host_gpu.txt" 2>&1
    taskset -c 24-31 timeout 80 python3 bench/host_bench.py --out "$out/host" > "$out/host.txt" 2>&1
    taskset -c 24-31 timeout 150 python3 bench/transformers_bench.py --out "$out/transformers" > "$out/transformers.txt" 2>&1
    taskset -c 24-31 timeout 60 python3 -m pytest -q -rf --tb=line -p no:cacheprovider tests/kernel/test_head_dims.py \
      > "$out/pytest_head_dims_gpu.txt" 2>&1
    unset CUDA_VISIBLE_DEVICES
    wait $fleet
    BUDGET=${BUDGET:-220s} bash bench/fleet_bench.sh "$out/fleet" multi > "$out/fleet_multi.txt" 2>&1
    python3 bench/fleet_compare.py "$out/fleet" > "$out/fleet_compare.txt" 2>&1
    rm -rf "$out"/fleet/triton_cache_*  # each mode's own Triton cache: large, and not a result
    for f in pytest_decode_host_gpu host transformers pytest_head_dims_gpu fleet_single fleet_multi fleet_compare; do echo "== $f"; tail -n 22 "$out/$f.txt"; done
    ;;
  *) echo "h200_suite.sh: mode must be single, multi, model or pair, got '$mode'" >&2; exit 2 ;;
esac
# One archive of everything the mode wrote (databases included): a remote command returns few files.
tar czf "/tmp/h200_suite_$mode.tgz" -C "$out" . && rm -rf "${out:?}"/* && mv "/tmp/h200_suite_$mode.tgz" "$out/"
