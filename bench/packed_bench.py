"""Packed sequences and paged caches: attention_varlen, paged attention_kvcache, swap_attention and the transformers packed path against their peers.

One process, bf16, D=128; every ratio is measured in the same run. Parts (--only, comma list):

1. packed: a causal training step (forward + backward) over documents of 100 to 8192 tokens (log-uniform, fixed
   seed; the last one cut to fill the pack) packed to 16k, 32k and 64k tokens, H=16 (and GQA 16/4 at 32k).
   flashtune attention_varlen against (a) SDPA on the whole pack (B=1) with the block-diagonal document∧causal
   boolean (N, N) mask (the faster of the efficient and cuDNN backends that accepts it; run where three N·N
   byte buffers fit half the free GPU memory: 64k, 12 GiB, fits an 80 GB H100), (b) padding every document to the
   longest and running flashtune's dense attention() (B=documents, causal), timed twice: the attention op alone
   on padded leaf tensors, and with the pad/unpad copies (index_copy in, index_select out, their backward
   included: what a packed-batch model would pay), (c) FlexAttention compiled with a document∧causal block mask
   built once (create_block_mask outside the timing). Targets: >= 1.5x SDPA-mask, >= 1.2x padded dense (the
   copies included), >= 1.0x Flex. TFLOP/s count useful work only: Σ_docs 2·H·len²·D forward (causal: half of
   4·H·len²·D), 3.5x that for forward + backward, the same count for every peer.
2. paged: decode (Nq=1) bandwidth of attention_kvcache with block_table (page 16, 64, 256; page tables shuffled
   at random) against the contiguous cache with cache_seqlens, GQA 32/8, ragged lengths (uniform in 0.5..1.5x
   the mean): B=8 at a 128k mean, B=32 at 16k, B=128 at 4k. TB/s = Σ lengths·Hkv·D·2 bytes·2 (K and V) / time;
   ratio = contiguous ms / paged ms (target >= 0.95). The GPU's copy bandwidth is measured in the same process
   (a 1 GiB device-to-device Tensor.copy_, bytes read + written / time) and paged TB/s is given as % of it
   (target >= 80% on the 128k caches). Decode calls are captured in CUDA graphs and timed as replays.
3. prefill: chunked prefill, a 512-token query chunk (causal, bottom-right) at the end of a 32k paged cache
   (page 64 and 256), B=4, GQA 32/8. Like for like, the peer is the dense forward attention() of the same q
   (B, 32, 512, D) against contiguous k/v of 32k with enable_gqa, not causal: the dense API is top-left causal,
   which would hide almost all of the cache. Each counts its own visible scores (4·B·Hq·D·Σ_i visible(i); the
   causal chunk sees 0.8% fewer), so the ratio is of TFLOP/s (target >= 0.9). attention_kvcache on the
   contiguous cache is given beside it.
4. encoder: nn.TransformerEncoder (d_model 1024, 16 heads, 4 layers, batch_first, dropout 0, bf16) in train mode
   on padded batches (lengths uniform in 50..100% of N, src_key_padding_mask), N = 512, 1024, 2048, 4096,
   B = 16384/N: a training step (forward + backward, no optimizer) of the torch model against a copy after
   swap_attention (same weights). Outputs on real tokens compared (max |diff|). Target >= 1.5x.
5. hf: a config-built transformers Llama (4 layers, hidden 1024, 16 heads, 4 KV heads) on a pack of documents as
   DataCollatorWithFlattening gives it (one row, position_ids restarting at 0, labels -100 at each document's
   first token) with flashtune's integration, against the same documents right-padded (attention_mask):
   the loss of 3 SGD steps in float32 (|packed − padded| <= 1e-3), the fallback counter (must be 0; the
   packed steps must run "varlen"), and the bf16 training-step time of both.

Each part catches its own errors (printed, the next part runs); the exit status is 1 when a part failed or
flashtune's packed output missed the float64 reference (a WRONG row), else 0: a target missed is a "no" in the
table, not a failure. Times are triton.testing.do_bench medians
(L2 flushed). Writes <out>/packed_bench.csv, packed_bench.json (provenance) and packed_bench.md, prints each
part's table as it ends and all of them last.

    python bench/packed_bench.py --out bench/results/h100/packed                 # GPU: meant to fit 5 minutes
    python bench/packed_bench.py --out /tmp/packed --quick                        # GPU: meant to fit 2 minutes
    TRITON_INTERPRET=1 python bench/packed_bench.py --smoke --out /tmp/packed-smoke  # CPU: tiny, float32, no timing claims
"""
from __future__ import annotations

