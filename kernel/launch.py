"""Launching the forward kernel with an explicit config: input checks, config checks, the launch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..db.smem import estimate_smem, padded_head_dim
from ..db.types import HEAD_DIMS, HEAD_DIMS_TEXT, Config

from . import device as _device
from .defaults import default_config
from .dtypes import DTYPE_NAMES
from .fwd import GRID_X_MAX, fwd_grid
from .variants import PLAIN_FWD, fwd_variant

_PRECISIONS = ("ieee", "tf32")
_INT32_MAX = 2**31 - 1
_MIN_BLOCK_M = 16  # the smallest query tile of any config (db.types.Config)
GRAD_UNSUPPORTED = ("inputs that require grad (attention_fwd is the explicit-config inference launch: train "
                    "through flashtune.kernel.attention, which has a backward, or call this under torch.no_grad())")


@dataclass(frozen=True)
class AttnShape:
    """The sizes one attention call works on, after validation."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: str

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 for plain multi-head attention)."""
        return self.heads_q // self.heads_kv


def check_qkv(q: Any, k: Any, v: Any, *, names: tuple[str, str, str] = ("q", "k", "v")) -> AttnShape:
    """Validate q (B, Hq, Nq, D) and k, v (B, Hkv, Nk, D), any strides, named `names` in messages; their sizes.

    The checks every entry point shares (the forward, the KV-cache path): tensors, dense layouts,
    rank, dtype, non-empty, one dtype and device, matching batch/head dim/K-V shapes, a head dim in
    db.types.HEAD_DIMS (flash_attn's rule: multiples of 8 up to 256), Hq a multiple of Hkv, and
    32-bit offsets inside one (batch, head) slice. TypeError for types, layouts and dtypes,
    ValueError for the rest; the message names the argument.
    """
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        # is_nested first: a strided-layout nested tensor answers .layout but raises on sizes.
        if t.is_nested or t.layout is not torch.strided:
            raise TypeError(f"{name} has layout {'nested' if t.is_nested else t.layout}: the kernel needs "
                            "dense (strided) tensors")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(DTYPE_NAMES.values())}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): every dimension must be at least 1")
    listed = ", ".join(names)
    nq_, nk_, nv_ = names
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{listed} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{listed} must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, nq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{nk_} and {nv_} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bk, hkv, nk, dk = k.shape
    if bk != b:
        raise ValueError(f"batch size differs: {nq_} has {b}, {nk_} and {nv_} have {bk}")
    if dk != d:
        raise ValueError(f"head dim differs: {nq_} has {d}, {nk_} and {nv_} have {dk}")
    if d not in HEAD_DIMS:
        raise ValueError(f"unsupported head dim {d}: the last dim of {listed} must be {HEAD_DIMS_TEXT}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA/MQA")
    for name, t in zip(names, (q, k, v)):
        if not head_span_fits(t.shape[2], t.stride(), d):
            raise ValueError(f"{name} spans more than 2**31 elements within one head "
                             f"(shape {tuple(t.shape)}, strides {t.stride()}): split the sequence")
    return AttnShape(b, hq, hkv, nq, nk, d, DTYPE_NAMES[q.dtype])


def head_span_fits(seq: int, strides: tuple[int, ...], head_dim: int) -> bool:
    """Whether one (batch, head) slice of `seq` rows of a (B, H, seq, head_dim) tensor with `strides`
    spans at most 2**31 elements: offsets inside a slice are 32-bit in the kernels."""
    return (seq - 1) * strides[2] + (head_dim - 1) * strides[3] <= _INT32_MAX


def check_tensors(q: Any, k: Any, v: Any) -> AttnShape:
    """Validate q, k, v of layout (batch, heads, seq, head_dim), any strides; return their sizes.

    What planning needs (dispatch.explain for another arch): it does not ask whether this machine
    can run them; check_inputs does. Raises TypeError for non-tensors, layouts and unsupported or
    mismatched dtypes, ValueError for devices, ranks, sizes and head dims; the message names the
    argument, the value and what is accepted.
    """
    shape = check_qkv(q, k, v)
    if fwd_grid(shape.batch, shape.heads_q, shape.seq_q, _MIN_BLOCK_M)[0] > GRID_X_MAX:
        # Only broadcast (stride-0) inputs get here: real memory runs out long before.
        raise ValueError(f"q of shape {tuple(q.shape)} needs more than 2**31-1 programs (batch x heads x "
                         f"query blocks of {_MIN_BLOCK_M} rows), CUDA's grid limit: split the batch")
    return shape


def check_runnable(t: torch.Tensor, names: str = "q, k, v") -> None:
    """Raise unless a kernel can run here on `t`'s device and dtype (`names`: the tensors it stands
    for, in the message): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 in fp16/fp32.
    ValueError for the device; TypeError for bf16 under the interpreter, whose bf16 dots are wrong."""
    if t.device.type == "cuda":
        return
    if not (t.device.type == "cpu" and _device.INTERPRET):
        raise ValueError(f"{names} are on {t.device}: the kernel needs CUDA tensors "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    if t.dtype == torch.bfloat16:
        raise TypeError(f"{names} are bfloat16 on the CPU: the Triton interpreter computes bf16 dots "
                        "wrongly (numpy has no bfloat16; results are off by orders of magnitude), so "
                        "under TRITON_INTERPRET=1 use float16 or float32; bf16 runs on CUDA GPUs")


def check_inputs(q: Any, k: Any, v: Any) -> AttnShape:
    """check_tensors, and check_runnable: that this machine can run the kernel on them."""
    shape = check_tensors(q, k, v)
    check_runnable(q)
    return shape


def check_causal(value: Any, name: str = "causal") -> bool:
    """`value` as a bool when it is one (numpy bools included); TypeError naming `name` otherwise.

    bool() would turn "False", "no", 2.5 or [] into causal attention: a silently wrong result
    (torch SDPA raises TypeError for these too).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")


