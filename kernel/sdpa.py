"""torch SDPA's fused backends, run as providers (kernel/providers.py names them): candidates the tuner times and
the dispatcher can route to."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from .providers import SDPA_BACKENDS


def available_providers() -> tuple[str, ...]:
    """The SDPA providers this torch has a backend for (all of them on current releases)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # torch < 2.3
        return ()
    return tuple(p for p, member in SDPA_BACKENDS.items() if hasattr(SDPBackend, member))


@lru_cache(maxsize=None)
def _backend(provider: str) -> Any:
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, SDPA_BACKENDS[provider])


def run_sdpa(provider: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
             scale: float | None) -> torch.Tensor:
    """torch SDPA pinned to `provider`'s backend; GQA (Hq a multiple of Hkv) through enable_gqa.

    Raises torch's RuntimeError ("No available kernel...") when the backend refuses the inputs.
    """
    from torch.nn.attention import sdpa_kernel

    extra = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    with sdpa_kernel(_backend(provider)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **extra)


def is_refusal(error: BaseException) -> bool:
    """Whether `error` is an SDPA backend declining these inputs (not a failure of the inputs)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("no available kernel" in text or "no viable backend" in text)
