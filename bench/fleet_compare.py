"""Compare a single-GPU and a multi-GPU run of bench/fleet_bench.sh: the same winners (or within the
timing noise), and the wall-time ratio multi / single (issue 16's target: at most 0.55 on 2 GPUs).

    python3 bench/fleet_compare.py OUTDIR [--tolerance 0.03]

A key whose two runs picked different winners counts as "within noise" when the two winner times
differ by no more than the larger of the runs' measured noise and `--tolerance` (the two runs time on
different GPUs and at different moments, so their clocks differ by more than one pass's noise).
Writes OUTDIR/fleet_compare.json; exit 1 when a key is missing or differs beyond the noise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _keys(path: Path) -> dict[str, dict]:
    return {k["key"]: k for k in json.loads(path.read_text())["keys"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.03)
    args = parser.parse_args()
    single, multi = _keys(args.outdir / "single.json"), _keys(args.outdir / "multi.json")
    walls = {mode: sum(float(x) for x in (args.outdir / f"{mode}.wall").read_text().split())
             for mode in ("single", "multi")}
    same, within, beyond, missing = [], [], [], sorted(set(single) ^ set(multi))
    for key in sorted(set(single) & set(multi)):
        a, b = single[key], multi[key]
        if a["winner"] == b["winner"]:
            same.append(key)
            continue
        limit = max(a.get("noise") or 0.0, b.get("noise") or 0.0, args.tolerance)
        diff = abs(a["median_ms"] - b["median_ms"]) / min(a["median_ms"], b["median_ms"])
        (within if diff <= limit else beyond).append({"key": key, "single": a["winner"], "multi": b["winner"],
                                                     "single_ms": a["median_ms"], "multi_ms": b["median_ms"],
                                                     "difference": round(diff, 4), "limit": round(limit, 4)})
    ratio = walls["multi"] / walls["single"]
    report = {"keys": len(single), "same_winner": len(same), "within_noise": within, "beyond_noise": beyond,
              "missing": missing, "wall_s": walls, "wall_ratio": round(ratio, 3)}
    (args.outdir / "fleet_compare.json").write_text(json.dumps(report, indent=1))
    print(f"keys: {len(single)} single, {len(multi)} multi; same winner {len(same)}, different but within noise "
          f"{len(within)}, beyond noise {len(beyond)}, missing {len(missing)}")
    for entry in beyond:
        print(f"  beyond noise: {entry['key']}: {entry['single']} {entry['single_ms']:.4f} ms vs {entry['multi']} "
              f"{entry['multi_ms']:.4f} ms ({entry['difference']:.1%} > {entry['limit']:.1%})")
    print(f"wall time: single {walls['single']:.1f} s, multi {walls['multi']:.1f} s, ratio {ratio:.3f} "
          f"(target <= 0.55)")
    return 1 if beyond or missing else 0


if __name__ == "__main__":
    sys.exit(main())
