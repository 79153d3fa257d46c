"""Tune the backward, then time training attention with the tuned database (H200).

    python3 bench/bwd_tune_bench.py OUTDIR [--budget 270s] [--rep 100]

1. `tune --op bwd --seq 4096,8192 --head-dim 64,128 --dtype fp16 --both --batch-heads 32` into a fresh
   SQLite database OUTDIR/bwd_tune.db (a time budget keeps it under five minutes; the JSON summary goes
   to OUTDIR/bwd_tune.json and the log to the terminal).
2. In this process, with FLASHTUNE_DB pointing at that database, for each of the 8 keys' shapes (B=2,
   H=16: B·H = 32, the keys' bucket): `attention()` forward + backward (its backward is the op="bwd"
   winner: `explain(..., op="bwd")` is printed and checked to be the stored one), the backward alone,
   and the tuned backward config against the default one launched by hand (bwd alone); torch SDPA's
   flash and cuDNN backends timed the same ways in the same process; peak memory of one forward +
   backward above the inputs, each beside SDPA's; the worst relative gradient error of attention()
   against fp32 autograd (the tuner's own check, tuner.op_bwd).

Timing: triton.testing.do_bench's mean (ms; do_bench's default mode, which this script has always
used). TFLOP/s count the forward as 4·B·H·N²·D (half when causal), the backward as 2.5x that and
forward + backward as 3.5x. Writes OUTDIR/bwd_tune_bench.json; the table is printed last.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import Budget, Timer, arguments, out_dir, peak_extra_bytes, print_table, provenance, write_json

SEQS, HEAD_DIMS, BATCH, HEADS = (4096, 8192), (64, 128), 2, 16


def tune(out: Path, budget: str) -> dict[str, Any]:
    """Run `tune --op bwd` on the grid into OUTDIR/bwd_tune.db; its JSON summary."""
    db = out / "bwd_tune.db"
    if db.exists():
        db.unlink()  # a fresh database: every key tuned in this run
    cmd = [sys.executable, "-m", "flashtune.tuner.cli", "tune", "--op", "bwd", "--seq", ",".join(map(str, SEQS)),
           "--head-dim", ",".join(map(str, HEAD_DIMS)), "--dtype", "fp16", "--both", "--batch-heads", str(BATCH * HEADS),
           "--db", f"sqlite:///{db}", "--budget", budget, "--json"]
    print("$", " ".join(cmd), flush=True)
    started = time.monotonic()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"tune failed with exit code {done.returncode}")
    summary = json.loads(done.stdout)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    write_json(out / "bwd_tune.json", summary)
    return summary


def main() -> None:
    ap = arguments(__doc__, out="positional", seed=True, timing=[Budget(warmup=25, rep=100)])
    ap.add_argument("--budget", default="270s", help="tune's --budget")
    ap.add_argument("--skip-tune", action="store_true", help="time with OUTDIR/bwd_tune.db as it is")
    args = ap.parse_args()
    out_dir(args.out)
    tuned = None if args.skip_tune else tune(args.out, args.budget)
    os.environ["FLASHTUNE_DB"] = f"sqlite:///{args.out / 'bwd_tune.db'}"

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtune.kernel import attention, dispatch
    from flashtune.kernel.ops.bwd import launch_bwd
    from flashtune.kernel.ops.bwd import default_bwd_config
    from flashtune.kernel.device import device_arch, device_smem_limit
    from flashtune.kernel.ops.fwd import attention_fwd
    from flashtune.kernel.checks import check_inputs
    from flashtune.kernel.testing import attention_flops, tflops
    from flashtune.tuner.ops.bwd import fp32_gradients, gradient_errors

    timer = Timer.from_args(args, mode="mean")

    arch, smem = device_arch(0), device_smem_limit(0)
    print(f"\n{torch.cuda.get_device_name(0)} ({arch}); database: {dispatch.info().message}", flush=True)
    rows: list[dict[str, Any]] = []
    for d in HEAD_DIMS:
        for n in SEQS:
            for causal in (False, True):
                gen = torch.Generator(device="cuda").manual_seed(args.seed)
                q, k, v, do = (torch.randn(BATCH, HEADS, n, d, generator=gen, device="cuda", dtype=torch.float16)
                               for _ in range(4))
                fwd = attention_flops(BATCH * HEADS, n, n, d, causal)
                choice = dispatch.explain(q, k, v, causal, op="bwd")
                row: dict[str, Any] = {"N": n, "D": d, "causal": causal, "bwd_config": str(choice.config),
                                       "bwd_source": choice.source, "bwd_reason": choice.reason}
                print(f"N={n} D={d} causal={causal}: backward {choice}", flush=True)
                leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]

                def ft_both() -> Any:
                    attention(*leaves, is_causal=causal).backward(do)

                out = attention(*leaves, is_causal=causal)
                ft_bwd = lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)  # noqa: E731
                row["ft_ms"], row["ft_bwd_ms"] = timer(ft_both, leaves), timer(ft_bwd)
                grads = torch.autograd.grad(out, leaves, do)
                del out
                row["ft_peak"] = peak_extra_bytes(ft_both, True)
                for x in leaves:
                    x.grad = None
                row["ft_err"] = max(gradient_errors(grads, fp32_gradients(q, k, v, do, causal, d ** -0.5)))
                del grads
                # The tuned backward config against the default, launched by hand on the same O and LSE.
                shape = check_inputs(q, k, v)
                o, lse = attention_fwd(q, k, v, causal=causal, return_lse=True)
                default = default_bwd_config(arch, d, "float16", smem)
                for name, config in (("tuned", choice.config), ("default", default)):
                    row[f"{name}_bwd_ms"] = timer(lambda c=config: launch_bwd(
                        do, q, k, v, o, lse, shape, causal=causal, scale=d ** -0.5, config=c, deterministic=False))
                row["default_bwd_config"] = str(default)
                for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(backend):
                            sl = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]

                            def sd_both(sl: list = sl) -> Any:
                                torch.nn.functional.scaled_dot_product_attention(*sl, is_causal=causal).backward(do)

                            so = torch.nn.functional.scaled_dot_product_attention(*sl, is_causal=causal)
                            row[f"{name}_ms"] = timer(sd_both, sl)
                            row[f"{name}_bwd_ms"] = timer(lambda: torch.autograd.grad(so, sl, do, retain_graph=True))
                            del so
                            row[f"{name}_peak"] = peak_extra_bytes(sd_both, True)
                    except RuntimeError as error:
                        row[f"{name}_error"] = str(error).splitlines()[0]
                        print(f"  SDPA {name} unavailable: {row[f'{name}_error']}", flush=True)
                for prefix in ("ft", "flash", "cudnn", "tuned", "default"):
                    if f"{prefix}_ms" in row:
                        row[f"{prefix}_tflops"] = tflops(3.5 * fwd, row[f"{prefix}_ms"])
                    if f"{prefix}_bwd_ms" in row:
                        row[f"{prefix}_bwd_tflops"] = tflops(2.5 * fwd, row[f"{prefix}_bwd_ms"])
                rows.append(row)
                del leaves, o, lse
                torch.cuda.empty_cache()

    result = {**provenance(), "tune": tuned, "rows": rows,
              "flops": "fwd 4*B*H*N^2*D (half causal); bwd 2.5x; fwd+bwd 3.5x"}
    write_json(args.out / "bwd_tune_bench.json", result)

    if tuned is not None:
        print(f"\ntune: status {tuned['status']}, {len(tuned['keys'])} of {tuned['keys_planned']} keys, "
              f"{tuned['wall_s']} s; geomean tuned/default (bwd) {tuned['geomean_speedup']}")

    def ratio(r: dict[str, Any], a: str, b: str) -> str | None:
        return f"{r[a] / r[b]:.2f}" if r.get(a) and r.get(b) else None

    def mib(r: dict[str, Any], name: str) -> int | None:
        return round(r[name] / 2**20) if r.get(name) is not None else None

    print_table(
        ["N", "D", "causal", "bwd src", "fwd+bwd", "flash", "cudnn", "x flash", "x cudnn", "bwd", "flash bwd",
         "cudnn bwd", "tuned/default bwd", "peak MiB", "flash MiB", "cudnn MiB", "grad err"],
        [[r["N"], r["D"], "yes" if r["causal"] else "no", r["bwd_source"], r.get("ft_tflops"),
          r.get("flash_tflops"), r.get("cudnn_tflops"), ratio(r, "ft_tflops", "flash_tflops"),
          ratio(r, "ft_tflops", "cudnn_tflops"), r.get("ft_bwd_tflops"), r.get("flash_bwd_tflops"),
          r.get("cudnn_bwd_tflops"), ratio(r, "default_bwd_ms", "tuned_bwd_ms"), mib(r, "ft_peak"),
          mib(r, "flash_peak"), mib(r, "cudnn_peak"), f"{r['ft_err']:.1e}"] for r in rows],
        title="TFLOP/s (fwd+bwd = 3.5x, bwd = 2.5x the forward's FLOPs); peak memory above the inputs", floats=".0f")


if __name__ == "__main__":
    main()
