"""The one map between the project's dtype names (db.types.DTYPES) and torch dtypes."""
from __future__ import annotations

import torch

from ..db.types import DTYPES, normalize_dtype

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name or alias ('float16', 'fp16', 'bf16', ...); ValueError if unknown."""
    return TORCH_DTYPES[normalize_dtype(name)]


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a supported torch dtype; TypeError naming the supported ones otherwise."""
    try:
        return DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        raise TypeError(f"dtype {dtype} is not supported: expected one of {', '.join(DTYPES)}") from None
