"""`attention`: the public entry point, a drop-in for torch SDPA on what the kernel supports, training included.

Eager inference calls go straight from the dispatcher's memoised plan to `kernel.ops.fwd.launch` (the
torch.library op costs dispatcher time that matters on small shapes). Under torch.compile the
same work runs inside the custom op `flashtune::attention_fwd`, whose fake implementation lets
the compiler trace through it without a graph break; both paths run the same `_forward`.

Calls whose inputs require grad are planned as a training pair (`dispatch.train_plan`): the pair tuned for
their "train" key is an SDPA backend, run with torch's own backward, or a kernel forward and backward config.
The kernel's forward runs in `flashtune::attention_fwd_lse`, which also returns the row log-sum-exp the
backward needs, and whose `register_autograd` backward is the custom op `flashtune::attention_bwd`
(kernel/jit/bwd.py: the FA2 backward) with the pair's backward config. In the style of flash-attn's
hopper/flash_attn_interface.py, so that a `torch.compile(fullgraph=True)` training step traces both
without a graph break.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, record
from .ops.bwd import launch_bwd
from .mods import NO_MODS, ScoreMods
from .checks import check_bool, check_inputs, check_scale, check_softcap, needs_grad
from .mods import NO_MODS, ScoreMods
from .ops.fwd import launch, launch_cached
from .sdpa import is_refusal, run_sdpa

__all__ = ["attention", "attention_bwd_op", "attention_fwd_lse_op", "attention_fwd_op"]


def _launch_planned(q: Tensor, k: Tensor, v: Tensor, plan: dispatch.Plan, causal: bool, scale: float, *,
                    return_lse: bool = False, softcap: float = 0.0) -> tuple[Tensor, Tensor | None]:
    try:
        # The plan keeps the compiled kernel: after its first launch it is relaunched directly.
        return launch_cached(q, k, v, plan.shape, causal=causal, scale=scale, config=plan.kernel,
                             return_lse=return_lse, cache=plan.launchers,
                             mods=ScoreMods(softcap=softcap) if softcap else NO_MODS)
    except Exception as error:
        if not dispatch.stored_config_failed(plan.choice, error):
            raise
        plan = dispatch.config_failed(q, k, v, causal, plan.choice, error, plan.softcap)
        return launch(q, k, v, plan.shape, causal=causal, scale=scale, config=plan.kernel,
                      return_lse=return_lse, mods=ScoreMods(softcap=softcap) if softcap else NO_MODS)[:2]


def _run_planned(q: Tensor, k: Tensor, v: Tensor, plan: dispatch.Plan, causal: bool, scale: float,
                 softcap: float = 0.0) -> Tensor:
    """The call's output from whatever won its key: an SDPA backend, or the kernel."""
    if plan.sdpa is not None:
        try:
            return run_sdpa(plan.sdpa, q, k, v, causal=causal, scale=scale)
        except RuntimeError as error:
            if not is_refusal(error):
                raise
            # The backend declines these inputs (a layout or size it does not take): run the
            # kernel config stored beside it, for this call and the later ones of its signature.
            dispatch.backend_refused(q, k, v, causal)
    return _launch_planned(q, k, v, plan, causal, scale, softcap=softcap)[0]


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, softcap: float) -> Tensor:
    """Plan (memoised) and run; the body of the custom op that torch.compile sees."""
    plan = dispatch.plan(q, k, v, causal, softcap > 0)
    if record.ENABLED:
        record.hit(plan.choice.key)
    return _run_planned(q, k, v, plan, causal, scale, softcap)


@torch.library.custom_op("flashtune::attention_fwd", mutates_args=())
def attention_fwd_op(query: Tensor, key: Tensor, value: Tensor, is_causal: bool, scale: float,
                     softcap: float = 0.0) -> Tensor:
    """The forward kernel as a torch.library op (what torch.compile sees)."""
    return _forward(query, key, value, is_causal, scale, softcap)


@attention_fwd_op.register_fake
def _attention_fwd_fake(query: Tensor, key: Tensor, value: Tensor, is_causal: bool, scale: float,
                        softcap: float = 0.0) -> Tensor:
    check_inputs(query, key, value)
    return torch.empty_like(query)  # exactly what launch() allocates for the output


