"""FP8 (e4m3) inference attention: the checks and the call behind `attention(q_fp8, k_fp8, v_fp8, q_descale=...)`.

The convention is FlashAttention 3's fp8 forward and cuDNN's: q, k, v are torch.float8_e4m3fn, each with a
dequantisation factor (`q_descale`, ...: None for 1.0, a 0-d or one-element fp32 tensor per tensor, or an fp32
(B, Hkv) tensor per batch and key/value head), so the real inputs are q·q_descale, k·k_descale, v·v_descale and

    out = softmax(scale · (q·qd)(k·kd)ᵀ) · (v·vd),   in `out_dtype` (bfloat16 by default, or float16).

The pointer kernel (kernel/jit/fwd.py, FP8 on) dots the fp8 tiles with fp32 accumulation, folds qd·kd into the
softmax scale, rounds P to e4m3 for the P·V dot and scales the output by vd once. Forward only: no gradient
(inputs that require grad are refused), no score modifiers, no SDPA backend (torch SDPA takes no fp8 inputs).
The call is planned like any other (kernel.dispatch), under its own fp8 key. Under torch.compile it runs
eagerly (a graph break), not as a custom op.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..db.types import Config

from . import dispatch, record
from .checks import AttnShape, check_inputs, check_scale
from .dtypes import FP8_DTYPES
from .ops.fwd import FP8_MIN_K, Fp8Scales, default_config, fwd_variant, launch

__all__ = ["OUT_DTYPES", "check_descale", "check_fp8", "fp8_attention", "refuse_modifiers"]

OUT_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)


_UNITS: dict[torch.device, Tensor] = {}  # one fp32 1.0 per device: a missing descale costs no allocation


def _unit(device: torch.device) -> Tensor:
    unit = _UNITS.get(device)
    if unit is None:
        unit = _UNITS[device] = torch.ones((), device=device, dtype=torch.float32)
    return unit


def check_descale(name: str, descale: Any, shape: AttnShape, device: torch.device) -> Tensor:
    """`descale` (None, a one-element fp32 tensor or an fp32 (B, Hkv) tensor on `device`) as an fp32 (B, Hkv)
    tensor or broadcast view; TypeError for its type or dtype, ValueError for its shape or device."""
    batch, heads_kv = shape.batch, shape.heads_kv
    if descale is None:
        return _unit(device).expand(batch, heads_kv)
    if not isinstance(descale, Tensor):
        raise TypeError(f"{name} must be None or a float32 torch.Tensor (one element, or shape (batch, kv heads) = "
                        f"({batch}, {heads_kv})), got {type(descale).__name__}")
    if descale.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {descale.dtype}; it must be torch.float32")
    if descale.device != device:
        raise ValueError(f"{name} is on {descale.device}; it must be on q's device {device}")
    if descale.layout is not torch.strided or descale.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor")
    if descale.numel() == 1:
        return descale.reshape(()).expand(batch, heads_kv)
    if tuple(descale.shape) != (batch, heads_kv):
        raise ValueError(f"{name} has shape {tuple(descale.shape)}: it must have one element (per tensor) or "
                         f"shape (batch, kv heads) = ({batch}, {heads_kv})")
    return descale


def check_fp8(query: Tensor, key: Tensor, value: Tensor, q_descale: Any, k_descale: Any, v_descale: Any,
              out_dtype: Any) -> tuple[AttnShape, Fp8Scales]:
    """Validate an fp8 call's tensors, descales and output dtype: (its shape, the launch's Fp8Scales).

    TypeError for types and dtypes (q, k, v must all be float8_e4m3fn), ValueError for shapes and devices,
    NotImplementedError for inputs that require grad (there is no fp8 backward)."""
    if out_dtype is None:
        out_dtype = torch.bfloat16
    elif out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be None, torch.bfloat16 or torch.float16, got {out_dtype!r}")
    shape = check_inputs(query, key, value, fp8=True)
    if query.dtype not in FP8_DTYPES:
        # One fp8 tensor among q, k, v is refused by check_inputs (one dtype); here none is fp8.
        raise ValueError(f"q_descale, k_descale, v_descale and out_dtype apply only to torch.float8_e4m3fn "
                         f"inputs; q, k, v are {query.dtype}")
    for name, t in (("query", query), ("key", key), ("value", value), ("q_descale", q_descale),
                    ("k_descale", k_descale), ("v_descale", v_descale)):
        if isinstance(t, Tensor) and t.requires_grad:
            raise NotImplementedError(f"{name} requires grad: fp8 attention is an inference forward without a "
                                      "backward (pass tensors that do not require grad)")
    device = query.device
    scales = Fp8Scales(check_descale("q_descale", q_descale, shape, device),
                       check_descale("k_descale", k_descale, shape, device),
                       check_descale("v_descale", v_descale, shape, device), out_dtype)
    return shape, scales


def refuse_modifiers(attn_mask: Any, dropout_p: Any, window_size: Any, softcap: Any, sinks: Any,
                     alibi_slopes: Any) -> None:
    """ValueError naming the first score modifier an fp8 call was given: the fp8 forward takes none."""
    given = (("attn_mask", attn_mask is not None), ("dropout_p", bool(dropout_p)),
             ("window_size", window_size is not None), ("softcap", bool(softcap)), ("sinks", sinks is not None),
             ("alibi_slopes", alibi_slopes is not None))
    for name, on in given:
        if on:
            raise ValueError(f"fp8 attention takes no score modifiers, but {name} was given: run such calls in "
                             "bfloat16 or float16 (is_causal and enable_gqa are supported)")


def _pointer_config(config: Config, arch: str, shape: AttnShape) -> Config:
    # A config the fp8 launch cannot run (a TMA winner or an SDPA provider's entry from elsewhere, key tiles
    # under 32 keys): the pointer kernel's default.
    try:
        if fwd_variant(config).launch is None and config.block_n >= FP8_MIN_K:
            return config
    except ValueError:
        pass
    return default_config(arch, shape.head_dim, shape.dtype)


@torch.compiler.disable  # not a custom op: torch.compile runs it eagerly, across a graph break
def fp8_attention(query: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float | None, enable_gqa: bool,
                  q_descale: Any, k_descale: Any, v_descale: Any, out_dtype: Any) -> Tensor:
    """attention() of fp8 inputs (checked here), with the config planned for its fp8 key."""
    shape, scales = check_fp8(query, key, value, q_descale, k_descale, v_descale, out_dtype)
    if shape.heads_q != shape.heads_kv and not enable_gqa:
        raise ValueError(f"query has {shape.heads_q} heads but key/value have {shape.heads_kv}: pass "
                         "enable_gqa=True for grouped-query attention (as with torch SDPA)")
    plan = dispatch.plan(query, key, value, causal)
    if record.ENABLED:
        record.hit(plan.choice.key)
    config = plan.kernel
    if config.extra or config.block_n < FP8_MIN_K:
        config = _pointer_config(config, plan.choice.arch, shape)
    return launch(query, key, value, shape, causal=causal, scale=plan.default_scale if scale is None
                  else check_scale(scale, shape.head_dim), config=config, fp8=scales)[0]
