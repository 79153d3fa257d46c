"""The hold-out: realistic shapes outside the main tuning grid, recorded and tuned the way a user would.

    mkdir -p bench/results/h100/holdout && export FLASHTUNE_DB=sqlite:///bench/results/h100/holdout/holdout.db
    python3 bench/holdout.py record                                   # FLASHTUNE_RECORD=1 set inside
    tune --recorded --op fwd,train,kvcache --budget 240s --json > bench/results/h100/holdout/tune_recorded.json
    python3 bench/holdout.py report --out bench/results/h100/holdout

or all three in one command: `bash bench/h200_holdout.sh bench/results/h100/holdout 240s` (any GPU; about
1-2 minutes of recording and compiling, the budget, then 1-2 minutes of report: keep it under a 10-minute
limit, or run the report as its own command). `--kinds fwd,train,decode` picks the parts (the same for
record and report).

Three kinds of call, each against every torch SDPA backend pinned (cuDNN, flash, efficient; a backend that
refuses the inputs is a '-'), in one process:

- `fwd`, inference: `attention()` (what the dispatcher picked: a tuned kernel config or an SDPA backend),
  also the kernel with its default and with its tuned config;
- `train`, forward + backward with a random dO: `attention()` under autograd (its backward: the fused
  backward kernel, or the winning backend's own) against each backend under autograd;
- `decode`, one query per sequence against a KV cache: `attention_kvcache(causal=True, check_lengths=False)`
  against `F.scaled_dot_product_attention(enable_gqa=True)` on the same cache, pinned to each backend and
  unpinned ("sdpa_auto", torch's own pick), each shape twice: every sequence at the cache's full length, and
  with per-sequence lengths (`cache_seqlens`; SDPA gets the equivalent boolean mask).

Head dims 40 to 256, GQA groups 1 to 8, batches 1 to 128; none of the shapes is a test's or a key of the main
grid. (FlexAttention is not timed.) `report` prints per shape attention()/best-SDPA (best SDPA time / attention()
time: above 1, attention() is faster) and what attention() ran, then the count of shapes at >= 0.98, and writes
<out>/holdout_report.json. `--smoke` runs tiny shapes on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    Budget,
    Timer,
    arguments,
    out_dir,
    print_table,
    str_list,
    use_interpreter,
    write_json,
)

KINDS = ("fwd", "train", "decode")


@dataclass(frozen=True)
class Shape:
    """One hold-out call: q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D); decode: Nq = 1 against a cache of Nk."""

    name: str
    kind: str  # "fwd", "train" or "decode"
    batch: int
    heads_q: int
    heads_kv: int
    seq_len: int  # Nq (decode: 1)
    seq_len_kv: int
    head_dim: int
    dtype: str
    causal: bool
    lengths: bool = False  # decode: per-sequence cache lengths

    @property
    def flops(self) -> float:
        from flashtune.kernel.testing import attention_flops

        causal = self.causal and self.kind != "decode"
        flops = attention_flops(self.batch * self.heads_q, self.seq_len, self.seq_len_kv, self.head_dim, causal)
        return flops * 3.5 if self.kind == "train" else flops  # the backward: 2.5 forwards' FLOPs


def _f(name: str, b: int, hq: int, hkv: int, n: int, d: int, dtype: str, causal: bool) -> Shape:
    return Shape(name, "fwd", b, hq, hkv, n, n, d, dtype, causal)


def _t(name: str, b: int, hq: int, hkv: int, n: int, d: int, dtype: str, causal: bool) -> Shape:
    return Shape(name, "train", b, hq, hkv, n, n, d, dtype, causal)


def _d(name: str, b: int, hq: int, hkv: int, nk: int, d: int, dtype: str) -> tuple[Shape, Shape]:
    return (Shape(name, "decode", b, hq, hkv, 1, nk, d, dtype, True),
            Shape(name, "decode", b, hq, hkv, 1, nk, d, dtype, True, lengths=True))


# Realistic shapes; none is a key of the main grid (tune --seq 128..4096 --head-dim 64,128 --batch-heads
# 16,64,256 --group 1) or a shape of the test suite.
SHAPES: tuple[Shape, ...] = (
    _f("prefill GQA 32/8", 1, 32, 8, 3000, 128, "bfloat16", True),
    _f("prefill GQA 16/2", 4, 16, 2, 1536, 128, "bfloat16", True),
    _f("prefill GQA 32/4", 8, 32, 4, 700, 128, "bfloat16", True),
    _f("prefill MQA D256", 1, 8, 1, 2500, 256, "bfloat16", True),
    _f("prefill D96 24/12", 2, 24, 12, 1800, 96, "float16", True),
    _f("long prefill D64", 1, 32, 32, 6000, 64, "bfloat16", True),
    _f("encoder D64", 48, 12, 12, 384, 64, "float16", False),
    _f("ViT-S B128", 128, 6, 6, 197, 64, "float16", False),
    _f("encoder D80", 16, 20, 20, 1024, 80, "bfloat16", False),
    _f("UNet D40", 8, 8, 8, 4096, 40, "float16", False),
    _t("train GQA 16/4", 4, 16, 4, 1536, 128, "bfloat16", True),
    _t("train D64", 8, 16, 16, 1000, 64, "bfloat16", True),
    _t("train D80", 2, 32, 32, 2500, 80, "bfloat16", True),
    _t("train D96 24/12", 4, 24, 12, 1200, 96, "float16", True),
    _t("train MQA D256", 2, 8, 1, 1024, 256, "bfloat16", True),
    _t("train encoder D64", 32, 12, 12, 384, 64, "float16", False),
    _t("train ViT D64", 64, 12, 12, 197, 64, "bfloat16", False),
    _t("train UNet D40", 2, 8, 8, 4096, 40, "float16", False),
    *_d("decode GQA 32/4", 32, 32, 4, 3000, 128, "bfloat16"),
    *_d("decode MQA D256", 16, 8, 1, 5000, 256, "bfloat16"),
    *_d("decode D64 B128", 128, 12, 12, 700, 64, "float16"),
    *_d("decode GQA 32/8 B1", 1, 32, 8, 20000, 128, "bfloat16"),
    *_d("decode D96 24/12", 8, 24, 12, 2200, 96, "float16"),
)
SMOKE: tuple[Shape, ...] = (
    _f("smoke", 1, 2, 2, 48, 16, "float32", True),
    _f("smoke GQA", 2, 4, 2, 40, 24, "float32", False),
    _t("smoke train GQA", 1, 4, 2, 24, 16, "float32", True),
    *_d("smoke decode GQA", 3, 4, 1, 40, 16, "float32"),
)


def _inputs(shape: Shape, device: str, seed: int) -> tuple[Any, Any, Any]:
    import torch

    dtype = getattr(torch, shape.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(h: int, n: int) -> Any:
        return torch.randn(shape.batch, h, n, shape.head_dim, generator=gen, device=device, dtype=dtype)

    return draw(shape.heads_q, shape.seq_len), draw(shape.heads_kv, shape.seq_len_kv), draw(shape.heads_kv,
                                                                                          shape.seq_len_kv)


def _lengths(shape: Shape, device: str, seed: int) -> Any:
    """int32 (B,) cache lengths, uniform in [Nk/2, Nk] (None for a full cache)."""
    import torch

    if not shape.lengths:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed + 7)
    low = max(1, shape.seq_len_kv // 2)
    return torch.randint(low, shape.seq_len_kv + 1, (shape.batch,), generator=gen, dtype=torch.int32).to(device)


def _selected(shapes: tuple[Shape, ...], kinds: list[str]) -> tuple[Shape, ...]:
    return tuple(s for s in shapes if s.kind in kinds)


def record(shapes: tuple[Shape, ...], device: str, seed: int = 0) -> None:
    """Run each shape the way it is timed (decode through attention_kvcache, training under autograd, its
    backward included) with recording on, then flush: forward, training-pair and KV-cache keys."""
    os.environ["FLASHTUNE_RECORD"] = "1"
    import torch
    from flashtune.kernel import attention, attention_kvcache
    from flashtune.kernel import record as rec

    rec.ENABLED = True  # the module may have been imported before the variable was set
    for i, shape in enumerate(shapes):
        q, k, v = _inputs(shape, device, seed + i)
        gqa = shape.heads_q != shape.heads_kv
        try:
            for _ in range(3 if device == "cuda" else 1):
                if shape.kind == "decode":
                    attention_kvcache(q, k, v, cache_seqlens=_lengths(shape, device, seed + i), causal=True)
                elif shape.kind == "train":
                    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
                    attention(q, k, v, is_causal=shape.causal, enable_gqa=gqa).backward(torch.randn_like(q))
                else:
                    with torch.no_grad():
                        attention(q, k, v, is_causal=shape.causal, enable_gqa=gqa)
        except Exception as exc:  # noqa: BLE001 - one shape that fails leaves the others recorded
            print(f"  {_label(shape)}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    written = rec.flush()
    print(f"recorded {written} key(s) from {len(shapes)} shape(s)")


# --- what each shape times ---------------------------------------------------------------------------

def _reference(shape: Shape, q: Any, k: Any, v: Any, lengths: Any) -> Any:
    """fp32 attention by SDPA's math backend (decode: per sequence over its own keys)."""
    import torch
    from flashtune.kernel.testing import fp32_reference

    group = shape.heads_q // shape.heads_kv
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if shape.kind != "decode":
        return fp32_reference(q, k, v, shape.causal)
    if lengths is None:
        return fp32_reference(q, k, v, False)  # one query per sequence sees every key
    ends = lengths.tolist()
    return torch.cat([fp32_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], False)
                      for b, n in enumerate(ends)])