def needs_grad(q: Any, k: Any, v: Any) -> bool:
    """Whether autograd would have to differentiate through the call (grad mode on, an input requiring grad)."""
    return torch.is_grad_enabled() and (getattr(q, "requires_grad", False) or getattr(k, "requires_grad", False)
                                        or getattr(v, "requires_grad", False))


def check_config(config: Any, shape: AttnShape, smem_limit: int | None, arch: str | None = None) -> None:
    """Raise if `config` is not a Config, has a knob the kernel does not know (kernel.variants), or
    its estimated shared memory on `arch` exceeds `smem_limit`."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a flashtune.db.types.Config, got {type(config).__name__}")
    fwd_variant(config)
    if smem_limit is not None:
        need = estimate_smem(config, shape.head_dim, shape.dtype, arch)
        if need > smem_limit:
            raise ValueError(f"config {config} needs about {need // 1024} KB of shared memory for head dim "
                             f"{shape.head_dim} {shape.dtype}; this GPU allows {smem_limit // 1024} KB per block")


def device_limits(t: torch.Tensor) -> tuple[str | None, int | None]:
    """(arch, per-block shared memory) of `t`'s CUDA device; (None, None) for the interpreter's CPU tensors,
    which have no limit to check against."""
    if t.device.type != "cuda":
        return None, None
    return _device.device_arch(t.device), _device.device_smem_limit(t.device)


def check_scale(scale: Any, head_dim: int) -> float:
    """The softmax scale to use: 1/sqrt(head_dim) for None, else `scale` if it is a finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def check_precision(fp32_precision: Any) -> str:
    """`fp32_precision` if it is one the kernels take ("ieee" or "tf32"); ValueError naming it otherwise."""
    if fp32_precision not in _PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {', '.join(_PRECISIONS)}, got {fp32_precision!r}")
    return fp32_precision


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttnShape, *, causal: bool,
           scale: float, config: Config, return_lse: bool = False, fp32_precision: str = "ieee",
           out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Launch the kernel with no input checks; returns (o, lse or None, Triton's compiled kernel or None).

    The dispatcher's hot path and the tuner call this after validating once. `config.extra` selects
    the kernel variant (kernel.variants; ValueError for a knob the kernel does not know, raised
    before anything runs). Triton's own errors (OutOfResources, CompilationError) propagate
    unchanged so the tuner can record them.
    """
    variant = fwd_variant(config) if config.extra else PLAIN_FWD
    if variant.launch is not None:
        return variant.launch(q, k, v, shape, causal=causal, scale=scale, config=config, return_lse=return_lse,
                              fp32_precision=fp32_precision, out=out)
    o = torch.empty_like(q) if out is None else out
    lse = _lse_buffer(q, shape) if return_lse else o
    grid, args, kwargs = _fwd_arguments(q, k, v, o, lse, shape, causal, scale, config, return_lse, fp32_precision,
                                        variant.constexprs)
    compiled = variant.kernel[grid](*args, **kwargs)
    return o, (lse if return_lse else None), compiled


_LOG2E = 1.4426950408889634  # log2(e): exp2 in-kernel
_TENSORS = 5  # q, k, v, o, lse lead the pointer kernel's arguments
_SCALE_AT = 20  # qk_scale's place among the arguments after them: 16 strides, seq_q, seq_k, heads_q, group


def _lse_buffer(q: torch.Tensor, shape: AttnShape) -> torch.Tensor:
    return torch.empty((shape.batch, shape.heads_q, shape.seq_q), device=q.device, dtype=torch.float32)


def _fwd_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                   shape: AttnShape, causal: bool, scale: float, config: Config, return_lse: bool,
                   fp32_precision: str, constexprs: Any) -> tuple[tuple[int], tuple[Any, ...], dict[str, Any]]:
    """The pointer kernel's (grid, positional arguments, keyword arguments) for one call."""
    grid = fwd_grid(shape.batch, shape.heads_q, shape.seq_q, config.block_m)
    args = (q, k, v, o, lse,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            shape.seq_q, shape.seq_k, shape.heads_q, shape.group, scale * _LOG2E)
    kwargs = dict(HEAD_DIM=shape.head_dim, BLOCK_D=padded_head_dim(shape.head_dim),
                  BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                  CAUSAL=bool(causal), STORE_LSE=return_lse, PRECISION=fp32_precision,
                  num_warps=config.num_warps, num_stages=config.num_stages, **constexprs)
    return grid, args, kwargs


def launch_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttnShape, *, causal: bool,
                  scale: float, config: Config, return_lse: bool, cache: dict[Any, Any]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """launch() for a caller that keeps `cache` per input signature (the dispatcher's Plan): (o, lse or None).

    The first call goes through Triton's JIT and keeps its compiled kernel in `cache`; later calls
    relaunch it directly (kernel.fastlaunch), allocating only the output (and the LSE when asked), as
    long as the pointers keep the 16-byte alignment the kernel was specialised for (else the JIT
    decides, as before). Only the pointer kernel: the TMA variant has its own launch, with tensor
    descriptors, and always takes it. Never under the interpreter.
    """
    fast = cache.get(return_lse)
    if fast is None and not _device.INTERPRET and q.device.type == "cuda":
        variant = fwd_variant(config) if config.extra else PLAIN_FWD
        if variant.launch is not None:
            cache[return_lse] = False  # the TMA kernel: never fast, do not ask again
        else:
            from . import fastlaunch

            o = torch.empty_like(q)
            lse = _lse_buffer(q, shape) if return_lse else o
            grid, args, kwargs = _fwd_arguments(q, k, v, o, lse, shape, causal, scale, config, return_lse,
                                                "ieee", variant.constexprs)
            compiled = variant.kernel[grid](*args, **kwargs)
            cache[return_lse] = fastlaunch.build(variant.kernel, compiled, grid, args, kwargs, _TENSORS) or False
            return o, (lse if return_lse else None)
    out = None
    if fast:
        out = torch.empty_like(q)
        lse = _lse_buffer(q, shape) if return_lse else out
        if fast.call((q, k, v, out, lse), {_SCALE_AT: scale * _LOG2E}):
            return out, (lse if return_lse else None)
    return launch(q, k, v, shape, causal=causal, scale=scale, config=config, return_lse=return_lse, out=out)[:2]


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: float | None = None, config: Config | None = None, return_lse: bool = False,
                  fp32_precision: str = "ieee") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward, O = softmax(scale·QKᵀ [+ causal mask])·V, with an explicit config.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq a multiple of Hkv; any strides. `causal` (a bool)
    is top-left aligned like torch SDPA's is_causal. `config=None` takes the device's default.
    float32 inputs use IEEE fp32 dots unless fp32_precision="tf32". With return_lse, also returns
    the fp32 row log-sum-exp of the scaled scores, (B, Hq, Nq). Inputs that require grad while
    grad mode is on raise NotImplementedError: this explicit-config launch is for inference; train
    through `flashtune.kernel.attention`, which has a backward.
    """
    shape = check_inputs(q, k, v)
    causal = check_causal(causal)
    if needs_grad(q, k, v):
        raise NotImplementedError(f"attention_fwd does not support {GRAD_UNSUPPORTED}")
    scale = check_scale(scale, shape.head_dim)
    precision = check_precision(fp32_precision)
    arch, smem_limit = device_limits(q)
    if config is None:
        config = default_config(arch or "sm_80", shape.head_dim, shape.dtype, smem_limit)
    check_config(config, shape, smem_limit, arch)
    o, lse, _ = launch(q, k, v, shape, causal=causal, scale=scale, config=config,
                       return_lse=return_lse, fp32_precision=precision)
    return (o, lse) if return_lse else o
