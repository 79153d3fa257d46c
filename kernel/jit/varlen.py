"""Packed-sequence (varlen) entry kernels: attention over documents laid end to end in (total, H, D) tensors.

The documents' tiles run through the very tile loops of the dense kernels (`_fwd_tiles` of kernel/jit/fwd.py,
`_dq_tiles` and `_dkdv_tiles` of kernel/jit/bwd.py); only the entry differs. Each program first reads which
(document, tile) it owns from a tile schedule, `Sched` (2, n_slots) int32, which kernel/ops/varlen.py builds on
the device: row 0 the document (n_docs past the last real tile: the program exits at once), row 1 the tile's
index inside the document. `Docs` (4, n_docs) int32 holds each document's query start, query length, key
start and key length, already clamped inside the tensors. So the grid walks only real tiles of real documents
(no padding tile, no tile that spans two documents) and no value of cu_seqlens is read on the host.

Inside a document, indices are the document's own: query i sees key j by flash_attn's varlen rule, aligned
bottom-right: diag = len_k − len_q, so causal keeps j <= i + diag and a window (left, right) keeps
i + diag − left <= j <= i + diag + right. Causal therefore always runs as a window (WINDOW, right capped at
0): the dense kernels' own CAUSAL mask is top-left. A row that sees no key (an empty key document, or a
bottom-right causal row with len_q > len_k) writes 0 and an LSE of −inf, and gets zero gradients.

The LSE and delta are (Hq, total_q) fp32, flash_attn's varlen layout. Offsets inside one document are 32-bit
(the host checks max_seqlen · row stride); document starts are 64-bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .bwd import _dkdv_tiles, _dq_tiles
from .common import LN2_C, LOG2E_C, causal_bounds, visible_range
from .fwd import _fwd_tiles


@triton.jit
def _doc_of(Sched, Docs, slot, n_slots, n_docs):
    """(document, tile in it, q start (int64), q length, k start (int64), k length) of schedule slot `slot`;
    the document is n_docs for a slot past the schedule's end (its lengths then read as 0)."""
    doc = tl.load(Sched + slot)
    tile = tl.load(Sched + n_slots + slot)
    real = doc < n_docs
    d = tl.where(real, doc, 0)
    q_start = tl.load(Docs + d).to(tl.int64)
    seq_q = tl.where(real, tl.load(Docs + n_docs + d), 0)
    k_start = tl.load(Docs + 2 * n_docs + d).to(tl.int64)
    seq_k = tl.where(real, tl.load(Docs + 3 * n_docs + d), 0)
    return doc, tile, q_start, seq_q, k_start, seq_k


@triton.jit
def attn_fwd_varlen_kernel(Q, K, V, O, LSE, Docs, Sched, Sinks,
                           stride_qm, stride_qh, stride_qd,
                           stride_kn, stride_kh, stride_kd,
                           stride_vn, stride_vh, stride_vd,
                           stride_om, stride_oh, stride_od, stride_lh,
                           n_slots, n_docs, group, qk_scale, cap_in, cap_out, window_before, window_after,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                           STORE_LSE: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                           SINKS: tl.constexpr):
    """Grid: (n_slots · heads_q,): the slots of one head are consecutive (its documents' K/V shared in L2).
    Q, O (total_q, Hq, D); K, V (total_k, Hkv, D); LSE (Hq, total_q) with row stride stride_lh. WINDOW (also
    for causal): the window sides as ScoreMods.window_sides gives them, bottom-right per document."""
    pid = tl.program_id(0)
    slot = pid % n_slots
    head = (pid // n_slots).to(tl.int64)
    doc, tile, q_start, seq_q, k_start, seq_k = _doc_of(Sched, Docs, slot, n_slots, n_docs)
    if doc >= n_docs:
        return
    head_kv = head // group
    diag = seq_k - seq_q
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_mask = offs_d < HEAD_DIM

    q_ptrs = (Q + q_start * stride_qm + head * stride_qh + offs_m[:, None] * stride_qm
              + offs_d[None, :] * stride_qd)
    k_ptrs = (K + k_start * stride_kn + head_kv * stride_kh + offs_n[None, :] * stride_kn
              + offs_d[:, None] * stride_kd)
    v_ptrs = (V + k_start * stride_vn + head_kv * stride_vh + offs_n[:, None] * stride_vn
              + offs_d[None, :] * stride_vd)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_mask[None, :], other=0.0)
    if SINKS:
        # As in attn_fwd_kernel: the sink is a key every row has already seen.
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(Sinks + head) * LOG2E_C
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The tile loops' arguments for modifiers varlen does not take (ALiBi, mask, dropout): inert. GUARD is on:
    # a row may see no key (an empty key document, a window, bottom-right causal).
    if WINDOW:
        lo, full_lo, full_hi, hi = visible_range(tile * BLOCK_M, seq_k, diag, window_before, window_after,
                                                 BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, full_lo, offs_m, offs_n, d_mask,
                                   seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                   m_ok, diag, window_before, window_after, 0.0, Q, 0, 0.0, 0, 0,
                                   BLOCK_N, True, False, PAD_D, PRECISION, SOFTCAP, True, False, 0, False, True)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_lo, full_hi, offs_m, offs_n, d_mask,
                                   seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                   m_ok, diag, window_before, window_after, 0.0, Q, 0, 0.0, 0, 0,
                                   BLOCK_N, False, False, PAD_D, PRECISION, SOFTCAP, True, False, 0, False, True)
    else:
        hi, full_hi = causal_bounds(tile * BLOCK_M, seq_k, BLOCK_M, BLOCK_N, False)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full_hi, offs_m, offs_n, d_mask,
                                   seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                   m_ok, diag, window_before, window_after, 0.0, Q, 0, 0.0, 0, 0,
                                   BLOCK_N, False, False, PAD_D, PRECISION, SOFTCAP, False, False, 0, False, True)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_hi, hi, offs_m, offs_n, d_mask,
                               seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                               m_ok, diag, window_before, window_after, 0.0, Q, 0, 0.0, 0, 0,
                               BLOCK_N, True, False, PAD_D, PRECISION, SOFTCAP, WINDOW, False, 0, False, True)

    seen = l_i > 0.0  # a row that saw no key keeps acc = 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = (O + q_start * stride_om + head * stride_oh + offs_m[:, None] * stride_om
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_mask[None, :])
    if STORE_LSE:
        lse = tl.where(seen, (m_i + tl.math.log2(l_i)) * LN2_C, float("-inf"))
        tl.store(LSE + head * stride_lh + q_start + offs_m, lse, mask=m_ok)


