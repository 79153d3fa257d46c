"""Split-KV ("flash-decoding") attention for a few queries against a long KV cache, in Triton.

Pass 1 (`decode_split_kernel`), a 1-D grid of cdiv(G·Nq, BLOCK_M) × num_splits × B·Hkv programs
(row block fastest, then split, then (batch, KV head)). One program packs the G = Hq/Hkv query heads
of one KV head and the Nq queries into the M dimension of one tile, row r = g·Nq + i (head
hkv·G + g, query i), so each KV head's keys and values are read once per split instead of once per
query head. It streams its split [s·split_size, min((s+1)·split_size, len)) in BLOCK_N tiles with
the online softmax in fp32 (exp2, the scale and log2(e) folded into one multiply; with SOFTCAP the
scores c·tanh(s/c) of kernel.jit.common.softcap_scores instead), and either
writes O directly (one split) or its partials: the normalised accumulator acc/l (fp32) and the
base-2 log-sum-exp m + log2(l) per row (-inf for a row that saw no key).

Pass 2 (`decode_combine_kernel`), one program per output row (b, hq, i), merges the splits that
hold keys of that sequence (split s is live iff s·split_size < len) by log-sum-exp rescaling and
writes O in the query's dtype with any strides. Rows that see no key at all (len = 0) get zeros.

Scratch, for R = B·Hq·Nq rows indexed (b·Hq + hq)·Nq + i: ACC (R, S, D) fp32 and LSE (R, S) fp32.
A split past a sequence's length exits before touching anything; pass 2 never reads its slots.

The split size is one number for the whole batch, a multiple of BLOCK_N computed from Nmax and
num_splits; programs whose split starts past their sequence's length exit at once. A ragged batch
thus runs about (total live keys)/split_size programs, and `default_decode_config` gives long
caches splits of `MAX_SPLIT_KEYS` keys whatever Nmax is, so that a ragged batch and a uniform one of
the same total length launch the same work (`default_num_splits` says when that holds).

Causal is bottom-right aligned (flash_attn's cache convention): query i of Nq sees keys
j <= len - Nq + i. Keys below len - Nq + 1 are visible to every query, so only the last tile(s) of a
sequence are masked.

Score modifiers (kernel.mods), constexpr flags that leave the plain kernels as they were: SOFTCAP (above);
WINDOW, bottom-right like causal (query i sees keys len − Nq + i − left ..= len − Nq + i + right): pass 1
loads only the tiles the block's rows reach (common.visible_range), a split that holds none of them exits
at once and pass 2 merges only the splits a row's window reaches, so a long cache with a window of W keys
reads about W keys; ALIBI (slopes per (batch, query head), the distance to the bottom-right diagonal);
SINKS, which join the denominator once: in pass 2's merge, or in pass 1 when it writes O itself.

Paged caches (PAGED, a constexpr; PAGED=False compiles the contiguous kernel as before): K and V are
(num_pages, PAGE_SIZE, Hkv, D) and a (B, max_pages) int32 block table maps sequence b's key t to page
table[b, t // PAGE_SIZE], slot t % PAGE_SIZE (vLLM's and flash_attn's layout). The splits and tiles walk key
positions exactly as for a contiguous cache; each tile gathers its columns' pages from the table, so a tile
may span pages and BLOCK_N and PAGE_SIZE are independent. Only the table entries of positions below the
length are read, and each page number is clamped into [0, num_pages): no table reads outside the cache.

Plain pointers, no block pointers: Triton 3.9 removed `tl.make_block_ptr`, and the same source must
compile on the GPU machine's Triton 3.6.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    LOG2E_C,
    load_tile,
    mod_scores,
    softcap_scores,
    softmax_step,
    visible_range,
)


@triton.jit
def _decode_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, hi, offs_n, d_mask, seq_len, row_limit, qk_scale,
                  cap_in, cap_out, stride_kn, stride_vn, diag_i, before, after, slope,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  PAD_D: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
                  WINDOW: tl.constexpr = False, ALIBI: tl.constexpr = False,
                  table=None, num_pages=0, stride_kp=0, stride_vp=0,
                  PAGED: tl.constexpr = False, PAGE_SIZE: tl.constexpr = 16):
    # PAGED: k_ptrs/v_ptrs hold only the head and head-dim offsets; each key column's page comes from the
    # sequence's row of the block table (`table`), clamped into [0, num_pages), so a tile may span pages.
    # MASKED=False: whole tiles below the sequence's length that every query sees, loaded and used
    # without masks. MASKED=True: the sequence's tail tile and the tiles holding the causal edge.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        n_ok = cols < seq_len
        if PAGED:
            # n_ok keeps the table read inside its row: seq_len <= max_pages * PAGE_SIZE.
            page = tl.load(table + cols // PAGE_SIZE, mask=n_ok, other=0)
            page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
            slot = (cols % PAGE_SIZE).to(tl.int64)
            k = load_tile(k_ptrs + (page * stride_kp + slot * stride_kn)[None, :], d_mask, n_ok, PAD_D, MASKED)
        else:
            k = load_tile(k_ptrs + start_n * stride_kn, d_mask, n_ok, PAD_D, MASKED)
        if SOFTCAP:
            qk = softcap_scores(tl.dot(q, k, input_precision=PRECISION), cap_in, cap_out)
        else:
            qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        if ALIBI or (WINDOW and MASKED):
            # diag_i: each row's diagonal key, len - Nq + i. WINDOW folds causal into `after`.
            valid = n_ok[None, :]
            if CAUSAL and MASKED and not WINDOW:
                valid = valid & (cols[None, :] <= row_limit[:, None])
            qk = mod_scores(qk, cols[None, :] - diag_i[:, None], valid, slope, 0.0, before, after,
                            WINDOW and MASKED, ALIBI, 0)
        elif MASKED:
            valid = n_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= row_limit[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        # Bottom-right causal: a row may have seen no key yet (its limit lies before this split).
        p, m_i, l_i, acc = softmax_step(qk, m_i, l_i, acc, MASKED)
        if PAGED:
            v = load_tile(v_ptrs + (page * stride_vp + slot * stride_vn)[:, None], n_ok, d_mask, MASKED, PAD_D)
        else:
            v = load_tile(v_ptrs + start_n * stride_vn, n_ok, d_mask, MASKED, PAD_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_i


@triton.jit
def _window_tiles(q_min, q_max, seq_len, diag, before, after, split_lo, split_hi, BLOCK_N: tl.constexpr):
    """(a, b, c, e): the split [split_lo, split_hi)'s key tiles that the window of queries q_min..q_max (all
    with the diagonal i + diag) reaches: masked [a, b), seen whole by every row [b, c), masked [c, e).

    visible_range of one row q_min widened by the span gives the union of the rows' windows; of one row
    q_max narrowed by it, the keys every row sees."""
    span = q_max - q_min
    lo, _, _, hi = visible_range(q_min, seq_len, diag, before, after + span, 1, BLOCK_N)
    _, full_lo, full_hi, _ = visible_range(q_max, seq_len, diag, before, after - span, 1, BLOCK_N)
    a = tl.maximum(lo, split_lo)
    e = tl.minimum(hi, split_hi)
    e_tiles = tl.maximum(tl.cdiv(e, BLOCK_N) * BLOCK_N, a)
    b = tl.minimum(tl.maximum(full_lo, a), e_tiles)
    c = tl.maximum(b, tl.minimum(full_hi, e_tiles))
    return a, b, c, e


@triton.jit
def decode_split_kernel(Q, K, V, O, ACC, LSE, SEQLENS, stride_s,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_ob, stride_oh, stride_om, stride_od,
                        heads_kv, seq_q, seq_kv, group, split_size, num_splits, num_m_blocks, qk_scale,
                        cap_in, cap_out, window_before, window_after, Sinks, Alibi, stride_ab, stride_ah,
                        Table, stride_tb, num_pages,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, SPLIT: tl.constexpr,
                        PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr = False,
                        SINKS: tl.constexpr = False, ALIBI: tl.constexpr = False,
                        PAGED: tl.constexpr = False, PAGE_SIZE: tl.constexpr = 16):
    """Pass 1. 1-D grid of num_m_blocks · num_splits · batch·heads_kv programs (see the module doc).

    SPLIT=False (num_splits == 1) writes O; SPLIT=True writes the partials ACC/LSE. SOFTCAP=True caps the
    scores (`softcap_scores` with the runtime cap_in, cap_out; qk_scale unused); SOFTCAP=False ignores
    cap_in and cap_out and compiles the uncapped loop. WINDOW: window_before/after are the window's sides
    (kernel.mods.UNBOUNDED when open; the caller caps after at 0 when causal). ALIBI: `Alibi` slopes at
    batch·stride_ab + query head·stride_ah. SINKS: `Sinks` (Hq,) fp32, read here only when SPLIT is False
    (pass 2 adds them otherwise). Pointers a flag leaves off are never read (None is fine).
    PAGED: K and V are paged, (num_pages, PAGE_SIZE, Hkv, D) passed with the strides of their
    (num_pages, Hkv, PAGE_SIZE, D) view (stride_kb is the page stride, stride_kn the slot's); `Table`
    (B, max_pages) int32 rows at batch·stride_tb map key t to page Table[b, t // PAGE_SIZE], slot
    t % PAGE_SIZE; seq_kv = max_pages·PAGE_SIZE. Pages are clamped into [0, num_pages).
    """
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    rest = pid // num_m_blocks
    split = rest % num_splits
    bh = rest // num_splits
    batch = (bh // heads_kv).to(tl.int64)
    head_kv = (bh % heads_kv).to(tl.int64)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    if HAS_SEQLENS:
        # Clamped so that no value of cache_seqlens can read outside the cache.
        seq_len = tl.minimum(tl.maximum(tl.load(SEQLENS + batch * stride_s), 0), seq_kv)
    else:
        seq_len = seq_kv
    lo = tl.multiple_of(split * split_size, BLOCK_N)
    if SPLIT:
        if lo >= seq_len:
            return  # nothing of this sequence here; pass 2 skips this split
    hi = tl.minimum(lo + split_size, seq_len)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed row r = g·Nq + i
    rows_ok = rows < group * seq_q
    g = rows // seq_q
    qi = rows % seq_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    head_q = head_kv * group + g  # int64: the row offsets below span several heads
    diag = seq_len - seq_q  # bottom-right: query i's diagonal key is len - Nq + i
    if WINDOW:
        # The block's query envelope (packed rows may hold several heads' queries), and its key tiles here.
        q_min = tl.min(tl.where(rows_ok, qi, seq_q), 0)
        q_max = tl.max(tl.where(rows_ok, qi, 0), 0)
        a, b, c, e = _window_tiles(q_min, q_max, seq_len, diag, window_before, window_after, lo, hi, BLOCK_N)
        if SPLIT:  # noqa: SIM102 - a constexpr, then a runtime test
            if a >= e:
                return  # no key of this split is in these rows' windows; pass 2 skips it too

    q_ptrs = (Q + batch * stride_qb + head_q[:, None] * stride_qh + qi[:, None].to(tl.int64) * stride_qm
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_mask[None, :], other=0.0)
    # K is read transposed, (BLOCK_D, BLOCK_N), so that QK^T is a plain dot. Offsets inside one
    # (batch, head) slice are 32-bit (the API checks the span).
    if PAGED:
        # The key columns' offsets come per tile from the block table (_decode_tiles).
        k_ptrs = K + head_kv * stride_kh + offs_d[:, None] * stride_kd
        v_ptrs = V + head_kv * stride_vh + offs_d[None, :] * stride_vd
        table = Table + batch * stride_tb
    else:
        k_ptrs = (K + batch * stride_kb + head_kv * stride_kh + offs_n[None, :] * stride_kn
                  + offs_d[:, None] * stride_kd)
        v_ptrs = (V + batch * stride_vb + head_kv * stride_vh + offs_n[:, None] * stride_vn
                  + offs_d[None, :] * stride_vd)
        table = Table

    if SINKS and not SPLIT:
        # One split writes O: the sink joins the denominator here, as a key every row has already seen
        # (base-2 max = the sink, sum exp2(0) = 1).
        m_i = tl.load(Sinks + head_q, mask=rows_ok, other=0.0) * LOG2E_C
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if ALIBI:
        slope = tl.load(Alibi + batch * stride_ab + head_q * stride_ah, mask=rows_ok, other=0.0)[:, None]
    else:
        slope = 0.0

    if WINDOW:
        acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, a, b, offs_n, d_mask, seq_len,
                                      qi, qk_scale, cap_in, cap_out, stride_kn, stride_vn, qi + diag,
                                      window_before, window_after, slope,
                                      BLOCK_N, True, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI,
                                      table, num_pages, stride_kb, stride_vb, PAGED, PAGE_SIZE)
        acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, b, c, offs_n, d_mask, seq_len,
                                      qi, qk_scale, cap_in, cap_out, stride_kn, stride_vn, qi + diag,
                                      window_before, window_after, slope,
                                      BLOCK_N, False, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI,
                                      table, num_pages, stride_kb, stride_vb, PAGED, PAGE_SIZE)
        acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, c, e, offs_n, d_mask, seq_len,
                                      qi, qk_scale, cap_in, cap_out, stride_kn, stride_vn, qi + diag,
                                      window_before, window_after, slope,
                                      BLOCK_N, True, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI,
                                      table, num_pages, stride_kb, stride_vb, PAGED, PAGE_SIZE)
    else:
        if CAUSAL:
            # Query i sees keys j <= len - Nq + i: keys below len - Nq + 1 are seen by every row.
            row_limit = seq_len - seq_q + qi
            seen_by_all = seq_len - seq_q + 1
        else:
            row_limit = qi  # unused
            seen_by_all = seq_len
        full_hi = lo + ((tl.minimum(hi, seen_by_all) - lo) // BLOCK_N) * BLOCK_N
        full_hi = tl.maximum(full_hi, lo)
        acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, full_hi, offs_n, d_mask, seq_len,
                                      row_limit, qk_scale, cap_in, cap_out, stride_kn, stride_vn, qi + diag,
                                      window_before, window_after, slope,
                                      BLOCK_N, False, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI,
                                      table, num_pages, stride_kb, stride_vb, PAGED, PAGE_SIZE)
        acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_hi, hi, offs_n, d_mask, seq_len,
                                      row_limit, qk_scale, cap_in, cap_out, stride_kn, stride_vn, qi + diag,
                                      window_before, window_after, slope,
                                      BLOCK_N, True, CAUSAL, PAD_D, PRECISION, SOFTCAP, WINDOW, ALIBI,
                                      table, num_pages, stride_kb, stride_vb, PAGED, PAGE_SIZE)

    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw no key keeps acc = 0
    if SPLIT:
        # Row index of the scratch, (b·Hq + hq)·Nq + i, and its slot for this split.
        out_row = ((batch * heads_kv + head_kv) * group * seq_q + rows) * num_splits + split
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(LSE + out_row, lse, mask=rows_ok)
        tl.store(ACC + out_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=rows_ok[:, None] & d_mask[None, :])
    else:
        o_ptrs = (O + batch * stride_ob + head_q[:, None] * stride_oh + qi[:, None].to(tl.int64) * stride_om
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=rows_ok[:, None] & d_mask[None, :])


@triton.jit
def decode_combine_kernel(ACC, LSE, O, SEQLENS, stride_s,
                          stride_ob, stride_oh, stride_om, stride_od,
                          heads_q, seq_q, seq_kv, split_size, num_splits, window_before, window_after, Sinks,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                          HAS_SEQLENS: tl.constexpr, WINDOW: tl.constexpr = False, SINKS: tl.constexpr = False):
    """Pass 2. Grid (B·Hq·Nq,): one output row per program, merging its sequence's live splits.

    WINDOW: only the splits that hold keys of the row's window (pass 1 wrote exactly those). SINKS: the
    row's denominator gains exp(sinks[head]) once, as a split with nothing to add."""
    row = tl.program_id(0).to(tl.int64)  # (b·Hq + hq)·Nq + i
    qi = row % seq_q
    bh = row // seq_q
    head = bh % heads_q
    batch = bh // heads_q
    if HAS_SEQLENS:
        seq_len = tl.minimum(tl.maximum(tl.load(SEQLENS + batch * stride_s), 0), seq_kv)
    else:
        seq_len = seq_kv
    # Splits at or past the length exited without writing: never read their slots.
    live = tl.minimum(tl.cdiv(seq_len, split_size), num_splits)
    first = 0
    if WINDOW:
        # The row's keys [k_lo, k_hi) (bottom-right: its diagonal key is len - Nq + i); the splits outside
        # exited in pass 1 without writing, or hold nothing of this row.
        k_lo = tl.maximum(seq_len - seq_q + qi - window_before, 0)
        k_hi = tl.minimum(seq_len - seq_q + qi + window_after + 1, seq_len)
        first = k_lo // split_size
        live = tl.where(k_hi > k_lo, tl.minimum(tl.cdiv(k_hi, split_size), live), first)

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    base = row * num_splits
    m_vec = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(first, live, BLOCK_S):
        s_ok = s0 + offs_s < live
        m_vec = tl.maximum(m_vec, tl.load(LSE + base + s0 + offs_s, mask=s_ok, other=float("-inf")))
    m = tl.max(m_vec, 0)
    if SINKS:
        sink = tl.load(Sinks + head) * LOG2E_C  # base 2, as the partials' LSE
        m = tl.maximum(m, sink)
    else:
        m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: all weights are 0 below
    l_vec = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(first, live, BLOCK_S):
        s_ok = s0 + offs_s < live
        lse = tl.load(LSE + base + s0 + offs_s, mask=s_ok, other=float("-inf"))
        w = tl.math.exp2(lse - m)  # 0 for empty splits (lse = -inf)
        used = s_ok & (lse > float("-inf"))
        part = tl.load(ACC + (base + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=used[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(part * w[:, None], 0)
        l_vec += w
    l_sum = tl.sum(l_vec, 0)
    if SINKS:
        l_sum += tl.math.exp2(sink - m)
    out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)
    o_ptrs = O + batch * stride_ob + head * stride_oh + qi * stride_om + offs_d * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=d_mask)
