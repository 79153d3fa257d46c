"""The kernel's shared-memory model: what a config needs, estimated before anything compiles.

The tuner prunes its space with it and the dispatcher refuses stored configs that would not fit; the
compiled kernel's own `metadata.shared` is the truth it is measured against (README, "Shared memory").
"""
from __future__ import annotations

from .types import DTYPE_BYTES, Config, normalize_dtype


def _pow2_at_least(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


def _uses_wgmma(config: Config, arch: str) -> bool:
    # Hopper's warpgroup MMA needs whole 64-row warpgroups; smaller query tiles take mma.sync.
    return arch == "sm_90" and config.block_m % 64 == 0 and config.num_warps >= 4


def estimate_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None) -> int:
    """Estimated shared memory (bytes) of the forward kernel compiled with `config` for `arch`.

    The model follows how Triton 3.x lays the kernel out: the Q tile is staged once; K and V tiles
    are buffered by the software pipeline, `num_stages` deep on the wgmma path (sm_90) and
    `num_stages - 1` deep on the mma.sync path, one tile when there is no pipelining; and on the
    mma.sync path small query tiles convert P through a shared-memory scratch tile. It equals the
    compiled kernels' own `metadata.shared` for every config measured (see README, "Shared memory").
    `arch=None` gives the larger of the two paths, a safe bound for any GPU.
    """
    if arch is None:
        return max(estimate_smem(config, head_dim, dtype, "sm_90"), estimate_smem(config, head_dim, dtype, "sm_80"))
    elt = DTYPE_BYTES[normalize_dtype(dtype)]
    d = _pow2_at_least(head_dim)
    q_tile, kv_tile = config.block_m * d * elt, config.block_n * d * elt
    wgmma = _uses_wgmma(config, arch)
    if config.num_stages == 1:
        buffers = 1
    else:
        buffers = 2 * (config.num_stages if wgmma else config.num_stages - 1)
    scratch = 0
    if not wgmma and (config.block_m < 64 or (config.block_m == 64 and d >= 128)):
        scratch = config.block_m * config.block_n * elt
    return q_tile + buffers * kv_tile + scratch


def fits(config: Config, head_dim: int, dtype: str, limit_bytes: int, arch: str | None = None) -> bool:
    """Whether the estimate fits a shared-memory limit."""
    return estimate_smem(config, head_dim, dtype, arch) <= limit_bytes
