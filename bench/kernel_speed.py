"""Time every op's kernels through their explicit-config launches, at fixed shapes and configs, and compare runs.

A refactor that must not change the kernels' speed runs this once per tree, in alternating processes of one GPU
session, then `--compare` prints each case's time ratio and the spread of repeated runs of one tree:

    python bench/kernel_speed.py --out DIR --tag new       # the installed flashtune
    PYTHONPATH=/tmp/old_site:$PYTHONPATH python bench/kernel_speed.py --out DIR --tag old
    python bench/kernel_speed.py --out DIR --compare old new

The cases: the pointer and TMA forwards (D=128 and 64, causal and not), the backward, and split-KV decode,
bf16, with the configs the tuner found on the H200. Times are do_bench medians (L2 flushed between runs).
"""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Budget, Timer, arguments, explicit_api, print_table, provenance, read_json,  # noqa: E402
                    require_gpu, write_json)


def cases() -> Iterator[tuple[str, float, Callable[[], Any]]]:
    """(name, FLOPs or bytes of one call, the call) for each timed case, inputs drawn once."""
    import torch

    api = explicit_api()
    Config = api["Config"]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    for d, (b, h, n) in ((128, (4, 16, 4096)), (64, (4, 32, 4096))):
        q, k, v = draw(b, h, n, d), draw(b, h, n, d), draw(b, h, n, d)
        for causal in (False, True):
            flops = 4.0 * b * h * n * n * d / (2 if causal else 1)
            for config in (Config(128, 64, 8, 3), Config(128, 128, 8, 2, {"loads": "tma"}),
                           Config(128, 128, 4, 2, {"loads": "tma", "ws": True, "schedule": "persistent"})):
                if causal and config.extra_dict.get("ws"):
                    continue  # warp specialisation miscompiles causal masking on Triton 3.6
                yield (f"fwd d{d} {'causal' if causal else 'full'} {config}", flops,
                       lambda q=q, k=k, v=v, c=config, causal=causal: api["fwd"](q, k, v, causal=causal, config=c))
            o, lse = api["fwd"](q, k, v, causal=causal, config=Config(128, 64, 8, 3), return_lse=True)
            do = draw(b, h, n, d)
            bwd = Config(64, 128, 8, 2, {"block_m_dq": 64, "block_n_dq": 64}) if d == 64 else \
                Config(32, 128, 8, 2, {"block_m_dq": 64, "block_n_dq": 64})
            yield (f"bwd d{d} {'causal' if causal else 'full'} {bwd}", 2.5 * flops,
                   lambda q=q, k=k, v=v, o=o, lse=lse, do=do, c=bwd, causal=causal: api["bwd"](
                       do, q, k, v, o, lse, causal=causal, scale=None, config=c))
    for batch, nk in ((8, 32768), (64, 2048)):
        q, kc, vc = draw(batch, 32, 1, 128), draw(batch, 8, nk, 128), draw(batch, 8, nk, 128)
        nbytes = 2.0 * (kc.numel() + vc.numel() + 2 * q.numel())
        config = Config(16, 64, 4, 2, {"num_splits": max(1, nk // 2048)})
        yield (f"kvcache B={batch} Nk={nk} {config}", nbytes,
               lambda q=q, kc=kc, vc=vc, c=config: api["kvcache"](q, kc, vc, causal=True, config=c))


def measure(timer: Timer, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, work, fn in cases():
        fn()
        times = [timer(fn) for _ in range(repeats)]
        ms = statistics.median(times)
        rate = work / (ms * 1e-3) / 1e12
        rows.append({"case": name, "ms": ms, "runs_ms": times, "rate": rate,
                     "unit": "TB/s" if name.startswith("kvcache") else "TFLOP/s"})
    return rows


def compare(out: Path, tags: list[str]) -> int:
    runs = {tag: [read_json(p)["rows"] for p in sorted(out.glob(f"kernel_speed_{tag}_*.json"))] for tag in tags}
    old, new = tags
    table = []
    ratios = []
    for i, row in enumerate(runs[new][0]):
        old_ms = [r[i]["ms"] for r in runs[old]]
        new_ms = [r[i]["ms"] for r in runs[new]]
        ratio = statistics.median(old_ms) / statistics.median(new_ms)
        ratios.append(ratio)
        spread = max(old_ms + new_ms) / min(old_ms + new_ms)
        table.append([row["case"], f"{statistics.median(new_ms):.4f}", f"{statistics.median(old_ms):.4f}",
                      f"{ratio:.3f}", f"{spread:.3f}", f"{row['rate']:.1f} {row['unit']}"])
    geo = math.exp(statistics.mean(math.log(r) for r in ratios))
    write_json(out / "kernel_speed_compare.json", {"tags": tags, "geomean_old_over_new": geo,
                                                   "rows": [dict(zip(("case", "new_ms", "old_ms", "old/new",
                                                                      "max/min of all runs", "rate"), t))
                                                            for t in table]})
    print_table(["case", f"{new} ms", f"{old} ms", f"{old}/{new}", "spread", f"{new} rate"], table,
                title=f"{len(table)} cases, geomean {old}/{new} {geo:.3f} (1.0: the same speed)")
    return 0


def main() -> int:
    parser = arguments(__doc__, timing=[Budget(25, 100)])
    parser.add_argument("--tag", default="new", help="name of this tree's run (files kernel_speed_TAG_N.json)")
    parser.add_argument("--repeats", type=int, default=3, help="do_bench runs of each case (median kept)")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare the runs of two tags")
    args = parser.parse_args()
    if args.compare:
        return compare(args.out, list(args.compare))
    require_gpu()
    rows = measure(Timer.from_args(args), args.repeats)
    n = len(list(args.out.glob(f"kernel_speed_{args.tag}_*.json")))
    write_json(args.out / f"kernel_speed_{args.tag}_{n}.json", {"provenance": provenance(), "rows": rows})
    print(f"{args.tag}: {len(rows)} cases, " + ", ".join(f"{r['rate']:.0f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
