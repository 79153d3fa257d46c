"""The fused forward attention kernel (FlashAttention-2 schedule) in Triton.

One program computes BLOCK_M query rows of one (batch, head): it streams BLOCK_N-row tiles of K and
V, keeps the running row max and row sum in fp32 (online softmax, base-2 exponentials with the
softmax scale folded into one multiply), accumulates P·V in fp32 and writes O once.

Plain pointers, no block pointers: Triton 3.9 removed `tl.make_block_ptr`, and the same source must
compile on the GPU machine's Triton 3.6. The file's hash is part of the kernel version stored with
every tuned config (kernel/version.py), so any change here marks earlier tuning results as stale;
the grid lives here for that reason too, since the kernel decodes its program id against it.
"""
from __future__ import annotations

import triton
import triton.language as tl

# CUDA's grid limit in x. y and z allow only 65535, which B or H alone can exceed, so the kernel
# runs on one axis and finds its (batch, head, query block) from the program id.
GRID_X_MAX = 2**31 - 1


def fwd_grid(batch: int, heads_q: int, seq_q: int, block_m: int) -> tuple[int]:
    """The launch grid of attn_fwd_kernel: one program per query block of every (batch, head)."""
    return (batch * heads_q * -(-seq_q // block_m),)  # ceil division inline: this runs on every call


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, hi, offs_m, offs_n, d_mask, seq_k, qk_scale,
               stride_kn, stride_vn,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               PAD_D: tl.constexpr, PRECISION: tl.constexpr):
    # MASKED=False is the steady state: whole tiles inside the sequence and below the diagonal,
    # loaded and used without any mask. MASKED=True handles the tail tile and the diagonal tiles.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASKED:
            n_ok = cols < seq_k
            if PAD_D:
                k = tl.load(k_ptrs + start_n * stride_kn, mask=n_ok[None, :] & d_mask[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs + start_n * stride_kn, mask=n_ok[None, :], other=0.0)
        else:
            if PAD_D:
                k = tl.load(k_ptrs + start_n * stride_kn, mask=d_mask[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs + start_n * stride_kn)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        if MASKED:
            valid = n_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= cols[None, :])
            qk = tl.where(valid, qk, float("-inf"))
        # Every row has seen key 0 by the time a tile can be fully masked for it (causal is
        # top-left aligned), so m_new is finite and exp2(-inf - m_new) is a clean 0.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            if PAD_D:
                v = tl.load(v_ptrs + start_n * stride_vn, mask=n_ok[:, None] & d_mask[None, :], other=0.0)
            else:
                v = tl.load(v_ptrs + start_n * stride_vn, mask=n_ok[:, None], other=0.0)
        else:
            if PAD_D:
                v = tl.load(v_ptrs + start_n * stride_vn, mask=d_mask[None, :], other=0.0)
            else:
                v = tl.load(v_ptrs + start_n * stride_vn)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(Q, K, V, O, LSE,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_om, stride_od,
                    seq_q, seq_k, heads_q, group, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid: fwd_grid(...), one axis. `group` = heads_q // heads_kv (GQA/MQA)."""
    # Program p is query block p % n_blocks of (batch, head) number p // n_blocks: the blocks of one
    # head run next to each other (they share K and V in L2), as with a (blocks, heads, batch) grid.
    n_blocks = tl.cdiv(seq_q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_blocks
    bh = pid // n_blocks
    batch = (bh // heads_q).to(tl.int64)
    head = bh % heads_q
    head_kv = (head // group).to(tl.int64)
    head = head.to(tl.int64)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_mask = offs_d < HEAD_DIM

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    # K is read transposed, (BLOCK_D, BLOCK_N), so that QK^T is a plain dot.
    k_ptrs = K + batch * stride_kb + head_kv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + batch * stride_vb + head_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # Top-left alignment (torch SDPA is_causal=True): query i sees keys j <= i. Keys past the
        # block's last row are never loaded; keys before its first row need no causal mask.
        hi = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M)
        full_hi = (tl.minimum(seq_k, pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    else:
        hi = seq_k
        full_hi = (seq_k // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full_hi, offs_m, offs_n, d_mask,
                               seq_k, qk_scale, stride_kn, stride_vn,
                               BLOCK_N, False, CAUSAL, PAD_D, PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_hi, hi, offs_m, offs_n, d_mask,
                               seq_k, qk_scale, stride_kn, stride_vn,
                               BLOCK_N, True, CAUSAL, PAD_D, PRECISION)

    acc = acc / l_i[:, None]
    o_ptrs = O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_mask[None, :])
    if STORE_LSE:
        # Natural-log LSE of the scaled scores: m_i and l_i live in base 2.
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + bh.to(tl.int64) * seq_q + offs_m, lse, mask=m_ok)
