"""Providers: which implementation a config runs, the flashtune kernel or one of torch SDPA's fused backends.

A provider is named in a config's `extra` (`provider=sdpa_cudnn`, ...); a config without it is the
flashtune kernel. An SDPA provider's config carries no meaningful tile sizes, so every one of them is
the same canonical value (`provider_config`), which keeps trials of one provider equal across runs.
Torch-free: the dispatcher's rules and the database's tools read it; kernel/sdpa.py runs the backends.
"""
from __future__ import annotations

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
