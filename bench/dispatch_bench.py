"""Dispatcher benchmark on a CUDA GPU: what `kernel.attention` costs over a hand launch.

(a) Host overhead: on a tiny shape (B=1, H=1, N=128, D=64, fp16) where the host dominates, N calls
    of `attention()` against N calls of `kernel.ops.fwd.launch` with the same config, plus the pieces
    (the custom op called eagerly, `dispatch.plan`, `check_inputs`) and torch SDPA for scale. Timed
    with time.perf_counter around the Python loop (host time, no synchronisation inside) and to the
    final synchronize (wall); repeats interleaved, medians reported. Target: <= 5 us per call.
(b) The 48-key grid (N 128..4096 doubling, D 64/128, fp16/bf16, causal both): triton do_bench median
    of `attention()` against `launch()` with the winner read from the database by hand (db.store),
    interleaved A/B/A/B; the two hand-launch runs give the noise. Also checks that explain() picks
    the stored winner and that both outputs are bitwise equal.

    python3 bench/dispatch_bench.py --db sqlite:///PATH/TO/flashtune.db --out bench/results/h200

Writes <out>/dispatch_overhead.csv, <out>/dispatch_grid.csv and <out>/dispatch_bench.json.
"""
from __future__ import annotations

import itertools
import math
import statistics
from typing import Any, Callable

import torch
from common import Budget, HostLoop, Timer, arguments, host_rounds, loop_times, out_dir, print_table, provenance, \
    require_gpu, write_csv, write_json

from flashtune.db.types import Key  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TARGET_US = 5.0