import copy
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
    str_list,
    use_interpreter,
    utc_now,
    write_csv,
    write_json,
    write_text,
)

PARTS = ("packed", "paged", "prefill", "encoder", "hf")
HEADER = ("part", "case", "who", "ms", "rate", "unit", "vs", "ratio", "target", "passed", "note")


@dataclass(frozen=True)
class Sizes:
    head_dim: int
    heads: int
    doc_range: tuple[int, int]
    packs: tuple[int, ...]
    gqa_pack: int | None  # the pack of the GQA 16/4 case (None: no such case)
    decode: tuple[tuple[int, int], ...]  # (B, mean length)
    decode_heads: tuple[int, int]  # Hq, Hkv
    pages: tuple[int, ...]
    prefill: tuple[int, int, int]  # B, chunk, cache length
    prefill_pages: tuple[int, ...]
    encoder: tuple[int, int, int, tuple[int, ...], int]  # d_model, heads, layers, N, tokens per batch
    llama: tuple[int, int, int, int, int, int]  # layers, hidden, heads, kv heads, vocab, pack tokens
    copy_bytes: int


GPU = Sizes(128, 16, (100, 8192), (16384, 32768, 65536), 32768, ((8, 131072), (32, 16384), (128, 4096)), (32, 8),
            (16, 64, 256), (4, 512, 32768), (64, 256), (1024, 16, 4, (512, 1024, 2048, 4096), 16384),
            (4, 1024, 16, 4, 32000, 8192), 1 << 30)
QUICK = Sizes(128, 16, (100, 8192), (32768,), None, ((8, 131072), (128, 4096)), (32, 8), (16, 256),
              (4, 512, 32768), (64,), (1024, 16, 4, (1024, 4096), 16384), (4, 1024, 16, 4, 32000, 8192), 1 << 30)
SMOKE = Sizes(32, 4, (5, 40), (96,), 96, ((2, 40),), (4, 2), (16,), (1, 16, 64), (16,), (64, 4, 1, (32,), 64),
              (1, 64, 4, 2, 128, 96), 1 << 20)


def log(text: str) -> None:
    """A progress line with the UTC time."""
    print(f"[{utc_now()[11:19]}] {text}", flush=True)


def draw_lengths(total: int, low: int, high: int, seed: int) -> list[int]:
    """Document lengths log-uniform in [low, high] (a fixed seed), the last one cut so that they sum to
    `total`; a remainder shorter than `low` joins the document before it (which may then pass `high` by less
    than `low`)."""
    import random

    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(int(math.exp(rng.uniform(math.log(low), math.log(high)))), total - sum(lengths)))
    if len(lengths) > 1 and lengths[-1] < low:
        tail = lengths.pop()
        lengths[-1] += tail
    return lengths


def causal_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention over documents: Σ 2·H·len²·D (half of 4·H·len²·D)."""
    return float(sum(2 * heads * n * n * head_dim for n in lengths))


class Bench(Runner):
    """The run's state: sizes, rows and the copy bandwidth; `time` times one call, keeping its output in `last`."""

    def __init__(self, args: Any) -> None:
        import torch

        super().__init__(args, torch.float32 if args.smoke else torch.bfloat16)
        self.sizes = SMOKE if args.smoke else (QUICK if args.quick else GPU)
        self.rows: list[dict[str, Any]] = []
        self.copy_tbs: float | None = None
        self.last: Any = None  # the output of the last call `time` ran first (for comparisons)

    def time(self, fn: Callable[[], Any], grads: list[Any] | None = None, graph: bool = False
             ) -> tuple[float | None, str | None]:
        """(median ms, None) or (None, the error), as `measure` times them; the first call's output, detached,
        is kept in `last`."""
        self.last, ms, error = self.measure(fn, grads, graph, keep=self._detached)
        return ms, error

    def _detached(self, out: Any) -> Any:
        return out.detach() if isinstance(out, self.torch.Tensor) else None

    def add(self, part: str, case: str, who: str, ms: float | None, work: float | None, unit: str, *,
            vs: str | None = None, vs_ms: float | None = None, ratio: float | None = None,
            target: float | None = None, note: str = "", error: str | None = None,
            passed: str | None = None) -> dict[str, Any]:
        """One row: `who`'s time and rate (work per second in `unit`: TFLOP/s from FLOPs, TB/s from bytes),
        and its ratio against `vs` (vs_ms / ms unless `ratio` is given; higher is better for flashtune).
        `passed` overrides the verdict of a row judged by something other than a ratio."""
        rate = work / (ms * 1e-3) / 1e12 if ms and work else None
        if ratio is None and ms and vs_ms:
            ratio = vs_ms / ms
        if passed is not None:
            pass
        elif error:
            passed = "ERROR"
        elif target is None:
            passed = "-"
        elif self.smoke:
            passed = "ran" if ms else "-"  # no timing claims on the CPU
        elif ratio is None:
            passed = "n/a"
        else:
            passed = "yes" if ratio >= target else "no"
        row = {"part": part, "case": case, "who": who, "ms": ms, "rate": rate, "unit": unit, "vs": vs,
               "ratio": ratio, "target": target, "passed": passed,
               "note": "; ".join(x for x in (note, error) if x)}
        self.rows.append(row)
        print(f"  => {part} {case} {who}: {ms or 0:.3f} ms, {rate or 0:.3f} {unit}"
              + (f" | vs {vs}: ratio {ratio:.3f} (target {target}) {passed}" if vs and ratio else
                 (f" | vs {vs}: {passed}" if vs else "")) + (f" | {row['note']}" if row["note"] else ""), flush=True)
        return row

    def table(self, part: str) -> None:
        rows = [r for r in self.rows if r["part"] == part]
        print_table(HEADER, [[r[h] for h in HEADER] for r in rows], title=f"{part}:", floats=".3f")


