"""The float64 references the tests and benchmarks check the kernels against, and the measurement helpers
(FLOP counts, rates, errors). Independent of the kernels: plain PyTorch."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# The fp32 reference runs in chunks of batch·heads whose N×N scores stay under this many bytes.
REFERENCE_BYTES = {"cuda": 4 << 30, "cpu": 256 << 20}


# torch SDPA's math backend upcasts fp16/bf16 to fp32 and materialises the scores, their softmax and,
# when causal, a masked copy: about three fp32 B·H·N·N tensors at its peak.
MATH_SCORE_COPIES = 3


def _heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    group = heads_q // x.shape[1]
    return x.double().repeat_interleave(group, dim=1) if group > 1 else x.double()


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None, softcap: float = 0.0, *,
            window_size: tuple[int, int] | None = None, alibi_slopes: torch.Tensor | None = None,
            attn_mask: torch.Tensor | None = None, diag: int = 0) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.double(), _heads(k, q.shape[1]).transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    nq, nk = q.shape[2], k.shape[2]
    # rel = j − (i + diag): the key's offset from the query's diagonal (top-left for diag = 0).
    rel = (torch.arange(nk, device=q.device)[None, :] - torch.arange(nq, device=q.device)[:, None] - diag).double()
    if alibi_slopes is not None:
        slopes = alibi_slopes.double()
        slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(slopes.shape[0], -1, 1, 1)
        scores = scores - slopes * rel.abs()
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.double()
    keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        # Top-left alignment (diag = 0), as torch SDPA is_causal=True: query i sees keys j <= i + diag.
        keep &= rel <= 0
    if window_size is not None:
        left, right = window_size
        if left >= 0:
            keep &= rel >= -left
        if right >= 0:
            keep &= rel <= right
    keep = keep.expand_as(scores)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask
    return scores.masked_fill(~keep, float("-inf"))


def _softmax(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Row softmax; `sinks` (Hq,) join each row's denominator; a row with nothing visible gives zeros (SDPA)."""
    if sinks is not None:
        sink = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    return probs[..., :-1] if sinks is not None else probs


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        scale: float | None = None, softcap: float = 0.0,
                        window_size: tuple[int, int] | None = None, sinks: torch.Tensor | None = None,
                        alibi_slopes: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                        dropout_keep: torch.Tensor | None = None, dropout_p: float = 0.0,
                        diag: int = 0) -> torch.Tensor:
    """softmax(scale·QKᵀ + modifiers)·V in float64, (B, Hq, Nq, D); GQA by head groups; differentiable.

    The modifiers follow kernel.mods' conventions, written out here independently of the kernels: `softcap`
    c > 0 caps the scaled scores to c·tanh(s/c); `alibi_slopes` (Hq,) or (B, Hq) subtract m·|j − i − diag|;
    a float `attn_mask` is added, a bool one keeps its True entries; `causal` keeps j <= i + diag and
    `window_size` (left, right) keeps i + diag − left <= j <= i + diag + right (-1: unbounded); `sinks` (Hq,)
    join each row's denominator; `dropout_keep` (broadcastable to (B, Hq, Nq, Nk), bool) keeps probabilities,
    scaled by 1/(1 − dropout_p). A row that sees no key gives zeros, as SDPA does."""
    scores = _scores(q, k, causal, scale, softcap, window_size=window_size, alibi_slopes=alibi_slopes,
                     attn_mask=attn_mask, diag=diag)
    probs = _softmax(scores, sinks)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    return torch.matmul(probs, _heads(v, q.shape[1]))


def lse_reference(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False,
                  scale: float | None = None, softcap: float = 0.0, window_size: tuple[int, int] | None = None,
                  sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                  attn_mask: torch.Tensor | None = None, diag: int = 0) -> torch.Tensor:
    """Row log-sum-exp of the scaled (modified, masked) scores in float64, (B, Hq, Nq), the sinks included
    (as `attention_reference` takes them); −inf for a row that sees nothing."""
    scores = _scores(q, k, causal, scale, softcap, window_size=window_size, alibi_slopes=alibi_slopes,
                     attn_mask=attn_mask, diag=diag)
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    return torch.logsumexp(scores, dim=-1)