@triton.jit
def attn_bwd_dq_varlen_kernel(Q, K, V, DO, DQ, LSE, DELTA, Docs, Sched,
                              stride_qm, stride_qh, stride_qd,
                              stride_kn, stride_kh, stride_kd,
                              stride_vn, stride_vh, stride_vd,
                              stride_dom, stride_doh, stride_dod,
                              stride_dqm, stride_dqh, stride_dqd, stride_lh,
                              n_slots, n_docs, group, left, right, qk_scale, sm_scale, cap_in, cap_out,
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                              SOFTCAP: tl.constexpr, WINDOW: tl.constexpr):
    """Grid: (n_slots · heads_q,) over the schedule of query tiles of BLOCK_M. dQ without atomics, as
    attn_bwd_dq_kernel; LSE and DELTA (Hq, total_q) with row stride stride_lh."""
    pid = tl.program_id(0)
    slot = pid % n_slots
    head = (pid // n_slots).to(tl.int64)
    doc, tile, q_start, seq_q, k_start, seq_k = _doc_of(Sched, Docs, slot, n_slots, n_docs)
    if doc >= n_docs:
        return
    head_kv = head // group
    diag = seq_k - seq_q
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_mask = offs_d < HEAD_DIM
    row_mask = m_ok[:, None] & d_mask[None, :]

    q = tl.load(Q + q_start * stride_qm + head * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
    do = tl.load(DO + q_start * stride_dom + head * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=row_mask, other=0.0)
    lse = tl.load(LSE + head * stride_lh + q_start + offs_m, mask=m_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row that saw no key: P = 0, not NaN
    lse2 = lse * LOG2E_C
    delta = tl.load(DELTA + head * stride_lh + q_start + offs_m, mask=m_ok, other=0.0)
    kT_ptrs = (K + k_start * stride_kn + head_kv * stride_kh + offs_n0[None, :] * stride_kn
               + offs_d[:, None] * stride_kd)
    vT_ptrs = (V + k_start * stride_vn + head_kv * stride_vh + offs_n0[None, :] * stride_vn
               + offs_d[:, None] * stride_vd)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if WINDOW:
        lo, full_lo, full_hi, hi = visible_range(tile * BLOCK_M, seq_k, diag, left, right, BLOCK_M, BLOCK_N)
        dq = _dq_tiles(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, Q, lo, full_lo, offs_m, m_ok, offs_n0,
                       d_mask, seq_k, qk_scale, cap_in, cap_out, 0.0, left, right, diag, 0, 0.0, 0,
                       stride_kn, stride_vn, 0,
                       BLOCK_N, True, False, PAD_D, PRECISION, SOFTCAP, True, False, 0, False)
    else:
        hi, full_hi = causal_bounds(tile * BLOCK_M, seq_k, BLOCK_M, BLOCK_N, False)
        full_lo = 0
    dq = _dq_tiles(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, Q, full_lo, full_hi, offs_m, m_ok, offs_n0,
                   d_mask, seq_k, qk_scale, cap_in, cap_out, 0.0, left, right, diag, 0, 0.0, 0,
                   stride_kn, stride_vn, 0,
                   BLOCK_N, False, False, PAD_D, PRECISION, SOFTCAP, WINDOW, False, 0, False)
    dq = _dq_tiles(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, Q, full_hi, hi, offs_m, m_ok, offs_n0,
                   d_mask, seq_k, qk_scale, cap_in, cap_out, 0.0, left, right, diag, 0, 0.0, 0,
                   stride_kn, stride_vn, 0,
                   BLOCK_N, True, False, PAD_D, PRECISION, SOFTCAP, WINDOW, False, 0, False)

    dq = dq * sm_scale
    tl.store(DQ + q_start * stride_dqm + head * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def attn_bwd_dkdv_varlen_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, Docs, Sched,
                                stride_qm, stride_qh, stride_qd,
                                stride_kn, stride_kh, stride_kd,
                                stride_vn, stride_vh, stride_vd,
                                stride_dom, stride_doh, stride_dod,
                                stride_dkn, stride_dkh, stride_dkd,
                                stride_dvn, stride_dvh, stride_dvd, stride_lh,
                                n_slots, n_docs, group, left, right, qk_scale, sm_scale, cap_in, cap_out,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                                SOFTCAP: tl.constexpr, WINDOW: tl.constexpr):
    """Grid: (n_slots · heads_kv,) over the schedule of key tiles of BLOCK_N. As attn_bwd_dkdv_kernel: one KV
    tile of one KV head streams the query tiles of its document for every query head of its GQA group."""
    pid = tl.program_id(0)
    slot = pid % n_slots
    head_kv = (pid // n_slots).to(tl.int64)
    doc, tile, q_start, seq_q, k_start, seq_k = _doc_of(Sched, Docs, slot, n_slots, n_docs)
    if doc >= n_docs:
        return
    diag = seq_k - seq_q
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    start_n = tile * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seq_k
    d_mask = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_mask[None, :]

    k = tl.load(K + k_start * stride_kn + head_kv * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + k_start * stride_vn + head_kv * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # The query-tile ranges, as attn_bwd_dkdv_kernel forms them (CAUSAL runs as the window here).
    if WINDOW:
        lo, mid, full_hi, q_end = visible_range(start_n, seq_q, -diag, right, left, BLOCK_N, BLOCK_M)
        full_hi = tl.where(start_n + BLOCK_N > seq_k, mid, full_hi)  # the KV tail tile: all masked
        tail_lo = full_hi
    else:
        q_end = tl.cdiv(seq_q, BLOCK_M) * BLOCK_M
        full_hi = (seq_q // BLOCK_M) * BLOCK_M
        lo = 0
        mid = tl.where(start_n + BLOCK_N > seq_k, q_end, 0)
        tail_lo = tl.maximum(mid, full_hi)

    for g in range(group):
        head = head_kv * group + g
        qT_ptrs = (Q + q_start * stride_qm + head * stride_qh + offs_m0[None, :] * stride_qm
                   + offs_d[:, None] * stride_qd)
        do_ptrs = (DO + q_start * stride_dom + head * stride_doh + offs_m0[:, None] * stride_dom
                   + offs_d[None, :] * stride_dod)
        lse_ptr = LSE + head * stride_lh + q_start
        delta_ptr = DELTA + head * stride_lh + q_start
        dk, dv = _dkdv_tiles(dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, Q, Q, lo, mid,
                             offs_m0, offs_n, n_ok, d_mask, seq_q, seq_k, qk_scale, cap_in, cap_out,
                             0.0, left, right, diag, 0, 0.0, 0, stride_qm, stride_dom, 1, 0, 0,
                             BLOCK_M, True, False, PAD_D, PRECISION, False, SOFTCAP, WINDOW, False, 0, False)
        dk, dv = _dkdv_tiles(dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, Q, Q, mid, full_hi,
                             offs_m0, offs_n, n_ok, d_mask, seq_q, seq_k, qk_scale, cap_in, cap_out,
                             0.0, left, right, diag, 0, 0.0, 0, stride_qm, stride_dom, 1, 0, 0,
                             BLOCK_M, False, False, PAD_D, PRECISION, False, SOFTCAP, WINDOW, False, 0, False)
        dk, dv = _dkdv_tiles(dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, Q, Q, tail_lo, q_end,
                             offs_m0, offs_n, n_ok, d_mask, seq_q, seq_k, qk_scale, cap_in, cap_out,
                             0.0, left, right, diag, 0, 0.0, 0, stride_qm, stride_dom, 1, 0, 0,
                             BLOCK_M, True, False, PAD_D, PRECISION, False, SOFTCAP, WINDOW, False, 0, False)

    dk = dk * sm_scale
    tl.store(DK + k_start * stride_dkn + head_kv * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + k_start * stride_dvn + head_kv * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)
