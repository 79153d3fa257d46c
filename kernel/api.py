"""`attention`: the public entry point, a drop-in for torch SDPA on what the kernel supports.

Eager calls go straight from the dispatcher's memoised plan to `kernel.launch.launch` (the
torch.library op costs dispatcher time that matters on small shapes). Under torch.compile the
same work runs inside the custom op `flashtune::attention_fwd`, whose fake implementation lets
the compiler trace through it without a graph break; both paths run the same `_forward`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .errors import launch_failure
from .launch import GRAD_UNSUPPORTED, check_causal, check_inputs, check_scale, launch, needs_grad

__all__ = ["attention", "attention_fwd_op"]


_STORED = (dispatch.EXACT, dispatch.NEAREST)
_COMPILE_FAILURES = ("compile_error", "out_of_resources")  # another config may work: fall back


def _launch_planned(q: Tensor, k: Tensor, v: Tensor, plan: dispatch.Plan, causal: bool, scale: float) -> Tensor:
    try:
        return launch(q, k, v, plan.shape, causal=causal, scale=scale, config=plan.choice.config)[0]
    except Exception as error:
        if plan.choice.source not in _STORED or launch_failure(error) not in _COMPILE_FAILURES:
            raise
        plan = dispatch.config_failed(q, k, v, causal, plan.choice, error)
        return launch(q, k, v, plan.shape, causal=causal, scale=scale, config=plan.choice.config)[0]


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    """Plan (memoised) and launch; the body of both the eager path and the custom op."""
    return _launch_planned(q, k, v, dispatch.plan(q, k, v, causal), causal, scale)


@torch.library.custom_op("flashtune::attention_fwd", mutates_args=())
def attention_fwd_op(query: Tensor, key: Tensor, value: Tensor, is_causal: bool, scale: float) -> Tensor:
    """The forward kernel as a torch.library op (what torch.compile sees)."""
    return _forward(query, key, value, is_causal, scale)


@attention_fwd_op.register_fake
def _attention_fwd_fake(query: Tensor, key: Tensor, value: Tensor, is_causal: bool, scale: float) -> Tensor:
    check_inputs(query, key, value)
    return torch.empty_like(query)  # exactly what launch() allocates for the output


def _unsupported(attn_mask: Any, dropout_p: float, query: Any, key: Any, value: Any) -> str | None:
    if attn_mask is not None:
        return "attn_mask (an explicit mask tensor; use is_causal=True for a causal mask)"
    if dropout_p:
        return f"dropout_p={dropout_p!r} (the kernel has no dropout)"
    if needs_grad(query, key, value):
        return GRAD_UNSUPPORTED
    return None


def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float,
          is_causal: bool, scale: float | None, enable_gqa: bool) -> Tensor:
    extra = {"enable_gqa": True} if enable_gqa else {}  # the keyword is new in torch 2.5
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, **extra)


def _gqa_error(heads_q: int, heads_kv: int) -> ValueError:
    return ValueError(f"query has {heads_q} heads but key/value have {heads_kv}: pass enable_gqa=True for "
                      "grouped-query attention (as with torch SDPA)")


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False, *, fallback: bool = False) -> Tensor:
    """softmax(scale·QKᵀ [+ causal mask])·V with the best stored config for this GPU and shape.

    The signature is torch.nn.functional.scaled_dot_product_attention's, so one swaps for the other.
    query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D); fp16, bf16 or fp32 (IEEE fp32 dots); any strides.
    `is_causal` is a bool (numpy bools too; anything else is a TypeError, as with SDPA), top-left
    aligned like SDPA (query i sees keys j <= i). Hq != Hkv needs enable_gqa=True. Returns a new
    tensor laid out like `query`.

    What the kernel does not run -- attn_mask, dropout_p > 0, inputs that require grad, CPU tensors
    outside the Triton interpreter, bf16 under it, dtypes/head dims/layouts check_inputs rejects -- raises
    (NotImplementedError for the arguments, TypeError/ValueError for the tensors) naming the
    problem. `fallback=True` sends such calls to torch SDPA instead. The default is False because
    a silent fallback hides that a call is not running the tuned kernel (a performance cliff a user
    swapping SDPA for this function would want to hear about), and it cannot be undone afterwards.
    """
    causal = is_causal if type(is_causal) is bool else check_causal(is_causal, "is_causal")
    # The common case decides in three cheap tests; _unsupported() repeats them to name the problem.
    if attn_mask is not None or dropout_p or (torch.is_grad_enabled() and needs_grad(query, key, value)):
        if fallback:
            return _sdpa(query, key, value, attn_mask, dropout_p, causal, scale, enable_gqa)
        raise NotImplementedError(f"flashtune attention does not support "
                                  f"{_unsupported(attn_mask, dropout_p, query, key, value)}; pass "
                                  "fallback=True to run torch's scaled_dot_product_attention for such calls")
    if torch.compiler.is_compiling():
        # Checked while tracing; at run time the op re-plans from the dispatcher's memo.
        try:
            shape = check_inputs(query, key, value)
        except (TypeError, ValueError):
            if fallback:
                return _sdpa(query, key, value, None, 0.0, causal, scale, enable_gqa)
            raise
        if shape.heads_q != shape.heads_kv and not enable_gqa:
            raise _gqa_error(shape.heads_q, shape.heads_kv)
        return attention_fwd_op(query, key, value, causal, check_scale(scale, shape.head_dim))
    try:
        plan = dispatch.plan(query, key, value, causal)
    except (TypeError, ValueError):
        if fallback:
            return _sdpa(query, key, value, None, 0.0, causal, scale, enable_gqa)
        raise
    if plan.grouped and not enable_gqa:
        raise _gqa_error(plan.shape.heads_q, plan.shape.heads_kv)
    return _launch_planned(query, key, value, plan, causal,
                           plan.default_scale if scale is None else check_scale(scale, plan.shape.head_dim))
