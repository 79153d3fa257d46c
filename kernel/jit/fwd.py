"""The fused forward attention kernel (FlashAttention-2 schedule), through plain pointers.

One program computes BLOCK_M query rows of one (batch, head): it streams BLOCK_N-row tiles of K and
V, keeps the running row max and row sum in fp32 (online softmax, base-2 exponentials with the
softmax scale folded into one multiply), accumulates P·V in fp32 and writes O once.

Score modifiers (kernel.mods), each a constexpr flag, so a call without them compiles the plain kernel:
SOFTCAP caps the scores; WINDOW bounds the key loop to the tiles the block's window reaches
(common.visible_range: tiles wholly outside are never loaded, so a window of W keys costs ~N·W) and masks
the edge tiles; ALIBI and MASK (1: bool, 2: float attn_mask) modify every tile's scores (common.mod_scores),
and a bool-mask tile that hides every key of the block skips its K/V loads; SINKS start each row's max and
sum at the sink (the sink joins the denominator and the LSE); DROPOUT drops P (common.dropout_keep) in
the P·V product only, the row sum being the undropped softmax's. A row that sees no key writes 0 and
an LSE of -inf.

Plain pointers, no block pointers: Triton 3.9 removed `tl.make_block_ptr`, and the same source must
compile on the GPU machine's Triton 3.6.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (LN2_C, LOG2E_C, block_of, causal_bounds, dropout_keep, load_tile, mod_scores, softcap_scores,
                     softmax_step, visible_range)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, d_mask, seq_k, qk_scale,
              cap_in, cap_out, stride_kn, stride_vn,
              diag, before, after, slope, mask_tile, dropout_p, seed, bh,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr, PRECISION: tl.constexpr,
              SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr,
              DROPOUT: tl.constexpr, GUARD: tl.constexpr):
    # One BLOCK_N tile of keys starting at start_n. MASKED=False is the steady state: a whole tile
    # inside the sequence (and the window, or below the diagonal), loaded and used without any mask.
    # MASKED=True handles the tail tile and the diagonal or window-edge tiles.
    cols = start_n + offs_n
    n_ok = cols < seq_k
    # K is read transposed, (BLOCK_D, BLOCK_N), so that QK^T is a plain dot.
    k = load_tile(k_ptrs + start_n * stride_kn, d_mask, n_ok, PAD_D, MASKED)
    if SOFTCAP:
        qk = softcap_scores(tl.dot(q, k, input_precision=PRECISION), cap_in, cap_out)
    else:
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    if ALIBI or MASK != 0 or (WINDOW and MASKED):
        valid = n_ok[None, :]
        if CAUSAL and MASKED and not WINDOW:
            valid = valid & (offs_m[:, None] >= cols[None, :])  # top-left: WINDOW folds causal into `after`
        rel = cols[None, :] - (offs_m[:, None] + diag)
        qk = mod_scores(qk, rel, valid, slope, mask_tile, before, after, WINDOW and MASKED, ALIBI, MASK)
    elif MASKED:
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        qk = tl.where(valid, qk, float("-inf"))
    # Without a window or mask, every row has seen key 0 by the time a tile can be fully masked for it
    # (causal is top-left aligned), so the new max is finite and exp2(-inf - max) is a clean 0. With them
    # (GUARD) a row's max may still be -inf.
    p, m_i, l_i, acc = softmax_step(qk, m_i, l_i, acc, GUARD)
    v = load_tile(v_ptrs + start_n * stride_vn, n_ok, d_mask, MASKED, PAD_D)
    if DROPOUT:
        # The row sum above is the undropped softmax's; only P·V sees the dropped probabilities
        # (the 1/(1 - p) scaling is applied once, at the end).
        p = tl.where(dropout_keep(seed, bh, offs_m[:, None], cols[None, :], seq_k, dropout_p), p, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, hi, offs_m, offs_n, d_mask, seq_k, qk_scale,
               cap_in, cap_out, stride_kn, stride_vn,
               m_ok, diag, before, after, slope, mask_ptrs, stride_mn, dropout_p, seed, bh,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               PAD_D: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
               WINDOW: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr,
               GUARD: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if MASK != 0:
            # The attn_mask tile, rows past seq_q and keys past seq_k read as 0 (hidden / no bias).
            mask_tile = tl.load(mask_ptrs + start_n * stride_mn,
                                mask=m_ok[:, None] & ((start_n + offs_n) < seq_k)[None, :], other=0)
            if MASK == 1:
                # A tile the bool mask hides from every row of the block: its K and V are never loaded.
                if tl.max(mask_tile.to(tl.int32)) > 0:
                    acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, d_mask,
                                              seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                              diag, before, after, slope, mask_tile, dropout_p, seed, bh,
                                              MASKED, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI, MASK,
                                              DROPOUT, GUARD)
            else:
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, d_mask,
                                          seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                          diag, before, after, slope, mask_tile, dropout_p, seed, bh,
                                          MASKED, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI, MASK,
                                          DROPOUT, GUARD)
        else:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, d_mask,
                                      seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                      diag, before, after, slope, 0.0, dropout_p, seed, bh,
                                      MASKED, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI, MASK,
                                      DROPOUT, GUARD)
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(Q, K, V, O, LSE,
                    stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_om, stride_od,
                    seq_q, seq_k, heads_q, group, qk_scale, cap_in, cap_out,
                    window_before, window_after, diag, Sinks, Alibi, stride_ab, stride_ah,
                    Mask, stride_mb, stride_mh, stride_mm, stride_mn, dropout_p, seed,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr,
                    SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False, SINKS: tl.constexpr = False,
                    ALIBI: tl.constexpr = False, MASK: tl.constexpr = 0, DROPOUT: tl.constexpr = False,
                    QD=None, KD=None, VD=None, stride_qdb=0, stride_qdh=0, stride_kdb=0, stride_kdh=0,
                    stride_vdb=0, stride_vdh=0, FP8: tl.constexpr = False):
    """Grid: one_axis_grid(batch, heads_q, seq_q, BLOCK_M). `group` = heads_q // heads_kv (GQA/MQA).

    SOFTCAP: scores are capped (common.softcap_scores with cap_in, cap_out) instead of scaled by qk_scale.
    WINDOW: query i sees keys i + diag - window_before ..= i + diag + window_after (kernel.mods.UNBOUNDED for an
    open side; with CAUSAL the caller caps window_after at 0, and a caller with diag != 0 that is causal passes
    WINDOW, since without it the causal mask is top-left). SINKS: `Sinks` (Hq,) fp32. ALIBI: `Alibi` slopes
    at batch·stride_ab + head·stride_ah. MASK (1 bool, 2 float): `Mask` (B, Hq, Nq, Nk) with its four strides
    (0 where it broadcasts). DROPOUT: drop with probability dropout_p, Philox keyed by seed. Pointers a flag
    leaves off are never read (None is fine).

    FP8: Q, K, V are float8 (e4m3); QD, KD, VD are their fp32 dequantisation factors at
    batch·stride_?db + kv_head·stride_?dh (strides 0 for one factor per tensor). q·k descales fold into
    qk_scale, P is rounded to V's fp8 type for the P·V dot (as FlashAttention 3 does) and v's descale
    multiplies the output once; O may be bf16 or fp16. No modifier (the host refuses them)."""
    pid_m, bh, batch, head = block_of(tl.program_id(0), tl.cdiv(seq_q, BLOCK_M), heads_q)
    batch = batch.to(tl.int64)
    head_kv = (head // group).to(tl.int64)
    head = head.to(tl.int64)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    # A row's max may stay -inf (nothing visible yet, or ever) under a window or a mask.
    GUARD: tl.constexpr = WINDOW or MASK != 0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_mask = offs_d < HEAD_DIM

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + batch * stride_kb + head_kv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + batch * stride_vb + head_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_mask[None, :], other=0.0)
    if SINKS:
        # The sink as a key every row has already seen: the row max starts at it (base 2) and the row
        # sum at exp2(sink - max) = 1, so the denominator and the LSE include it and no row max is -inf.
        sink = tl.load(Sinks + head) * LOG2E_C
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if FP8:
        # Scores = scale·(q·qd)(k·kd)ᵀ = (scale·qd·kd)·(q kᵀ): the fp8 dot stays exact in fp32.
        qk_scale = (qk_scale * tl.load(QD + batch * stride_qdb + head_kv * stride_qdh)
                    * tl.load(KD + batch * stride_kdb + head_kv * stride_kdh))
    if ALIBI:
        slope = tl.load(Alibi + batch * stride_ab + head * stride_ah)
    else:
        slope = 0.0
    if MASK != 0:
        mask_ptrs = (Mask + batch * stride_mb + head * stride_mh + offs_m[:, None].to(tl.int64) * stride_mm
                     + offs_n[None, :] * stride_mn)
    else:
        mask_ptrs = Q  # unused

    if WINDOW:
        # Only the tiles the block's windows reach: masked edge tiles, whole tiles, masked edge tiles.
        lo, full_lo, full_hi, hi = visible_range(pid_m * BLOCK_M, seq_k, diag, window_before, window_after,
                                                 BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, full_lo, offs_m, offs_n, d_mask,
                                   seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                   m_ok, diag, window_before, window_after, slope, mask_ptrs, stride_mn,
                                   dropout_p, seed, bh,
                                   BLOCK_N, True, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI, MASK, DROPOUT,
                                   GUARD)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_lo, full_hi, offs_m, offs_n, d_mask,
                                   seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                   m_ok, diag, window_before, window_after, slope, mask_ptrs, stride_mn,
                                   dropout_p, seed, bh,
                                   BLOCK_N, False, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI, MASK, DROPOUT,
                                   GUARD)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_hi, hi, offs_m, offs_n, d_mask,
                                   seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                   m_ok, diag, window_before, window_after, slope, mask_ptrs, stride_mn,
                                   dropout_p, seed, bh,
                                   BLOCK_N, True, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI, MASK, DROPOUT,
                                   GUARD)
    else:
        hi, full_hi = causal_bounds(pid_m * BLOCK_M, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full_hi, offs_m, offs_n, d_mask,
                                   seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                   m_ok, diag, window_before, window_after, slope, mask_ptrs, stride_mn,
                                   dropout_p, seed, bh,
                                   BLOCK_N, False, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI, MASK, DROPOUT,
                                   GUARD)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_hi, hi, offs_m, offs_n, d_mask,
                                   seq_k, qk_scale, cap_in, cap_out, stride_kn, stride_vn,
                                   m_ok, diag, window_before, window_after, slope, mask_ptrs, stride_mn,
                                   dropout_p, seed, bh,
                                   BLOCK_N, True, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI, MASK, DROPOUT,
                                   GUARD)

    if GUARD:
        seen = l_i > 0.0  # a row that saw no key keeps acc = 0
        l_i = tl.where(seen, l_i, 1.0)
        acc = acc / l_i[:, None]
    else:
        acc = acc / l_i[:, None]
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    if FP8:
        acc = acc * tl.load(VD + batch * stride_vdb + head_kv * stride_vdh)
    o_ptrs = O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_mask[None, :])
    if STORE_LSE:
        # Natural-log LSE of the scaled scores: m_i and l_i live in base 2.
        lse = (m_i + tl.math.log2(l_i)) * LN2_C
        if GUARD:
            lse = tl.where(seen, lse, float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * seq_q + offs_m, lse, mask=m_ok)
