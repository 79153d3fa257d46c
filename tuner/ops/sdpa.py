"""torch SDPA as a candidate of feature keys: which keys it computes, which of its backends take the mask it then
needs, and the run with that mask.

SDPA computes a sliding window, ALiBi and an explicit mask as one `attn_mask` (kernel.mods.sdpa_mask: the window
and the causal mask as a boolean mask, ALiBi as a float bias added to a float mask; kernel.mods.SDPA_FEATURES), so
keys with those features and nothing else may be won by a backend that takes an attn_mask: cuDNN's (where this
torch's SDPA takes the mask there; a refusal is a `compile_error` trial saying so) and the memory-efficient one;
the flash backend takes no mask. SDPA has no softcap, no sinks and draws its own dropout: keys with any of those
are the kernel's alone (kernel.mods.sdpa_computes, which the dispatcher's routing asks too).
"""
from __future__ import annotations

import torch

from ...db.types import Key
from ...kernel.dtypes import FP8_NAME
from ...kernel.mods import sdpa_computes as features_computed
from ...kernel.sdpa import run_sdpa

# The SDPA backends that take an attn_mask: the candidates of keys whose call SDPA computes with one.
MASK_PROVIDERS: frozenset[str] = frozenset({"sdpa_cudnn", "sdpa_efficient"})


def sdpa_computes(key: Key) -> bool:
    """Whether torch SDPA computes `key`'s call (window, ALiBi, mask: through an attn_mask), i.e. no softcap,
    sinks or dropout (kernel.mods.sdpa_computes of the key's features), and not for fp8 inputs: torch's SDPA
    takes none (its backends accept fp16, bf16 and fp32)."""
    return key.dtype != FP8_NAME and features_computed(tuple(key.features_on().items()))


def needs_mask(key: Key) -> bool:
    """Whether SDPA needs an attn_mask for `key`'s call (a window, ALiBi or a mask): then only MASK_PROVIDERS."""
    return bool(key.window or key.alibi or key.mask != "none")


def key_backends(key: Key, available: tuple[str, ...] | list[str]) -> list[str]:
    """The providers of `available` that compete for `key` when SDPA computes it (the caller asks that first)."""
    return [p for p in available if p in MASK_PROVIDERS] if needs_mask(key) else list(available)


def run_provider(provider: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                 attn_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA pinned to `provider`'s backend (kernel.sdpa.run_sdpa), with `attn_mask` (kernel.mods.sdpa_mask, the
    causal mask folded in: then is_causal is off) or without. Raises torch's refusal (kernel.sdpa.is_refusal)
    when the backend declines."""
    return run_sdpa(provider, q, k, v, causal=causal and attn_mask is None, scale=scale, attn_mask=attn_mask)
