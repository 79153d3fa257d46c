"""GPU architectures: shared-memory limits for planning, and the kernel's shared-memory model.

The per-block opt-in limits are what CUDA reports as `sharedMemPerBlockOptin` on each chip; on a
real GPU the device's own figure wins (the tuner and the kernel read it from the device).
"""
from __future__ import annotations

import re

from .types import DTYPE_BYTES, Config, normalize_dtype

KB = 1024
# Per-block opt-in shared memory, bytes.
ARCH_SMEM: dict[str, int] = {
    "sm_75": 64 * KB,
    "sm_80": 163 * KB,
    "sm_86": 99 * KB,
    "sm_87": 163 * KB,
    "sm_89": 99 * KB,
    "sm_90": 227 * KB,
    "sm_100": 227 * KB,
    "sm_120": 99 * KB,
}


def normalize_arch(arch: str) -> str:
    """Accept 'sm_90', 'sm90', '90', '9.0' and return 'sm_90'; ValueError naming the known archs."""
    text = str(arch).strip().lower()
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", text) or re.fullmatch(r"(\d+)\.(\d)", text)
    if m:
        digits = "".join(m.groups())
        name = f"sm_{digits}"
        if name in ARCH_SMEM:
            return name
    raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCH_SMEM)}")


def arch_from_capability(major: int, minor: int) -> str:
    """'sm_XY' for a compute capability; unknown chips are allowed here (the device is real)."""
    return f"sm_{major}{minor}"


def smem_limit(arch: str) -> int:
    """Planning limit in bytes for a known arch."""
    return ARCH_SMEM[normalize_arch(arch)]


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