def _sdpa_call(provider: str | None, q: Any, k: Any, v: Any, causal: bool, mask: Any = None) -> Any:
    """F.scaled_dot_product_attention(enable_gqa where Hq != Hkv), pinned to `provider`'s backend (None: unpinned)."""
    import contextlib

    import torch.nn.functional as F
    from flashtune.kernel.providers import SDPA_BACKENDS
    from flashtune.kernel.sdpa import available_providers
    from torch.nn.attention import sdpa_kernel

    extra = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    pin = contextlib.nullcontext()
    if provider is not None and provider in available_providers():
        from torch.nn.attention import SDPBackend

        pin = sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[provider]))
    with pin:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **extra)


def _fwd_fns(shape: Shape, q: Any, k: Any, v: Any, device: str) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    from flashtune.kernel import attention, dispatch
    from flashtune.kernel.device import device_arch, device_smem_limit
    from flashtune.kernel.ops.fwd import attention_fwd, default_config
    from flashtune.kernel.sdpa import available_providers

    gqa = shape.heads_q != shape.heads_kv
    kernel_choice = dispatch.explain(q, k, v, is_causal=shape.causal, kernel_only=True)
    if device == "cuda":
        default = default_config(device_arch(q.device), shape.head_dim, shape.dtype, device_smem_limit(q.device))
    else:
        default = default_config("sm_80", shape.head_dim, shape.dtype)
    fns = {"attention": lambda: attention(q, k, v, is_causal=shape.causal, enable_gqa=gqa),
           "kernel_default": lambda: attention_fwd(q, k, v, causal=shape.causal, config=default),
           "kernel_tuned": lambda: attention_fwd(q, k, v, causal=shape.causal, config=kernel_choice.config)}
    for provider in available_providers():  # on the CPU these mostly refuse: the path still runs
        fns[provider] = lambda p=provider: _sdpa_call(p, q, k, v, shape.causal)
    return fns, {"kernel_config": str(kernel_choice.config), "default": str(default)}


