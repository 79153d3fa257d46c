"""The config a call gets when nothing was tuned for its key: safe first, reasonable second."""
from __future__ import annotations

from ..db.arch import ARCH_SMEM, normalize_arch
from ..db.smem import estimate_smem, padded_head_dim
from ..db.types import Config, normalize_dtype

# Ordered from the best general-purpose choice to the smallest tile; the first one whose estimated
# shared memory fits the GPU wins. The larger tiles need Ampere-class shared memory.
_PREFERENCE: tuple[Config, ...] = (
    Config(128, 64, 8, 3),
    Config(128, 64, 4, 2),
    Config(64, 64, 4, 2),
    Config(64, 32, 4, 2),
    Config(32, 32, 4, 1),
    Config(16, 16, 2, 1),
)
_FALLBACK_SMEM = 64 * 1024  # smallest opt-in limit of any supported arch (sm_75)


def default_config(arch: str, head_dim: int, dtype: str, smem_limit: int | None = None) -> Config:
    """The first preferred config whose estimated shared memory fits the arch (or the given limit).

    Small head dims prefer a 64-wide key tile for fewer loop trips; big ones (> 128) halve the query
    tile to stay inside the register file.
    """
    dtype = normalize_dtype(dtype)
    try:
        arch = normalize_arch(arch)
        known = True
    except ValueError:
        known = False  # a real but unlisted GPU: plan for the smallest chip and any MMA path
    if smem_limit is None:
        smem_limit = ARCH_SMEM[arch] if known else _FALLBACK_SMEM
    # The tiles hold the padded head dim: 72 runs in 128 columns, 136 and up in 256.
    candidates = _PREFERENCE if padded_head_dim(head_dim) <= 128 else _PREFERENCE[2:]
    for config in candidates:
        if estimate_smem(config, head_dim, dtype, arch if known else None) <= smem_limit:
            return config
    return _PREFERENCE[-1]
