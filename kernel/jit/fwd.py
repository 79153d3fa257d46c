"""The fused forward attention kernel (FlashAttention-2 schedule), through plain pointers.

One program computes BLOCK_M query rows of one (batch, head): it streams BLOCK_N-row tiles of K and
V, keeps the running row max and row sum in fp32 (online softmax, base-2 exponentials with the
softmax scale folded into one multiply), accumulates P·V in fp32 and writes O once.

Plain pointers, no block pointers: Triton 3.9 removed `tl.make_block_ptr`, and the same source must
compile on the GPU machine's Triton 3.6.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import LN2_C, block_of, causal_bounds, load_tile, softcap_scores, softmax_step


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, hi, offs_m, offs_n, d_mask, seq_k, qk_scale,
               cap_in, cap_out, stride_kn, stride_vn,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               PAD_D: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    # MASKED=False is the steady state: whole tiles inside the sequence and below the diagonal,
    # loaded and used without any mask. MASKED=True handles the tail tile and the diagonal tiles.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        n_ok = cols < seq_k
        # K is read transposed, (BLOCK_D, BLOCK_N), so that QK^T is a plain dot.
        k = load_tile(k_ptrs + start_n * stride_kn, d_mask, n_ok, PAD_D, MASKED)
        if SOFTCAP:
            qk = softcap_scores(tl.dot(q, k, input_precision=PRECISION), cap_in, cap_out)
        else:
            qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        if MASKED:
            valid = n_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= cols[None, :])
            qk = tl.where(valid, qk, float("-inf"))
        # Every row has seen key 0 by the time a tile can be fully masked for it (causal is
        # top-left aligned), so the new max is finite and exp2(-inf - max) is a clean 0.
        p, m_i, l_i, acc = softmax_step(qk, m_i, l_i, acc, False)
        v = load_tile(v_ptrs + start_n * stride_vn, n_ok, d_mask, MASKED, PAD_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(Q, K, V, O, LSE,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_om, stride_od,
                    seq_q, seq_k, heads_q, group, qk_scale, cap_in, cap_out,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr,
                    SOFTCAP: tl.constexpr = False):
    """Grid: one_axis_grid(batch, heads_q, seq_q, BLOCK_M). `group` = heads_q // heads_kv (GQA/MQA).
    SOFTCAP: scores are capped (common.softcap_scores with cap_in, cap_out) instead of scaled by qk_scale."""
    pid_m, bh, batch, head = block_of(tl.program_id(0), tl.cdiv(seq_q, BLOCK_M), heads_q)
    batch = batch.to(tl.int64)
    head_kv = (head // group).to(tl.int64)
    head = head.to(tl.int64)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_mask = offs_d < HEAD_DIM

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + batch * stride_kb + head_kv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + batch * stride_vb + head_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi, full_hi = causal_bounds(pid_m * BLOCK_M, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full_hi, offs_m, offs_n, d_mask,
                               seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                               BLOCK_N, False, CAUSAL, PAD_D, PRECISION, SOFTCAP)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_hi, hi, offs_m, offs_n, d_mask,
                               seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                               BLOCK_N, True, CAUSAL, PAD_D, PRECISION, SOFTCAP)

    acc = acc / l_i[:, None]
    o_ptrs = O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_mask[None, :])
    if STORE_LSE:
        # Natural-log LSE of the scaled scores: m_i and l_i live in base 2.
        lse = (m_i + tl.math.log2(l_i)) * LN2_C
        tl.store(LSE + bh.to(tl.int64) * seq_q + offs_m, lse, mask=m_ok)
