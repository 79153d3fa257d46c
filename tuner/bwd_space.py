"""The backward's search space: which configs of the fused backward (kernel/jit/bwd.py) the tuner times.

A backward config (kernel.ops.bwd) sets two kernels: the dK/dV pass (`block_m` queries streamed
past a program's `block_n` keys, `num_warps`, `num_stages`) and the dQ pass (`block_m_dq` queries
owned, `block_n_dq` keys streamed), or, with `deterministic: false`, dQ added with fp32 atomics
inside the dK/dV pass (no dQ pass). The full cross product of both passes is thousands of configs;
the space is built from what the two kernels share instead:

- dK/dV tiles: block_n (keys owned) 64 or 128, block_m (queries streamed) 16 to 64, 4 or 8 warps,
  2 or 3 stages;
- the dQ pass mirrors it (FA2): it owns block_m_dq = block_n queries and streams block_n_dq = 32 or
  64 keys, with the dK/dV pass's warps and stages (the knobs' defaults);
- the atomic-dQ variant of each dK/dV tile and warp count, at 2 stages (its extra dQ tile leaves
  little shared memory for a third).

That is 60 configs before pruning (45 kept at D=64 on sm_90, 30 at D=128 fp16; at D > 128 the
register rule leaves none, and the default alone is timed). Rules, each with a reason `tune --dry-run --op bwd` prints:

- legal: the shared-memory estimate (kernel.ops.bwd.estimate_bwd_smem, the larger of the two
  kernels) fits the GPU, and each pass's fp32 accumulators plus its score tiles fit the register
  file (dK and dV: 2·block_n·D; dQ: block_m_dq·D; scores and their gradients: 2 tiles);
- cost: every warp owns at least one 16-row MMA slab of the tile it accumulates (block_n for dK/dV,
  block_m_dq for dQ), as in tuner.space: more warps than slabs duplicate work.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

from ..kernel.ops.common import padded_head_dim
from ..db.types import Config, normalize_dtype
from ..kernel.ops.bwd import bwd_knobs, estimate_bwd_smem

from .space import MMA_ROWS, THREAD_FP32_MAX, Candidate

DKDV_BLOCK_N: tuple[int, ...] = (64, 128)  # keys a dK/dV program owns
DKDV_BLOCK_M: tuple[int, ...] = (16, 32, 64)  # queries it streams per step
WARPS: tuple[int, ...] = (4, 8)
STAGES: tuple[int, ...] = (2, 3)
DQ_BLOCK_N: tuple[int, ...] = (32, 64)  # keys the dQ program streams per step
ATOMIC_STAGES = 2


def full_bwd_space() -> list[Config]:
    """Every config of the backward's structured space, unpruned (60)."""
    configs = []
    for n, m, w, s, n_dq in itertools.product(DKDV_BLOCK_N, DKDV_BLOCK_M, WARPS, STAGES, DQ_BLOCK_N):
        configs.append(Config(m, n, w, s, {"block_m_dq": n, "block_n_dq": n_dq}))
    for n, m, w in itertools.product(DKDV_BLOCK_N, DKDV_BLOCK_M, WARPS):
        configs.append(Config(m, n, w, ATOMIC_STAGES, {"deterministic": False}))
    return configs


def _per_thread(rows: int, cols: int, acc_tiles: int, head_dim: int, score_cols: int, warps: int) -> int:
    """fp32 values a thread holds: `acc_tiles` rows x D accumulators plus two rows x score_cols tiles."""
    return (acc_tiles * rows * head_dim + 2 * rows * score_cols) // (32 * warps)


def bwd_reason(config: Config, head_dim: int, dtype: str, smem_limit: int, arch: str | None = None) -> str | None:
    """Why `config` is not worth timing for (head_dim, dtype) on `arch` with `smem_limit`; None if it is."""
    knobs = bwd_knobs(config)
    smem = estimate_bwd_smem(config, head_dim, dtype, arch)
    if smem > smem_limit:
        return f"smem {smem // 1024} KB > {smem_limit // 1024} KB"
    d = padded_head_dim(head_dim)
    dkdv = _per_thread(knobs.block_n, d, 2, d, knobs.block_m, knobs.num_warps)
    if dkdv > THREAD_FP32_MAX:
        return f"dK/dV pass: {dkdv} fp32 acc+score values per thread > {THREAD_FP32_MAX}"
    if knobs.deterministic:
        dq = _per_thread(knobs.block_m_dq, d, 1, d, knobs.block_n_dq, knobs.num_warps_dq)
        if dq > THREAD_FP32_MAX:
            return f"dQ pass: {dq} fp32 acc+score values per thread > {THREAD_FP32_MAX}"
        if knobs.block_m_dq < MMA_ROWS * knobs.num_warps_dq:
            return f"dQ pass: block_m_dq {knobs.block_m_dq} < {MMA_ROWS} rows x {knobs.num_warps_dq} warps"
    if knobs.block_n < MMA_ROWS * knobs.num_warps:
        return f"dK/dV pass: block_n {knobs.block_n} < {MMA_ROWS} rows x {knobs.num_warps} warps"
    return None


def bwd_plan(head_dim: int, dtype: str, smem_limit: int, arch: str | None = None) -> list[Candidate]:
    """Every config of the backward's space with its shared-memory estimate and the rule that drops it."""
    dtype = normalize_dtype(dtype)
    return [Candidate(c, estimate_bwd_smem(c, head_dim, dtype, arch), bwd_reason(c, head_dim, dtype, smem_limit, arch))
            for c in full_bwd_space()]


@lru_cache(maxsize=256)
def bwd_candidates(head_dim: int, dtype: str, smem_limit: int, arch: str | None = None) -> tuple[Config, ...]:
    """The backward configs the tuner times for (head_dim, dtype) on `arch` with `smem_limit`."""
    return tuple(c.config for c in bwd_plan(head_dim, dtype, smem_limit, arch) if c.kept)
