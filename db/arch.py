"""GPU architectures: the known archs and their shared-memory limits for planning.

A leaf module: it imports nothing of flashtune, so the key type and the shared-memory model can both use it.

The per-block opt-in limits are what CUDA reports as `sharedMemPerBlockOptin` on each chip; on a
real GPU the device's own figure wins (the tuner and the kernel read it from the device).
"""
from __future__ import annotations

import re

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
