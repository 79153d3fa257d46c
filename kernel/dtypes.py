"""The one map between the project's dtype names (db.types.DTYPES) and torch dtypes."""
from __future__ import annotations

import torch

from ..db.types import DTYPES, FP8_DTYPE, normalize_dtype

FP8_NAME = FP8_DTYPE  # the fp8 inputs of the inference forward (kernel.fp8)
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    FP8_NAME: torch.float8_e4m3fn,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
# Dtypes only the fp8 forward takes (attention with q/k/v descales): every other entry point refuses them.
FP8_DTYPES: frozenset[torch.dtype] = frozenset({torch.float8_e4m3fn})


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name or alias ('float16', 'fp16', 'bf16', 'fp8', ...); ValueError if unknown."""
    return TORCH_DTYPES[normalize_dtype(name)]


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a supported torch dtype; TypeError naming the supported ones otherwise."""
    try:
        return DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        raise TypeError(f"dtype {dtype} is not supported: expected one of {', '.join(DTYPES)}") from None
