"""The testing reference for KV-cache attention: explicit masks, plain PyTorch ops, no tiling.

Independent of the decode kernel on purpose (no splits, no online softmax, no row packing): the
mask is built element by element from its definition, so tests and benchmarks can check the kernel
against it.
"""
from __future__ import annotations

import math

import torch


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
                                scale: float | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """softmax(scale·QKᵀ masked)·V computed in `dtype` (float64 by default), (B, Hq, Nq, D).

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
    keep = keep.unsqueeze(2)  # (B, 1, 1, Nq, Nmax)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    probs = torch.where(keep.any(-1, keepdim=True), probs, torch.zeros((), dtype=dtype, device=q.device))
    return torch.matmul(probs.view(b, hkv, group * nq, nmax), v).reshape(b, hq, nq, d)
