"""flashtune's config database: the shared key/config types, the store and the exchange file."""
from .arch import ARCH_SMEM, estimate_smem, normalize_arch, smem_limit
from .types import DTYPES, HEAD_DIMS, OPS, OUTCOMES, Config, Key, normalize_dtype

__all__ = ["ARCH_SMEM", "DTYPES", "HEAD_DIMS", "OPS", "OUTCOMES", "Config", "Key", "estimate_smem",
           "normalize_arch", "normalize_dtype", "smem_limit"]
