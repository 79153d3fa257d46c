"""Shared-memory estimate vs the compiled kernel's own figure, over the whole config space, on this GPU.

Compiles (launches once, never times) every config of tuner.space.full_space() for each head dim,
reads `compiled.metadata.shared` (or the figure in Triton's OutOfResources), and counts how often
the analytic estimate db.arch.estimate_smem is wrong in each direction against the GPU's limit:

- keeps that fail: the estimate fits, the compiled kernel does not (a wasted compile, an OOR trial);
- drops that fit: the estimate is over the limit, the compiled kernel fits (a config never tried).

    python3 bench/tuner_smem_report.py --out bench/results/h200 [--head-dims 64,128] [--max-configs 200]
Writes tuner_smem_report.csv and tuner_smem_report.json under --out and prints a table last.
"""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from common import arguments, error_line, int_list, out_dir, print_table, provenance, write_csv, write_json
from triton.runtime.errors import OutOfResources  # noqa: E402

from flashtune.kernel.ops.fwd import estimate_smem  # noqa: E402
from flashtune.db.types import Config, Key, normalize_dtype  # noqa: E402
from flashtune.tuner.ops.fwd import KeyInputs  # noqa: E402
from flashtune.tuner.gpu import detect_gpu  # noqa: E402
from flashtune.tuner.ops.space import full_space  # noqa: E402


def compile_one(inputs: KeyInputs, config: Config) -> tuple[int | None, str, float]:
    """(compiled shared bytes, status, seconds); status 'ok', 'out_of_resources' or the error."""
    start = time.perf_counter()
    try:
        _, compiled = inputs.run(config)
        return int(compiled.metadata.shared), "ok", time.perf_counter() - start
    except OutOfResources as error:
        return int(getattr(error, "required", 0)) or None, "out_of_resources", time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - a compile failure is data here, not a reason to stop
        return None, error_line(error, 200), time.perf_counter() - start


def score(rows: list[dict], field: str, limit: int) -> dict:
    """How often the estimate in `field` mis-predicts fitting, and its relative error where known."""
    known = [r for r in rows if r["compiled"] is not None]
    keeps_fail = sum(1 for r in known if r[field] <= limit < r["compiled"])
    drops_fit = sum(1 for r in known if r["compiled"] <= limit < r[field])
    exact = sum(1 for r in known if r[field] == r["compiled"])
    rel = sorted(abs(r[field] - r["compiled"]) / r["compiled"] for r in known if r["compiled"])
    return {"configs": len(known), "keeps_that_fail": keeps_fail, "drops_that_fit": drops_fit, "exact": exact,
            "median_rel_error": rel[len(rel) // 2] if rel else None, "max_rel_error": rel[-1] if rel else None}


def main() -> None:
    parser = arguments(__doc__, seed=True)
    parser.add_argument("--head-dims", type=int_list, default="64,128")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch-heads", type=int, default=16)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--max-configs", type=int, default=None, help="a random sample of this many per head dim")
    args = parser.parse_args()

    gpu = detect_gpu()
    dtype = normalize_dtype(args.dtype)
    out = out_dir(args.out)
    rows: list[dict] = []
    started = time.monotonic()
    for head_dim in args.head_dims:
        configs = full_space()
        if args.max_configs and args.max_configs < len(configs):
            configs = random.Random(args.seed).sample(configs, args.max_configs)
        inputs = KeyInputs.build(Key(gpu.arch, "fwd", args.seq, head_dim, dtype, False), args.batch_heads,
                                 torch.device("cuda", gpu.index))
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.threads) as pool:
            results = list(pool.map(lambda c: compile_one(inputs, c), configs))
        torch.cuda.synchronize()
        print(f"D={head_dim}: {len(configs)} configs compiled in {time.monotonic() - t0:.0f} s", flush=True)
        for config, (shared, status, seconds) in zip(configs, results):
            rows.append({"head_dim": head_dim, "dtype": dtype, "config": str(config), "block_m": config.block_m,
                         "block_n": config.block_n, "num_warps": config.num_warps, "num_stages": config.num_stages,
                         "compiled": shared, "status": status, "compile_s": round(seconds, 3),
                         "estimate": estimate_smem(config, head_dim, dtype, gpu.arch)})
        del inputs
        torch.cuda.empty_cache()

    write_csv(out / "tuner_smem_report.csv", rows)
    summary = {**provenance(gpu.index), "elapsed_s": round(time.monotonic() - started, 1),
               "failed_compiles": sum(1 for r in rows if r["compiled"] is None),
               "by_head_dim": {}}
    for head_dim in sorted({r["head_dim"] for r in rows}):
        part = [r for r in rows if r["head_dim"] == head_dim]
        summary["by_head_dim"][head_dim] = {m: score(part, m, gpu.smem_limit) for m in ("estimate",)}
    summary["all"] = {m: score(rows, m, gpu.smem_limit) for m in ("estimate",)}
    write_json(out / "tuner_smem_report.json", summary)

    print_table(
        ["D", "model", "configs", "keeps-fail", "drops-fit", "exact", "med err"],
        [[head_dim, name, s["configs"], s["keeps_that_fail"], s["drops_that_fit"], s["exact"], s["median_rel_error"]]
         for head_dim, models in summary["by_head_dim"].items() for name, s in models.items()],
        title=f"{gpu.name} ({gpu.arch}), limit {gpu.smem_limit // 1024} KB, {len(rows)} configs, "
              f"{summary['failed_compiles']} failed to compile, {summary['elapsed_s']} s")


if __name__ == "__main__":
    main()
