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


def estimate_smem(config: Config, head_dim: int, dtype: str) -> int:
    """Estimated shared memory (bytes) of the forward kernel compiled with `config`.

    The model follows how Triton 3.x lays the kernel out on sm_80+: the Q tile is staged in shared
    memory once, and K and V tiles are buffered `num_stages` deep by the software pipeline. It
    matched the compiled kernels' own figure exactly for every measured config on the H200
    (bench/results/kernel_fwd_summary.json, bench/results/smem_report.*).
    """
    elt = DTYPE_BYTES[normalize_dtype(dtype)]
    d = _pow2_at_least(head_dim)
    q_tile = config.block_m * d * elt
    kv_tiles = 2 * max(1, config.num_stages) * config.block_n * d * elt
    return q_tile + kv_tiles


def fits(config: Config, head_dim: int, dtype: str, limit_bytes: int) -> bool:
    """Whether the estimate fits a shared-memory limit."""
    return estimate_smem(config, head_dim, dtype) <= limit_bytes
