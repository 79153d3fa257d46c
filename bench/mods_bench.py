"""Score modifiers: attention() with a window, softcap, sinks or attn_mask and attention_kvcache with a window or sinks vs SDPA, Flex, eager.

One process, one dtype (--dtype, default bf16), D=128; every ratio is measured in the same run. Cases (--only):

1. window: N=32768, B=1, H=16, causal, window_size=(4095, 0), forward. flashtune vs torch SDPA given the same
   (N, N) boolean mask (broadcast over B and H; the faster of the efficient and cuDNN backends that accepts
   it) and vs FlexAttention compiled (torch.compile(flex_attention)) with a sliding-window causal mask_mod whose
   block mask (create_block_mask) is built once, outside the timing. Targets: >= 4x SDPA, >= 1.0x Flex.
2. softcap / sinks: causal, forward and forward+backward, N in {2048, 8192, 16384}, B = 16384/N, H = 16.
   flashtune vs FlexAttention compiled and vs eager torch written as transformers' eager attention does it:
   softcap (Gemma 2): QKᵀ·scale, /cap, tanh, ·cap, + the additive causal mask, fp32 softmax, PV; sinks
   (GPT-OSS): QKᵀ·scale + mask, the sink logit concatenated as an extra column, max subtracted, softmax, the
   column dropped, PV. Flex takes the softcap as a score_mod. Flex has no sinks; it runs with the row LSE
   (return_aux=AuxRequest(lse=True), or return_lse on older torch) and the post-correction
       O_sink = O · 1/(1 + exp(sink − lse)) = O · sigmoid(lse − sink),
   which is exact: the sink adds exp(sink) to each row's denominator Σ_j exp(s_ij) = exp(lse) and nothing to
   its numerator, so O_sink = O·exp(lse)/(exp(lse) + exp(sink)); autograd through lse and sink gives every
   gradient (the correction is compiled with the call). Targets: >= 1.0x Flex, >= 2x eager. Eager is skipped,
   with a note, where its B·H·N·N score tensors would not fit in the free GPU memory (or run out of it).
3. decode: attention_kvcache, B=8, Hq=32, Hkv=8, Nq=1, a 32768-token cache: plain, with window_size=(4095, 0)
   and with sinks. Rate = the K/V bytes the call needs / time, TB/s (a window needs only its 4096 tokens).
   Targets, time-based: window: ratio = (plain decode of a 4096-token cache, ms) / (window ms) >= 0.9;
   sinks: ratio = (plain decode of the same 32k cache, ms) / (sinks ms) >= 0.9. The plain 32k decode's TB/s is
   reported on its own row. Decode calls are captured in a CUDA graph (one call each) and timed as replays.
4. attn_mask, not causal, N in {2048, 8192, 16384}, B = 16384/N, H = 16, mask (1, 1, N, N) broadcast: a random
   boolean mask (90% kept: every tile mixed), a random float mask (added to the scores) and a block-sparse
   boolean mask in which half of the 128x128 tiles of every tile row are fully hidden (flashtune skips them).
   flashtune vs the faster of SDPA's efficient and cuDNN backends that accepts the same mask (a refusal is
   noted). Targets: >= 1.0x; block-sparse >= 2x.
5. Correctness, in the same run: each flashtune output (and each peer's) is compared with the float64
   kernel.testing.attention_reference on a slice (batch 0, 2 heads, 256 query rows; decode: batch 0, every
   head); forward+backward cases compare dq, dk, dv (and dsinks) with float64 autograd on one head of every
   batch where its B·N·N scores fit, else dq on a row slice. The error is max |x − ref| / max |ref|, printed per
   case; a flashtune error over the dtype's bound makes the row WRONG and the exit status 1.

TFLOP/s count visible scores only: 4·B·H·D·Σ_i visible_keys(i) forward (a window: Σ_i min(i + 1, 4096)), and
3.5x that for forward+backward (backward 2.5x). Ratio = peer ms / flashtune ms (higher is better for flashtune).
flashtune runs as dispatched: attention() / attention_kvcache with the database FLASHTUNE_DB points to (the JSON's
"ran" says what the dispatcher chose, kernel.explain); --kernel-config forces one forward config through
FLASHTUNE_CONFIG (default: nothing forced). Times are triton.testing.do_bench medians (L2 flushed).
Writes <out>/mods_bench.json (rewritten after each case), logs to stdout, prints the table last.

    python bench/mods_bench.py --out bench/results/h100/mods                          # GPU: 6-8 minutes, half of it Flex compiling
    python bench/mods_bench.py --out /tmp/mods --quick --only window,decode
    TRITON_INTERPRET=1 python bench/mods_bench.py --smoke --out /tmp/mods-smoke      # CPU: float32, tiny, no Flex
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import (
    Budget,
    Runner,
    arguments,
    error_line,
    out_dir,
    print_table,
    provenance,
    require_gpu,
    use_interpreter,
    utc_now,
    write_json,
)

CASES = ("window", "softcap", "sinks", "decode", "mask")
BOUND = {"bfloat16": 0.05, "float16": 0.02, "float32": 1e-3}  # max |x − ref| / max |ref|
ROWS = 256  # query rows of a forward check slice
FULL_GRAD = 1 << 27  # B·N·N at most: the gradient check takes every row of one head, else dq on a row slice
EAGER_BYTES = {"fwd": 12, "fwd+bwd": 24}  # eager's peak bytes per B·H·N·N score (bf16/fp16), estimated
SOFTCAP = 4.0


@dataclass(frozen=True)
class Sizes:
    head_dim: int
    heads: int
    tokens: int  # B·N of cases 2 and 4
    seqs: tuple[int, ...]
    window_n: int
    window: int  # keys a window row sees: window_size=(window - 1, 0)
    decode: tuple[int, int, int, int]  # B, Hq, Hkv, cache length
    tile: int  # the block-sparse mask's tile


GPU = Sizes(128, 16, 16384, (2048, 8192, 16384), 32768, 4096, (8, 32, 8, 32768), 128)
SMOKE = Sizes(32, 2, 64, (64,), 64, 16, (2, 4, 2, 96), 16)


def visible_keys(nq: int, nk: int, causal: bool, window: int | None = None) -> int:
    """Σ_i of the keys query i sees: causal (j <= i), and a window of `window` keys ending at the diagonal."""
    import torch

    d = torch.arange(nq, dtype=torch.int64)
    hi = torch.minimum(d, torch.tensor(nk - 1)) if causal or window else torch.full_like(d, nk - 1)
    lo = (d - window + 1).clamp_min(0) if window else torch.zeros_like(d)
    return int((hi - lo + 1).clamp_min(0).sum())


def nerr(x: Any, ref: Any) -> float:
    """max |x − ref| / max |ref| (inf when x holds a NaN or inf)."""
    import torch

    diff = x.detach().double() - ref.double()
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    return float(diff.abs().max() / ref.abs().max().clamp_min(1e-30))


class Bench(Runner):
    """The run's state: sizes, rows, checks; `measure` (the runner's) runs, checks and times one call."""

    def __init__(self, args: Any) -> None:
        import torch

        super().__init__(args, torch.float32 if args.smoke else {"bf16": torch.bfloat16,
                                                                 "fp16": torch.float16}[args.dtype])
        self.dtype_name = str(self.dtype).removeprefix("torch.")
        self.bound = BOUND[self.dtype_name]
        sizes = SMOKE if args.smoke else GPU
        if args.quick and not args.smoke:
            sizes = Sizes(**{**sizes.__dict__, "seqs": (8192,)})
        self.sizes = sizes
        self.rows: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.flex: Any = None

    def ran(self, q: Any, k: Any, v: Any, causal: bool, op: str = "fwd", **mods: Any) -> str:
        """What the dispatcher runs for this call (kernel.explain), in words."""
        try:
            from flashtune.kernel import explain
            from flashtune.kernel.checks import check_inputs, check_kvcache_inputs
            from flashtune.kernel.mods import check_mods

            shape = (check_kvcache_inputs if op == "kvcache" else check_inputs)(q, k, v)
            features = check_mods(shape, q.device, **mods).features(k.shape[2])
            choice = explain(q, k, v, causal, op=op, **features)
            return f"{choice.provider} {choice.config} ({choice.source})"
        except Exception as exc:  # noqa: BLE001 - provenance only
            return f"? ({error_line(exc, 120)})"

    def check(self, case: str, n: int, who: str, errors: dict[str, float], peer: bool = False) -> float | None:
        """Record and print one call's errors; the worst of them (None when it did not run)."""
        worst = max(errors.values()) if errors else None
        ok = worst is not None and worst <= self.bound
        self.checks.append({"case": case, "n": n, "who": who, "errors": errors, "worst": worst,
                            "bound": self.bound, "ok": ok})
        text = ", ".join(f"{k} {e:.2e}" for k, e in errors.items()) or "did not run"
        flag = "" if ok else ("  (peer over the bound)" if peer else "  WRONG")
        print(f"  check {case} N={n} {who}: max err/max|ref| {text}{flag}", flush=True)
        return worst

    def add(self, case: str, n: int, ft: dict[str, Any], peer: str | None, peer_res: dict[str, Any] | None,
            target: float | None, note: str = "") -> None:
        """One table row: flashtune's result `ft` against `peer`'s (each: ms, rate, unit, ran, err, error)."""
        ft_ms, peer_ms = ft.get("ms"), (peer_res or {}).get("ms")
        ratio = peer_ms / ft_ms if ft_ms and peer_ms else None
        if ft.get("error") or ft_ms is None:
            passed = "ERROR"
        elif ft.get("err") is None or ft["err"] > self.bound:
            passed = "WRONG"
        elif self.smoke:
            passed = "ok"
        elif target is None:
            passed = "-"
        elif ratio is None:
            passed = "n/a"
        else:
            passed = "yes" if ratio >= target else "no"
        peer_res = peer_res or {}
        notes = "; ".join(x for x in (note, ft.get("error") and f"flashtune: {ft['error']}",
                                      peer_res.get("error") and f"{peer}: {peer_res['error']}") if x)
        row = {"case": case, "n": n, "ft_ms": ft_ms, "rate": ft.get("rate"), "unit": ft.get("unit"),
               "ft_ran": ft.get("ran"), "ft_err": ft.get("err"), "peer": peer, "peer_ms": peer_ms,
               "peer_ran": peer_res.get("ran"), "peer_err": peer_res.get("err"), "ratio": ratio, "target": target,
               "passed": passed, "note": notes}
        self.rows.append(row)
        vs = f" | {peer} {peer_ms or 0:.3f} ms | ratio {ratio or 0:.2f} (target {target})" if peer else ""
        print(f"  => {case} N={n}: flashtune {ft_ms or 0:.3f} ms ({row['rate'] or 0:.2f} {row['unit']}){vs} {passed}"
              + (f" | {notes}" if notes else ""), flush=True)
        print(f"     ran: flashtune {row['ft_ran']}" + (f" | {peer}: {row['peer_ran']}" if peer else ""), flush=True)

    def sdpa_best(self, case: str, n: int, q: Any, k: Any, v: Any, mask: Any,
                  ref_of: Callable[[Any], float]) -> tuple[str | None, dict[str, Any]]:
        """The fastest SDPA backend that takes `mask` (efficient, cuDNN; math under --smoke): (name, result)."""
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = ([("sdpa_math", SDPBackend.MATH)] if self.smoke else
                    [("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)])
        best: tuple[str | None, dict[str, Any]] = (None, {})
        refused = []
        for name, backend in backends:
            def fn(backend: Any = backend) -> Any:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out, ms, error = self.measure(fn)
            if error:
                refused.append(f"{name}: {error}")
                print(f"  {name} refused or failed: {error}", flush=True)
                continue
            err = self.check(case, n, name, {"out": ref_of(out)}, peer=True)
            out = None
            if err is None or err > self.bound:
                refused.append(f"{name}: wrong result ({err}), not counted")
            elif ms is not None and (best[0] is None or ms < best[1]["ms"]):
                best = (name, {"ms": ms, "err": err, "ran": f"{name} with the mask"})
        if best[0] is None:
            best = ("sdpa", {"error": "; ".join(refused) or "no backend ran"})
        return best

    def flex_tools(self) -> Any:
        """torch.compile'd flex_attention and the sinks wrapper, and a block-mask builder; None under --smoke
        or where FlexAttention is missing (noted)."""
        if self.flex is not None or self.smoke:
            return self.flex or None
        torch = self.torch
        try:
            from torch.nn.attention import flex_attention as fa
        except ImportError as exc:
            self.note(f"FlexAttention unavailable: {exc}")
            self.flex = False
            return None
        for name in ("recompile_limit", "cache_size_limit"):  # one compile per (mod, shape, grad mode)
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        aux = getattr(fa, "AuxRequest", None)

        def with_sinks(q: Any, k: Any, v: Any, sinks: Any, block_mask: Any) -> Any:
            if aux is not None:
                o, extra = fa.flex_attention(q, k, v, block_mask=block_mask, return_aux=aux(lse=True))
                lse = extra.lse
            else:
                o, lse = fa.flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
            # exact: the sink joins each row's denominator exp(lse) (see the docstring)
            return (o.float() * torch.sigmoid(lse - sinks.float().view(1, -1, 1)).unsqueeze(-1)).to(o.dtype)

        def block_mask(mask_mod: Any, n: int) -> Any:
            return fa.create_block_mask(mask_mod, None, None, n, n, device=self.device, _compile=True)

        self.flex = {"attn": torch.compile(fa.flex_attention, dynamic=False),
                     "sinks": torch.compile(with_sinks, dynamic=False), "block_mask": block_mask}
        return self.flex


# --- references ---

def fwd_ref(q: Any, k: Any, v: Any, r0: int, *, causal: bool, mask: Any = None, sinks: Any = None,
            **mods: Any) -> Callable[[Any], float]:
    """output -> its error against the float64 reference of rows r0..r0+ROWS of batch 0, heads 0..1."""
    from flashtune.kernel.testing import attention_reference

    heads = slice(0, min(2, q.shape[1]))
    r1 = min(r0 + ROWS, q.shape[2])
    ref = attention_reference(q[:1, heads, r0:r1], k[:1, heads], v[:1, heads], causal=causal, diag=r0,
                              attn_mask=None if mask is None else mask[..., r0:r1, :],
                              sinks=None if sinks is None else sinks.detach()[heads], **mods)
    return lambda out: nerr(out[:1, heads, r0:r1], ref)


def grad_ref(q: Any, k: Any, v: Any, do: Any, *, causal: bool, softcap: float = 0.0,
             sinks: Any = None) -> dict[str, tuple[tuple[slice, ...], Any]]:
    """Float64 autograd gradients: name -> (index into the input's .grad, reference). One head of every batch,
    every row, where B·N·N <= FULL_GRAD (dq, dk, dv, dsinks); else dq of the last ROWS rows of batch 0, head 0."""
    from flashtune.kernel.testing import attention_reference

    b, _, n = q.shape[:3]
    leaf = lambda x: x.detach().double().requires_grad_()
    sink = None
    if b * n * n <= FULL_GRAD:
        idx: tuple[slice, ...] = (slice(None), slice(0, 1))
        leaves = {"dq": leaf(q[idx]), "dk": leaf(k[idx]), "dv": leaf(v[idx])}
        sink = None if sinks is None else leaf(sinks[0:1])
        o = attention_reference(leaves["dq"], leaves["dk"], leaves["dv"], causal=causal, softcap=softcap, sinks=sink)
    else:
        r0 = n - ROWS
        idx = (slice(0, 1), slice(0, 1), slice(r0, None))
        leaves = {"dq": leaf(q[idx])}
        o = attention_reference(leaves["dq"], k[:1, :1].detach(), v[:1, :1].detach(), causal=causal, diag=r0,
                                softcap=softcap, sinks=None if sinks is None else sinks.detach()[0:1])
    o.backward(do[idx].double())
    refs = {name: (idx, t.grad) for name, t in leaves.items()}
    if sink is not None:
        refs["dsinks"] = ((slice(0, 1),), sink.grad)
    return refs


def grad_errors(refs: dict[str, Any], q: Any, k: Any, v: Any, sinks: Any = None) -> dict[str, float]:
    tensors = {"dq": q, "dk": k, "dv": v, "dsinks": sinks}
    out = {}
    for name, (idx, ref) in refs.items():
        grad = tensors[name].grad
        out[name] = math.inf if grad is None else nerr(grad[idx], ref)
    return out


# --- the cases ---

def case_window(bench: Bench) -> None:
    from flashtune.kernel import attention

    torch, s = bench.torch, bench.sizes
    n, w, b, h, d = s.window_n, s.window, 1, s.heads, s.head_dim
    print(f"[window] N={n} B={b} H={h} D={d} causal window_size=({w - 1}, 0)", flush=True)
    gen = bench.gen("window", n)
    q, k, v = (bench.randn(b, h, n, d, gen=gen) for _ in range(3))
    flops = 4.0 * b * h * d * visible_keys(n, n, True, w)
    check = fwd_ref(q, k, v, n // 2, causal=True, window_size=(w - 1, 0))
    out, ms, error = bench.measure(lambda: attention(q, k, v, is_causal=True, window_size=(w - 1, 0)))
    ft = {"ms": ms, "error": error, "rate": flops / ms / 1e9 if ms else None, "unit": "TFLOP/s",
          "ran": bench.ran(q, k, v, True, window_size=(w - 1, 0)),
          "err": bench.check("window", n, "flashtune", {"out": check(out)} if out is not None else {})}
    out = None
    i = torch.arange(n, device=bench.device)
    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < w)  # (N, N), broadcast over B and H
    name, res = bench.sdpa_best("window", n, q, k, v, mask, check)
    bench.add(f"window fwd vs {name}", n, ft, name, res, 4.0)
    mask = None
    bench.free()
    flex = bench.flex_tools()
    if not flex:
        bench.add("window fwd vs flex", n, ft, "flex", None, 1.0, "Flex not run (--smoke or unavailable)")
        return

    def window_mod(b_: Any, h_: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)
    block = flex["block_mask"](window_mod, n)
    out, ms, error = bench.measure(lambda: flex["attn"](q, k, v, block_mask=block))
    res = {"ms": ms, "error": error, "ran": "flex_attention compiled, sliding-window causal block mask",
           "err": bench.check("window", n, "flex", {"out": check(out)} if out is not None else {}, peer=True)}
    bench.add("window fwd vs flex", n, ft, "flex", res, 1.0)


def eager_softcap(q: Any, k: Any, v: Any, cap: float, add_mask: Any) -> Any:
    """Gemma 2's eager attention (transformers): capped scores, additive mask, fp32 softmax, PV."""
    import torch

    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    w = torch.tanh(w / cap) * cap
    w = w + add_mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def eager_sinks(q: Any, k: Any, v: Any, sinks: Any, add_mask: Any) -> Any:
    """GPT-OSS's eager attention (transformers): the sink as an extra logit column, dropped after the softmax."""
    import torch

    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + add_mask
    sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1).to(w.dtype)
    logits = torch.cat([w, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    return torch.matmul(probs, v)


def case_capsink(bench: Bench, mod: str) -> None:
    torch = bench.torch
    flex = bench.flex_tools()

    def softcap_mod(score: Any, b_: Any, h_: Any, q_idx: Any, kv_idx: Any) -> Any:
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    def causal_mod(b_: Any, h_: Any, q_idx: Any, kv_idx: Any) -> Any:
        return q_idx >= kv_idx

    for n in bench.sizes.seqs:
        capsink_at(bench, mod, n, flex, softcap_mod, causal_mod)
        bench.free()


def capsink_at(bench: Bench, mod: str, n: int, flex: Any, softcap_mod: Any, causal_mod: Any) -> None:
    """Case 2 at one N: forward, then forward+backward, flashtune vs Flex vs eager."""
    from flashtune.kernel import attention

    torch, s = bench.torch, bench.sizes
    h, d, b = s.heads, s.head_dim, max(1, s.tokens // n)
    print(f"[{mod}] N={n} B={b} H={h} D={d} causal", flush=True)
    gen = bench.gen(mod, n)
    q, k, v, do = (bench.randn(b, h, n, d, gen=gen) for _ in range(4))
    # sinks near log(N/2): each takes a share of its rows' mass comparable to the keys', so errors show
    sinks = (math.log(n / 2) + 0.5 * bench.randn(h, gen=gen, dtype=torch.float32)) if mod == "sinks" else None
    kw: dict[str, Any] = {"softcap": SOFTCAP} if mod == "softcap" else {"sinks": sinks}
    ref_kw: dict[str, Any] = {"softcap": SOFTCAP} if mod == "softcap" else {}
    fwd_flops = 4.0 * b * h * d * visible_keys(n, n, True)
    i = torch.arange(n, device=bench.device)
    add_mask = torch.zeros(n, n, device=bench.device, dtype=bench.dtype).masked_fill(
        i[None, :] > i[:, None], torch.finfo(bench.dtype).min)[None, None]  # transformers' additive causal mask
    block = flex["block_mask"](causal_mod, n) if flex else None
    ways: dict[str, Callable[[], Any]] = {"flashtune": lambda: attention(q, k, v, is_causal=True, **kw)}
    if flex and mod == "softcap":
        ways["flex"] = lambda: flex["attn"](q, k, v, score_mod=softcap_mod, block_mask=block)
    elif flex:
        ways["flex"] = lambda: flex["sinks"](q, k, v, sinks, block)
    ways["eager"] = ((lambda: eager_softcap(q, k, v, SOFTCAP, add_mask)) if mod == "softcap"
                     else (lambda: eager_sinks(q, k, v, sinks, add_mask)))
    ran = {"flex": "flex_attention compiled, causal block mask, "
                   + ("softcap score_mod" if mod == "softcap" else "LSE + sink post-correction"),
           "eager": f"eager torch ({'Gemma 2' if mod == 'softcap' else 'GPT-OSS'} style, transformers)"}
    for mode in ("fwd", "fwd+bwd"):
        flops = fwd_flops * (3.5 if mode == "fwd+bwd" else 1.0)
        case = f"{mod} {mode}"
        grads = None
        if mode == "fwd":
            check = fwd_ref(q, k, v, n - min(ROWS, n), causal=True, sinks=sinks, **ref_kw)
        else:
            grads = [x.requires_grad_() for x in (q, k, v)] + ([sinks.requires_grad_()] if sinks is not None else [])
            refs = grad_ref(q, k, v, do, causal=True, sinks=sinks, **ref_kw)
        results: dict[str, dict[str, Any]] = {}
        for who, fn in ways.items():
            if who == "eager" and bench.cuda:
                need = EAGER_BYTES[mode] * b * h * n * n
                if need > 0.9 * bench.free_bytes():
                    results[who] = {"error": f"skipped: would need ~{need / 2**30:.0f} GiB of scores, "
                                             f"{bench.free_bytes() / 2**30:.0f} GiB free"}
                    print(f"  eager {mode}: {results[who]['error']}", flush=True)
                    continue
            call = fn if mode == "fwd" else (lambda fn=fn: _step(fn, do))
            out, ms, error = bench.measure(call, grads=grads)
            if out is None:
                errors = {}
            elif mode == "fwd":
                errors = {"out": check(out)}
            else:
                errors = grad_errors(refs, q, k, v, sinks)
            out = None
            res = {"ms": ms, "error": error, "rate": flops / ms / 1e9 if ms else None, "unit": "TFLOP/s",
                   "err": bench.check(case, n, who, errors, peer=who != "flashtune")}
            res["ran"] = (bench.ran(q, k, v, True, op="fwd" if mode == "fwd" else "train", **kw)
                          if who == "flashtune" else ran[who])
            results[who] = res
            bench.free()
        for peer, target in (("flex", 1.0), ("eager", 2.0)):
            note = "" if peer in results else "Flex not run (--smoke or unavailable)"
            bench.add(f"{case} vs {peer}", n, results["flashtune"], peer, results.get(peer), target, note)
        for x in grads or ():
            x.requires_grad_(False)
            x.grad = None


def _step(fn: Callable[[], Any], do: Any) -> Any:
    o = fn()
    o.backward(do)
    return o


def case_decode(bench: Bench) -> None:
    from flashtune.kernel import attention_kvcache
    from flashtune.kernel.testing import attention_reference

    torch, s = bench.torch, bench.sizes
    b, hq, hkv, n = s.decode
    w, d = s.window, s.head_dim
    print(f"[decode] B={b} Hq={hq} Hkv={hkv} Nq=1 cache={n} D={d}; window ({w - 1}, 0); sinks", flush=True)
    gen = bench.gen("decode", n)
    q = bench.randn(b, hq, 1, d, gen=gen)
    k, v = (bench.randn(b, hkv, n, d, gen=gen) for _ in range(2))
    k_w, v_w = k[:, :, -w:].contiguous(), v[:, :, -w:].contiguous()
    sinks = math.log(n / 2) + 0.5 * bench.randn(hq, gen=gen, dtype=torch.float32)
    elt = q.element_size()
    kv_bytes = {"full": 2.0 * b * hkv * n * d * elt, "window": 2.0 * b * hkv * w * d * elt}
    calls = {  # name -> (call, caches, modifiers, bytes it needs)
        "plain": (lambda: attention_kvcache(q, k, v), (k, v), {}, kv_bytes["full"]),
        f"plain@{w}": (lambda: attention_kvcache(q, k_w, v_w), (k_w, v_w), {}, kv_bytes["window"]),
        "window": (lambda: attention_kvcache(q, k, v, window_size=(w - 1, 0)), (k, v),
                   {"window_size": (w - 1, 0)}, kv_bytes["window"]),
        "sinks": (lambda: attention_kvcache(q, k, v, sinks=sinks), (k, v), {"sinks": sinks}, kv_bytes["full"]),
    }
    res: dict[str, dict[str, Any]] = {}
    for name, (fn, (kc, vc), mods, nbytes) in calls.items():
        ref = attention_reference(q[:1], kc[:1], vc[:1], diag=kc.shape[2] - 1, **mods)
        out, ms, error = bench.measure(fn, graph=bench.cuda)
        res[name] = {"ms": ms, "error": error, "rate": nbytes / ms / 1e9 if ms else None, "unit": "TB/s",
                     "ran": bench.ran(q, kc, vc, False, op="kvcache", **mods),
                     "err": bench.check(f"decode {name}", kc.shape[2], "flashtune",
                                        {"out": nerr(out[:1], ref)} if out is not None else {})}
        out = ref = None
    bench.add("decode plain", n, res["plain"], None, None, None)
    bench.add(f"decode window vs plain@{w}", n, res["window"], f"plain@{w}", res[f"plain@{w}"], 0.9,
              f"window reads {w} of {n} tokens; ratio = plain {w}-token cache ms / window ms")
    bench.add("decode sinks vs plain", n, res["sinks"], "plain", res["plain"], 0.9)


def case_mask(bench: Bench) -> None:
    for n in bench.sizes.seqs:
        mask_at(bench, n)
        bench.free()


def mask_at(bench: Bench, n: int) -> None:
    """Case 4 at one N: a random bool, a random float and a block-sparse bool mask, flashtune vs SDPA."""
    torch, s = bench.torch, bench.sizes
    h, d, t, b = s.heads, s.head_dim, s.tile, max(1, s.tokens // n)
    print(f"[mask] N={n} B={b} H={h} D={d} not causal, mask (1, 1, N, N)", flush=True)
    gen = bench.gen("mask", n)
    q, k, v = (bench.randn(b, h, n, d, gen=gen) for _ in range(3))
    # half of each tile row's tiles visible, at random places: no row is ever empty
    tiles = torch.rand(n // t, n // t, generator=gen, device=bench.device).argsort(dim=1) < (n // t) // 2
    for kind in ("bool", "float", "block-sparse"):  # one mask at a time: a 16k float mask is 512 MiB
        if kind == "bool":
            mask = torch.rand(1, 1, n, n, generator=gen, device=bench.device) < 0.9
        elif kind == "float":
            mask = bench.randn(1, 1, n, n, gen=gen)
        else:
            mask = tiles.repeat_interleave(t, 0).repeat_interleave(t, 1)[None, None]
        mask_one(bench, n, kind, q, k, v, mask)
        mask = None
        bench.free()


def mask_one(bench: Bench, n: int, kind: str, q: Any, k: Any, v: Any, mask: Any) -> None:
    from flashtune.kernel import attention

    b, h, _, d = q.shape
    visible = int(mask.sum()) if mask.dtype == bench.torch.bool else n * n
    flops = 4.0 * b * h * d * visible
    case = f"mask {kind}"
    check = fwd_ref(q, k, v, n // 2, causal=False, mask=mask)
    out, ms, error = bench.measure(lambda: attention(q, k, v, attn_mask=mask))
    ft = {"ms": ms, "error": error, "rate": flops / ms / 1e9 if ms else None, "unit": "TFLOP/s",
          "ran": bench.ran(q, k, v, False, attn_mask=mask),
          "err": bench.check(case, n, "flashtune", {"out": check(out)} if out is not None else {})}
    out = None
    name, res = bench.sdpa_best(case, n, q, k, v, mask, check)
    bench.add(f"{case} vs {name}", n, ft, name, res, 2.0 if kind == "block-sparse" else 1.0,
              "half the tiles hidden; flashtune skips them" if kind == "block-sparse" else "")


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__, smoke="CPU check: float32, tiny shapes under TRITON_INTERPRET=1, SDPA's math backend, "
                   "no Flex; checks every path runs and agrees with the reference", seed=True,
                   timing=[Budget(warmup=10, rep=50)], whole_doc=True)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="inputs' dtype (default bf16)")
    ap.add_argument("--quick", action="store_true", help="cases 2 and 4 at N=8192 only")
    ap.add_argument("--only", default="", help=f"comma list of cases to run (default: all of {', '.join(CASES)})")
    ap.add_argument("--kernel-config", default=None, metavar="CONFIG",
                    help="force this forward config (FLASHTUNE_CONFIG, e.g. m128-n64-w4-s3); default: nothing "
                         "forced, attention() as dispatched with the database FLASHTUNE_DB points to")
    args = ap.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()] or list(CASES)
    unknown = sorted(set(only) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}: known {', '.join(CASES)}")
    if args.kernel_config:
        os.environ["FLASHTUNE_CONFIG"] = args.kernel_config  # read when the dispatcher is imported

    require_gpu(unless=args.smoke, hint="run with --smoke (tiny shapes under the Triton interpreter)")
    use_interpreter(args.smoke)  # before the kernels are imported
    bench = Bench(args)
    out = out_dir(args.out)
    meta: dict[str, Any] = dict(provenance(), dtype=bench.dtype_name, sizes=bench.sizes.__dict__, smoke=args.smoke,
                                quick=args.quick, cases=only, kernel_config=args.kernel_config,
                                flashtune_db=os.environ.get("FLASHTUNE_DB"), warmup_ms=args.warmup, rep_ms=args.rep)
    if bench.cuda:
        meta["cudnn"] = bench.torch.backends.cudnn.version()

    def save() -> None:
        write_json(out / "mods_bench.json",
                   {"meta": meta, "rows": bench.rows, "checks": bench.checks, "notes": bench.notes})

    t_all = time.perf_counter()
    runners: dict[str, Callable[[], None]] = {
        "window": lambda: case_window(bench), "softcap": lambda: case_capsink(bench, "softcap"),
        "sinks": lambda: case_capsink(bench, "sinks"), "decode": lambda: case_decode(bench),
        "mask": lambda: case_mask(bench)}
    for name in only:
        t0 = time.perf_counter()
        try:
            runners[name]()
        except Exception as exc:  # noqa: BLE001 - one case failing must not lose the others
            import traceback

            traceback.print_exc()
            bench.note(f"case {name} failed: {error_line(exc, 300)}")
            bench.rows.append({"case": name, "n": None, "passed": "ERROR", "note": error_line(exc, 300)})
            bench.free()
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
        save()
    meta["finished"], meta["wall_s"] = utc_now(), time.perf_counter() - t_all
    save()

    print_table(["case", "who", "worst err", "bound", "ok"],
                [[f"{c['case']} N={c['n']}", c["who"], c["worst"], c["bound"], "ok" if c["ok"] else "OVER"]
                 for c in bench.checks], floats=".2e",
                title="Correctness: max |x − ref| / max |ref| against float64 on a slice")
    for text in bench.notes:
        print(f"note: {text}")
    print(f"\nwrote {out / 'mods_bench.json'}; {meta['wall_s']:.0f} s")
    table = [[r["case"], r["n"], r.get("ft_ms"), r.get("rate"), r.get("unit"), r.get("peer_ms"), r.get("ratio"),
              r.get("target"), r["passed"]] for r in bench.rows]
    print_table(["case", "N", "flashtune ms", "rate", "unit", "peer ms", "ratio", "target", "pass"], table,
                title=f"Score modifiers, {bench.dtype_name} D={bench.sizes.head_dim} ({meta.get('gpu')}): "
                      "ratio = peer ms / flashtune ms"
                      + ("; --smoke: wall ms under the interpreter, pass = correctness only" if args.smoke else ""))
    bad = [r for r in bench.rows if r["passed"] in ("WRONG", "ERROR")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