# --- 1. packed ---------------------------------------------------------------------------------------

def part_packed(b: Bench) -> None:
    s = b.sizes
    cases = [(total, s.heads, s.heads) for total in s.packs]
    if s.gqa_pack:
        cases.append((s.gqa_pack, s.heads, s.heads // 4))
    for total, hq, hkv in cases:
        packed_case(b, total, hq, hkv)
        b.free()


def packed_case(b: Bench, total: int, hq: int, hkv: int) -> None:
    """One pack: flashtune's varlen training step against SDPA with a mask, padded dense and Flex."""
    torch = b.torch
    import torch.nn.functional as F
    from flashtune.kernel import attention, attention_varlen

    s = b.sizes
    case = f"N={total} H={hq}/{hkv}"
    log(f"packed {case}")
    lengths = draw_lengths(total, *s.doc_range, seed=b.args.seed + total)
    d = s.head_dim
    flops = 3.5 * causal_flops(lengths, hq, d)
    gen = b.gen("packed", total, hq, hkv)
    q = b.randn(total, hq, d, gen=gen, grad=True)
    k = b.randn(total, hkv, d, gen=gen, grad=True)
    v = b.randn(total, hkv, d, gen=gen, grad=True)
    dout = b.randn(total, hq, d, gen=gen)
    lens = torch.tensor(lengths, device=b.device)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=b.device)
    cu[1:] = lens.cumsum(0)
    longest = max(lengths)
    print(f"  {len(lengths)} documents, {min(lengths)}..{longest} tokens", flush=True)

    def ft() -> Any:
        out = attention_varlen(q, k, v, cu, cu, longest, longest, causal=True)
        out.backward(dout)
        return out
    ft_ms, err = b.time(ft, grads=[q, k, v])
    b.add("packed", case, "flashtune varlen", ft_ms, flops, "TFLOP/s", error=err,
          note=f"{len(lengths)} docs {min(lengths)}..{longest}")
    out_ft = b.last if b.last is not None else attention_varlen(q, k, v, cu, cu, longest, longest,
                                                                 causal=True).detach()
    check_packed(b, case, q, k, v, out_ft, lengths)

    def vs_ft(out: Any) -> str:
        """A peer's output (packed layout, or (1, H, N, D)) against flashtune's, for the row's note."""
        if out is None:
            return ""
        if out.dim() == 4:
            out = out[0].transpose(0, 1)
        return f"max |out - flashtune| {float((out.float() - out_ft.float()).abs().max()):.1e}"

    # (1, H, N, D) views of the same values as leaves, for the peers that take a whole pack as one row
    q1, k1, v1 = (x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_(True) for x in (q, k, v))
    dout1 = dout.transpose(0, 1).unsqueeze(0).contiguous()
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=b.device), lens)

    # (a) SDPA with the block-diagonal causal mask
    if 3 * total * total > b.free_bytes() // 2:
        b.add("packed", case, "sdpa mask", None, flops, "TFLOP/s", vs="flashtune", target=1.5,
              error=f"skipped: three {total}x{total} byte buffers exceed half the free GPU memory")
    else:
        pos = torch.arange(total, device=b.device)
        mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
        best: tuple[str | None, float | None, str] = (None, None, "")
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backends = ([("math", SDPBackend.MATH)] if b.smoke else
                    [("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)])
        refused = []
        group = hq // hkv
        for name, backend in backends:
            def sdpa(backend: Any = backend, expand: bool = False) -> Any:
                # GQA: enable_gqa, or where a backend refuses it the K/V heads repeated (as transformers'
                # repeat_kv does), the copy and its backward timed with the call
                kk, vv = (x.repeat_interleave(group, dim=1) for x in (k1, v1)) if expand else (k1, v1)
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q1, kk, vv, attn_mask=mask,
                                                         enable_gqa=group > 1 and not expand)
                out.backward(dout1)
                return out
            ms, error = b.time(sdpa, grads=[q1, k1, v1])
            if error and group > 1:
                print(f"  sdpa {name} with enable_gqa: {error}; again with K/V repeated", flush=True)
                ms, error = b.time(partial(sdpa, backend, True), grads=[q1, k1, v1])
                name += ", K/V repeated"
            if error:
                refused.append(f"{name}: {error}")
                print(f"  sdpa {name} refused or failed: {error}", flush=True)
            elif best[1] is None or ms < best[1]:
                best = (name, ms, vs_ft(b.last))
            b.last = None
        b.add("packed", case, f"sdpa mask ({best[0] or '-'})", best[1], flops, "TFLOP/s", vs="flashtune",
              ratio=best[1] / ft_ms if best[1] and ft_ms else None, target=1.5, note=best[2],
              error=None if best[1] else "; ".join(refused) or "no backend ran")
        del mask, pos
        b.free()

    # (b) padding to the longest document, flashtune's dense attention()
    nb = len(lengths)
    starts = cu[:-1].long()
    tok = torch.arange(total, device=b.device)
    idx = doc * longest + (tok - starts[doc])  # each packed token's row in the (docs·longest) padded layout
    if nb * longest * hq * d * 2 * 12 > b.free_bytes():
        b.add("packed", case, "padded dense", None, flops, "TFLOP/s", vs="flashtune", target=1.2,
              error="skipped: the padded tensors exceed the free GPU memory")
    else:
        def pad(x: Any) -> Any:
            flat = x.new_zeros(nb * longest, x.shape[1], d).index_copy(0, idx, x)
            return flat.view(nb, longest, x.shape[1], d).transpose(1, 2)

        def padded_full() -> Any:
            out = attention(pad(q), pad(k), pad(v), is_causal=True, enable_gqa=hkv != hq)
            out = out.transpose(1, 2).reshape(nb * longest, hq, d).index_select(0, idx)
            out.backward(dout)
            return out
        qp, kp, vp = (pad(x.detach()).contiguous().requires_grad_(True) for x in (q, k, v))
        doutp = pad(dout).contiguous()

        def padded_op() -> Any:
            out = attention(qp, kp, vp, is_causal=True, enable_gqa=hkv != hq)
            out.backward(doutp)
            return out
        ms_op, err_op = b.time(padded_op, grads=[qp, kp, vp])
        unpadded = (None if b.last is None else
                    b.last.transpose(1, 2).reshape(nb * longest, hq, d).index_select(0, idx))
        b.add("packed", case, "padded dense, op only", ms_op, flops, "TFLOP/s", vs="flashtune",
              ratio=ms_op / ft_ms if ms_op and ft_ms else None, error=err_op,
              note=f"B={nb} N={longest}; no target (the copies excluded); {vs_ft(unpadded)}")
        del qp, kp, vp, doutp, unpadded
        b.last = None
        ms_full, err_full = b.time(padded_full, grads=[q, k, v])
        b.add("packed", case, "padded dense + copies", ms_full, flops, "TFLOP/s", vs="flashtune",
              ratio=ms_full / ft_ms if ms_full and ft_ms else None, target=1.2, error=err_full, note=vs_ft(b.last))
        b.last = None
        b.free()

    # (c) FlexAttention with a document∧causal block mask
    if b.smoke:
        b.add("packed", case, "flex", None, flops, "TFLOP/s", vs="flashtune", target=1.0,
              note="not run under --smoke (no compile)")
    else:
        ms, error = None, None
        try:
            from torch.nn.attention.flex_attention import (
                create_block_mask,
                flex_attention,
            )

            def mask_mod(bi: Any, h: Any, qi: Any, ki: Any) -> Any:
                return (doc[qi] == doc[ki]) & (qi >= ki)
            block_mask = create_block_mask(mask_mod, None, None, total, total, device=b.device, _compile=True)
            flex = torch.compile(flex_attention, dynamic=False)
            log(f"packed {case}: compiling Flex")

            def flex_step() -> Any:
                out = flex(q1, k1, v1, block_mask=block_mask, enable_gqa=hkv != hq)
                out.backward(dout1)
                return out
            ms, error = b.time(flex_step, grads=[q1, k1, v1])
        except Exception as exc:  # noqa: BLE001
            error = error_line(exc, 200)
        b.add("packed", case, "flex", ms, flops, "TFLOP/s", vs="flashtune",
              ratio=ms / ft_ms if ms and ft_ms else None, target=1.0, error=error, note=vs_ft(b.last))
        b.last = None


def check_packed(b: Bench, case: str, q: Any, k: Any, v: Any, out: Any, lengths: list[int]) -> None:
    """flashtune's packed output on its two shortest documents against the float64 reference (a row)."""
    from flashtune.kernel.testing import attention_reference

    torch = b.torch
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    worst = 0.0
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j])[:2]:
        r = slice(starts[i], starts[i + 1])
        qd, kd, vd = (x.detach()[r].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        if kd.shape[1] != qd.shape[1]:
            kd, vd = (x.repeat_interleave(qd.shape[1] // kd.shape[1], dim=1) for x in (kd, vd))
        ref = attention_reference(qd, kd, vd, causal=True)[0].transpose(0, 1)
        worst = max(worst, float((out[r].double() - ref).abs().max() / ref.abs().max()))
    bound = 1e-3 if b.dtype == torch.float32 else 0.05
    b.add("packed", case, "flashtune vs float64", None, None, "-", passed="yes" if worst <= bound else "WRONG",
          note=f"the two shortest documents: max err/max|ref| {worst:.2e} (bound {bound})")


# --- 2. paged ----------------------------------------------------------------------------------------

def copy_bandwidth(b: Bench) -> float | None:
    """The GPU's device-to-device copy rate, TB/s (bytes read + written)."""
    torch = b.torch
    n = b.sizes.copy_bytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=b.device).normal_()
    dst = torch.empty_like(src)
    ms, error = b.time(lambda: dst.copy_(src))
    b.add("paged", f"copy {b.sizes.copy_bytes >> 20} MiB", "Tensor.copy_", ms, 2.0 * n * 2, "TB/s", error=error,
          note="bytes read + written")
    return 2.0 * n * 2 / (ms * 1e-3) / 1e12 if ms else None


def paged_cache(b: Bench, k: Any, v: Any, lengths: Any, page: int, gen: Any) -> tuple[Any, Any, Any]:
    """The contiguous caches k, v (B, Hkv, Nmax, D) written into shuffled pages: (k_pages, v_pages, table)."""
    from flashtune.kernel.kvcache import append_paged_kv

    torch = b.torch
    bsz, hkv, _, d = k.shape
    per = [(int(n) + page - 1) // page for n in lengths.tolist()]
    num = max(1, sum(per))
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(int(gen.initial_seed()) % (1 << 31)))
    table = torch.zeros(bsz, max(per + [1]), dtype=torch.int32)
    at = 0
    for i, n in enumerate(per):
        table[i, :n] = perm[at:at + n].to(torch.int32)
        at += n
    table = table.to(b.device)
    kp = torch.empty(num, page, hkv, d, dtype=k.dtype, device=b.device).normal_()
    vp = torch.empty_like(kp).normal_()
    zero = torch.zeros(bsz, dtype=torch.int32, device=b.device)
    for i, n in enumerate(lengths.tolist()):  # per sequence: the pages of one sequence only
        if n:
            append_paged_kv(kp, vp, table[i:i + 1], zero[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n])
    return kp, vp, table


def part_paged(b: Bench) -> None:
    torch = b.torch
    from flashtune.kernel import attention_kvcache

    s = b.sizes
    hq, hkv = s.decode_heads
    d = s.head_dim
    log("paged: copy bandwidth")
    b.copy_tbs = copy_bandwidth(b)
    for bsz, mean in s.decode:
        gen = b.gen("paged", bsz, mean)
        lengths = torch.randint(mean // 2, mean * 3 // 2 + 1, (bsz,), generator=gen, device=b.device,
                                dtype=torch.int32)
        nmax = int(lengths.max())
        case = f"B={bsz} mean={mean}"
        log(f"paged {case}")
        nbytes = float(lengths.sum()) * hkv * d * 2 * 2
        q = b.randn(bsz, hq, 1, d, gen=gen)
        k = b.randn(bsz, hkv, nmax, d, gen=gen)
        v = b.randn(bsz, hkv, nmax, d, gen=gen)
        with torch.no_grad():
            contiguous = attention_kvcache(q, k, v, cache_seqlens=lengths)
            ms_c, err = b.time(partial(attention_kvcache, q, k, v, cache_seqlens=lengths), graph=not b.smoke)
        b.add("paged", case, "contiguous", ms_c, nbytes, "TB/s", error=err,
              note=f"% of copy: {100 * nbytes / (ms_c * 1e-3) / 1e12 / b.copy_tbs:.1f}" if ms_c and b.copy_tbs else "")
        for page in s.pages:
            try:
                kp, vp, table = paged_cache(b, k, v, lengths, page, gen)
            except Exception as exc:  # noqa: BLE001
                b.add("paged", case, f"paged {page}", None, nbytes, "TB/s", error=error_line(exc, 200))
                continue
            with torch.no_grad():
                out = attention_kvcache(q, kp, vp, cache_seqlens=lengths, block_table=table)
                diff = float((out.float() - contiguous.float()).abs().max())
                ms, err = b.time(partial(attention_kvcache, q, kp, vp, cache_seqlens=lengths, block_table=table),
                                 graph=not b.smoke)
            tbs = nbytes / (ms * 1e-3) / 1e12 if ms else None
            pct = 100 * tbs / b.copy_tbs if tbs and b.copy_tbs else None
            long_cache = mean >= 65536 or b.smoke
            note = f"max |paged - contiguous| {diff:.1e}" + (f"; {pct:.1f}% of copy" if pct else "")
            b.add("paged", case, f"paged {page}", ms, nbytes, "TB/s", vs="contiguous",
                  ratio=ms_c / ms if ms and ms_c else None, target=0.95, error=err, note=note)
            if long_cache:
                b.add("paged", case, f"paged {page} % of copy", ms, nbytes, "TB/s", vs="copy_",
                      ratio=pct / 100 if pct else None, target=0.8)
            del kp, vp, table
            b.free()
        del q, k, v, contiguous
        b.free()


# --- 3. prefill --------------------------------------------------------------------------------------

def part_prefill(b: Bench) -> None:
    torch = b.torch
    from flashtune.kernel import attention, attention_kvcache

    s = b.sizes
    hq, hkv = s.decode_heads
    d = s.head_dim
    bsz, chunk, nk = s.prefill
    gen = b.gen("prefill", bsz, chunk, nk)
    q = b.randn(bsz, hq, chunk, d, gen=gen)
    k = b.randn(bsz, hkv, nk, d, gen=gen)
    v = b.randn(bsz, hkv, nk, d, gen=gen)
    lengths = torch.full((bsz,), nk, dtype=torch.int32, device=b.device)
    visible_causal = sum(nk - chunk + i + 1 for i in range(chunk))
    f_causal = 4.0 * bsz * hq * d * visible_causal
    f_full = 4.0 * bsz * hq * d * chunk * nk
    case = f"B={bsz} chunk={chunk} cache={nk}"
    log(f"prefill {case}")
    with torch.no_grad():
        ms_dense, err = b.time(partial(attention, q, k, v, enable_gqa=True))
        dense = b.add("prefill", case, "dense attention() full", ms_dense, f_full, "TFLOP/s", error=err,
                      note="not causal: the like-for-like dense peer (its API is top-left causal)")
        ref = attention_kvcache(q, k, v, cache_seqlens=lengths, causal=True)
        ms_c, err = b.time(partial(attention_kvcache, q, k, v, cache_seqlens=lengths, causal=True))
        rate_c = f_causal / (ms_c * 1e-3) / 1e12 if ms_c else None
        b.add("prefill", case, "kvcache contiguous", ms_c, f_causal, "TFLOP/s", vs="dense (TFLOP/s)",
              ratio=rate_c / dense["rate"] if rate_c and dense["rate"] else None, error=err)
        for page in s.prefill_pages:
            kp, vp, table = paged_cache(b, k, v, lengths, page, gen)
            out = attention_kvcache(q, kp, vp, cache_seqlens=lengths, causal=True, block_table=table)
            diff = float((out.float() - ref.float()).abs().max())
            ms, err = b.time(partial(attention_kvcache, q, kp, vp, cache_seqlens=lengths, causal=True,
                                     block_table=table))
            rate = f_causal / (ms * 1e-3) / 1e12 if ms else None
            b.add("prefill", case, f"paged {page}", ms, f_causal, "TFLOP/s", vs="dense (TFLOP/s)",
                  ratio=rate / dense["rate"] if rate and dense["rate"] else None, target=0.9, error=err,
                  note=f"max |paged - contiguous| {diff:.1e}")
            del kp, vp, table
            b.free()


# --- 4. encoder --------------------------------------------------------------------------------------

def part_encoder(b: Bench) -> None:
    seqs = b.sizes.encoder[3]
    for n in seqs:
        encoder_case(b, n)
        b.free()


def encoder_case(b: Bench, n: int) -> None:
    """One sequence length: a training step of torch's encoder against the same after swap_attention."""
    torch = b.torch
    from flashtune.kernel import nn as ftnn
    from torch import nn

    dm, heads, layers, _, tokens = b.sizes.encoder
    bsz = max(1, tokens // n)
    case = f"N={n} B={bsz}"
    log(f"encoder {case}")
    torch.manual_seed(b.args.seed + n)
    layer = nn.TransformerEncoderLayer(dm, heads, dim_feedforward=4 * dm, dropout=0.0, batch_first=True)
    ref_model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(b.device, b.dtype).train()
    ft_model = copy.deepcopy(ref_model)
    swapped = ftnn.swap_attention(ft_model)
    gen = b.gen("encoder", n)
    lengths = torch.randint(n // 2, n + 1, (bsz,), generator=gen, device=b.device)
    pad = torch.arange(n, device=b.device)[None, :] >= lengths[:, None]  # True: padding
    x = b.randn(bsz, n, dm, gen=gen)
    g = b.randn(bsz, n, dm, gen=gen) * (~pad)[..., None]  # no gradient from the padding rows

    def step(model: Any) -> Callable[[], Any]:
        def run() -> Any:
            out = model(x, src_key_padding_mask=pad)
            out.backward(g)
            return out
        return run
    with torch.no_grad():
        diff = float((ref_model(x, src_key_padding_mask=pad) - ft_model(x, src_key_padding_mask=pad))
                     .float()[~pad].abs().max())
    ftnn.reset_counts()
    ms_t, err_t = b.time(step(ref_model), grads=list(ref_model.parameters()))
    b.add("encoder", case, "torch", ms_t, None, "-", error=err_t)
    ms_f, err_f = b.time(step(ft_model), grads=list(ft_model.parameters()))
    b.add("encoder", case, "swap_attention", ms_f, None, "-", vs="torch", vs_ms=ms_t, target=1.5, error=err_f,
          note=f"{swapped} swapped; max |diff| on real tokens {diff:.2e}; fallbacks {ftnn.fallback_counts()}")


# --- 5. hf -------------------------------------------------------------------------------------------

def part_hf(b: Bench) -> None:
    torch = b.torch
    from flashtune.kernel.integrations import transformers as ft_hf
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv, vocab, total = b.sizes.llama
    name = ft_hf.register()
    lengths = draw_lengths(total, *(b.sizes.doc_range if b.smoke else (100, 2048)), seed=b.args.seed + 5)
    gen = b.gen("hf", total)
    ids = torch.randint(0, vocab, (total,), generator=gen, device=b.device)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    nb, longest = len(lengths), max(lengths)
    # packed: one row, positions restarting per document, label -100 at each document's first token
    packed_ids = ids[None]
    position_ids = torch.cat([torch.arange(n, device=b.device) for n in lengths])[None]
    packed_labels = packed_ids.clone()
    packed_labels[0, starts[:-1]] = -100
    # padded: one row per document, right padding
    pad_ids = torch.zeros(nb, longest, dtype=ids.dtype, device=b.device)
    mask = torch.zeros(nb, longest, dtype=torch.long, device=b.device)
    for i, n in enumerate(lengths):
        pad_ids[i, :n] = ids[starts[i]:starts[i + 1]]
        mask[i, :n] = 1
    pad_labels = pad_ids.masked_fill(mask == 0, -100)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=max(4096, longest), attention_dropout=0.0)
    torch.manual_seed(b.args.seed)
    base = LlamaForCausalLM(config).to(b.device)
    base.set_attn_implementation(name)
    case = f"{nb} docs, {total} tokens"
    print(f"  {nb} documents, {min(lengths)}..{longest} tokens", flush=True)

    def packed_loss(model: Any) -> Any:
        return model(packed_ids, position_ids=position_ids, labels=packed_labels, use_cache=False).loss

    def padded_loss(model: Any) -> Any:
        return model(pad_ids, attention_mask=mask, labels=pad_labels, use_cache=False).loss

    # the loss check, float32: 3 SGD steps from the same weights
    log(f"hf {case}: loss check (float32)")
    losses: dict[str, list[float]] = {}
    counts: dict[str, Any] = {}
    for arm, loss_of in (("packed", packed_loss), ("padded", padded_loss)):
        model = copy.deepcopy(base).float().train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        ft_hf.reset_counts()
        losses[arm] = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model)
            loss.backward()
            opt.step()
            losses[arm].append(loss.item())
        counts[arm] = (ft_hf.kernel_counts(), ft_hf.fallback_counts())
        del model, opt
    diff = max(abs(a - c) for a, c in zip(losses["packed"], losses["padded"]))
    fallbacks = sum(sum(c[1].values()) for c in counts.values())
    varlen_ran = counts["packed"][0].get("varlen", 0) > 0
    b.add("hf", case, "loss |packed - padded|", None, None, "-", passed="yes" if diff <= 1e-3 else "no",
          note=f"max over 3 steps {diff:.2e} (target <= 1e-3); losses packed {losses['packed']}, "
               f"padded {losses['padded']}")
    b.add("hf", case, "fallbacks", None, None, "-", passed="yes" if fallbacks == 0 and varlen_ran else "no",
          note=f"{fallbacks} fallbacks (target 0), the packed steps ran varlen: {varlen_ran}; "
               f"packed: kernels {counts['packed'][0]} fallbacks {counts['packed'][1]}; "
               f"padded: kernels {counts['padded'][0]} fallbacks {counts['padded'][1]}")
    # step time, bf16 (float32 under --smoke)
    log(f"hf {case}: step time")
    model = base.to(b.dtype).train()
    params = list(model.parameters())

    def step(loss_of: Callable[[Any], Any], model: Any) -> Callable[[], Any]:
        def run() -> Any:
            loss = loss_of(model)
            loss.backward()
            return loss
        return run
    ms_pad, err = b.time(step(padded_loss, model), grads=params)
    b.add("hf", case, "padded step", ms_pad, None, "-", error=err, note=f"B={nb} N={longest}")
    ms_pack, err = b.time(step(packed_loss, model), grads=params)
    b.add("hf", case, "packed step", ms_pack, None, "-", vs="padded step", vs_ms=ms_pad, error=err)


RUNNERS: dict[str, Callable[[Bench], None]] = {"packed": part_packed, "paged": part_paged,
                                               "prefill": part_prefill, "encoder": part_encoder, "hf": part_hf}


def summary(b: Bench, prov: dict[str, Any]) -> str:
    """The markdown summary: provenance, each part's table, the notes."""
    lines = [f"# packed_bench ({prov.get('gpu')}, {prov.get('time')})", "",
             (f"`{prov.get('command')}` at {prov.get('git_commit')}; torch {prov.get('torch')}, "
              f"Triton {prov.get('triton')}."), ""]

    def cell(x: Any) -> str:
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x).replace("|", "\\|"))
    for part in PARTS:
        rows = [r for r in b.rows if r["part"] == part]
        if not rows:
            continue
        lines += [f"## {part}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(cell(r[h]) for h in HEADER) + " |" for r in rows]
        lines.append("")
    if b.notes:
        lines += ["## notes", ""] + [f"- {n}" for n in b.notes] + [""]
    return "\n".join(lines)


def main() -> int:
    parser = arguments(__doc__, smoke="CPU run: tiny shapes in float32 under the Triton interpreter, every path "
                                      "once, no timing claims, no Flex compile, no CUDA graphs",
                       seed=True, timing=[Budget(10, 100)])
    parser.add_argument("--quick", action="store_true", help="fewer cases (meant to fit 2 minutes on an H100)")
    parser.add_argument("--only", type=str_list, default=list(PARTS), help=f"parts, comma list of {','.join(PARTS)}")
    args = parser.parse_args()
    bad = [p for p in args.only if p not in PARTS]
    if bad:
        parser.error(f"--only: unknown part(s) {','.join(bad)}; choose from {','.join(PARTS)}")
    use_interpreter(args.smoke)
    require_gpu(args.smoke, "or run --smoke under TRITON_INTERPRET=1")
    folder = out_dir(args.out)
    bench = Bench(args)
    prov = provenance()
    t0 = time.perf_counter()
    log(f"packed_bench: parts {','.join(args.only)} on {prov.get('gpu')}")
    failed = []
    for part in args.only:
        start = time.perf_counter()
        try:
            RUNNERS[part](bench)
        except Exception as exc:  # noqa: BLE001 - one part's failure never loses the others
            traceback.print_exc()
            bench.add(part, "-", "-", None, None, "-", error=f"part failed: {error_line(exc, 300)}")
            failed.append(part)
            bench.free()
        log(f"{part} done in {time.perf_counter() - start:.1f} s")
        bench.table(part)
        write_csv(folder / "packed_bench.csv", bench.rows)
        write_json(folder / "packed_bench.json", {"provenance": prov, "rows": bench.rows, "notes": bench.notes})
    write_text(folder / "packed_bench.md", summary(bench, prov))
    log(f"all parts in {time.perf_counter() - t0:.1f} s; wrote {folder}/packed_bench.csv, .json, .md")
    for part in args.only:
        bench.table(part)
    wrong = [r for r in bench.rows if r["passed"] == "WRONG"]
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
