"""What the ops' host code shares: the padded head-dim tile and the smallest shared-memory limit."""
from __future__ import annotations


MIN_BLOCK_D = 16  # tl.dot's smallest K: the QK^T product runs over the head-dim tile


def padded_head_dim(head_dim: int) -> int:
    """The head-dim tile every kernel runs `head_dim` through: the next power of two, at least 16.

    Triton tiles are powers of two and a dot needs K >= 16, so D=8 runs in a 16-column tile and
    D=24, 48, 72, 200 in 32, 64, 128, 256; the extra columns are masked (pointer kernels) or
    zero-filled by the descriptor bounds (TMA). Shared-memory estimates use this width.
    """
    p = MIN_BLOCK_D
    while p < head_dim:
        p *= 2
    return p


FALLBACK_SMEM = 64 * 1024  # smallest opt-in limit of any supported arch (sm_75)


def check_smem(what: str, need: int, head_dim: int, dtype: str, smem_limit: int | None) -> None:
    """ValueError when `what` (e.g. "config m64-n64-w4-s2") needs more than `smem_limit` bytes of shared memory
    (None: no limit known, nothing to check)."""
    if smem_limit is not None and need > smem_limit:
        raise ValueError(f"{what} needs about {need // 1024} KB of shared memory for head dim {head_dim} {dtype}; "
                         f"this GPU allows {smem_limit // 1024} KB per block")
