"""The hold-out: realistic shapes outside the main tuning grid, recorded and tuned the way a user would.

    FLASHTUNE_DB=sqlite:///h.db python bench/holdout.py record          # FLASHTUNE_RECORD=1 set inside
    FLASHTUNE_DB=sqlite:///h.db tune --recorded                         # tunes exactly those keys
    FLASHTUNE_DB=sqlite:///h.db python bench/holdout.py report --out bench/results/h200

`report` times, per shape and in one process: `attention()` (the dispatcher's choice: the tuned kernel
config or an SDPA backend), the kernel with its default config, the kernel with the tuned kernel
config (the winner's kernel fallback when an SDPA backend won), and torch SDPA's flash, cuDNN and
efficient backends. It prints tuned/default and attention()/best-SDPA per shape and writes JSON.
`--smoke` runs tiny shapes on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from common import Budget, Timer, arguments, out_dir, print_table, use_interpreter, write_json


@dataclass(frozen=True)
class Shape:
    """One hold-out call: q (B, Hq, N, D), k/v (B, Hkv, N, D)."""

    name: str
    batch: int
    heads_q: int
    heads_kv: int
    seq_len: int
    head_dim: int
    dtype: str
    causal: bool

    @property
    def flops(self) -> float:
        from flashtune.kernel.testing import attention_flops

        return attention_flops(self.batch * self.heads_q, self.seq_len, self.seq_len, self.head_dim, self.causal)


def _s(name: str, b: int, hq: int, hkv: int, n: int, d: int, dtype: str, causal: bool) -> Shape:
    return Shape(name, b, hq, hkv, n, d, dtype, causal)


# Realistic shapes, none of them a key of the main grid (tune --seq 128..4096 ...) at its default buckets.
SHAPES: tuple[Shape, ...] = (
    _s("train 16k tok", 4, 16, 16, 4096, 128, "float16", True),
    _s("train 16k tok", 4, 16, 16, 4096, 128, "bfloat16", True),
    _s("train 16k tok", 8, 32, 32, 2048, 64, "bfloat16", True),
    _s("train 16k tok", 2, 32, 32, 8192, 128, "bfloat16", True),
    _s("train 16k tok D64", 4, 32, 32, 4096, 64, "float16", True),
    _s("prefill GQA", 1, 32, 8, 1024, 128, "bfloat16", True),
    _s("prefill GQA", 1, 32, 8, 2048, 128, "bfloat16", True),
    _s("prefill GQA", 1, 32, 8, 4096, 128, "bfloat16", True),
    _s("prefill GQA", 1, 32, 8, 8192, 128, "bfloat16", True),
    _s("prefill GQA", 1, 32, 8, 16384, 128, "bfloat16", True),
    _s("prefill GQA", 1, 32, 8, 32768, 128, "bfloat16", True),
    _s("prefill GQA odd N", 1, 32, 8, 3000, 128, "bfloat16", True),
    _s("prefill GQA odd N", 1, 32, 8, 1500, 128, "float16", True),
    _s("prefill GQA 64:8", 1, 64, 8, 8192, 128, "float16", True),
    _s("batch prefill GQA", 4, 32, 8, 2048, 128, "bfloat16", True),
    _s("batch prefill GQA", 16, 32, 8, 512, 128, "bfloat16", True),
    _s("encoder", 16, 16, 16, 512, 64, "float16", False),
    _s("BERT batch", 64, 12, 12, 256, 64, "float16", False),
    _s("encoder long", 32, 16, 16, 1024, 64, "float16", False),
    _s("one seq D64", 1, 16, 16, 4096, 64, "float16", False),
    _s("ViT", 8, 12, 12, 197, 64, "float16", False),
    _s("ViT-L", 32, 16, 16, 257, 64, "bfloat16", False),
    _s("full D128", 2, 16, 16, 4096, 128, "float16", False),
    _s("full D128", 8, 8, 8, 1024, 128, "bfloat16", False),
    _s("one seq D64 causal", 1, 32, 32, 8192, 64, "bfloat16", True),
    _s("small batch causal", 2, 16, 16, 1024, 64, "float16", True),
)
SMOKE: tuple[Shape, ...] = (
    _s("smoke", 1, 2, 2, 48, 16, "float32", True),
    _s("smoke GQA", 2, 4, 2, 40, 16, "float32", False),
)


def _inputs(shape: Shape, device: str, seed: int):
    import torch

    dtype = getattr(torch, shape.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(h: int):
        return torch.randn(shape.batch, h, shape.seq_len, shape.head_dim, generator=gen, device=device,
                           dtype=dtype)

    return draw(shape.heads_q), draw(shape.heads_kv), draw(shape.heads_kv)


def record(shapes: tuple[Shape, ...], device: str, seed: int = 0) -> None:
    """Run each shape through attention() a few times with recording on, then flush."""
    os.environ["FLASHTUNE_RECORD"] = "1"
    import torch

    from flashtune.kernel import attention, record as rec

    for i, shape in enumerate(shapes):
        q, k, v = _inputs(shape, device, seed + i)
        with torch.no_grad():
            for _ in range(3 if device == "cuda" else 1):
                attention(q, k, v, is_causal=shape.causal, enable_gqa=shape.heads_q != shape.heads_kv)
    written = rec.flush()
    print(f"recorded {written} key(s) from {len(shapes)} shape(s)")


def report(shapes: tuple[Shape, ...], device: str, out: Path, timer: Timer, seed: int = 0) -> list[dict]:
    """Time attention(), the default and tuned kernel configs and SDPA's backends per shape."""
    import torch

    from flashtune.kernel import attention, dispatch
    from flashtune.kernel.ops.fwd import default_config
    from flashtune.kernel.device import device_arch, device_smem_limit
    from flashtune.kernel.ops.fwd import attention_fwd
    from flashtune.kernel.testing import fp32_reference, output_errors, tflops
    from flashtune.kernel.sdpa import available_providers, is_refusal, run_sdpa

    rows = []
    for i, shape in enumerate(shapes):
        q, k, v = _inputs(shape, device, seed + 1000 + i)
        gqa = shape.heads_q != shape.heads_kv
        choice = dispatch.explain(q, k, v, is_causal=shape.causal)
        kernel_choice = dispatch.explain(q, k, v, is_causal=shape.causal, kernel_only=True)
        if device == "cuda":
            default = default_config(device_arch(q.device), shape.head_dim, shape.dtype, device_smem_limit(q.device))
        else:
            default = default_config("sm_80", shape.head_dim, shape.dtype)
        ref = fp32_reference(q, k.repeat_interleave(shape.heads_q // shape.heads_kv, 1),
                             v.repeat_interleave(shape.heads_q // shape.heads_kv, 1), shape.causal)
        fns = {
            "attention": lambda: attention(q, k, v, is_causal=shape.causal, enable_gqa=gqa),
            "kernel_default": lambda: attention_fwd(q, k, v, causal=shape.causal, config=default),
            "kernel_tuned": lambda: attention_fwd(q, k, v, causal=shape.causal, config=kernel_choice.config),
        }
        if device == "cuda":
            for provider in available_providers():
                fns[provider] = lambda p=provider: run_sdpa(p, q, k, v, causal=shape.causal, scale=None)
        times: dict[str, float | None] = {}
        errors: dict[str, float] = {}
        with torch.no_grad():
            for name, fn in fns.items():
                try:
                    errors[name] = output_errors(fn(), ref)[1]
                    times[name] = timer(fn)
                except Exception as exc:  # noqa: BLE001 - a refused backend is a row, not the end
                    times[name] = None
                    if not is_refusal(exc):
                        print(f"  {shape.name}: {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
        sdpa = [t for p, t in times.items() if p.startswith("sdpa_") and t]
        best_sdpa = min(sdpa) if sdpa else None
        row = {**asdict(shape), "choice": str(choice.config), "source": choice.source,
               "kernel_config": str(kernel_choice.config), "default": str(default), "times_ms": times,
               "rel_err": errors,
               "tflops_attention": tflops(shape.flops, times["attention"]) if times["attention"] else None,
               "tuned_over_default": (times["kernel_default"] / times["kernel_tuned"]
                                      if times["kernel_default"] and times["kernel_tuned"] else None),
               "attention_over_default": (times["kernel_default"] / times["attention"]
                                          if times["kernel_default"] and times["attention"] else None),
               "attention_over_best_sdpa": (best_sdpa / times["attention"]
                                            if best_sdpa and times["attention"] else None)}
        rows.append(row)
        print(f"[{i + 1}/{len(shapes)}] {shape.name} B={shape.batch} H={shape.heads_q}/{shape.heads_kv} "
              f"N={shape.seq_len} D={shape.head_dim} {shape.dtype} {'causal' if shape.causal else 'full'}: "
              f"{choice.config} ({choice.source})", flush=True)
    write_json(out_dir(out) / "holdout_report.json", rows)
    _table(rows)
    return rows


def _table(rows: list[dict]) -> None:
    print_table(
        ["shape", "B", "Hq/Hkv", "N", "D", "dtype", "c", "choice", "TFLOP/s", "tuned/def", "attn/def", "attn/SDPA"],
        [[r["name"], r["batch"], f"{r['heads_q']}/{r['heads_kv']}", r["seq_len"], r["head_dim"], r["dtype"],
          "y" if r["causal"] else "n", r["choice"][:34],
          None if r["tflops_attention"] is None else round(r["tflops_attention"]), r["tuned_over_default"],
          r["attention_over_default"], r["attention_over_best_sdpa"]] for r in rows], floats=".3f")
    for field in ("tuned_over_default", "attention_over_default", "attention_over_best_sdpa"):
        values = [r[field] for r in rows if r[field]]
        if values:
            geo = math.exp(sum(map(math.log, values)) / len(values))
            print(f"{field}: min {min(values):.3f}, geomean {geo:.3f}, max {max(values):.3f} over {len(values)}")


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__, out="optional", out_help="report: results directory, e.g. bench/results/h200",
                   smoke="tiny shapes on the CPU under TRITON_INTERPRET=1", seed=True,
                   timing=[Budget(warmup=25, rep=100)])
    ap.add_argument("step", choices=("record", "report"))
    args = ap.parse_args(argv)
    if args.step == "report" and args.out is None:
        ap.error("report needs --out DIR (one folder per GPU model, e.g. bench/results/h200)")
    use_interpreter(args.smoke, even_with_gpu=True)  # the smoke shapes run on the CPU
    shapes = SMOKE if args.smoke else SHAPES
    device = "cpu" if args.smoke else "cuda"
    if args.step == "record":
        record(shapes, device, args.seed)
    else:
        report(shapes, device, args.out, Timer.from_args(args, cuda=device == "cuda"), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
