"""torch SDPA's fused backends as providers: candidates the tuner times and the dispatcher can route to.

A provider is named in a config's `extra` (`provider=sdpa_cudnn`, ...); a config without it is the
flashtune kernel. An SDPA provider's config carries no meaningful tile sizes, so every one of them is
the same canonical value (`provider_config`), which keeps trials of one provider equal across runs.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from ..db.types import Config

PROVIDER_KNOB = "provider"
KERNEL = "kernel"
# Provider name -> torch.nn.attention.SDPBackend member. The math backend is no candidate: it is
# never faster than a fused one and materialises the whole score matrix.
SDPA_BACKENDS: dict[str, str] = {
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
}
PROVIDERS: tuple[str, ...] = (KERNEL, *SDPA_BACKENDS)


def provider_of(config: Config) -> str:
    """Which implementation `config` runs: "kernel" or an SDPA backend's provider name."""
    for name, value in config.extra:
        if name == PROVIDER_KNOB:
            return str(value)
    return KERNEL


def provider_config(provider: str) -> Config:
    """The one config value that stands for SDPA backend `provider` (ValueError if unknown)."""
    if provider not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA provider {provider!r}: expected one of {', '.join(SDPA_BACKENDS)}")
    return Config(16, 16, 1, 1, ((PROVIDER_KNOB, provider),))


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
