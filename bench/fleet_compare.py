"""Compare a single-GPU and a multi-GPU run of bench/fleet_bench.sh: the same winners (or within the
timing noise), and the wall-time ratio multi / single (the target: at most 0.55 on 2 GPUs).

    python3 bench/fleet_compare.py OUTDIR [--tolerance 0.03]

A key whose two runs picked different winners counts as "within noise" when the two winner times
differ by no more than the larger of the runs' measured noise and `--tolerance` (the two runs time on
different GPUs and at different moments, so their clocks differ by more than one pass's noise).

It also shows where each run's time went, from its log (MODE.log): per GPU and group (op, D, dtype,
mask, GQA group), the seconds of the group's first key, which compiles the group's whole space,
beside the seconds of its other keys, which only load the compiled kernels and time them. A key's
seconds are the difference of the log's whole-second "elapsed" stamps on its GPU; each invocation
starts its clock again.

Writes OUTDIR/fleet_compare.json; exit 1 when a key is missing or differs beyond the noise.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from common import arguments, print_table, read_json, write_json

# `tune`'s log line per finished key: "[3/144] KEY: ...; elapsed 1m05s, ETA ..." on one GPU,
# "[gpu1] [3/144] KEY: ...; elapsed 65s" with --gpus; fleet_bench.sh's "== MODE, invocation N"
# line starts an invocation.
_LINE = re.compile(r"^(?:\[gpu(?P<gpu>\d+)\] )?\[\d+(?:/\d+)?\] (?P<key>\S+): .*; elapsed "
                   r"(?:(?P<min>\d+)m)?(?P<sec>\d+)s")


def _keys(path: Path) -> dict[str, dict]:
    return {k["key"]: k for k in read_json(path)["keys"]}


def key_group(key: str) -> str:
    """A key's compile group: the key without its N and B·Hq bucket (arch/op/D=../dtype/mask[/G=..])."""
    return "/".join(part for part in key.split("/") if not part.startswith(("N=", "BH=")))


def key_seconds(log: str) -> list[dict]:
    """Per finished key of a log: its GPU, key, group and seconds (since the GPU's previous key, or
    since its invocation started)."""
    rows: list[dict] = []
    last: dict[int, int] = {}
    for line in log.splitlines():
        if line.startswith("== "):
            last = {}
            continue
        m = _LINE.match(line)
        if not m:
            continue
        gpu = int(m["gpu"] or 0)
        elapsed = int(m["min"] or 0) * 60 + int(m["sec"])
        rows.append({"gpu": gpu, "key": m["key"], "group": key_group(m["key"]), "seconds": elapsed - last.get(gpu, 0)})
        last[gpu] = elapsed
    return rows


def first_keys(log: str) -> list[dict]:
    """Per (GPU, group), in order of appearance: the first key's seconds (it compiles the group) and
    the count and total seconds of the group's other keys on that GPU."""
    groups: dict[tuple[int, str], dict] = {}
    for row in key_seconds(log):
        entry = groups.get((row["gpu"], row["group"]))
        if entry is None:
            groups[(row["gpu"], row["group"])] = {"gpu": row["gpu"], "group": row["group"], "first_key": row["key"],
                                                  "first_s": row["seconds"], "other_keys": 0, "other_s": 0}
        else:
            entry["other_keys"] += 1
            entry["other_s"] += row["seconds"]
    return list(groups.values())


def _print_first_keys(mode: str, rows: list[dict]) -> None:
    print_table(["gpu", "group", "first key s", "other keys", "others s"],
                [[f"gpu{r['gpu']}", r["group"], r["first_s"], r["other_keys"], r["other_s"]] for r in rows],
                title=f"{mode}: the first key of each group (compiles it) against the group's other keys")
    print(f"  {mode} total: first keys {sum(r['first_s'] for r in rows)} s, others {sum(r['other_s'] for r in rows)} s")


def main() -> int:
    parser = arguments(__doc__, out="positional",
                       out_help="the folder bench/fleet_bench.sh wrote (MODE.json, .log, .wall); the report goes there")
    parser.add_argument("--tolerance", type=float, default=0.03)
    args = parser.parse_args()
    timings = {}
    for mode in ("single", "multi"):
        log = args.out / f"{mode}.log"
        if log.exists():
            timings[mode] = first_keys(log.read_text())
            _print_first_keys(mode, timings[mode])
    if not all((args.out / f"{mode}.json").exists() for mode in ("single", "multi")):
        print("single.json or multi.json is missing (a mode not run, or not finished): nothing to compare")
        return 1
    single, multi = _keys(args.out / "single.json"), _keys(args.out / "multi.json")
    walls = {mode: sum(float(x) for x in (args.out / f"{mode}.wall").read_text().split())
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
              "missing": missing, "wall_s": walls, "wall_ratio": round(ratio, 3),
              "first_keys": timings}
    write_json(args.out / "fleet_compare.json", report)
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
