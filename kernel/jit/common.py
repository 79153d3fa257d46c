"""What every kernel family shares: the program-id decode, the masked tile load, the causal bounds, the
online-softmax step and the constants.

Triton inlines these helpers, so sharing them changes no compiled kernel (tests/kernel/test_output_hashes.py
checks the outputs bitwise). Each op's version (kernel/version.py) includes the helpers its kernels call.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...db.types import INT32_MAX

LOG2E = 1.4426950408889634  # log2(e): the kernels exponentiate in base 2, with the scale and log2(e) folded
LN2 = 0.6931471805599453  # ln(2): base-2 log-sum-exps back to natural log
GRID_X_MAX = INT32_MAX  # CUDA's limit on grid x; y and z stop at 65535, which B or H alone can exceed

# The same values as compile-time constants: a jit function reads only constexpr globals.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


def one_axis_grid(batch: int, heads: int, seq: int, block: int) -> tuple[int]:
    """The grid of a kernel that runs one program per `block` rows of every (batch, head), on one axis
    (`block_of` decodes it); the blocks of one head are consecutive, so they share K and V in L2."""
    return (batch * heads * -(-seq // block),)  # ceil division inline: this runs on every call


@triton.jit
def block_of(pid, n_blocks, heads):
    """(block, batch·heads + head, batch, head) of program `pid` on a `one_axis_grid`."""
    pid_m = pid % n_blocks
    bh = pid // n_blocks
    return pid_m, bh, bh // heads, bh % heads


@triton.jit
def load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A 2-D tile; where asked, rows past `rows_ok` (dim 0) and columns past `cols_ok` (dim 1) read 0.

    The unmasked load is the steady state: whole tiles inside the sequence with a power-of-two head dim."""
    if MASK_ROWS:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def causal_bounds(start_m, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(hi, full_hi) of the key loop of the query block starting at `start_m`: tiles below full_hi need no
    mask, tiles in [full_hi, hi) do, keys from hi on are never loaded.

    Causal is top-left aligned (torch SDPA's is_causal): query i sees keys j <= i, so keys past the
    block's last row are skipped and keys before its first row need no causal mask."""
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M)
        full_hi = (tl.minimum(seq_k, start_m) // BLOCK_N) * BLOCK_N
    else:
        hi = seq_k
        full_hi = (seq_k // BLOCK_N) * BLOCK_N
    return hi, full_hi


@triton.jit
def softmax_step(qk, m_i, l_i, acc, GUARD_EMPTY: tl.constexpr):
    """One tile of the online softmax in base 2: (p, the new row max, the new row sum, the rescaled
    accumulator). `qk` holds scaled scores, -inf where masked.

    GUARD_EMPTY: a row may have seen no key yet (bottom-right causal decode), so its max can be -inf;
    subtracting 0 instead keeps exp2 at 0 rather than NaN. Top-left causal rows always see key 0 first."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if GUARD_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def softcap_scores(raw, cap_in, cap_out):
    """Logit softcapping of raw dot products `raw` (QKᵀ before the scale) in the kernels' base-2 units:
    cap_out·tanh(cap_in·raw), with cap_in = scale/c and cap_out = c·log2(e) for a cap c (`softcap_factors`).

    tanh as 1 − 2/(e^{2x} + 1) through exp2: exact at ±inf (exp2 overflows to inf or underflows to 0), and
    within a few fp32 ulps of 1 in absolute terms elsewhere."""
    return cap_out * (1.0 - 2.0 / (tl.math.exp2(raw * (cap_in * 2.0 * LOG2E_C)) + 1.0))


def softcap_factors(scale: float, softcap: float) -> tuple[float, float]:
    """(cap_in, cap_out) of `softcap_scores` for softmax scale `scale` and cap `softcap` > 0."""
    return scale / softcap, softcap * LOG2E


@triton.jit
def visible_range(start, seq_other, diag, before, after, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """The tiles of the other axis that rows [start, start + BLOCK) see, where row r sees index o when
    r + diag − before <= o <= r + diag + after and 0 <= o < seq_other: (lo, full_lo, full_hi, hi).

    Rows are queries and o keys (before/after = the window's left/right, `diag` the diagonal offset), or rows
    are keys and o queries (before = right, after = left, diag negated). A side without bound is
    kernel.mods.UNBOUNDED; causal caps the query frame's `after` at 0. Tiles in [lo, full_lo) and
    [full_hi, hi) need the mask; tiles in [full_lo, full_hi) are seen whole by every row and lie inside
    seq_other. lo, full_lo and full_hi are multiples of TILE; hi is the exclusive end (past it nothing is
    loaded). Without a window and not causal: (0, 0, seq_other rounded down, seq_other)."""
    lo = (tl.maximum(start + diag - before, 0) // TILE) * TILE
    hi = tl.maximum(tl.minimum(start + BLOCK + diag + after, seq_other), lo)
    hi_tiles = tl.cdiv(hi, TILE) * TILE
    full_lo = tl.cdiv(tl.maximum(start + BLOCK - 1 + diag - before, 0), TILE) * TILE
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi_tiles)
    full_hi = (tl.maximum(tl.minimum(start + diag + after + 1, seq_other), 0) // TILE) * TILE
    full_hi = tl.maximum(full_lo, tl.minimum(full_hi, hi_tiles))
    return lo, full_lo, full_hi, hi


@triton.jit
def mod_scores(qk, rel, valid, slope, mask_tile, before, after,
               WINDOW: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr):
    """A tile's scores (base-2 units: scaled or capped) with the modifiers applied, −inf where hidden.

    rel = o − (r + diag) per element in either frame (key index minus the query's diagonal); `valid` the
    positions inside both sequences (and the causal mask, where the caller applies it); `slope` ALiBi's slope
    of this (batch, head); `mask_tile` the attn_mask values of the tile (MASK 1: bool, 2: float, 0: none).
    ALiBi subtracts slope·|rel| and a float mask is added (both in natural-log units, so times log2(e));
    the window keeps −before <= rel <= after; a bool mask keeps its nonzero entries."""
    if ALIBI:
        qk = qk - (slope * LOG2E_C) * tl.abs(rel).to(tl.float32)
    if MASK == 2:
        qk = qk + mask_tile.to(tl.float32) * LOG2E_C
    if WINDOW:
        valid = valid & (rel >= -before) & (rel <= after)
    if MASK == 1:
        valid = valid & (mask_tile != 0)
    return tl.where(valid, qk, float("-inf"))


@triton.jit
def dropout_keep(seed, bh, rows, cols, seq_k, dropout_p):
    """Which probabilities of a tile dropout keeps: Philox (tl.rand) keyed by `seed` + the (batch·heads) index
    `bh`, at offset row·seq_k + col (2-D `rows`, `cols`, either frame), kept where the uniform draw >= p.
    The forward and the backward call it with the same arguments, so the backward sees the forward's mask.
    Offsets are int32: a (batch, head) plane holds up to 2^32 distinct draws (Nq·Nk <= 2^32, then they wrap)."""
    return tl.rand(seed + bh, rows * seq_k + cols) >= dropout_p