def overhead(calls: int, repeats: int, seed: int) -> list[dict[str, Any]]:
    """Part (a): µs per call of each way to run the tiny shape, medians over interleaved repeats."""
    import torch.nn.functional as F

    from flashtune.kernel import attention, dispatch
    from flashtune.kernel.checks import check_inputs
    from flashtune.kernel.ops.fwd import launch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
    shape = check_inputs(q, k, v)
    config = dispatch.explain(q, k, v).config
    scale = 1 / math.sqrt(64)
    op = torch.ops.flashtune.attention_fwd
    ways: dict[str, Callable[[], Any]] = {
        "launch (hand, same config)": lambda: launch(q, k, v, shape, causal=False, scale=scale, config=config),
        "attention()": lambda: attention(q, k, v),
        "custom op, eager": lambda: op(q, k, v, False, scale),
        "dispatch.plan only": lambda: dispatch.plan(q, k, v, False),
        "check_inputs only": lambda: check_inputs(q, k, v),
        "torch SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    equal = torch.equal(attention(q, k, v), launch(q, k, v, shape, causal=False, scale=scale, config=config)[0])
    for fn in ways.values():  # warm-up: compile, plan, allocator
        loop_times(fn, 200)
    return [{"way": name, "config": str(config), "calls": calls, "repeats": repeats, "bitwise_equal": equal, **stats}
            for name, stats in host_rounds(ways, calls, repeats).items()]


def grid(url: str | None, tokens: int, timer: Timer, seed: int) -> list[dict[str, Any]]:
    """Part (b): attention() vs the stored winner launched by hand over the 48-key grid."""
    from flashtune.db.store import StoreError, load_winners
    from flashtune.kernel import attention, dispatch
    from flashtune.kernel.ops.fwd import default_config
    from flashtune.kernel.device import device_arch, device_smem_limit
    from flashtune.kernel.checks import check_inputs
    from flashtune.kernel.ops.fwd import launch

    arch = device_arch(0)
    try:
        stored = {w.key: w for w in load_winners([arch], url)}
    except StoreError as exc:
        print(f"no stored winners ({exc}): comparing against the default configs", flush=True)
        stored = {}
    rows = []
    for n, d, dtype, causal in itertools.product((128, 256, 512, 1024, 2048, 4096), (64, 128),
                                                 ("float16", "bfloat16"), (False, True)):
        key = Key(arch, "fwd", n, d, dtype, causal)
        bh = max(1, tokens // n)
        heads = math.gcd(bh, 16)
        gen = torch.Generator(device="cuda").manual_seed(seed + n + d)
        q, k, v = (torch.randn(bh // heads, heads, n, d, device="cuda", dtype=DTYPES[dtype], generator=gen)
                   for _ in range(3))
        shape = check_inputs(q, k, v)
        winner = stored.get(key)
        config = winner.config if winner else default_config(arch, d, dtype, device_smem_limit(0))
        choice = dispatch.explain(q, k, v, is_causal=causal)
        scale = 1 / math.sqrt(d)

        def by_hand() -> torch.Tensor:
            return launch(q, k, v, shape, causal=causal, scale=scale, config=config)[0]

        def api() -> torch.Tensor:
            return attention(q, k, v, is_causal=causal)

        equal = torch.equal(api(), by_hand())
        a1, h1, a2, h2 = (timer(fn) for fn in (api, by_hand, api, by_hand))
        api_ms, hand_ms = (a1 + a2) / 2, (h1 + h2) / 2
        rows.append({
            "key": str(key), "batch": bh // heads, "heads": heads,
            "stored": str(winner.config) if winner else "", "used": str(choice.config),
            "source": choice.source, "same_config": choice.config == config, "bitwise_equal": equal,
            "attention_ms": api_ms, "launch_ms": hand_ms, "ratio": api_ms / hand_ms,
            "noise": abs(h1 - h2) / hand_ms, "stored_median_ms": winner.median_ms if winner else None,
        })
        print(f"  {key}: {api_ms:.4f} vs {hand_ms:.4f} ms", flush=True)
    return rows


def main() -> None:
    ap = arguments(__doc__, seed=True, timing=[HostLoop(calls=10_000, repeats=7),
                                               Budget(warmup=25, rep=100, rep_flags=("--rep-ms", "--rep"))])
    ap.add_argument("--db", default=None, help="database URL with the tuned winners (default: FLASHTUNE_DB or "
                                               "the per-user file)")
    ap.add_argument("--tokens", type=int, default=1 << 17, help="B*H*N of each grid input in part (b)")
    ap.add_argument("--skip-grid", action="store_true", help="only part (a)")
    args = ap.parse_args()
    require_gpu()
    out = out_dir(args.out)

    from flashtune.kernel import dispatch

    info = dispatch.reload(args.db) if args.db else dispatch.info()
    print(f"dispatcher: {info.message}", flush=True)
    over = overhead(args.calls, args.repeats, args.seed)
    write_csv(out / "dispatch_overhead.csv", over)
    rows = [] if args.skip_grid else grid(args.db, args.tokens, Timer.from_args(args), args.seed)
    write_csv(out / "dispatch_grid.csv", rows)
    by_way = {r["way"]: r for r in over}
    extra_us = by_way["attention()"]["host_us"] - by_way["launch (hand, same config)"]["host_us"]
    ratios = [r["ratio"] for r in rows]
    summary = {
        **provenance(), "load": info.message, "overhead_us": extra_us,
        "overhead_target_us": TARGET_US, "overhead_ok": extra_us <= TARGET_US, "overhead": over,
        "grid_keys": len(rows), "grid_with_winner": sum(bool(r["stored"]) for r in rows),
        "grid_same_config": all(r["same_config"] for r in rows),
        "grid_bitwise_equal": all(r["bitwise_equal"] for r in rows),
        "grid_ratio_median": statistics.median(ratios) if ratios else None,
        "grid_ratio_max": max(ratios) if ratios else None,
        "grid_noise_median": statistics.median(r["noise"] for r in rows) if rows else None,
        "grid": rows,
    }
    write_json(out / "dispatch_bench.json", summary)

    if rows:
        print_table(["key", "used", "src", "attn ms", "hand ms", "ratio", "noise"],
                    [[r["key"], r["used"], r["source"], f"{r['attention_ms']:.4f}", f"{r['launch_ms']:.4f}",
                      r["ratio"], r["noise"]] for r in rows], floats=".3f")
        print(f"grid: {len(rows)} keys, {summary['grid_with_winner']} with a stored winner; same config "
              f"{summary['grid_same_config']}, bitwise equal {summary['grid_bitwise_equal']}; attention/launch "
              f"median {summary['grid_ratio_median']:.3f}, max {summary['grid_ratio_max']:.3f} "
              f"(hand-vs-hand noise median {summary['grid_noise_median']:.3f})")
    print_table(["way (B=1 H=1 N=128 D=64 fp16)", "host us/call", "wall us/call"],
                [[r["way"], r["host_us"], r["wall_us"]] for r in over])
    print(f"attention() over launch: {extra_us:+.2f} us/call (target <= {TARGET_US} us): "
          f"{'PASS' if extra_us <= TARGET_US else 'FAIL'}")


if __name__ == "__main__":
    main()