def attention_flops(batch_heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of attention: 4·B·H·Nq·Nk·D, half when causal."""
    flops = 4.0 * batch_heads * seq_q * seq_k * head_dim
    return flops / 2 if causal else flops


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of `flops` done in `ms` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False, scale: float | None = None, softcap: float = 0.0) -> torch.Tensor:
    """softmax(scale·QKᵀ [capped] [+ mask])·V in the inputs' dtype, differentiable: torch SDPA's math backend
    (the caller pins it), or, with `softcap` c > 0, the same steps written out with the scores capped to
    c·tanh(s/c) first (SDPA has no cap). `attn_mask` is boolean (True: seen) and excludes is_causal."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def fp32_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, *,
                   max_bytes: int | None = None, softcap: float = 0.0) -> torch.Tensor:
    """softmax(QKᵀ/√D [capped] [+ causal mask])·V by torch SDPA's math backend on fp32 copies (`math_attention`:
    written out with a `softcap`), (B, H, N, D).

    Computed a few (batch, head) slices at a time, so a long sequence never needs the whole
    B·H·N·N score tensor at once; when one slice's N×N scores alone exceed `max_bytes` (a 64k
    prefill: 16 GiB each), a few query rows at a time (`query_rows`).
    """
    b, h, n, d = q.shape
    nk = k.shape[2]
    if max_bytes is None:
        max_bytes = REFERENCE_BYTES.get(q.device.type, REFERENCE_BYTES["cpu"])
    per_row = MATH_SCORE_COPIES * nk * 4
    chunk = max(1, max_bytes // (per_row * n))
    rows = min(n, max(1, max_bytes // per_row))
    qf, kf, vf = (x.flatten(0, 1) for x in (q, k, v))
    out = torch.empty(b * h, n, d, dtype=torch.float32, device=q.device)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        for lo in range(0, b * h, chunk):
            hi = min(lo + chunk, b * h)
            kc, vc = kf[lo:hi].float(), vf[lo:hi].float()
            for r0, r1, mask in query_rows(n, nk, rows, causal, q.device):
                out[lo:hi, r0:r1] = math_attention(qf[lo:hi, r0:r1].float(), kc, vc, attn_mask=mask,
                                                   is_causal=causal and mask is None, softcap=softcap)
    return out.view(b, h, n, d)


def query_rows(n: int, nk: int, rows: int, causal: bool, device: torch.device
               ) -> Iterator[tuple[int, int, torch.Tensor | None]]:
    """The query-row blocks [r0, r1) of `rows` rows an N×Nk reference is computed in, each with the
    boolean mask SDPA needs for it: None for one block (then SDPA's own is_causal applies) or when
    not causal; else the top-left causal mask of those rows (query r0 + i sees keys j <= r0 + i).
    Softmax is per row, so the blocks' outputs (and gradients) are exactly the whole one's. A
    generator: one block's mask exists at a time."""
    if rows >= n:
        yield 0, n, None
        return
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        mask = None
        if causal:
            mask = torch.arange(nk, device=device)[None, :] <= torch.arange(r0, r1, device=device)[:, None]
        yield r0, r1, mask


def output_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out − ref|, ‖out − ref‖ / ‖ref‖) in fp32; (inf, inf) when `out` holds a NaN or inf."""
    diff = out.float() - ref
    if not bool(torch.isfinite(diff).all()):
        return math.inf, math.inf
    rel = torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref).clamp_min(1e-30)
    return float(diff.abs().max()), float(rel)


def kvcache_mask(lengths: torch.Tensor, seq_q: int, seq_kv: int, causal: bool) -> torch.Tensor:
    """Which keys each query sees, (B, 1, Nq, Nmax) bool: j < len, and j <= len − Nq + i when causal.

    `lengths` is a (B,) integer tensor. Causal is bottom-right aligned (flash_attn's cache convention).
    """
    lens = lengths.to(torch.int64).view(-1, 1, 1, 1)
    j = torch.arange(seq_kv, device=lengths.device).view(1, 1, 1, -1)
    keep = j < lens
    if causal:
        i = torch.arange(seq_q, device=lengths.device).view(1, 1, -1, 1)
        keep = keep & (j <= lens - seq_q + i)
    return keep


def attention_kvcache_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                                cache_seqlens: torch.Tensor | None = None, causal: bool = False,
                                scale: float | None = None, dtype: torch.dtype = torch.float64,
                                softcap: float = 0.0) -> torch.Tensor:
    """softmax(scale·QKᵀ masked)·V computed in `dtype` (float64 by default), (B, Hq, Nq, D); `softcap` c > 0
    caps the scaled scores s to c·tanh(s/c) first (0: off).

    q (B, Hq, Nq, D); caches (B, Hkv, Nmax, D), Hq a multiple of Hkv (query head h uses KV head
    h // (Hq/Hkv)). A row that sees no key is 0. The caches are not repeated per query head: the
    query heads of one KV head are stacked into one matrix, so a long cache costs one copy in `dtype`.
    """
    b, hq, nq, d = q.shape
    hkv, nmax = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lengths = (torch.full((b,), nmax, dtype=torch.int64, device=q.device) if cache_seqlens is None
               else cache_seqlens.to(q.device))
    keep = kvcache_mask(lengths, nq, nmax, causal)  # (B, 1, Nq, Nmax)
    qg = q.to(dtype).reshape(b, hkv, group * nq, d)  # query head hkv·G + g, query i: row g·Nq + i
    k, v = k_cache.to(dtype), v_cache.to(dtype)
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, hkv, group, nq, nmax) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    keep = keep.unsqueeze(2)  # (B, 1, 1, Nq, Nmax)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    probs = torch.where(keep.any(-1, keepdim=True), probs, torch.zeros((), dtype=dtype, device=q.device))
    return torch.matmul(probs.view(b, hkv, group * nq, nmax), v).reshape(b, hq, nq, d)


# --- fp8 (e4m3) --------------------------------------------------------------------------------------

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn; torch's cast does not saturate (beyond it: NaN)
E4M3_UNIT = 2.0 ** -4  # unit roundoff of e4m3 (3 mantissa bits) for normal values, round to nearest
# Rounding P to e4m3 errs by at most this much in absolute terms below the normal range (2^-6): half the
# subnormal spacing 2^-9 on the GPU (round to nearest), the whole spacing where the Triton interpreter flushes.
E4M3_TINY = 2.0 ** -9


def quantize_fp8(x: torch.Tensor, per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in float8_e4m3fn, its fp32 descale) for a (B, H, N, D) tensor: one power-of-two descale per tensor
    (shape (1,)) or per (batch, head) (shape (B, H)), the smallest that keeps |x| / descale <= 448. A
    power of two, so x8·descale is exact in fp32 (and the kernels' products stay exact)."""
    amax = x.abs().amax(dim=(2, 3)) if per_head else x.abs().amax().reshape(1)
    descale = torch.exp2(torch.ceil(torch.log2(amax.float().clamp_min(1e-30) / E4M3_MAX)))
    view = descale[:, :, None, None] if per_head else descale
    return (x.float() / view).to(torch.float8_e4m3fn), descale


def dequantize_fp8(x8: torch.Tensor, descale: torch.Tensor | None) -> torch.Tensor:
    """float64 x8·descale (`descale` None, one element, or (B, H)): the real values of an fp8 input."""
    x = x8.double()
    if descale is None:
        return x
    d = descale.double()
    return x * (d.reshape(()) if d.numel() == 1 else d[:, :, None, None])


def fp8_error_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An elementwise bound on |out − reference| of the fp8 forward, for the dequantised float64 q, k, v.

    The reference is exact on the dequantised inputs, so the error comes from the kernel's own roundings:
    - P rounded to e4m3 for the P·V dot. The kernel's p_j (in units of the running row max, <= 1, then rescaled
      by a factor <= 1) errs by at most u·p_j + t (u = 2^-4, t = E4M3_TINY for subnormals and flushed
      values). Divided by the row sum l = 1 / max_j π_j (π the reference probabilities), the output errs by at
      most u·Σ π_j|v_j| + t·max_j π_j·Σ_j |v_j| over the visible keys j.
    - the scores: fp8 products are exact, summed in fp32 or, in Hopper's fp8 MMA, an accumulator of about 13
      mantissa bits (an error near 2^-13·Σ_i |q_i k_i|: ~2^-10 of P at D = 128 on N(0, 1) inputs); the
      exponentials in fp32. Bounded here by 2^-8·Σ π_j|v_j|, still well under u.
    - the output rounded to `out_dtype`: half an ulp, 2^-8 (bf16) or 2^-11 (fp16) of |out|, taken as twice
      that of the reference.
    """
    scores = _scores(q, k, causal, scale)
    probs = _softmax(scores, None)
    va = _heads(v, q.shape[1]).abs()
    visible = torch.isfinite(scores).double()
    weighted = torch.matmul(probs, va)
    tiny = probs.amax(dim=-1, keepdim=True) * torch.matmul(visible, va)
    out_ulp = 2.0 ** -8 if out_dtype == torch.bfloat16 else 2.0 ** -11
    ref = torch.matmul(probs, _heads(v, q.shape[1]))
    return (E4M3_UNIT + 2.0 ** -8) * weighted + E4M3_TINY * tiny + 2 * out_ulp * ref.abs()
