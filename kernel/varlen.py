"""`attention_varlen`: attention over packed sequences, flash_attn's `flash_attn_varlen_func` in shape, training
included.

The documents of a batch lie end to end: q (total_q, Hq, D), k and v (total_k, Hkv, D), document b owning rows
cu_seqlens_q[b] .. cu_seqlens_q[b + 1] of q and cu_seqlens_k[b] .. cu_seqlens_k[b + 1] of k and v. Tokens attend
only inside their document. The kernels are kernel/jit/varlen.py's (the dense kernels' tile loops behind a
per-document entry), launched by kernel/ops/varlen.py; forward and backward run in the custom ops
`flashtune::attention_varlen_fwd` and `flashtune::attention_varlen_bwd`, tied by `register_autograd`, so
torch.compile traces a training step without a graph break.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..db.types import Config
from . import dispatch, record
from .checks import check_bool, check_scale, check_softcap, device_limits
from .mods import NO_WINDOW, ScoreMods, check_mods, sinks_grad
from .ops.bwd import bwd_knobs, check_bwd_config
from .ops.fwd import check_config
from .ops.varlen import (
    check_varlen_inputs,
    launch_varlen_bwd,
    launch_varlen_fwd,
    packing,
)

__all__ = ["attention_varlen"]


def _fwd_sizes(config: Config) -> list[int]:
    # Custom ops take no Python objects: a config travels as its sizes (the varlen kernels take no other knob).
    return [config.block_m, config.block_n, config.num_warps, config.num_stages]


def _bwd_sizes(config: Config) -> list[int]:
    knobs = bwd_knobs(config)
    return [knobs.block_m, knobs.block_n, knobs.num_warps, knobs.num_stages, knobs.block_m_dq, knobs.block_n_dq,
            knobs.num_warps_dq, knobs.num_stages_dq]


def _bwd_config(sizes: list[int]) -> Config:
    m, n, warps, stages, m_dq, n_dq, warps_dq, stages_dq = sizes
    return Config(m, n, warps, stages, {"block_m_dq": m_dq, "block_n_dq": n_dq, "num_warps_dq": warps_dq,
                                        "num_stages_dq": stages_dq})


def _mods(softcap: float, window_left: int, window_right: int, sinks: Tensor | None) -> ScoreMods:
    return ScoreMods(softcap=softcap, window=(window_left, window_right),
                     sinks=None if sinks is None else sinks.float().contiguous())


@torch.library.custom_op("flashtune::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, softcap: float,
                            window_left: int, window_right: int, sinks: Tensor | None, config: list[int],
                            bwd_config: list[int]) -> tuple[Tensor, Tensor]:
    """(O (total_q, Hq, D), LSE (Hq, total_q) fp32, sinks included) of a checked packed call. `bwd_config` rides
    along for the backward."""
    shape = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    pack = packing(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    o, lse = launch_varlen_fwd(q, k, v, pack, shape, causal=causal, scale=scale,
                               config=Config(*config),
                               mods=_mods(softcap, window_left, window_right, sinks))
    return o, lse


@attention_varlen_fwd_op.register_fake
def _fwd_fake(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
              max_seqlen_k: int, causal: bool, scale: float, softcap: float, window_left: int, window_right: int,
              sinks: Tensor | None, config: list[int], bwd_config: list[int]) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("flashtune::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                            cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                            causal: bool, scale: float, softcap: float, window_left: int, window_right: int,
                            sinks: Tensor | None, bwd_config: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dQ, dK, dV, delta (Hq, total_q) = rowsum(dO ∘ O)) of the forward above; dK/dV summed over GQA groups."""
    shape = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    pack = packing(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    return launch_varlen_bwd(grad_out.contiguous(), q, k, v, out, lse, pack, shape, causal=causal, scale=scale,
                             config=_bwd_config(bwd_config),
                             mods=_mods(softcap, window_left, window_right, sinks))


@attention_varlen_bwd_op.register_fake
def _bwd_fake(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
              cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
              softcap: float, window_left: int, window_right: int, sinks: Tensor | None,
              bwd_config: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    delta = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), delta


_SINKS_AT = 12  # the sinks' place among the forward op's inputs


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap, left, right, sinks, _, bwd_config = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, *output, sinks)
    ctx.args = (max_q, max_k, causal, scale, softcap, left, right, bwd_config)