def _train_fns(shape: Shape, q: Any, k: Any, v: Any) -> dict[str, Callable[[], Any]]:
    """Forward + backward with one fixed random dO; each fn returns the forward's output (detached)."""
    import torch
    from flashtune.kernel import attention
    from flashtune.kernel.sdpa import available_providers

    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    grad = torch.randn_like(q)
    gqa = shape.heads_q != shape.heads_kv

    def step(forward: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            q.grad = k.grad = v.grad = None
            out = forward()
            out.backward(grad)
            return out.detach()
        return run

    fns = {"attention": step(lambda: attention(q, k, v, is_causal=shape.causal, enable_gqa=gqa))}
    for provider in available_providers():
        fns[provider] = step(lambda p=provider: _sdpa_call(p, q, k, v, shape.causal))
    return fns


def _decode_fns(shape: Shape, q: Any, k: Any, v: Any, lengths: Any) -> dict[str, Callable[[], Any]]:
    import torch
    from flashtune.kernel import attention_kvcache
    from flashtune.kernel.sdpa import available_providers

    mask = None
    if lengths is not None:  # what cache_seqlens means, as SDPA's boolean mask (B, 1, 1, Nk)
        mask = (torch.arange(shape.seq_len_kv, device=q.device) < lengths[:, None].long())[:, None, None, :]
    # check_lengths=False: a serving loop keeps its own lengths (reading them back is a sync per call)
    fns = {"attention": lambda: attention_kvcache(q, k, v, cache_seqlens=lengths, causal=True, check_lengths=False)}
    for provider in (*available_providers(), "sdpa_auto"):
        pinned = None if provider == "sdpa_auto" else provider
        # Nq = 1: the query sees every (valid) key; SDPA's is_causal would align top-left instead
        fns[provider] = lambda p=pinned: _sdpa_call(p, q, k, v, False, mask)
    return fns


def _ran(shape: Shape, q: Any, k: Any, v: Any) -> dict[str, str]:
    """What attention() ran for the call: the plan's SDPA backend or kernel config, and the choice's source
    (train: the backward's too, where the kernel ran the forward; decode: attention_kvcache's config)."""
    from flashtune.kernel import dispatch
    from flashtune.kernel.providers import KERNEL

    if shape.kind == "decode":
        # An SDPA winner runs only calls it computes the same (no lengths); the others run the kernel config
        # stored beside it.
        plan = dispatch.kvcache_plan(q, k, v, True, shape.lengths)
        choice = plan.choice
        config = choice.kernel_config if choice.provider != KERNEL and choice.kernel_config else choice.config
        return {"ran": plan.sdpa or f"kernel {config}", "source": choice.source}
    if shape.kind == "train":  # the training pair's plan (its key "train"), after the calls
        plan = dispatch.train_plan(q, k, v, shape.causal)
        ran = plan.sdpa or f"kernel {plan.kernel}"
        if plan.sdpa is None:
            bwd = plan.bwd or dispatch.explain(q, k, v, is_causal=shape.causal, op="bwd").config
            ran += f"; bwd {bwd}"
        return {"ran": ran, "source": plan.choice.source}
    plan = dispatch.plan(q, k, v, shape.causal)  # after the calls: a backend's refusal shows here
    return {"ran": plan.sdpa or f"kernel {plan.kernel}", "source": plan.choice.source}


def report(shapes: tuple[Shape, ...], device: str, out: Path, timer: Timer, seed: int = 0) -> list[dict]:
    """Time attention() against SDPA's backends (and for fwd the kernel's default and tuned configs) per shape."""
    import torch
    from flashtune.kernel.sdpa import is_refusal
    from flashtune.kernel.testing import output_errors, tflops

    rows = []
    for i, shape in enumerate(shapes):
        q, k, v = _inputs(shape, device, seed + 1000 + i)
        lengths = _lengths(shape, device, seed + 1000 + i)
        extra: dict[str, Any] = {}
        if shape.kind == "fwd":
            fns, extra = _fwd_fns(shape, q, k, v, device)
        elif shape.kind == "train":
            fns = _train_fns(shape, q, k, v)
        else:
            fns = _decode_fns(shape, q, k, v, lengths)
        ref = _reference(shape, q, k, v, lengths)
        times: dict[str, float | None] = {}
        errors: dict[str, float] = {}
        with torch.set_grad_enabled(shape.kind == "train"):
            for name, fn in fns.items():
                try:
                    errors[name] = output_errors(fn(), ref)[1]
                    times[name] = timer(fn)
                except Exception as exc:  # noqa: BLE001 - a refused backend is a row, not the end
                    times[name] = None
                    if not is_refusal(exc):
                        print(f"  {shape.name}: {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
        sdpa = {p: t for p, t in times.items() if p.startswith("sdpa_") and t}
        best = min(sdpa, key=sdpa.__getitem__) if sdpa else None
        attn = times["attention"]
        row = {**asdict(shape), **_ran(shape, q, k, v), **extra, "times_ms": times, "rel_err": errors,
               "best_sdpa": best,
               # decode is bound by reading the cache: no TFLOP/s
               "tflops_attention": tflops(shape.flops, attn) if attn and shape.kind != "decode" else None,
               "attention_over_best_sdpa": sdpa[best] / attn if best and attn else None}
        if shape.kind == "fwd":
            d, t = times["kernel_default"], times["kernel_tuned"]
            row["tuned_over_default"] = d / t if d and t else None
            row["attention_over_default"] = d / attn if d and attn else None
        rows.append(row)
        print(f"[{i + 1}/{len(shapes)}] {_label(shape)}: ran {row['ran']} ({row['source']}); "
              f"attention()/best SDPA {_fmt(row['attention_over_best_sdpa'])}", flush=True)
    write_json(out_dir(out) / "holdout_report.json", rows)
    _table(rows)
    return rows


def _label(shape: Shape) -> str:
    n = f"Nk={shape.seq_len_kv}{' lens' if shape.lengths else ''}" if shape.kind == "decode" else f"N={shape.seq_len}"
    return (f"{shape.kind} {shape.name} B={shape.batch} H={shape.heads_q}/{shape.heads_kv} {n} D={shape.head_dim} "
            f"{shape.dtype} {'causal' if shape.causal else 'full'}")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _table(rows: list[dict]) -> None:
    print_table(
        ["kind", "shape", "B", "Hq/Hkv", "N", "D", "dtype", "c", "attention() ran", "best SDPA", "TFLOP/s",
         "attn/SDPA"],
        [[r["kind"], r["name"] + (" (lengths)" if r["lengths"] else ""), r["batch"], f"{r['heads_q']}/{r['heads_kv']}",
          r["seq_len_kv"] if r["kind"] == "decode" else r["seq_len"], r["head_dim"],
          r["dtype"].replace("float", "fp").replace("bfp", "bf"), "y" if r["causal"] else "n",
          f"{r['ran']} ({r['source']})"[:90], r["best_sdpa"],
          None if r["tflops_attention"] is None else round(r["tflops_attention"]), r["attention_over_best_sdpa"]]
         for r in rows], floats=".3f")
    for field in ("tuned_over_default", "attention_over_default", "attention_over_best_sdpa"):
        values = [r[field] for r in rows if r.get(field)]
        if values:
            geo = math.exp(sum(map(math.log, values)) / len(values))
            print(f"{field}: min {min(values):.3f}, geomean {geo:.3f}, max {max(values):.3f} over {len(values)}")
    for kind in KINDS:
        values = [r["attention_over_best_sdpa"] for r in rows if r["kind"] == kind and r["attention_over_best_sdpa"]]
        if values:
            print(f"{kind}: {sum(1 for x in values if x >= 0.98)} of {len(values)} shapes at >= 0.98x best SDPA")
    values = [r["attention_over_best_sdpa"] for r in rows]
    print(f"all: {sum(1 for x in values if x and x >= 0.98)} of {len(values)} shapes at >= 0.98x best SDPA"
          + (f" ({sum(1 for x in values if x is None)} without a ratio)" if None in values else ""))


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__, out="optional", out_help="report: results directory, e.g. bench/results/h100",
                   smoke="tiny shapes on the CPU under TRITON_INTERPRET=1", seed=True,
                   timing=[Budget(warmup=25, rep=100)])
    ap.add_argument("step", choices=("record", "report"))
    ap.add_argument("--kinds", type=str_list, default=",".join(KINDS), help="of fwd, train, decode (default: all)")
    args = ap.parse_args(argv)
    if args.step == "report" and args.out is None:
        ap.error("report needs --out DIR (one folder per GPU model, e.g. bench/results/h100)")
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown or not args.kinds:
        ap.error(f"--kinds takes a comma list of {', '.join(KINDS)} (got {','.join(args.kinds) or 'nothing'})")
    use_interpreter(args.smoke, even_with_gpu=True)  # the smoke shapes run on the CPU
    shapes = _selected(SMOKE if args.smoke else SHAPES, args.kinds)
    device = "cpu" if args.smoke else "cuda"
    if args.step == "record":
        record(shapes, device, args.seed)
    else:
        report(shapes, device, args.out, Timer.from_args(args, cuda=device == "cuda"), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
