"""torch SDPA as a candidate of feature keys: which keys it computes, which of its backends take the mask it then
needs, and the run with that mask.

SDPA computes a sliding window, ALiBi and an explicit mask as one `attn_mask` (kernel.mods.sdpa_mask: the window
and the causal mask as a boolean mask, ALiBi as a float bias added to a float mask), so keys with those features
and nothing else may be won by a backend that takes an attn_mask: cuDNN's (where this torch's SDPA takes the
mask there; a refusal is a `compile_error` trial saying so) and the memory-efficient one; the flash backend takes
no mask. SDPA has no softcap, no sinks and draws its own dropout: keys with any of those are the kernel's alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...db.types import Key
from ...kernel.providers import SDPA_BACKENDS
from ...kernel.sdpa import run_sdpa

# The SDPA backends that take an attn_mask: the candidates of keys whose call SDPA computes with one.
MASK_PROVIDERS: frozenset[str] = frozenset({"sdpa_cudnn", "sdpa_efficient"})


def sdpa_computes(key: Key) -> bool:
    """Whether torch SDPA computes `key`'s call (window, ALiBi, mask: through an attn_mask), i.e. no softcap,
    sinks or dropout."""
    return not (key.softcap or key.sinks or key.dropout)


def needs_mask(key: Key) -> bool:
    """Whether SDPA needs an attn_mask for `key`'s call (a window, ALiBi or a mask): then only MASK_PROVIDERS."""
    return bool(key.window or key.alibi or key.mask != "none")


def key_backends(key: Key, available: tuple[str, ...] | list[str]) -> list[str]:
    """The providers of `available` that compete for `key` when SDPA computes it (the caller asks that first)."""
    return [p for p in available if p in MASK_PROVIDERS] if needs_mask(key) else list(available)


def run_provider(provider: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                 attn_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA pinned to `provider`'s backend: kernel.sdpa.run_sdpa without a mask; with `attn_mask` (which has
    the causal mask folded in: kernel.mods.sdpa_mask) F.scaled_dot_product_attention under that backend alone,
    is_causal off. Raises torch's refusal (kernel.sdpa.is_refusal) when the backend declines."""
    if attn_mask is None:
        return run_sdpa(provider, q, k, v, causal=causal, scale=scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    extra = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[provider])):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False, scale=scale, **extra)
