"""The reference of a workload with score modifiers: kernel.testing's float64 `attention_reference` (the modifiers
written out independently of the kernels), computed in chunks so that a long sequence never holds all its scores.

A chunk is one sequence, one K/V head's group of query heads and a block of query rows; each modifier is cut to
the chunk (sinks and slopes to its heads, the mask to its sequence, heads and rows) and the rows' diagonal
offset moves with the block (row r0 + i of the block is query r0 + i). Softmax is per row, so the blocks' outputs,
and their gradients, are exactly the whole call's. Dropout's keep mask is the kernels' own
(kernel.mods.dropout_keep_mask), drawn one chunk's (sequence, heads) at a time: the kernels key Philox by
seed + the (batch·heads) index, so a chunk's planes are those of the seed moved to its first head.

The result comes back in fp32, like the SDPA references of unmodified keys (kernel.testing.fp32_reference).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ...kernel.mods import ScoreMods, dropout_keep_mask
from ...kernel.testing import REFERENCE_BYTES, attention_reference

# float64 Nk-long rows the reference holds per query row and head at its peak: scores, relative positions,
# the keep mask, the softmax's exponentials and probabilities, and the mask and dropout planes.
FORWARD_COPIES = 8
GRADIENT_COPIES = 16  # the forward's and autograd's saved tensors and gradients


def _chunks(q: torch.Tensor, k: torch.Tensor, max_bytes: int | None, copies: int
            ) -> Iterator[tuple[int, int, int, int, int]]:
    """(sequence, K/V head, first query head, first row, end row) of each chunk, rows innermost."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    if max_bytes is None:
        max_bytes = REFERENCE_BYTES.get(q.device.type, REFERENCE_BYTES["cpu"])
    rows = min(nq, max(1, max_bytes // (copies * group * nk * 8)))
    for s in range(b):
        for h in range(hkv):
            for r0 in range(0, nq, rows):
                yield s, h, h * group, r0, min(r0 + rows, nq)


def _keep_planes(mods: ScoreMods, q: torch.Tensor, k: torch.Tensor, s: int, h0: int) -> torch.Tensor | None:
    """The dropout keep mask (1, G, Nq, Nk) of sequence `s`, query heads h0.., as the kernels draw it."""
    if not mods.dropout_p:
        return None
    hq, nq, group = q.shape[1], q.shape[2], q.shape[1] // k.shape[1]
    return dropout_keep_mask(mods.seed + s * hq + h0, mods.dropout_p, 1, group, nq, k.shape[2], q.device)


def _chunk_mods(mods: ScoreMods, keep: torch.Tensor | None, s: int, h0: int, h1: int, r0: int, r1: int,
                diag: int) -> dict[str, Any]:
    """attention_reference's modifier keywords for one chunk."""
    return {"softcap": mods.softcap, "window_size": mods.window if mods.windowed else None,
            "sinks": None if mods.sinks is None else mods.sinks[h0:h1],
            "alibi_slopes": None if mods.alibi is None else mods.alibi[s:s + 1, h0:h1],
            "attn_mask": None if mods.mask is None else mods.mask[s:s + 1, h0:h1, r0:r1],
            "dropout_keep": None if keep is None else keep[:, :, r0:r1], "dropout_p": mods.dropout_p,
            "diag": diag + r0}


def modified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                       mods: ScoreMods, diag: int = 0, max_bytes: int | None = None) -> torch.Tensor:
    """softmax(scale·QKᵀ + `mods`)·V, (B, Hq, Nq, D) fp32, computed in float64 (kernel.testing.attention_reference)
    `max_bytes` of scores at a time; GQA by each K/V head serving its group of consecutive query heads; `diag` the
    diagonal's offset (0: attention()'s top-left; Nk − Nq: a full KV cache's bottom-right)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    keep, planes_of = None, None
    for s, h, h0, r0, r1 in _chunks(q, k, max_bytes, FORWARD_COPIES):
        if planes_of != (s, h):
            keep, planes_of = _keep_planes(mods, q, k, s, h0), (s, h)
        out[s:s + 1, h0:h0 + group, r0:r1] = attention_reference(
            q[s:s + 1, h0:h0 + group, r0:r1], k[s:s + 1, h:h + 1], v[s:s + 1, h:h + 1], causal=causal, scale=scale,
            **_chunk_mods(mods, keep, s, h0, h0 + group, r0, r1, diag))
    return out


def modified_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, *, causal: bool,
                       scale: float, mods: ScoreMods, max_bytes: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in fp32 of `modified_attention` for output gradient `do`, by float64 autograd chunk by chunk:
    dQ of a row block is its own, dK and dV add up over the blocks and the query heads of a K/V head."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    keep, planes_of = None, None
    with torch.enable_grad():
        for s, h, h0, r0, r1 in _chunks(q, k, max_bytes, GRADIENT_COPIES):
            if planes_of != (s, h):
                keep, planes_of = _keep_planes(mods, q, k, s, h0), (s, h)
            qs = q[s:s + 1, h0:h0 + group, r0:r1].double().requires_grad_(True)
            ks, vs = (x[s:s + 1, h:h + 1].double().requires_grad_(True) for x in (k, v))
            out = attention_reference(qs, ks, vs, causal=causal, scale=scale,
                                      **_chunk_mods(mods, keep, s, h0, h0 + group, r0, r1, 0))
            gq, gk, gv = torch.autograd.grad(out, (qs, ks, vs), do[s:s + 1, h0:h0 + group, r0:r1].double())
            dq[s:s + 1, h0:h0 + group, r0:r1] = gq.float()
            dk[s:s + 1, h:h + 1] += gk.float()
            dv[s:s + 1, h:h + 1] += gv.float()
    return dq, dk, dv
