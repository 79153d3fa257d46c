"""The attention implementations the benchmarks compare: the tuned kernel and torch SDPA's backends.

`flashtune` is `kernel.attention` (the dispatcher picks the config). Each `sdpa_*` provider is
torch.nn.functional.scaled_dot_product_attention pinned to one backend with
torch.nn.attention.sdpa_kernel. Whether a backend runs a shape (dtype, head dim, GPU) is torch's
call: the benchmark tries it once and records torch's reason when it refuses.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from .results import PROVIDER_NAMES, TUNED
from ...kernel.device import INTERPRET
from ...kernel.testing import MATH_SCORE_COPIES

Fn = Callable[[], torch.Tensor]

_BACKENDS = {"sdpa_math": "MATH", "sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
             "sdpa_cudnn": "CUDNN_ATTENTION"}


@dataclass(frozen=True)
class Provider:
    """One attention implementation the benchmark can time."""

    name: str
    description: str

    @property
    def backend(self) -> str | None:
        """The SDPBackend member this provider pins, None for the tuned kernel."""
        return _BACKENDS.get(self.name)

    def unavailable(self, device: torch.device) -> str | None:
        """Why this provider cannot run on `device` at all, or None (shape limits are found by running)."""
        if self.name == TUNED:
            if device.type != "cuda" and not INTERPRET:
                return "the kernel needs a CUDA GPU (CPU tensors run only under TRITON_INTERPRET=1)"
            return None
        from torch.nn.attention import SDPBackend

        if not hasattr(SDPBackend, self.backend or ""):
            return f"this torch ({torch.__version__}) has no SDPA {self.backend} backend"
        if device.type != "cuda" and self.name != "sdpa_math":
            return f"the SDPA {self.backend} backend is benchmarked on CUDA only"
        return None

    def extra_bytes(self, batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, elt: int) -> int:
        """Estimated device memory one call allocates: its output, plus the scores for the math backend."""
        out = batch * heads * seq_q * head_dim * elt
        if self.name == "sdpa_math":
            return out + MATH_SCORE_COPIES * batch * heads * seq_q * seq_k * 4
        return out + batch * heads * seq_q * 4  # the row statistics the fused kernels keep

    def context(self) -> ContextManager[object]:
        """Enter around both the checked call and the timing (pins the SDPA backend)."""
        if self.backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, self.backend))

    def build(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Fn:
        """A no-argument callable running this provider on q, k, v (call it inside `context()`)."""
        if self.name == TUNED:
            # The kernel alone, with the config the dispatcher gives it (kernel_only: also where an
            # SDPA backend won the key), so the kernel's own gap to each backend stays visible.
            from ...kernel.dispatch import explain
            from ...kernel.ops.fwd import attention_fwd

            config = explain(q, k, v, causal, kernel_only=True).config
            return lambda: attention_fwd(q, k, v, causal=causal, config=config)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


_DESCRIPTIONS = {
    TUNED: "flashtune's kernel through flashtune.kernel.attention (the dispatcher's config)",
    "sdpa_math": "torch SDPA, math backend (unfused, fp32 internally)",
    "sdpa_flash": "torch SDPA, FlashAttention-2 backend",
    "sdpa_efficient": "torch SDPA, memory-efficient (xFormers) backend",
    "sdpa_cudnn": "torch SDPA, cuDNN backend",
}
PROVIDERS: tuple[Provider, ...] = tuple(Provider(name, _DESCRIPTIONS[name]) for name in PROVIDER_NAMES)


def select_providers(names: str | None) -> tuple[Provider, ...]:
    """Providers named in a comma list ('flashtune,sdpa_flash'), in table order; all when None.

    The tuned kernel is always included: every speed-up is measured against it.
    """
    if names is None or not names.strip():
        return PROVIDERS
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = sorted(wanted - set(PROVIDER_NAMES))
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}: expected a comma list of "
                         f"{', '.join(PROVIDER_NAMES)}")
    wanted.add(TUNED)
    return tuple(p for p in PROVIDERS if p.name in wanted)
