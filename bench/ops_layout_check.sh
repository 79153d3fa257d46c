#!/usr/bin/env bash
# The kernels after a refactor of the host code around them, side by side with the tree before it, on one GPU:
# every kernel's output fingerprint (bench/output_hashes.py; bitwise equal expected) and every op's speed
# (bench/kernel_speed.py, the two trees in alternating processes).
# Run from the repository root after the install preamble of ../shared/device/README.md, with the earlier tree
# unpacked in .prev (git archive REV kernel db tuner pyproject.toml setup.py README.md LICENSE | tar -x -C .prev):
#   bash bench/ops_layout_check.sh OUT [ROUNDS]
set -uo pipefail
out=${1:?usage: ops_layout_check.sh OUT [ROUNDS]}
rounds=${2:-2}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/old_site ./.prev > /dev/null \
  || { echo "cannot install .prev"; exit 1; }
old="/tmp/old_site:${PYTHONPATH:-}"
PYTHONPATH=$old python3 -c "import flashtune.kernel as k, os; print('old tree:', os.path.dirname(k.__file__))"
python3 -c "import flashtune.kernel as k, os; print('new tree:', os.path.dirname(k.__file__))"
timeout 300 python3 bench/output_hashes.py --out "$out/output_hashes_new.json"
PYTHONPATH=$old timeout 300 python3 bench/output_hashes.py --out "$out/output_hashes_old.json"
python3 bench/output_hashes.py --compare "$out/output_hashes_old.json" "$out/output_hashes_new.json" \
  | tee "$out/output_hashes_compare.txt" | head -20
for i in $(seq "$rounds"); do
  PYTHONPATH=$old timeout 240 python3 bench/kernel_speed.py --out "$out" --tag old
  timeout 240 python3 bench/kernel_speed.py --out "$out" --tag new
done
python3 bench/kernel_speed.py --out "$out" --compare old new
