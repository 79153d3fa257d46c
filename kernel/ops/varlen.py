"""The packed-sequence (varlen) op: input checks, the device-side document table and tile schedule, and the
forward and backward launches of kernel/jit/varlen.py.

No value of cu_seqlens is read on the host. `packing` turns cu_seqlens_q/k into a (4, B) int32 document table
with a few torch ops on the device: each offset is clamped into [0, total] and made non-decreasing (a running
max), and each length is capped at max_seqlen, so a kernel never reads or writes outside q, k, v or the outputs
whatever the values. (Rows that no document covers, or that lie past max_seqlen in theirs, are then left
unwritten: their output and gradients are undefined, as with flash_attn.) `schedule` lists the real tiles:
document d has ceil(len_d / block) tiles, their offsets an exclusive cumsum, and slot t belongs to the document
`searchsorted` finds for it. The grid is the upper bound min(ceil(total / block) + min(B, total),
B · ceil(max_seqlen / block)) times the heads; programs past the schedule's end exit at once, so the grid never
walks a padding tile or a tile that spans two documents.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...db.types import HEAD_DIMS, HEAD_DIMS_TEXT, INT32_MAX, Config
from ..checks import AttnShape, check_dense, check_int32, check_runnable
from ..dtypes import DTYPE_NAMES
from ..jit.bwd import attn_bwd_preprocess_kernel
from ..jit.common import GRID_X_MAX, LOG2E, one_axis_grid, softcap_factors
from ..jit.varlen import (
    attn_bwd_dkdv_varlen_kernel,
    attn_bwd_dq_varlen_kernel,
    attn_fwd_varlen_kernel,
)
from ..mods import NO_MODS, ScoreMods
from .bwd import _elementwise_block, bwd_knobs
from .common import padded_head_dim
from .fwd import fwd_variant

__all__ = ["Packing", "check_varlen_inputs", "launch_varlen_bwd", "launch_varlen_fwd", "packing", "schedule",
           "varlen_knobs"]


@dataclass(frozen=True)
class Packing:
    """The documents of one packed call: `docs` (4, B) int32 on the device (q start, q length, k start, k length,
    clamped inside the tensors) and the host sizes that bound the grids."""

    docs: Tensor
    batch: int
    total_q: int
    total_k: int
    max_q: int
    max_k: int


def _check_tokens(name: str, t: Any) -> None:
    check_dense(name, t, "3-D (total_tokens, heads, head_dim)")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no heads (shape {tuple(t.shape)})")


def _check_cu(name: str, cu: Any, device: torch.device) -> int:
    check_int32(name, cu, device, "(batch + 1,)")
    if cu.dim() != 1 or cu.numel() == 0:
        raise ValueError(f"{name} must be 1-D of batch + 1 offsets starting at 0, got shape {tuple(cu.shape)}")
    return cu.numel() - 1


def _check_max(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int (the longest document's length), got {reprlib.repr(value)}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_varlen_inputs(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: Any,
                        max_seqlen_k: Any) -> AttnShape:
    """Validate packed q (total_q, Hq, D), k and v (total_k, Hkv, D) and the cu_seqlens / max_seqlen of their
    documents (shapes, dtypes, devices; not their values, which stay on the device). Returns an AttnShape with
    batch = the number of documents and seq_q/seq_k = max_seqlen_q/k. TypeError / ValueError naming the problem."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tokens(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _, hq, d = q.shape
    _, hkv, dk = k.shape
    if dk != d:
        raise ValueError(f"head dim differs: q has {d}, k and v have {dk}")
    if d not in HEAD_DIMS:
        raise ValueError(f"unsupported head dim {d}: the last dim of q, k, v must be {HEAD_DIMS_TEXT}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA/MQA")
    batch = _check_cu("cu_seqlens_q", cu_seqlens_q, q.device)
    if _check_cu("cu_seqlens_k", cu_seqlens_k, q.device) != batch:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    max_q = _check_max("max_seqlen_q", max_seqlen_q)
    max_k = _check_max("max_seqlen_k", max_seqlen_k)
    # Offsets inside one document are 32-bit in the kernels (documents' starts are 64-bit).
    for name, t, longest in (("q", q, max_q), ("k", k, max_k), ("v", v, max_k)):
        if max(longest - 1, 0) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) + (d - 1) * t.stride(2) > INT32_MAX:
            raise ValueError(f"{name}: one document of {longest} tokens spans more than 2**31 elements "
                             f"(strides {t.stride()}): split the document")
    if (-(-q.shape[0] // 16) + batch) * hq > GRID_X_MAX:
        raise ValueError(f"q of shape {tuple(q.shape)} with {batch} documents needs more than 2**31-1 programs")
    check_runnable(q)
    return AttnShape(batch, hq, hkv, max_q, max_k, d, DTYPE_NAMES[q.dtype])


def _offsets(cu: Tensor, total: int, longest: int) -> tuple[Tensor, Tensor]:
    # Clamped into [0, total] and non-decreasing: every document lies inside the tensor whatever the values.
    cu = torch.cummax(cu.clamp(0, total), 0).values
    return cu[:-1], (cu[1:] - cu[:-1]).clamp(max=longest)


def packing(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_q: int, total_k: int, max_q: int,
            max_k: int) -> Packing:
    """The document table of a call (checked by check_varlen_inputs), built on the device without a sync."""
    q_start, q_len = _offsets(cu_seqlens_q, total_q, max_q)
    k_start, k_len = _offsets(cu_seqlens_k, total_k, max_k)
    docs = torch.stack([q_start, q_len, k_start, k_len]).to(torch.int32).contiguous()
    return Packing(docs, cu_seqlens_q.numel() - 1, total_q, total_k, max_q, max_k)


def slots(total: int, batch: int, longest: int, block: int) -> int:
    """An upper bound of the tiles of `block` rows of `batch` documents of `total` rows, none over `longest`."""
    return min(-(-total // block) + min(batch, total), batch * -(-longest // block))


def schedule(lengths: Tensor, block: int, n_slots: int) -> Tensor:
    """(2, n_slots) int32: each slot's document (len(lengths) past the last tile) and tile within it."""
    tiles = (lengths.to(torch.int64) + (block - 1)) // block
    ends = torch.cumsum(tiles, 0)
    slot = torch.arange(n_slots, device=lengths.device)
    doc = torch.searchsorted(ends, slot, right=True)
    tile = slot - (ends - tiles)[doc.clamp(max=lengths.numel() - 1)]
    return torch.stack([doc, tile]).to(torch.int32)


def _window(mods: ScoreMods, causal: bool) -> tuple[bool, int, int]:
    # Causal is bottom-right per document: it runs as the window's right side capped at 0 (kernel/jit/varlen.py).
    left, right = mods.window_sides(causal)
    return bool(causal or mods.windowed), left, right


def _caps(scale: float, mods: ScoreMods) -> tuple[float, float]:
    return softcap_factors(scale, mods.softcap) if mods.softcap else (0.0, 0.0)


def varlen_knobs(config: Config) -> None:
    """Raise ValueError for a forward config the packed kernel cannot run: it takes the pointer kernel's tile
    sizes, warps and stages, and no variant knob (TMA loads, schedules, dropout, ...)."""
    variant = fwd_variant(config)
    if variant.launch is not None or variant.constexprs:
        raise ValueError(f"config {config}: the varlen forward runs the pointer kernel only (no knobs)")


def launch_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, pack: Packing, shape: AttnShape, *, causal: bool,
                      scale: float, config: Config, mods: ScoreMods = NO_MODS, return_lse: bool = True,
                      fp32_precision: str = "ieee", out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(o (total_q, Hq, D), lse (Hq, total_q) fp32 or None) of the packed call; no input checks.

    `config` is a forward Config of the pointer kernel (block_m, block_n, warps, stages; ValueError for a knob it
    does not take). `mods`: softcap, window and sinks (bottom-right per document); the LSE includes the sinks.
    Rows no document covers are not written."""
    varlen_knobs(config)
    o = torch.empty_like(q) if out is None else out
    lse = torch.empty((shape.heads_q, pack.total_q), device=q.device, dtype=torch.float32) if return_lse else o
    n_slots = slots(pack.total_q, pack.batch, pack.max_q, config.block_m)
    if n_slots == 0:
        return o, (lse if return_lse else None)
    sched = schedule(pack.docs[1], config.block_m, n_slots)
    windowed, left, right = _window(mods, causal)
    cap_in, cap_out = _caps(scale, mods)
    attn_fwd_varlen_kernel[(n_slots * shape.heads_q,)](
        q, k, v, o, lse, pack.docs, sched, mods.sinks,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), lse.stride(0) if return_lse else 0,
        n_slots, pack.batch, shape.group, scale * LOG2E, cap_in, cap_out, left, right,
        HEAD_DIM=shape.head_dim, BLOCK_D=padded_head_dim(shape.head_dim), BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, PRECISION=fp32_precision, STORE_LSE=return_lse, SOFTCAP=bool(mods.softcap),
        WINDOW=windowed, SINKS=mods.sinks is not None, num_warps=config.num_warps, num_stages=config.num_stages)
    return o, (lse if return_lse else None)


def launch_varlen_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, pack: Packing,
                      shape: AttnShape, *, causal: bool, scale: float, config: Config, mods: ScoreMods = NO_MODS,
                      fp32_precision: str = "ieee", out: tuple[Tensor, Tensor, Tensor] | None = None,
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, delta (Hq, total_q) fp32) of the packed call; o and lse (Hq, total_q) from launch_varlen_fwd
    with the same arguments. Always deterministic (no atomics: a config's `deterministic` knob is ignored); the
    sinks' gradient is the caller's (kernel.mods.sinks_grad with delta). Keys no document covers get no
    gradient written. `out`: the (dq, dk, dv) buffers to write (else new ones like q, k, v)."""
    knobs = bwd_knobs(config)
    dq, dk, dv = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) if out is None else out
    lse = lse.contiguous()
    delta = torch.empty((shape.heads_q, pack.total_q), device=q.device, dtype=torch.float32)
    block_d = padded_head_dim(shape.head_dim)
    if pack.total_q:
        rows = _elementwise_block(block_d)
        # The dense preprocess over one "batch" of total_q rows: delta (Hq, total_q) is its (1, Hq, Nq) output.
        attn_bwd_preprocess_kernel[one_axis_grid(1, shape.heads_q, pack.total_q, rows)](
            o, do, delta, 0, o.stride(1), o.stride(0), o.stride(2), 0, do.stride(1), do.stride(0), do.stride(2),
            pack.total_q, shape.heads_q, HEAD_DIM=shape.head_dim, BLOCK_D=block_d, BLOCK_M=rows, num_warps=4)
    windowed, left, right = _window(mods, causal)
    cap_in, cap_out = _caps(scale, mods)
    common = {"HEAD_DIM": shape.head_dim, "BLOCK_D": block_d, "PRECISION": fp32_precision, "SOFTCAP": bool(mods.softcap),
                  "WINDOW": windowed}
    n_kv = slots(pack.total_k, pack.batch, pack.max_k, knobs.block_n)
    if n_kv:
        attn_bwd_dkdv_varlen_kernel[(n_kv * shape.heads_kv,)](
            q, k, v, do, dk, dv, lse, delta, pack.docs, schedule(pack.docs[3], knobs.block_n, n_kv),
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), lse.stride(0),
            n_kv, pack.batch, shape.group, left, right, scale * LOG2E, scale, cap_in, cap_out,
            BLOCK_M=knobs.block_m, BLOCK_N=knobs.block_n, **common,
            num_warps=knobs.num_warps, num_stages=knobs.num_stages)
    n_q = slots(pack.total_q, pack.batch, pack.max_q, knobs.block_m_dq)
    if n_q:
        attn_bwd_dq_varlen_kernel[(n_q * shape.heads_q,)](
            q, k, v, do, dq, lse, delta, pack.docs, schedule(pack.docs[1], knobs.block_m_dq, n_q),
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), lse.stride(0),
            n_q, pack.batch, shape.group, left, right, scale * LOG2E, scale, cap_in, cap_out,
            BLOCK_M=knobs.block_m_dq, BLOCK_N=knobs.block_n_dq, **common,
            num_warps=knobs.num_warps_dq, num_stages=knobs.num_stages_dq)
    return dq, dk, dv, delta
