"""Dropout's keep mask written out, for references and tests: the same draws the attention kernels make
(common.dropout_keep), one program per BLOCK_M rows of one (batch, head)."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import block_of, dropout_keep


@triton.jit
def dropout_mask_kernel(OUT, seed, dropout_p, seq_q, seq_k, heads,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid: one_axis_grid(batch, heads, seq_q, BLOCK_M). OUT: contiguous (B, H, Nq, Nk) int8, 1 where kept."""
    pid_m, bh, _, _ = block_of(tl.program_id(0), tl.cdiv(seq_q, BLOCK_M), heads)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = OUT + bh.to(tl.int64) * seq_q * seq_k
    for start_n in range(0, seq_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, bh, rows[:, None], cols[None, :], seq_k, dropout_p)
        ok = (rows < seq_q)[:, None] & (cols < seq_k)[None, :]
        tl.store(base + rows[:, None] * seq_k + cols[None, :], keep.to(tl.int8), mask=ok)
