"""Split-KV ("flash-decoding") attention for a few queries against a long KV cache, in Triton.

Pass 1 (`decode_split_kernel`), a 1-D grid of cdiv(G·Nq, BLOCK_M) × num_splits × B·Hkv programs
(row block fastest, then split, then (batch, KV head)). One program packs the G = Hq/Hkv query heads
of one KV head and the Nq queries into the M dimension of one tile, row r = g·Nq + i (head
hkv·G + g, query i), so each KV head's keys and values are read once per split instead of once per
query head. It streams its split [s·split_size, min((s+1)·split_size, len)) in BLOCK_N tiles with
the online softmax in fp32 (exp2, the scale and log2(e) folded into one multiply), and either
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

Plain pointers, no block pointers: Triton 3.9 removed `tl.make_block_ptr`, and the same source must
compile on the GPU machine's Triton 3.6.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from ..db.arch import ARCH_SMEM, normalize_arch
from ..db.smem import estimate_smem, padded_head_dim
from ..db.types import Config, normalize_dtype

__all__ = ["DEFAULT_SM_COUNT", "MAX_PROGRAMS", "MAX_SPLIT_KEYS", "SPLITS_KNOB", "DecodePlan", "combine_block_s",
           "combine_warps", "decode_block_d", "decode_bytes", "decode_combine_kernel", "decode_knobs",
           "decode_split_kernel", "default_decode_config", "default_num_splits", "estimate_decode_smem",
           "num_splits_of", "plan_decode"]

SPLITS_KNOB = "num_splits"
# Split sizing for the default config (the tuner searches num_splits itself); the H200 measurements
# behind these numbers are in `default_num_splits`.
TARGET_PROGRAMS_PER_SM = 2  # occupancy floor: programs per SM, rounded down (see default_num_splits)
MAX_SPLIT_KEYS = 2048  # the split length for long caches; a ragged batch then launches as a uniform one
MIN_SPLIT_TILES = 4  # a split shorter than this many BLOCK_N tiles is mostly prologue and epilogue
DEFAULT_SM_COUNT = 132  # H100/H200; used when no device is known (planning, the interpreter)
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid.x


@triton.jit
def _decode_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, hi, offs_n, d_mask, seq_len, row_limit, qk_scale,
                  stride_kn, stride_vn,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  PAD_D: tl.constexpr, PRECISION: tl.constexpr):
    # MASKED=False: whole tiles below the sequence's length that every query sees, loaded and used
    # without masks. MASKED=True: the sequence's tail tile and the tiles holding the causal edge.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASKED:
            n_ok = cols < seq_len
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
                valid = valid & (cols[None, :] <= row_limit[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # Bottom-right causal: a row may have seen no key yet (its limit lies before this
            # split), so m_new can be -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
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
def decode_split_kernel(Q, K, V, O, ACC, LSE, SEQLENS, stride_s,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_ob, stride_oh, stride_om, stride_od,
                        heads_kv, seq_q, seq_kv, group, split_size, num_splits, num_m_blocks, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, SPLIT: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Pass 1. 1-D grid of num_m_blocks · num_splits · batch·heads_kv programs (see the module doc).

    SPLIT=False (num_splits == 1) writes O; SPLIT=True writes the partials ACC/LSE.
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

    q_ptrs = (Q + batch * stride_qb + head_q[:, None] * stride_qh + qi[:, None].to(tl.int64) * stride_qm
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_mask[None, :], other=0.0)
    # K is read transposed, (BLOCK_D, BLOCK_N), so that QK^T is a plain dot. Offsets inside one
    # (batch, head) slice are 32-bit (the API checks the span).
    k_ptrs = K + batch * stride_kb + head_kv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + batch * stride_vb + head_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

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
                                  row_limit, qk_scale, stride_kn, stride_vn,
                                  BLOCK_N, False, CAUSAL, PAD_D, PRECISION)
    acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_hi, hi, offs_n, d_mask, seq_len,
                                  row_limit, qk_scale, stride_kn, stride_vn,
                                  BLOCK_N, True, CAUSAL, PAD_D, PRECISION)

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
                          heads_q, seq_q, seq_kv, split_size, num_splits,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                          HAS_SEQLENS: tl.constexpr):
    """Pass 2. Grid (B·Hq·Nq,): one output row per program, merging its sequence's live splits."""
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

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    base = row * num_splits
    m_vec = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, live, BLOCK_S):
        s_ok = s0 + offs_s < live
        m_vec = tl.maximum(m_vec, tl.load(LSE + base + s0 + offs_s, mask=s_ok, other=float("-inf")))
    m = tl.max(m_vec, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: all weights are 0 below
    l_vec = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, live, BLOCK_S):
        s_ok = s0 + offs_s < live
        lse = tl.load(LSE + base + s0 + offs_s, mask=s_ok, other=float("-inf"))
        w = tl.math.exp2(lse - m)  # 0 for empty splits (lse = -inf)
        used = s_ok & (lse > float("-inf"))
        part = tl.load(ACC + (base + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=used[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(part * w[:, None], 0)
        l_vec += w
    l_sum = tl.sum(l_vec, 0)
    out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)
    o_ptrs = O + batch * stride_ob + head * stride_oh + qi * stride_om + offs_d * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=d_mask)


# --- planning -------------------------------------------------------------------------------

def decode_block_d(head_dim: int) -> int:
    """The padded head-dim tile: the next power of two, at least 16 (db.smem.padded_head_dim)."""
    return padded_head_dim(head_dim)


def decode_knobs(config: Config) -> int:
    """The config's num_splits after checking its knobs: ValueError naming a knob the decode kernel
    does not know (it takes `num_splits`, a positive int) or a bad value."""
    for name, value in config.extra:
        if name == SPLITS_KNOB:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config {config}: {SPLITS_KNOB} must be a positive int, got {value!r}")
        elif not (name == "provider" and value == "kernel"):
            raise ValueError(f"config {config}: the decode kernel does not know the knob {name!r} "
                             f"(it takes {SPLITS_KNOB})")
    return int(config.extra_dict.get(SPLITS_KNOB, 1))


def num_splits_of(config: Config) -> int:
    """The config's requested split count (`extra["num_splits"]`, 1 when absent)."""
    return int(config.extra_dict.get(SPLITS_KNOB, 1))


@dataclass(frozen=True)
class DecodePlan:
    """The launch geometry for one call: split size (keys, a multiple of BLOCK_N) and counts."""

    split_size: int
    num_splits: int  # effective: cdiv(Nmax, split_size), may be less than the config asked for
    num_m_blocks: int
    block_d: int

    @property
    def split(self) -> bool:
        """Whether pass 2 runs (more than one split)."""
        return self.num_splits > 1


def plan_decode(config: Config, *, batch: int, heads_kv: int, group: int, seq_q: int, seq_kv: int,
                head_dim: int, ragged: bool = False) -> DecodePlan:
    """Split size and grid counts for `config` on these sizes.

    split_size = BLOCK_N · cdiv(cdiv(Nmax, num_splits), BLOCK_N); the effective split count is then
    cdiv(Nmax, split_size), so no split is empty for a full-length sequence (e.g. Nmax=100,
    num_splits=3, BLOCK_N=64 runs 2 splits of 64 keys).

    `ragged` (the call passes cache_seqlens): the split count is at least the one that keeps splits
    to the default's long-cache length (`ragged_min_splits`). A ragged batch's time is that of its
    longest sequences' splits; a config tuned on full caches may ask for a few long splits (2 of
    16k keys won B=8 Nk=32k on the H200), which the long sequences of a ragged batch then run alone
    while most programs exit at once (1.30x the time of the uniform batch of the same total).
    """
    requested = max(1, num_splits_of(config))
    if ragged:
        requested = max(requested, ragged_min_splits(seq_kv, group * seq_q))
    tiles = triton.cdiv(seq_kv, config.block_n)
    split_size = triton.cdiv(tiles, min(requested, tiles)) * config.block_n
    num_splits = triton.cdiv(seq_kv, split_size)
    num_m_blocks = triton.cdiv(group * seq_q, config.block_m)
    return DecodePlan(split_size, num_splits, num_m_blocks, decode_block_d(head_dim))


def ragged_min_splits(seq_kv: int, rows: int) -> int:
    """The fewest splits a call with cache_seqlens runs: splits of at most the default's long-cache
    length, MAX_SPLIT_KEYS · max(1, rows // 16) keys (`default_num_splits`)."""
    return triton.cdiv(seq_kv, MAX_SPLIT_KEYS * max(1, rows // 16))


def estimate_decode_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None) -> int:
    """Estimated shared memory of pass 1 with `config`: the forward kernel's model at the padded D.

    The inner loop is the forward kernel's (a Q tile staged once, K/V tiles buffered by the
    pipeline, P converted through shared memory on the mma.sync path), so `db.smem` applies with
    the head dim padded as this kernel pads it (to at least 16). Pass 2 uses no shared memory to
    speak of. Not yet measured against compiled kernels over the decode space.
    """
    return estimate_smem(config, decode_block_d(head_dim), dtype, arch)


_DECODE_PREFERENCE: tuple[tuple[int, int, int], ...] = (
    # (block_n, num_warps, num_stages), best first; the first that fits the arch's shared memory wins.
    # n64-w4-s2 won 6 of the 11 H200 decode cases (bench/results/h200/decode_bench.csv) and was within 5 %
    # of the best in 4 more; 3 stages won 2 and lost up to 10 % elsewhere.
    (64, 4, 2), (64, 4, 3), (32, 4, 2), (32, 4, 1), (16, 2, 1),
)


def default_decode_config(seq_q: int, seq_kv: int, head_dim: int, dtype: str, *, batch_heads: int, group: int,
                          sm_count: int | None = None, arch: str | None = None,
                          smem_limit: int | None = None) -> Config:
    """The decode config a call gets when nothing was tuned for it.

    batch_heads is B·Hq and group Hq/Hkv, as in the tuning key. M tile: the packed rows G·Nq
    rounded up to a power of two, 16 to 64 (128 for D <= 64). Tile, warps and stages: the first of
    `_DECODE_PREFERENCE` that fits the shared memory. Splits: `default_num_splits`.
    """
    dtype = normalize_dtype(dtype)
    rows = group * seq_q
    block_m = min(max(16, triton.next_power_of_2(rows)), 128 if head_dim <= 64 else 64)
    try:
        known = normalize_arch(arch) if arch is not None else None
    except ValueError:
        known = None
    if smem_limit is None:
        smem_limit = ARCH_SMEM[known] if known else min(ARCH_SMEM.values())
    block_n, warps, stages = _DECODE_PREFERENCE[-1]
    for bn, w, s in _DECODE_PREFERENCE:
        if head_dim > 128 and bn > 32:
            continue  # a 64 x 256 K/V tile pair crowds the register file at a 16-row query tile
        if estimate_decode_smem(Config(block_m, bn, w, s), head_dim, dtype, known) <= smem_limit:
            block_n, warps, stages = bn, w, s
            break
    splits = default_num_splits(seq_kv, block_n, batch_heads_kv=max(1, batch_heads // max(1, group)),
                                rows=rows, block_m=block_m, sm_count=sm_count)
    return Config(block_m, block_n, warps, stages, ((SPLITS_KNOB, splits),))


def default_num_splits(seq_kv: int, block_n: int, *, batch_heads_kv: int, rows: int = 1, block_m: int = 16,
                       sm_count: int | None = None) -> int:
    """The split count of `default_decode_config`. `rows` = G·Nq per KV head, `seq_kv` = Nmax.

    splits = max(cdiv(Nmax, MAX_SPLIT_KEYS · max(1, rows // 16)),
                 TARGET_PROGRAMS_PER_SM · SMs // (B·Hkv · row blocks)),
    then no split shorter than MIN_SPLIT_TILES tiles and at most the grid limit.

    Derived from the H200 sweep (bench/results/h200/decode_bench.csv: bf16, D=128, Hq=32, Hkv=8, 132
    SMs; num_splits timed at the old rule's choice, its half and its double):
    - Long caches want splits of about 2048 keys: B=8 Nk=32k won with 16 splits (4.13 TB/s; 32
      splits of 1024 keys 4.07, 64 splits 3.96), B=8 Nk=16k with 8, the ragged and uniform B=32
      batches with 8-16. Shorter splits add partials traffic and per-program prologues for nothing.
    - A batch with few KV heads needs the splits for occupancy, but about 2 programs per SM are
      enough, rounded down: B=8 (64 KV heads) Nk=4k ran at 2.46-2.60 TB/s with 4 splits (256
      programs) and 1.07-1.35 with 9 or 18 (the old rule, 4 per SM rounded up, picked 9: 1.15).
    - A batch with many KV heads needs no split: B=64 Nk=2k (512 KV heads) 3.94 TB/s with 1 split,
      3.77 with 2, 3.63 with 4; B=64 Nq=8 the same (3.86 with 1, 3.16 with 2).
    The split-length cap grows with the rows per KV head: each split writes rows·D fp32 partials
    (and pass 2 reads them back) against split·D·2 elements of K and V, so the cap keeps that
    traffic near 2·rows/MAX_SPLIT_KEYS of the cache's (under 1 % for 8 rows), never the bulk.

    Ragged batches: the split size is one number for the batch, chosen from Nmax, and splits past
    a sequence's length exit at once, so a batch runs about Σ cdiv(len_b, split_size)·Hkv live
    programs. Whenever the length term decides (B·Hkv·Nmax/MAX_SPLIT_KEYS ≥ 2 programs per SM, e.g.
    any B=8 Hkv=8 batch of 8k keys or more) the split size is MAX_SPLIT_KEYS·max(1, rows // 16)
    for the ragged batch and for the uniform batch of the same total length alike, so both launch
    the same number of live programs. Where the occupancy term decides (short caches, few heads)
    a ragged batch, whose Nmax exceeds its mean length, gets longer splits than the uniform one.
    """
    sms = sm_count or DEFAULT_SM_COUNT
    tiles = triton.cdiv(seq_kv, block_n)
    programs = batch_heads_kv * triton.cdiv(rows, block_m)  # per split
    splits = max(ragged_min_splits(seq_kv, rows), TARGET_PROGRAMS_PER_SM * sms // programs)
    splits = min(splits, max(1, tiles // MIN_SPLIT_TILES))
    splits = min(splits, max(1, MAX_PROGRAMS // programs))
    return max(1, splits)


def decode_bytes(*, batch: int, heads_q: int, heads_kv: int, seq_q: int, kv_tokens: int, head_dim: int,
                 elt: int) -> int:
    """Bytes a decode call must move: K and V of the live tokens (summed over the batch), Q and O."""
    return 2 * heads_kv * kv_tokens * head_dim * elt + 2 * batch * heads_q * seq_q * head_dim * elt


def combine_block_s(num_splits: int) -> int:
    """Splits merged per step of pass 2: all of them up to 16, else chunks of 16."""
    return min(16, max(2, triton.next_power_of_2(num_splits)))


def combine_warps(block_d: int) -> int:
    """Warps of pass 2: it is a tiny (BLOCK_S x BLOCK_D) reduction."""
    return 4 if block_d >= 128 else 2

