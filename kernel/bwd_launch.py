"""Launching the backward kernels with an explicit config: input checks, config checks, the launches.

`attention_bwd` is the checked entry point; `launch_bwd` is what the autograd Function, the
dispatcher and the tuner call after validating once.
"""
from __future__ import annotations

from typing import Any

import torch

from .bwd import (LOG2E, attn_bwd_dkdv_kernel, bwd_grid, attn_bwd_dq_convert_kernel, attn_bwd_dq_kernel,
                  attn_bwd_preprocess_kernel)
from .bwd_smem import BWD_EXTRA_KEYS, bwd_knobs, default_bwd_config, estimate_bwd_smem
from .launch import AttnShape, check_causal, check_inputs, check_precision, check_scale, device_limits
from ..db.smem import padded_head_dim
from ..db.types import Config

__all__ = ["attention_bwd", "launch_bwd", "check_bwd_inputs", "check_bwd_config", "default_bwd_config",
           "estimate_bwd_smem", "BWD_EXTRA_KEYS"]

_INT32_MAX = 2**31 - 1


def _elementwise_block(block_d: int) -> int:
    # Rows per program of the elementwise kernels: about 8K elements, i.e. 32-64 registers a thread.
    return max(16, min(128, 8192 // block_d))


def launch_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, shape: AttnShape, *, causal: bool, scale: float, config: Config,
               deterministic: bool = True, fp32_precision: str = "ieee",
               out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Launch the backward with no input checks; returns (dq, dk, dv, Triton's compiled kernels by name).

    `scale` is the softmax scale (not folded with log2(e)); `lse` the forward's natural-log LSE.
    dq, dk, dv are allocated with empty_like(q/k/v) (same strides) unless `out` gives them.
    Atomics for dQ are used only when both `deterministic` is False and the config's
    `deterministic` knob is false. The config's extras are checked (ValueError on unknown knobs);
    Triton's own errors (OutOfResources, CompilationError) propagate for the tuner to record.
    """
    knobs = bwd_knobs(config)
    atomic = not deterministic and not knobs.deterministic
    dq, dk, dv = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) if out is None else out
    b, hq, nq, hkv, nk = shape.batch, shape.heads_q, shape.seq_q, shape.heads_kv, shape.seq_k
    block_d = padded_head_dim(shape.head_dim)
    causal = bool(causal)
    qk_scale = scale * LOG2E  # exp2 in-kernel
    compiled: dict[str, Any] = {}

    delta = torch.empty((b, hq, nq), device=q.device, dtype=torch.float32)
    rows = _elementwise_block(block_d)
    compiled["preprocess"] = attn_bwd_preprocess_kernel[bwd_grid(b, hq, nq, rows)](
        o, do, delta, *o.stride(), *do.stride(), nq, hq,
        HEAD_DIM=shape.head_dim, BLOCK_D=block_d, BLOCK_M=rows, num_warps=4)

    # With atomics the dQ shares land in a zeroed fp32 buffer; otherwise dk stands in (never read).
    dq_acc = torch.zeros((b, hq, nq, shape.head_dim), device=q.device, dtype=torch.float32) if atomic else dk
    dq_acc_strides = dq_acc.stride() if atomic else (0, 0, 0, 0)
    compiled["dkdv"] = attn_bwd_dkdv_kernel[bwd_grid(b, hkv, nk, knobs.block_n)](
        q, k, v, do, dk, dv, lse, delta, dq_acc,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *lse.stride(),
        *dq_acc_strides,
        nq, nk, hkv, shape.group, qk_scale, scale,
        HEAD_DIM=shape.head_dim, BLOCK_D=block_d, BLOCK_M=knobs.block_m, BLOCK_N=knobs.block_n,
        CAUSAL=causal, PRECISION=fp32_precision, ATOMIC_DQ=atomic,
        num_warps=knobs.num_warps, num_stages=knobs.num_stages)

    if atomic:
        compiled["dq_convert"] = attn_bwd_dq_convert_kernel[bwd_grid(b, hq, nq, rows)](
            dq_acc, dq, *dq_acc.stride(), *dq.stride(), nq, hq, scale,
            HEAD_DIM=shape.head_dim, BLOCK_D=block_d, BLOCK_M=rows, num_warps=4)
    else:
        compiled["dq"] = attn_bwd_dq_kernel[bwd_grid(b, hq, nq, knobs.block_m_dq)](
            q, k, v, do, dq, lse, delta,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *lse.stride(),
            nq, nk, hq, shape.group, qk_scale, scale,
            HEAD_DIM=shape.head_dim, BLOCK_D=block_d, BLOCK_M=knobs.block_m_dq, BLOCK_N=knobs.block_n_dq,
            CAUSAL=causal, PRECISION=fp32_precision,
            num_warps=knobs.num_warps_dq, num_stages=knobs.num_stages_dq)
    return dq, dk, dv, compiled


def _check_like(name: str, t: Any, q: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout is not torch.strided or t.is_nested:
        raise TypeError(f"{name} has layout {'nested' if t.is_nested else t.layout}: the kernel needs "
                        "dense (strided) tensors")
    if t.shape != q.shape:
        raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if t.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; it must match q's dtype {q.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device}; it must be on q's device {q.device}")
    if (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) > _INT32_MAX:
        raise ValueError(f"{name} spans more than 2**31 elements within one head "
                         f"(shape {tuple(t.shape)}, strides {t.stride()}): split the sequence")


def check_bwd_inputs(do: Any, q: Any, k: Any, v: Any, o: Any, lse: Any) -> AttnShape:
    """Validate the backward's tensors; return the sizes. TypeError/ValueError naming the argument.

    q, k, v as the forward (kernel.launch.check_inputs); do and o with q's shape, dtype and device
    (any strides); lse the forward's fp32 (B, Hq, Nq) log-sum-exp on the same device.
    """
    shape = check_inputs(q, k, v)
    _check_like("do", do, q)
    _check_like("o", o, q)
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if lse.layout is not torch.strided or lse.is_nested:
        raise TypeError(f"lse has layout {'nested' if lse.is_nested else lse.layout}: the kernel needs a dense tensor")
    expected = (shape.batch, shape.heads_q, shape.seq_q)
    if tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape (batch, heads_q, seq_q) = {expected}, got {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse has dtype {lse.dtype}; it must be float32 (attention_fwd(..., return_lse=True))")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device}; it must be on q's device {q.device}")
    return shape


def check_bwd_config(config: Any, shape: AttnShape, smem_limit: int | None, arch: str | None = None) -> None:
    """Raise if `config` is not a Config, has unknown or malformed backward knobs, or does not fit."""
    bwd_knobs(config)  # TypeError / ValueError naming the problem
    if smem_limit is not None:
        need = estimate_bwd_smem(config, shape.head_dim, shape.dtype, arch)
        if need > smem_limit:
            raise ValueError(f"backward config {config} needs about {need // 1024} KB of shared memory for head dim "
                             f"{shape.head_dim} {shape.dtype}; this GPU allows {smem_limit // 1024} KB per block")


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, *, causal: bool, scale: float | None, config: Config | None = None,
                  deterministic: bool = True, fp32_precision: str = "ieee",
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of O = softmax(scale·QKᵀ [+ causal mask])·V given dO.

    o and lse come from `attention_fwd(q, k, v, causal=..., scale=..., return_lse=True)` with the
    same causal (a bool) and scale (None = 1/sqrt(head_dim)). For GQA/MQA, dk and dv are summed over each
    KV head's query group. The gradients have the dtypes and strides of q, k, v. `config=None`
    takes the device's default backward config. `deterministic=True` (the default) never uses
    atomics, so two runs give bitwise-equal gradients; False lets a config with
    `extra={"deterministic": False}` add dQ with fp32 atomics. float32 inputs use IEEE fp32 dots
    unless fp32_precision="tf32".
    """
    shape = check_bwd_inputs(do, q, k, v, o, lse)
    causal = check_causal(causal)
    scale = check_scale(scale, shape.head_dim)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    fp32_precision = check_precision(fp32_precision)
    arch, smem_limit = device_limits(q)
    if config is None:
        config = default_bwd_config(arch or "sm_80", shape.head_dim, shape.dtype, smem_limit)
    check_bwd_config(config, shape, smem_limit, arch)
    dq, dk, dv, _ = launch_bwd(do, q, k, v, o, lse, shape, causal=causal, scale=scale, config=config,
                               deterministic=deterministic, fp32_precision=fp32_precision)
    return dq, dk, dv
