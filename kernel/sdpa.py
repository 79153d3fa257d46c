"""torch SDPA's fused backends, run as providers (kernel/providers.py names them): candidates the tuner times and
the dispatcher can route to.

A routed call runs the backend's own aten op (`_scaled_dot_product_{cudnn,flash,efficient}_attention`)
directly, not F.scaled_dot_product_attention under the `sdpa_kernel(...)` context manager: entering and
leaving that context toggles torch's global backend flags through Python, a host cost (tens of µs)
that dominates a small call. The direct call does what SDPA's front end does for that backend (same
gate, same arguments, same output tensor), so its output, and its autograd graph, are the ones SDPA
pinned to the backend gives. Calls the direct op does not take the same way (a backend's gate says
no, a head dim flash would pad, CPU tensors, a torch without the ops) run the pinned SDPA path,
which computes the result or raises torch's refusal.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .providers import SDPA_BACKENDS


@dataclass(frozen=True)
class DirectOp:
    """How one backend is called without SDPA's front end.

    `gate` is the backend's own `can_use_*` check (what SDPA's backend selection asks), on
    `torch._C._SDPAParams`; `op` the backend's aten op; `lse_arg` whether the op takes
    `compute_log_sumexp` (SDPA's front end asks for it exactly when autograd will need it);
    `head_dim_multiple` the head-dim multiple the front end calls the op unpadded with (flash pads
    other head dims to it; such calls take the pinned path).
    """

    gate: Callable[..., bool]
    op: Callable[..., Any]
    lse_arg: bool
    head_dim_multiple: int


# provider -> (aten op name, torch._C gate name, arguments the op's schema must have, in order)
_OPS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sdpa_cudnn": ("_scaled_dot_product_cudnn_attention", "_can_use_cudnn_attention",
                   ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal",
                    "return_debug_mask", "scale")),
    "sdpa_flash": ("_scaled_dot_product_flash_attention", "_can_use_flash_attention",
                   ("query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale")),
    "sdpa_efficient": ("_scaled_dot_product_efficient_attention", "_can_use_mem_efficient_attention",
                       ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal",
                        "scale")),
}


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


@lru_cache(maxsize=None)
def direct_op(provider: str) -> DirectOp | None:
    """`provider`'s direct call, or None where this torch lacks the op, its gate, or the schema the call
    is written for (then every call takes the pinned SDPA path). Resolved once per provider."""
    if provider not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA provider {provider!r}: expected one of {', '.join(SDPA_BACKENDS)}")
    name, gate_name, arguments = _OPS[provider]
    overloads = getattr(torch.ops.aten, name, None)
    gate = getattr(torch._C, gate_name, None)
    if overloads is None or gate is None or not hasattr(torch._C, "_SDPAParams"):
        return None
    schema = overloads.default._schema
    if tuple(arg.name for arg in schema.arguments) != arguments:
        return None  # an older or newer signature than the call below is written for
    # torch.<name> is the same aten op through the C++ argument parser: less host time than
    # the OpOverload's Python __call__, the same autograd node.
    op = getattr(torch, name, None) or overloads.default
    return DirectOp(gate=gate, op=op, lse_arg="compute_log_sumexp" in arguments,
                    head_dim_multiple=8 if provider == "sdpa_flash" else 1)


def takes_direct(provider: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether run_sdpa computes this call with the backend's op directly (else the pinned SDPA path)."""
    direct = direct_op(provider)
    return direct is not None and _admits(direct, q, k, v, causal)


def _admits(direct: DirectOp, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    # The backend's own gate, as SDPA's selection calls it (it says no for CPU tensors too); flash's
    # front end pads head dims that are not a multiple of 8, which the pinned path does for us.
    return (q.shape[-1] % direct.head_dim_multiple == 0
            and direct.gate(torch._C._SDPAParams(q, k, v, None, 0.0, causal, q.shape[1] != k.shape[1]), False))


def run_sdpa(provider: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
             scale: float | None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA pinned to `provider`'s backend; GQA (Hq a multiple of Hkv) through enable_gqa.

    Bitwise the output of F.scaled_dot_product_attention under sdpa_kernel(backend), with torch's own
    backward. Raises torch's RuntimeError ("No available kernel...") when the backend refuses the inputs.
    A call with an `attn_mask` (never with causal: fold it into the mask) takes the pinned path.
    """
    direct = direct_op(provider)
    if attn_mask is not None:
        return run_pinned(provider, q, k, v, causal=causal, scale=scale, attn_mask=attn_mask)
    if direct is not None and _admits(direct, q, k, v, causal):
        if direct.lse_arg:
            # SDPA's front end: the log-sum-exp is computed when the backward will read it.
            lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            return direct.op(q, k, v, None, lse, 0.0, causal, scale=scale)[0]
        return direct.op(q, k, v, 0.0, causal, False, scale=scale)[0]
    return run_pinned(provider, q, k, v, causal=causal, scale=scale)


def run_pinned(provider: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float | None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention under sdpa_kernel(`provider`'s backend): the reference the direct
    call matches, and the path of the calls it does not take."""
    from torch.nn.attention import sdpa_kernel

    extra = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    with sdpa_kernel(_backend(provider)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale, **extra)


def is_refusal(error: BaseException) -> bool:
    """Whether `error` is an SDPA backend declining these inputs (not a failure of the inputs)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("no available kernel" in text or "no viable backend" in text)