def _backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Any, ...]:
    # The LSE is an internal output: nothing downstream differentiates through it.
    q, k, v, cu_q, cu_k, out, lse, sinks = ctx.saved_tensors
    max_q, max_k, causal, scale, softcap, left, right, bwd_config = ctx.args
    dq, dk, dv, delta = attention_varlen_bwd_op(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal,
                                                scale, softcap, left, right, sinks, bwd_config)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[_SINKS_AT]:
        dsinks = sinks_grad(sinks, lse.unsqueeze(0), delta.unsqueeze(0)).to(sinks.dtype)
    grads: list[Any] = [dq, dk, dv] + [None] * 12
    grads[_SINKS_AT] = dsinks
    return tuple(grads)


attention_varlen_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False, scale: float | None = None,
                     window_size: tuple[int, int] | None = None, softcap: float = 0.0,
                     sinks: Tensor | None = None, config: Config | None = None,
                     bwd_config: Config | None = None) -> Tensor:
    """softmax(scale·QKᵀ [+ modifiers])·V inside each packed document: (total_q, Hq, D), laid out like q.

    q (total_q, Hq, D), k and v (total_k, Hkv, D) (Hq a multiple of Hkv: GQA/MQA), fp16, bf16 or fp32 (IEEE fp32
    dots), any strides. cu_seqlens_q/k: int32 (B + 1,) on q's device, starting at 0, non-decreasing, ending at
    total_q/total_k; document b is rows cu[b] .. cu[b + 1]. Empty documents (length 0) are fine; a query
    document with no keys gives zeros. max_seqlen_q/k (ints) bound the documents' lengths, as flash_attn's.

    Alignment is flash_attn's varlen one, bottom-right per document: with diag = len_k − len_q, `causal` lets
    query i see keys j <= i + diag (top-left when the lengths are equal; with len_q > len_k the first
    len_q − len_k queries see nothing and give zeros), and `window_size=(left, right)` keeps
    i + diag − left <= j <= i + diag + right (-1: unbounded). `softcap` c > 0 caps the scaled scores to
    c·tanh(s/c); `sinks` (Hq,) join every row's denominator (with their gradient when they require grad).

    The values of cu_seqlens are never read on the host: the kernels' document table and tile schedule are
    built on the device (kernel/ops/varlen.py), each offset clamped into the tensors and each length capped at
    max_seqlen, so bad values never read or write outside the tensors; rows they leave uncovered (or past
    max_seqlen) have undefined output and gradients. The grid walks only the real tiles of real documents.

    `config` (a forward Config, no knobs) and `bwd_config` (a backward Config) default to the dispatcher's
    choices for the call's key (op "varlen" and "varlen_bwd": the longest documents' lengths and the total query
    tokens, each bucketed to a power of two; kernel.dispatch.varlen_plan), tuned by `tune --op varlen`, else
    the default configs; under FLASHTUNE_RECORD=1 the call counts those keys. The backward is always
    deterministic. Inputs that require grad get the backward through
    autograd, also under torch.compile. TypeError / ValueError name any bad argument.
    """
    shape = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    causal = check_bool(causal, "causal")
    scale = check_scale(scale, shape.head_dim)
    softcap = check_softcap(softcap)
    mods = check_mods(shape, q.device, softcap=softcap, window_size=window_size, sinks=sinks)
    arch, smem_limit = device_limits(q)
    if config is None or bwd_config is None:
        plan = dispatch.varlen_plan(q, shape, q.shape[0], causal, mods.key_features(shape.seq_k))
        if record.ENABLED:
            record.hit(plan.fwd.key)
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                record.hit(plan.bwd.key)
        config = plan.fwd.config if config is None else config
        bwd_config = plan.bwd.config if bwd_config is None else bwd_config
    check_config(config, shape, smem_limit, arch)
    check_bwd_config(bwd_config, shape, smem_limit, arch)
    left, right = mods.window if mods.window != NO_WINDOW else NO_WINDOW
    return attention_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                   causal, scale, softcap, left, right, sinks, _fwd_sizes(config),
                                   _bwd_sizes(bwd_config))[0]
