"""The fused backward attention kernels (FlashAttention-2 schedule) in Triton.

Three kernels, launched in order by kernel/ops/bwd.py:

1. `attn_bwd_preprocess_kernel`: delta = rowsum(dO ∘ O) in fp32, (B, Hq, Nq). It is the row term of
   dS = P ∘ (dP − delta), since rowsum(P ∘ dP) = rowsum(dO ∘ O).
2. `attn_bwd_dkdv_kernel`: one program per (KV block, KV head, batch). It keeps its K and V tiles
   and the fp32 dK, dV accumulators on chip and streams every query tile of every query head of its
   GQA group, recomputing P = exp2(scale·log2(e)·QKᵀ − LSE·log2(e)) from the forward's natural-log
   LSE. dK/dV are therefore summed over the group in registers and written once, without atomics
   and without materialising repeated K/V. With ATOMIC_DQ it also adds each tile's dQ share into an
   fp32 buffer with atomics (fast, not bitwise reproducible).
3. `attn_bwd_dq_kernel`: one program per (query block, query head, batch), looping over KV tiles in
   a fixed order: dQ without atomics, deterministic by construction. With ATOMIC_DQ the launcher
   runs `attn_bwd_dq_convert_kernel` instead, scaling and casting the fp32 buffer into dQ.

Masking follows the forward: causal is top-left aligned (query i sees keys j <= i, as torch SDPA's
is_causal), tiles wholly above the diagonal are never visited, tiles wholly inside the sequences and
below the diagonal run without masks, and head dims that are not powers of two are padded to the
next one with masked loads and stores.

With SOFTCAP the scores are capped as in the forward, s = c·tanh(scale·qkᵀ/c) (`softcap_scores`), P is
recomputed from the capped scores, and dS is multiplied by the cap's derivative 1 − tanh²(scale·qkᵀ/c)
before the dots; dQ and dK keep their scale factor. SOFTCAP=False compiles exactly the uncapped code.

Plain pointers only: Triton 3.9 removed block pointers and
the same source must compile on Triton 3.6.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E_C, block_of, causal_bounds, load_tile, softcap_scores


@triton.jit
def attn_bwd_preprocess_kernel(O, DO, DELTA,
                               stride_ob, stride_oh, stride_om, stride_od,
                               stride_dob, stride_doh, stride_dom, stride_dod,
                               seq_q, heads_q,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid: one_axis_grid(batch, heads_q, seq_q, BLOCK_M). DELTA is contiguous (B, Hq, Nq) fp32."""
    pid_m, bh, batch, head = block_of(tl.program_id(0), tl.cdiv(seq_q, BLOCK_M), heads_q)
    batch = batch.to(tl.int64)
    head = head.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + bh.to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, lo, hi,
                offs_m0, offs_n, n_ok, d_mask, seq_q, qk_scale, cap_in, cap_out,
                stride_qm, stride_dom, stride_lm, stride_dqm,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
                PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, SOFTCAP: tl.constexpr):
    # Works in the transposed frame, (BLOCK_N keys) x (BLOCK_M queries), so that dV += Pᵀ·dO and
    # dK += dSᵀ·Q are plain dots with the KV tile as the row dimension.
    # MASKED=False: whole query tiles inside seq_q, below the diagonal, and a KV tile inside seq_k.
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        m_ok = offs_m < seq_q
        qT = load_tile(qT_ptrs + start_m * stride_qm, d_mask, m_ok, PAD_D, MASKED)
        do = load_tile(do_ptrs + start_m * stride_dom, m_ok, d_mask, MASKED, PAD_D)
        if MASKED:
            lse = tl.load(lse_ptr + offs_m * stride_lm, mask=m_ok, other=0.0)
            delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        else:
            lse = tl.load(lse_ptr + offs_m * stride_lm)
            delta = tl.load(delta_ptr + offs_m)
        qkT = tl.dot(k, qT, input_precision=PRECISION)
        # The forward's LSE is natural-log; scores here are in base 2 (exp2 with log2(e) folded in).
        if SOFTCAP:
            # tanh(scale·qkᵀ/c) once: the capped score is c·log2(e) times it, and dS needs 1 − tanh².
            tT = softcap_scores(qkT, cap_in, 1.0)
            pT = tl.math.exp2(tT * cap_out - (lse * LOG2E_C)[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - (lse * LOG2E_C)[None, :])
        if MASKED:
            valid = m_ok[None, :] & n_ok[:, None]
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            # where, not a -inf score: exp2 of a padded row's garbage may be inf, and inf·0 is NaN.
            pT = tl.where(valid, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if SOFTCAP:
            dsT = (pT * (dpT - delta[None, :]) * (1.0 - tT * tT)).to(qT.dtype)
        else:
            dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            # k holds zeros past seq_k and dsT is 0 there, so padded keys add nothing.
            dq = tl.dot(tl.trans(dsT), k, input_precision=PRECISION)
            if MASKED:
                tl.atomic_add(dq_ptrs + start_m * stride_dqm, dq, mask=m_ok[:, None] & d_mask[None, :], sem="relaxed")
            elif PAD_D:
                tl.atomic_add(dq_ptrs + start_m * stride_dqm, dq, mask=d_mask[None, :], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs + start_m * stride_dqm, dq, sem="relaxed")
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, DQ_ACC,
                         stride_qb, stride_qh, stride_qm, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                         stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                         stride_lb, stride_lh, stride_lm,
                         stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                         seq_q, seq_k, heads_kv, group, qk_scale, sm_scale, cap_in, cap_out,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                         SOFTCAP: tl.constexpr):
    """Grid: one_axis_grid(batch, heads_kv, seq_k, BLOCK_N). Its query heads: head_kv·group ... + group − 1."""
    # The KV blocks of one head run next to each other and share its Q and dO in L2. Causal: block 0
    # has the most query tiles to visit and starts first.
    pid_n, bh, batch, head_kv = block_of(tl.program_id(0), tl.cdiv(seq_k, BLOCK_N), heads_kv)
    batch = batch.to(tl.int64)
    head_kv = head_kv.to(tl.int64)
    heads_q = heads_kv * group
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seq_k
    d_mask = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_mask[None, :]

    k = tl.load(K + batch * stride_kb + head_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + batch * stride_vb + head_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_end = tl.cdiv(seq_q, BLOCK_M) * BLOCK_M
    full_hi = (seq_q // BLOCK_M) * BLOCK_M  # query tiles below this need no row mask
    if CAUSAL:
        # Query tiles ending before start_n see none of these keys: skip them. Tiles starting at or
        # past start_n + BLOCK_N see all of them: no causal mask.
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, q_end)
    else:
        lo = 0
        mid = 0
    # The KV tail tile: every query tile needs the key mask.
    mid = tl.where(start_n + BLOCK_N > seq_k, q_end, mid)
    tail_lo = tl.maximum(mid, full_hi)

    for g in range(group):
        head = head_kv * group + g
        qT_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m0[None, :] * stride_qm + offs_d[:, None] * stride_qd
        do_ptrs = DO + batch * stride_dob + head * stride_doh + offs_m0[:, None] * stride_dom + offs_d[None, :] * stride_dod
        lse_ptr = LSE + batch * stride_lb + head * stride_lh
        delta_ptr = DELTA + (batch * heads_q + head) * seq_q
        dq_ptrs = DQ_ACC + batch * stride_dqb + head * stride_dqh + offs_m0[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
        dk, dv = _dkdv_tiles(dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, lo, mid,
                             offs_m0, offs_n, n_ok, d_mask, seq_q, qk_scale, cap_in, cap_out,
                             stride_qm, stride_dom, stride_lm, stride_dqm,
                             BLOCK_M, True, CAUSAL, PAD_D, PRECISION, ATOMIC_DQ, SOFTCAP)
        dk, dv = _dkdv_tiles(dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, mid, full_hi,
                             offs_m0, offs_n, n_ok, d_mask, seq_q, qk_scale, cap_in, cap_out,
                             stride_qm, stride_dom, stride_lm, stride_dqm,
                             BLOCK_M, False, CAUSAL, PAD_D, PRECISION, ATOMIC_DQ, SOFTCAP)
        dk, dv = _dkdv_tiles(dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, tail_lo, q_end,
                             offs_m0, offs_n, n_ok, d_mask, seq_q, qk_scale, cap_in, cap_out,
                             stride_qm, stride_dom, stride_lm, stride_dqm,
                             BLOCK_M, True, CAUSAL, PAD_D, PRECISION, ATOMIC_DQ, SOFTCAP)

    dk = dk * sm_scale  # dS was formed from unscaled scores: dK = scale·dSᵀQ
    tl.store(DK + batch * stride_dkb + head_kv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + batch * stride_dvb + head_kv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, lo, hi, offs_m, offs_n0, d_mask, seq_k, qk_scale,
              cap_in, cap_out, stride_kn, stride_vn,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
              PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    # MASKED=False: whole KV tiles inside seq_k and below the diagonal for every row of the block.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n0
        n_ok = cols < seq_k
        kT = load_tile(kT_ptrs + start_n * stride_kn, d_mask, n_ok, PAD_D, MASKED)
        vT = load_tile(vT_ptrs + start_n * stride_vn, d_mask, n_ok, PAD_D, MASKED)
        qk = tl.dot(q, kT, input_precision=PRECISION)
        if SOFTCAP:
            t = softcap_scores(qk, cap_in, 1.0)  # as in _dkdv_tiles
            p = tl.math.exp2(t * cap_out - lse2[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            valid = n_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= cols[None, :])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        if SOFTCAP:
            ds = (p * (dp - delta[:, None]) * (1.0 - t * t)).to(kT.dtype)
        else:
            ds = (p * (dp - delta[:, None])).to(kT.dtype)
        dq = tl.dot(ds, tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                       stride_qb, stride_qh, stride_qm, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_dob, stride_doh, stride_dom, stride_dod,
                       stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                       stride_lb, stride_lh, stride_lm,
                       seq_q, seq_k, heads_q, group, qk_scale, sm_scale, cap_in, cap_out,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """Grid: one_axis_grid(batch, heads_q, seq_q, BLOCK_M)."""
    n_blocks = tl.cdiv(seq_q, BLOCK_M)
    pid_m, bh, batch, head = block_of(tl.program_id(0), n_blocks, heads_q)
    if CAUSAL:
        # The last query block visits the most KV tiles: start the heavy blocks first.
        pid_m = n_blocks - 1 - pid_m
    batch = batch.to(tl.int64)
    head_kv = (head // group).to(tl.int64)
    head = head.to(tl.int64)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_mask = offs_d < HEAD_DIM
    row_mask = m_ok[:, None] & d_mask[None, :]

    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_mask, other=0.0)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=row_mask, other=0.0)
    # Padded rows: q = dO = 0 and LSE = delta = 0, so P = 1 and dS = 1·(0 − 0) = 0; never stored anyway.
    lse2 = tl.load(LSE + batch * stride_lb + head * stride_lh + offs_m * stride_lm, mask=m_ok, other=0.0) * LOG2E_C
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_q + offs_m, mask=m_ok, other=0.0)
    kT_ptrs = K + batch * stride_kb + head_kv * stride_kh + offs_n0[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vT_ptrs = V + batch * stride_vb + head_kv * stride_vh + offs_n0[None, :] * stride_vn + offs_d[:, None] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi, full_hi = causal_bounds(pid_m * BLOCK_M, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_tiles(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, 0, full_hi, offs_m, offs_n0, d_mask, seq_k, qk_scale,
                   cap_in, cap_out, stride_kn, stride_vn, BLOCK_N, False, CAUSAL, PAD_D, PRECISION, SOFTCAP)
    dq = _dq_tiles(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, full_hi, hi, offs_m, offs_n0, d_mask, seq_k, qk_scale,
                   cap_in, cap_out, stride_kn, stride_vn, BLOCK_N, True, CAUSAL, PAD_D, PRECISION, SOFTCAP)

    dq = dq * sm_scale
    tl.store(DQ + batch * stride_dqb + head * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def attn_bwd_dq_convert_kernel(DQ_ACC, DQ,
                               stride_ab, stride_ah, stride_am, stride_ad,
                               stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                               seq_q, heads_q, sm_scale,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid: one_axis_grid(batch, heads_q, seq_q, BLOCK_M). dQ = scale · the fp32 atomic accumulator."""
    pid_m, bh, batch, head = block_of(tl.program_id(0), tl.cdiv(seq_q, BLOCK_M), heads_q)
    batch = batch.to(tl.int64)
    head = head.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc = tl.load(DQ_ACC + batch * stride_ab + head * stride_ah + offs_m[:, None] * stride_am + offs_d[None, :] * stride_ad,
                  mask=mask, other=0.0)
    tl.store(DQ + batch * stride_dqb + head * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (acc * sm_scale).to(DQ.dtype.element_ty), mask=mask)