# --- training: the forward that keeps its LSE, and the backward ------------------------------

@torch.library.custom_op("flashtune::attention_fwd_lse", mutates_args=())
def attention_fwd_lse_op(query: Tensor, key: Tensor, value: Tensor, is_causal: bool,
                         scale: float, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """The forward kernel returning (O, the fp32 natural-log row LSE (B, Hq, Nq)) for the backward."""
    o, lse = _launch_planned(query, key, value, dispatch.train_plan(query, key, value, is_causal, softcap > 0),
                             is_causal, scale, return_lse=True, softcap=softcap)
    return o, lse


@attention_fwd_lse_op.register_fake
def _attention_fwd_lse_fake(query: Tensor, key: Tensor, value: Tensor, is_causal: bool,
                            scale: float, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    shape = check_inputs(query, key, value)
    lse = query.new_empty((shape.batch, shape.heads_q, shape.seq_q), dtype=torch.float32)
    return torch.empty_like(query), lse


@torch.library.custom_op("flashtune::attention_bwd", mutates_args=())
def attention_bwd_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                     is_causal: bool, scale: float, deterministic: bool,
                     softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV of the forward above (kernel/jit/bwd.py); dK/dV summed over each GQA group."""
    capped = softcap > 0
    plan = dispatch.train_plan(query, key, value, is_causal, capped)
    # The backward config of the pair the training key decided, else the op="bwd" table's (memoised).
    choice = plan.choice if plan.bwd is not None else dispatch.bwd_choice(query, plan.shape, is_causal, capped)

    def run(config: Any) -> tuple[Tensor, Tensor, Tensor]:
        return launch_bwd(grad_out, query, key, value, out, lse, plan.shape, causal=is_causal, scale=scale,
                          config=config, deterministic=deterministic,
                          mods=ScoreMods(softcap=softcap) if softcap else NO_MODS)[:3]

    try:
        return run(plan.bwd if plan.bwd is not None else choice.config)
    except Exception as error:
        if not dispatch.stored_config_failed(choice, error):
            raise
        # A stored backward (or pair) that does not compile here: the default, with one warning.
        if plan.bwd is not None:
            replanned = dispatch.config_failed(query, key, value, is_causal, choice, error, capped)
            if replanned.bwd is not None:
                return run(replanned.bwd)
            return run(dispatch.bwd_choice(query, plan.shape, is_causal, capped).config)
        return run(dispatch.bwd_config_failed(query, plan.shape, is_causal, choice, error, capped).config)


@attention_bwd_op.register_fake
def _attention_bwd_fake(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                        is_causal: bool, scale: float, deterministic: bool,
                        softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)  # what launch_bwd allocates


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    query, key, value, is_causal, scale, softcap = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.is_causal, ctx.scale, ctx.softcap = is_causal, scale, softcap


def _backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Any, ...]:
    # The LSE is an internal output: nothing downstream differentiates through it.
    query, key, value, out, lse = ctx.saved_tensors
    # Atomics for dQ only where the tuned config allows them and the user has not asked for
    # deterministic algorithms (torch.use_deterministic_algorithms).
    dq, dk, dv = attention_bwd_op(grad_out, query, key, value, out, lse, ctx.is_causal, ctx.scale,
                                  torch.are_deterministic_algorithms_enabled(), ctx.softcap)
    return dq, dk, dv, None, None, None


attention_fwd_lse_op.register_autograd(_backward, setup_context=_setup_context)


def _trainable(query: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float | None,
               enable_gqa: bool, softcap: float) -> Tensor:
    if torch.compiler.is_compiling():
        shape, sdpa = check_inputs(query, key, value), None
    else:
        plan = dispatch.train_plan(query, key, value, causal, softcap > 0)
        if record.ENABLED:
            record.hit(plan.choice.key)  # the training key: `tune --recorded` tunes it as a pair
        shape, sdpa = plan.shape, plan.sdpa
    if shape.heads_q != shape.heads_kv and not enable_gqa:
        raise _gqa_error(shape.heads_q, shape.heads_kv)
    scale = check_scale(scale, shape.head_dim)
    if sdpa is not None:
        try:
            return run_sdpa(sdpa, query, key, value, causal=causal, scale=scale)  # torch's own backward
        except RuntimeError as error:
            if not is_refusal(error):
                raise
            dispatch.backend_refused(query, key, value, causal)
    return attention_fwd_lse_op(query, key, value, causal, scale, softcap)[0]


def _unsupported(attn_mask: Any, dropout_p: float) -> str | None:
    if attn_mask is not None:
        return "attn_mask (an explicit mask tensor; use is_causal=True for a causal mask)"
    if dropout_p:
        return f"dropout_p={dropout_p!r} (the kernel has no dropout)"
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
              enable_gqa: bool = False, *, softcap: float = 0.0, fallback: bool = False) -> Tensor:
    """softmax(scale·QKᵀ [+ causal mask])·V with the best stored config for this GPU and shape.

    The signature is torch.nn.functional.scaled_dot_product_attention's, so one swaps for the other.
    query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D); fp16, bf16 or fp32 (IEEE fp32 dots); any strides.
    `is_causal`, `enable_gqa` and `fallback` are bools (numpy bools too; anything else is a TypeError,
    as with SDPA); is_causal is top-left aligned like SDPA (query i sees keys j <= i). Hq != Hkv needs
    enable_gqa=True. Returns a new tensor laid out like `query`.

    `softcap` c > 0 caps the scaled scores s to c·tanh(s/c) before the softmax (Gemma 2, Grok; flash_attn's
    convention; 0, the default, is off), training included; a softcap call is its own key (never an SDPA
    backend, which has no softcap).

    Inputs that require grad (with grad mode on) get a backward: the fused FA2 backward kernel, through
    autograd (`register_autograd`), also under torch.compile.

    What the kernel does not run -- attn_mask, dropout_p > 0, CPU tensors
    outside the Triton interpreter, bf16 under it, dtypes/head dims/layouts check_inputs rejects -- raises
    (NotImplementedError for the arguments, TypeError/ValueError for the tensors) naming the
    problem. `fallback=True` sends such calls to torch SDPA instead (not with softcap, which SDPA cannot
    compute). The default is False because a silent fallback hides that a call is not running the tuned
    kernel (a performance cliff a user swapping SDPA for this function would want to hear about), and it
    cannot be undone afterwards.
    """
    causal = is_causal if type(is_causal) is bool else check_bool(is_causal, "is_causal")
    if type(enable_gqa) is not bool:
        enable_gqa = check_bool(enable_gqa, "enable_gqa")
    if type(fallback) is not bool:
        fallback = check_bool(fallback, "fallback")
    if softcap:
        softcap = check_softcap(softcap)
        fallback = False  # SDPA cannot compute a capped call: its problems are raised
    # The common case decides in two cheap tests; _unsupported() repeats them to name the problem.
    if attn_mask is not None or dropout_p:
        if fallback:
            return _sdpa(query, key, value, attn_mask, dropout_p, causal, scale, enable_gqa)
        raise NotImplementedError(f"flashtune attention does not support "
                                  f"{_unsupported(attn_mask, dropout_p)}; pass "
                                  "fallback=True to run torch's scaled_dot_product_attention for such calls")
    if needs_grad(query, key, value):
        try:
            return _trainable(query, key, value, causal, scale, enable_gqa, softcap)
        except (TypeError, ValueError):
            if fallback:
                return _sdpa(query, key, value, None, 0.0, causal, scale, enable_gqa)
            raise
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
        return attention_fwd_op(query, key, value, causal, check_scale(scale, shape.head_dim), softcap)
    try:
        plan = dispatch.plan(query, key, value, causal, softcap > 0)
    except (TypeError, ValueError):
        if fallback:
            return _sdpa(query, key, value, None, 0.0, causal, scale, enable_gqa)
        raise
    if plan.grouped and not enable_gqa:
        raise _gqa_error(plan.shape.heads_q, plan.shape.heads_kv)
    if record.ENABLED:
        record.hit(plan.choice.key)
    return _run_planned(query, key, value, plan, causal,
                        plan.default_scale if scale is None else check_scale(scale, plan.shape.head_dim), softcap)
