"""The forward attention kernel with Q/K/V loaded through tensor descriptors (TMA on sm_90 and newer).

Same math and semantics as the pointer kernel (jit/fwd.py): online softmax in base 2 with the scale folded
into one multiply, fp32 accumulation, causal top-left aligned like torch SDPA, GQA by `head // group`, any
sequence length, output in q's layout, optional natural-log LSE. What differs is how tiles move: each
program builds 2-D descriptors (rows × head dim) over its own (batch, head) slices, so the descriptor bounds
zero-fill rows past the sequence end and columns past the head dim, and clip the output store. On Hopper
the loads become TMA copies (`cp.async.bulk.tensor`) that feed `wgmma` from shared memory.

WS: Triton's automatic warp specialisation of the KV loop (`tl.range(..., warp_specialize=True)`); the pass
fails on a kernel holding a second loop after the specialised one, or any if/else, so with WS the KV loop
is one loop that masks every tile. PERSISTENT: about one wave of programs striding over work units. The
host side (knobs, schedules, launch) is kernel/ops/fwd_tma.py.

Score modifiers (kernel.mods; constexpr flags, so a call without them compiles the plain kernel): SOFTCAP,
WINDOW (only the tiles the block's window reaches are loaded, common.visible_range; with WS one loop that
masks each of them), ALIBI and SINKS, as in the pointer kernel (jit/fwd.py). No attn_mask, no dropout.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    LN2_C,
    LOG2E_C,
    causal_bounds,
    mod_scores,
    softcap_scores,
    softmax_step,
    visible_range,
)


@triton.jit
def _tma_step(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n, seq_k, qk_scale,
              cap_in, cap_out, diag, before, after, slope,
              MASK_COLS: tl.constexpr, MASK_DIAG: tl.constexpr, NEG_SCALE: tl.constexpr,
              PRECISION: tl.constexpr, SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False,
              ALIBI: tl.constexpr = False, MASK_WINDOW: tl.constexpr = False):
    # One BLOCK_N tile of keys. MASK_COLS drops keys past seq_k (the descriptor zero-fills them, so
    # they would score 0, not -inf); MASK_DIAG applies the causal mask. Unmasked (the steady state),
    # the row max is taken on the raw scores and scaled once, so the exponent is one FMA per score.
    # With modifiers of the scores (SOFTCAP, ALIBI, WINDOW) every tile takes the general path;
    # MASK_WINDOW: this tile holds the window's edge (WINDOW folds causal into `after`).
    k = k_desc.load([start_n, 0])
    qk = tl.dot(q, k.T, input_precision=PRECISION)
    if SOFTCAP or ALIBI or WINDOW:
        if SOFTCAP:
            qk = softcap_scores(qk, cap_in, cap_out)
        else:
            qk = qk * qk_scale
        cols = start_n + offs_n
        valid = (cols < seq_k)[None, :]
        if MASK_DIAG:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        qk = mod_scores(qk, cols[None, :] - (offs_m[:, None] + diag), valid, slope, 0.0, before, after,
                        MASK_WINDOW, ALIBI, 0)
        # Under a window a row may have seen no key yet: its max is then -inf (softmax_step's guard).
        p, m_new, l_i, acc = softmax_step(qk, m_i, l_i, acc, WINDOW)
    else:
        if MASK_COLS or MASK_DIAG:
            cols = start_n + offs_n
            # Rows see key 0 before any tile can mask them fully (top-left causal), so m_new is
            # finite and the masked scores give exp2(-inf) = 0.
            if MASK_DIAG:
                valid = offs_m[:, None] >= cols[None, :]
                if MASK_COLS:
                    valid = valid & (cols < seq_k)[None, :]
                qk = tl.where(valid, qk * qk_scale, float("-inf"))
            else:
                qk = qk * qk_scale + tl.where(cols < seq_k, 0.0, float("-inf"))[None, :]  # one FMA per score
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
        else:
            if NEG_SCALE:
                m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)  # a negative scale flips the order
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
    v = v_desc.load([start_n, 0])
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _tma_tile(Q, K, V, O, LSE, pid_m, head, batch,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              seq_q, seq_k, heads_q, group, qk_scale,
              cap_in, cap_out, window_before, window_after, diag, Sinks, Alibi, stride_ab, stride_ah,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr,
              WS: tl.constexpr, NEG_SCALE: tl.constexpr, EVEN_N: tl.constexpr,
              SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, ALIBI: tl.constexpr):
    # One BLOCK_M block of queries of one (batch, head), start to finish.
    head_kv = (head // group).to(tl.int64)
    batch = batch.to(tl.int64)
    head64 = head.to(tl.int64)
    # Per-(batch, head) 2-D descriptors: their bounds are this head's rows, so a box that runs past
    # the sequence end reads zeros (and a store there is clipped) instead of the next head's rows.
    q_desc = tl.make_tensor_descriptor(Q + batch * stride_qb + head64 * stride_qh, shape=[seq_q, HEAD_DIM],
                                       strides=[stride_qm, 1], block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K + batch * stride_kb + head_kv * stride_kh, shape=[seq_k, HEAD_DIM],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + batch * stride_vb + head_kv * stride_vh, shape=[seq_k, HEAD_DIM],
                                       strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_D])
    o_desc = tl.make_tensor_descriptor(O + batch * stride_ob + head64 * stride_oh, shape=[seq_q, HEAD_DIM],
                                       strides=[stride_om, 1], block_shape=[BLOCK_M, BLOCK_D])
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = q_desc.load([start_m, 0])
    if SINKS:
        # The sink as a key every row has already seen (base-2 max = the sink, sum = 1): see jit/fwd.py.
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(Sinks + head64) * LOG2E_C
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if ALIBI:
        slope = tl.load(Alibi + batch * stride_ab + head64 * stride_ah)
    else:
        slope = 0.0

    if WINDOW:
        lo, full_lo, full_hi, hi = visible_range(start_m, seq_k, diag, window_before, window_after, BLOCK_M, BLOCK_N)
        if WS:
            # One loop (see below): every tile the window reaches, each masked.
            for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                acc, l_i, m_i = _tma_step(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n, seq_k,
                                          qk_scale, cap_in, cap_out, diag, window_before, window_after, slope,
                                          True, False, NEG_SCALE, PRECISION, SOFTCAP, WINDOW, ALIBI, True)
        else:
            for start_n in range(lo, full_lo, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                acc, l_i, m_i = _tma_step(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n, seq_k,
                                          qk_scale, cap_in, cap_out, diag, window_before, window_after, slope,
                                          True, False, NEG_SCALE, PRECISION, SOFTCAP, WINDOW, ALIBI, True)
            for start_n in range(full_lo, full_hi, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                acc, l_i, m_i = _tma_step(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n, seq_k,
                                          qk_scale, cap_in, cap_out, diag, window_before, window_after, slope,
                                          False, False, NEG_SCALE, PRECISION, SOFTCAP, WINDOW, ALIBI, False)
            for start_n in range(full_hi, hi, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                acc, l_i, m_i = _tma_step(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n, seq_k,
                                          qk_scale, cap_in, cap_out, diag, window_before, window_after, slope,
                                          True, False, NEG_SCALE, PRECISION, SOFTCAP, WINDOW, ALIBI, True)
    else:
        acc, l_i, m_i = _tma_causal_loop(acc, l_i, m_i, q, k_desc, v_desc, start_m, offs_m, offs_n, seq_k, qk_scale,
                                         cap_in, cap_out, diag, window_before, window_after, slope,
                                         BLOCK_M, BLOCK_N, CAUSAL, PRECISION, WS, NEG_SCALE, EVEN_N, SOFTCAP, ALIBI)

    if WINDOW:
        seen = l_i > 0.0  # a row that saw no key keeps acc = 0, lse = -inf
        l_i = tl.where(seen, l_i, 1.0)
    acc = acc / l_i[:, None]
    o_desc.store([start_m, 0], acc.to(O.dtype.element_ty))
    if STORE_LSE:
        # Natural-log LSE of the scaled scores: m_i and l_i live in base 2.
        lse = (m_i + tl.math.log2(l_i)) * LN2_C
        if WINDOW:
            lse = tl.where(seen, lse, float("-inf"))
        row0 = (batch * heads_q + head64) * seq_q
        tl.store(LSE + row0 + offs_m, lse, mask=offs_m < seq_q)


@triton.jit
def _tma_causal_loop(acc, l_i, m_i, q, k_desc, v_desc, start_m, offs_m, offs_n, seq_k, qk_scale,
                     cap_in, cap_out, diag, before, after, slope,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                     WS: tl.constexpr, NEG_SCALE: tl.constexpr, EVEN_N: tl.constexpr, SOFTCAP: tl.constexpr,
                     ALIBI: tl.constexpr):
    # The key loop without a window: causal (top-left) or every key.
    hi, full_hi = causal_bounds(start_m, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    if WS:
        # One loop: Triton 3.6's Hopper warp-specialisation pass fails (PassManager::run failed) on a
        # function with a second loop beside the specialised one. So every tile takes the causal mask,
        # and the key-range mask too unless seq_k is a multiple of BLOCK_N (EVEN_N).
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _tma_step(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n, seq_k,
                                      qk_scale, cap_in, cap_out, diag, before, after, slope,
                                      not EVEN_N, CAUSAL, NEG_SCALE, PRECISION, SOFTCAP, False, ALIBI)
    else:
        for start_n in range(0, full_hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _tma_step(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n, seq_k,
                                      qk_scale, cap_in, cap_out, diag, before, after, slope,
                                      False, False, NEG_SCALE, PRECISION, SOFTCAP, False, ALIBI)
        for start_n in range(full_hi, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _tma_step(acc, l_i, m_i, q, k_desc, v_desc, start_n, offs_m, offs_n, seq_k,
                                      qk_scale, cap_in, cap_out, diag, before, after, slope,
                                      True, CAUSAL, NEG_SCALE, PRECISION, SOFTCAP, False, ALIBI)
    return acc, l_i, m_i


# seq lengths, head counts and the work counts are not specialised on (=1, %16), so one binary
# serves every shape of a (dtype, head dim, config): the tuner and the benchmark compile it once on
# a small input.
@triton.jit(do_not_specialize=["seq_q", "seq_k", "heads_q", "group", "num_m", "num_units", "reverse"])
def attn_fwd_tma_kernel(Q, K, V, O, LSE,
                        stride_qb, stride_qh, stride_qm,
                        stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn,
                        stride_ob, stride_oh, stride_om,
                        seq_q, seq_k, heads_q, group, qk_scale, num_m, num_units, reverse,
                        cap_in, cap_out, window_before, window_after, diag, Sinks, Alibi, stride_ab, stride_ah,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr,
                        WS: tl.constexpr, PERSISTENT: tl.constexpr, NEG_SCALE: tl.constexpr,
                        EVEN_N: tl.constexpr, SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False,
                        SINKS: tl.constexpr = False, ALIBI: tl.constexpr = False):
    """Grid (batch * heads_q * num_m,), or (programs,) when PERSISTENT. Last dims contiguous.

    `reverse` (0/1, grid schedules) takes query blocks last-first. PERSISTENT programs stride over
    `num_units` work units, head-major; causally a unit is the query-block pair (last - i, i).
    Modifiers as attn_fwd_kernel's (jit/fwd.py): SOFTCAP (cap_in, cap_out), WINDOW (window_before/after
    around the diagonal i + diag; the caller caps after at 0 when causal), SINKS (`Sinks` (Hq,) fp32),
    ALIBI (`Alibi` slopes at batch·stride_ab + head·stride_ah); pointers a flag leaves off are never read.
    """
    if PERSISTENT:
        if CAUSAL:
            per_head = (num_m + 1) // 2
        else:
            per_head = num_m
        for unit in range(tl.program_id(0), num_units, tl.num_programs(0)):
            bh = unit // per_head
            i = unit % per_head
            head = bh % heads_q
            batch = bh // heads_q
            tiles = 1
            if CAUSAL:
                tiles = 1 + (i != num_m - 1 - i).to(tl.int32)
            # The costly block first (later blocks see more keys), then its cheap partner. One call
            # site, so the warp-specialised loop exists once in the kernel.
            for j in range(0, tiles):
                pid_m = tl.where(j == 0, num_m - 1 - i, i)
                _tma_tile(Q, K, V, O, LSE, pid_m, head, batch,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                          seq_q, seq_k, heads_q, group, qk_scale,
                          cap_in, cap_out, window_before, window_after, diag, Sinks, Alibi, stride_ab, stride_ah,
                          HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, STORE_LSE, PRECISION, WS, NEG_SCALE, EVEN_N,
                          SOFTCAP, WINDOW, SINKS, ALIBI)
    else:
        # One grid axis (y and z stop at 65535, which B or H alone can exceed): program p is query
        # block p % num_m of (batch, head) p // num_m, so one head's blocks run side by side and
        # share K and V in L2. `reverse` flips the block order by arithmetic, not an `if`: Triton's
        # Hopper warp-specialisation pass gives up on any function holding an if/else.
        pid = tl.program_id(0)
        bh = pid // num_m
        j = pid % num_m
        pid_m = j + reverse * (num_m - 1 - 2 * j)
        _tma_tile(Q, K, V, O, LSE, pid_m, bh % heads_q, bh // heads_q,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                  seq_q, seq_k, heads_q, group, qk_scale,
                  cap_in, cap_out, window_before, window_after, diag, Sinks, Alibi, stride_ab, stride_ah,
                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, STORE_LSE, PRECISION, WS, NEG_SCALE, EVEN_N,
                  SOFTCAP, WINDOW, SINKS, ALIBI)
