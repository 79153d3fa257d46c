"""Exhaustive sweep of the legal config space for a few keys, against the tuner's winners in a database.

For each key every legal config (tuner.space without the cost rules: the shared-memory estimate fits,
the tile is legal for D and dtype) gets the first-pass timing, with no pruning; the fastest eight and
the tuner's stored winner are then timed carefully in the same process, so the comparison is like
with like. Trials go to a scratch SQLite file under --out, never to the tuned database.

    python3 bench/tuner_exhaustive.py --db sqlite:///$PWD/tune.db --out bench/results/h200
Writes tuner_exhaustive.csv and tuner_exhaustive.json and prints a table last: the tuner's winner is
expected within 3 % of the exhaustive best.
"""
from __future__ import annotations

import os
import time

from common import arguments, out_dir, print_table, provenance, write_csv, write_json

from flashtune.db.store import Store
from flashtune.db.types import Key
from flashtune.tuner.loop import TuneSettings
from flashtune.tuner.session import session_gpu, tuning_session
from flashtune.tuner.ops.fwd import candidates

# fp16 non-causal: bench/tuner_smem_report.py compiled these groups already, so Triton's cache has them.
DEFAULT_KEYS = "512:64:fp16:full,2048:64:fp16:full,1024:128:fp16:full,4096:128:fp16:full"


def parse_keys(text: str, arch: str) -> list[Key]:
    """'N:D:dtype:causal|full,...' -> keys for `arch`."""
    keys = []
    for item in text.split(","):
        n, d, dtype, mode = item.split(":")
        if mode not in ("causal", "full"):
            raise SystemExit(f"bad key {item!r}: the last field is causal or full")
        keys.append(Key(arch, "fwd", int(n), int(d), dtype, mode == "causal"))
    return keys


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--db", required=True, help="the database the tune command wrote")
    parser.add_argument("--keys", default=DEFAULT_KEYS)
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--careful-top", type=int, default=8)
    args = parser.parse_args()

    gpu = session_gpu()
    keys = parse_keys(args.keys, gpu.arch)
    out = out_dir(args.out)
    with Store.open(args.db, create=False) as tuned:
        winners = {w.key: w for w in tuned.winners(gpu.arch)}
    missing = [str(k) for k in keys if k not in winners]
    if missing:
        raise SystemExit(f"no tuned winner in {args.db} for: {', '.join(missing)}")

    scratch_path = out / "tuner_exhaustive.db"
    scratch_path.unlink(missing_ok=True)
    started = time.monotonic()
    with tuning_session(f"sqlite:///{scratch_path}", {"exhaustive": args.keys}, gpu=gpu,
                        compile_threads=args.threads, kernel_only=True) as session:
        # No pruning (prune_ratio huge); the tuner's kernel config plays the "default" so it is timed
        # carefully; the exhaustive best must beat it by more than the pass's noise to count.
        results = session.tune(
            keys, space=lambda k: candidates(k.head_dim, k.dtype, gpu.smem_limit, arch=gpu.arch, cost_rules=False),
            default=lambda k: winners[k].kernel_config or winners[k].config,
            settings=TuneSettings(prune_ratio=1e9, careful_top=args.careful_top))
        trials = session.store.trials()
        restarts = session.bench.restarts
    rows = []
    for r in results:
        best = r.winner
        tuned_ms = r.default_ms
        gap = tuned_ms / best.median_ms - 1 if best and tuned_ms else None
        default = session.default(r.key)
        rows.append({"key": str(r.key), "space": len(candidates(r.key.head_dim, r.key.dtype, gpu.smem_limit, arch=gpu.arch,
                                                               cost_rules=False)),
                     "tuned_space": len(candidates(r.key.head_dim, r.key.dtype, gpu.smem_limit, arch=gpu.arch)),
                     "exhaustive_best": str(best.config) if best else None,
                     "exhaustive_ms": best.median_ms if best else None,
                     "tuner_winner": str(winners[r.key].config), "tuner_winner_ms_now": tuned_ms,
                     "tuner_winner_ms_stored": winners[r.key].median_ms, "gap": gap,
                     "within_3pct": gap is not None and gap <= 0.03, "default": str(default),
                     "outcomes": r.outcomes})
    write_csv(out / "tuner_exhaustive.csv", [
        {"key": str(t.key), "config": str(t.config), "outcome": t.outcome, "median_ms": t.median_ms,
         "tflops": t.tflops, "compile_s": t.compile_s, "error": (t.error or "")[:200]} for t in trials])
    summary = {**provenance(gpu.index), "elapsed_s": round(time.monotonic() - started, 1),
               "worker_restarts": restarts, "keys": rows}
    write_json(out / "tuner_exhaustive.json", summary)
    print_table(
        ["key", "space", "best", "ms", "tuner", "ms now", "gap"],
        [[row["key"], row["space"], row["exhaustive_best"], f"{row['exhaustive_ms'] or 0:.4f}", row["tuner_winner"],
          f"{row['tuner_winner_ms_now'] or 0:.4f}", f"{row['gap'] * 100:+.1f}%" if row["gap"] is not None else None]
         for row in rows],
        title=f"{gpu.name}: exhaustive sweep of {len(rows)} keys in {summary['elapsed_s']} s")


if __name__ == "__main__":
    main()
