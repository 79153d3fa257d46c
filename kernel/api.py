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

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, record
from .checks import check_bool, check_inputs, check_scale, check_softcap, needs_grad
from .dtypes import FP8_DTYPES
from .mods import NO_MODS, ScoreMods, capped, check_mods, sinks_grad
from .ops.bwd import launch_bwd
from .ops.fwd import launch, launch_cached
from .sdpa import is_refusal, run_sdpa

__all__ = ["attention", "attention_bwd_op", "attention_fwd_lse_op", "attention_fwd_op"]

_CAPPED: tuple[tuple[str, bool], ...] = (("softcap", True),)  # the key features of a softcap-only call


def _features(mods: ScoreMods, seq_k: int) -> tuple[tuple[str, object], ...]:
    # The common cases without building a dict: no modifier, or a cap alone.
    if mods is NO_MODS:
        return ()
    if mods.plain:
        return _CAPPED
    return mods.key_features(seq_k)


def _launch_planned(q: Tensor, k: Tensor, v: Tensor, plan: dispatch.Plan, causal: bool, scale: float, *,
                    return_lse: bool = False, mods: ScoreMods = NO_MODS) -> tuple[Tensor, Tensor | None]:
    try:
        # The plan keeps the compiled kernel: after its first launch it is relaunched directly.
        return launch_cached(q, k, v, plan.shape, causal=causal, scale=scale, config=plan.kernel,
                             return_lse=return_lse, cache=plan.launchers, mods=mods)
    except Exception as error:
        if not dispatch.stored_config_failed(plan.choice, error):
            raise
        plan = dispatch.config_failed(q, k, v, causal, plan.choice, error, plan.features)
        return launch(q, k, v, plan.shape, causal=causal, scale=scale, config=plan.kernel,
                      return_lse=return_lse, mods=mods)[:2]


def _run_sdpa(backend: str, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None,
              mods: ScoreMods) -> Tensor:
    """An SDPA backend's output for a call it computes the same (kernel.mods.sdpa_computes): the window, ALiBi
    and the mask as one attn_mask (with the causal mask folded in), else the plain call."""
    if mods is NO_MODS:
        return run_sdpa(backend, q, k, v, causal=causal, scale=scale)
    from .mods import sdpa_mask

    mask = sdpa_mask(mods, check_inputs(q, k, v), causal, q.device, q.dtype)
    return run_sdpa(backend, q, k, v, causal=causal and mask is None, scale=scale, attn_mask=mask)


def _run_planned(q: Tensor, k: Tensor, v: Tensor, plan: dispatch.Plan, causal: bool, scale: float,
                 mods: ScoreMods = NO_MODS) -> Tensor:
    """The call's output from whatever won its key: an SDPA backend, or the kernel."""
    if plan.sdpa is not None:
        try:
            return _run_sdpa(plan.sdpa, q, k, v, causal, scale, mods)
        except RuntimeError as error:
            if not is_refusal(error):
                raise
            # The backend declines these inputs (a layout or size it does not take): run the
            # kernel config stored beside it, for this call and the later ones of its signature.
            dispatch.backend_refused(q, k, v, causal, plan.features)
    return _launch_planned(q, k, v, plan, causal, scale, mods=mods)[0]


def _op_mods(query: Tensor, key: Tensor, softcap: float, window_left: int, window_right: int, sinks: Tensor | None,
             alibi: Tensor | None, attn_mask: Tensor | None, dropout_p: float, seed: Tensor | None) -> ScoreMods:
    """A custom op's modifiers, rebuilt from its arguments (checked by attention() before the op was called)."""
    if (window_left == -1 and window_right == -1 and sinks is None and alibi is None and attn_mask is None
            and not dropout_p):
        return capped(softcap)
    shape = check_inputs(query, key, key)
    return check_mods(shape, query.device, softcap=softcap, window_size=(window_left, window_right), sinks=sinks,
                      alibi_slopes=alibi, attn_mask=attn_mask, dropout_p=dropout_p,
                      seed=None if seed is None else int(seed))


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, mods: ScoreMods) -> Tensor:
    """Plan (memoised) and run; the body of the custom op that torch.compile sees."""
    plan = dispatch.plan(q, k, v, causal, _features(mods, k.shape[2]))
    if record.ENABLED:
        record.hit(plan.choice.key)
    return _run_planned(q, k, v, plan, causal, scale, mods)


@torch.library.custom_op("flashtune::attention_fwd", mutates_args=())
def attention_fwd_op(query: Tensor, key: Tensor, value: Tensor, is_causal: bool, scale: float,
                     softcap: float = 0.0, window_left: int = -1, window_right: int = -1, sinks: Tensor | None = None,
                     alibi: Tensor | None = None, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                     seed: Tensor | None = None) -> Tensor:
    """The forward kernel as a torch.library op (what torch.compile sees); the modifiers as kernel.mods takes
    them (`seed`: dropout's Philox seed, a CPU int64 scalar, drawn outside so that a compiled graph draws anew)."""
    return _forward(query, key, value, is_causal, scale,
                    _op_mods(query, key, softcap, window_left, window_right, sinks, alibi, attn_mask, dropout_p,
                             seed))


@attention_fwd_op.register_fake
def _attention_fwd_fake(query: Tensor, key: Tensor, value: Tensor, is_causal: bool, scale: float,
                        softcap: float = 0.0, window_left: int = -1, window_right: int = -1,
                        sinks: Tensor | None = None, alibi: Tensor | None = None, attn_mask: Tensor | None = None,
                        dropout_p: float = 0.0, seed: Tensor | None = None) -> Tensor:
    check_inputs(query, key, value)
    return torch.empty_like(query)  # exactly what launch() allocates for the output


# --- training: the forward that keeps its LSE, and the backward ------------------------------

@torch.library.custom_op("flashtune::attention_fwd_lse", mutates_args=())
def attention_fwd_lse_op(query: Tensor, key: Tensor, value: Tensor, is_causal: bool, scale: float,
                         softcap: float = 0.0, window_left: int = -1, window_right: int = -1,
                         sinks: Tensor | None = None, alibi: Tensor | None = None, attn_mask: Tensor | None = None,
                         dropout_p: float = 0.0, seed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The forward kernel returning (O, the fp32 natural-log row LSE (B, Hq, Nq), sinks included) for the
    backward."""
    mods = _op_mods(query, key, softcap, window_left, window_right, sinks, alibi, attn_mask, dropout_p, seed)
    plan = dispatch.train_plan(query, key, value, is_causal, _features(mods, key.shape[2]))
    o, lse = _launch_planned(query, key, value, plan, is_causal, scale, return_lse=True, mods=mods)
    return o, lse


@attention_fwd_lse_op.register_fake
def _attention_fwd_lse_fake(query: Tensor, key: Tensor, value: Tensor, is_causal: bool, scale: float,
                            softcap: float = 0.0, window_left: int = -1, window_right: int = -1,
                            sinks: Tensor | None = None, alibi: Tensor | None = None,
                            attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                            seed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    shape = check_inputs(query, key, value)
    lse = query.new_empty((shape.batch, shape.heads_q, shape.seq_q), dtype=torch.float32)
    return torch.empty_like(query), lse


@torch.library.custom_op("flashtune::attention_bwd", mutates_args=())
def attention_bwd_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                     is_causal: bool, scale: float, deterministic: bool, softcap: float = 0.0,
                     window_left: int = -1, window_right: int = -1, sinks: Tensor | None = None,
                     alibi: Tensor | None = None, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                     seed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV of the forward above (kernel/jit/bwd.py); dK/dV summed over each GQA group. The sinks'
    gradient is the caller's (kernel.mods.sinks_grad, from the LSE)."""
    mods = _op_mods(query, key, softcap, window_left, window_right, sinks, alibi, attn_mask, dropout_p, seed)
    features = _features(mods, key.shape[2])
    plan = dispatch.train_plan(query, key, value, is_causal, features)
    # The backward config of the pair the training key decided, else the op="bwd" table's (memoised).
    choice = plan.choice if plan.bwd is not None else dispatch.bwd_choice(query, plan.shape, is_causal, features)

    def run(config: Any) -> tuple[Tensor, Tensor, Tensor]:
        return launch_bwd(grad_out, query, key, value, out, lse, plan.shape, causal=is_causal, scale=scale,
                          config=config, deterministic=deterministic, mods=mods)[:3]

    try:
        return run(plan.bwd if plan.bwd is not None else choice.config)
    except Exception as error:
        if not dispatch.stored_config_failed(choice, error):
            raise
        # A stored backward (or pair) that does not compile here: the default, with one warning.
        if plan.bwd is not None:
            replanned = dispatch.config_failed(query, key, value, is_causal, choice, error, features)
            if replanned.bwd is not None:
                return run(replanned.bwd)
            return run(dispatch.bwd_choice(query, plan.shape, is_causal, features).config)
        return run(dispatch.bwd_config_failed(query, plan.shape, is_causal, choice, error, features).config)


@attention_bwd_op.register_fake
def _attention_bwd_fake(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                        is_causal: bool, scale: float, deterministic: bool, softcap: float = 0.0,
                        window_left: int = -1, window_right: int = -1, sinks: Tensor | None = None,
                        alibi: Tensor | None = None, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                        seed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)  # what launch_bwd allocates


# The custom ops' modifier arguments after `scale`, with their defaults: softcap, window_left, window_right,
# sinks, alibi, attn_mask, dropout_p, seed.
_MOD_DEFAULTS: tuple[Any, ...] = (0.0, -1, -1, None, None, None, 0.0, None)
_SINKS_AT = 3  # the sinks' place among them


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    query, key, value, is_causal, scale, *mods = inputs
    mods += _MOD_DEFAULTS[len(mods):]
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, mods[_SINKS_AT])
    mods[_SINKS_AT] = None
    ctx.is_causal, ctx.scale, ctx.mods = is_causal, scale, mods


def _backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Any, ...]:
    # The LSE is an internal output: nothing downstream differentiates through it.
    query, key, value, out, lse, sinks = ctx.saved_tensors
    mods = list(ctx.mods)
    mods[_SINKS_AT] = sinks
    # Atomics for dQ only where the tuned config allows them and the user has not asked for
    # deterministic algorithms (torch.use_deterministic_algorithms).
    dq, dk, dv = attention_bwd_op(grad_out, query, key, value, out, lse, ctx.is_causal, ctx.scale,
                                  torch.are_deterministic_algorithms_enabled(), *mods)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[5 + _SINKS_AT]:
        # delta = rowsum(dO ∘ O), as the backward kernels form it; the sink's share of each row is exp(s − lse).
        delta = (grad_out.float() * out.float()).sum(-1)
        dsinks = sinks_grad(sinks, lse, delta).to(sinks.dtype)
    grads: list[Any] = [dq, dk, dv, None, None, *[None] * len(_MOD_DEFAULTS)]
    grads[5 + _SINKS_AT] = dsinks
    return tuple(grads)


attention_fwd_lse_op.register_autograd(_backward, setup_context=_setup_context)


def _trainable(query: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float | None,
               enable_gqa: bool, mods: ScoreMods, op_args: tuple[Any, ...]) -> Tensor:
    if torch.compiler.is_compiling():
        shape, sdpa = check_inputs(query, key, value), None
    else:
        plan = dispatch.train_plan(query, key, value, causal, _features(mods, key.shape[2]))
        if record.ENABLED:
            record.hit(plan.choice.key)  # the training key: `tune --recorded` tunes it as a pair
        shape, sdpa = plan.shape, plan.sdpa
    if shape.heads_q != shape.heads_kv and not enable_gqa:
        raise _gqa_error(shape.heads_q, shape.heads_kv)
    scale = check_scale(scale, shape.head_dim)
    if sdpa is not None:
        try:
            return _run_sdpa(sdpa, query, key, value, causal, scale, mods)  # torch's own backward
        except RuntimeError as error:
            if not is_refusal(error):
                raise
            dispatch.backend_refused(query, key, value, causal, plan.features)
    return attention_fwd_lse_op(query, key, value, causal, scale, *op_args)[0]


def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float,
          is_causal: bool, scale: float | None, enable_gqa: bool) -> Tensor:
    extra = {"enable_gqa": True} if enable_gqa else {}  # the keyword is new in torch 2.5
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, **extra)


def _gqa_error(heads_q: int, heads_kv: int) -> ValueError:
    return ValueError(f"query has {heads_q} heads but key/value have {heads_kv}: pass enable_gqa=True for "
                      "grouped-query attention (as with torch SDPA)")


def _modified(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float, causal: bool,
              scale: float | None, enable_gqa: bool, window_size: Any, softcap: float, sinks: Tensor | None,
              alibi_slopes: Tensor | None, fallback: bool) -> Tensor:
    """attention() of a call with score modifiers beyond a softcap (kernel.mods)."""
    sdpa_native = window_size is None and sinks is None and alibi_slopes is None and not softcap
    try:
        shape = check_inputs(query, key, value)
        # Under torch.compile the seed is a tensor drawn in the graph (a Python int would be traced as a constant).
        mods = check_mods(shape, query.device, softcap=softcap, window_size=window_size, sinks=sinks,
                          alibi_slopes=alibi_slopes, attn_mask=attn_mask, dropout_p=dropout_p, seed=0)
    except (TypeError, ValueError):
        if fallback and sdpa_native:
            return _sdpa(query, key, value, attn_mask, dropout_p, causal, scale, enable_gqa)
        raise
    if shape.heads_q != shape.heads_kv and not enable_gqa:
        raise _gqa_error(shape.heads_q, shape.heads_kv)
    grad = torch.is_grad_enabled() and (needs_grad(query, key, value) or (sinks is not None and sinks.requires_grad))
    if grad:
        for name, t in (("attn_mask", attn_mask), ("alibi_slopes", alibi_slopes)):
            if t is not None and t.requires_grad:
                raise NotImplementedError(f"flashtune attention has no gradient for {name}: pass it without "
                                          "requires_grad (the kernels take it as a constant)")
    seed = None
    if mods.dropout_p:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)  # torch's default generator: manual_seed replays it
        if not torch.compiler.is_compiling():
            mods = dataclasses.replace(mods, seed=int(seed))
    op_args = (mods.softcap, mods.window[0], mods.window[1], sinks, alibi_slopes, attn_mask, mods.dropout_p, seed)
    if grad:
        return _trainable(query, key, value, causal, scale, enable_gqa, mods, op_args)
    if torch.compiler.is_compiling():
        return attention_fwd_op(query, key, value, causal, check_scale(scale, shape.head_dim), *op_args)
    plan = dispatch.plan(query, key, value, causal, mods.key_features(shape.seq_k))
    if record.ENABLED:
        record.hit(plan.choice.key)
    return _run_planned(query, key, value, plan, causal, check_scale(scale, shape.head_dim), mods)


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False, *, window_size: tuple[int, int] | None = None, softcap: float = 0.0,
              sinks: Tensor | None = None, alibi_slopes: Tensor | None = None, fallback: bool = False,
              q_descale: Tensor | None = None, k_descale: Tensor | None = None, v_descale: Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> Tensor:
    """softmax(scale·QKᵀ [+ modifiers])·V with the best stored config for this GPU, shape and modifiers.

    The signature is torch.nn.functional.scaled_dot_product_attention's, so one swaps for the other.
    query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D); fp16, bf16 or fp32 (IEEE fp32 dots); any strides.
    `is_causal`, `enable_gqa` and `fallback` are bools (numpy bools too; anything else is a TypeError,
    as with SDPA); is_causal is top-left aligned like SDPA (query i sees keys j <= i). Hq != Hkv needs
    enable_gqa=True. Returns a new tensor laid out like `query`.

    Score modifiers, in the kernels (kernel.mods gives the exact conventions):
    - `attn_mask` as SDPA takes it: bool (True takes part) or float (added to the scaled scores), any shape
      that broadcasts to (B, Hq, Nq, Nk), any strides; a row that sees no key gives zeros, as SDPA does.
      A float mask gets no gradient.
    - `dropout_p` in [0, 1): dropout on the probabilities whenever it is > 0 (as SDPA; modules pass 0 in
      eval mode), Philox seeded from torch's default generator, so torch.manual_seed reproduces a run;
      the backward regenerates the same mask.
    - `window_size=(left, right)`: query i sees keys i − left .. i + right (-1: unbounded; flash_attn's
      convention, aligned like is_causal); tiles outside the window are never read, so the cost grows as N·W.
    - `softcap` c > 0 caps the scaled scores s to c·tanh(s/c) (Gemma 2, Grok; 0, the default, is off).
    - `sinks` (Hq,): one logit per head that joins every row's softmax denominator (GPT-OSS), with its
      gradient when it requires grad.
    - `alibi_slopes` (Hq,) or (B, Hq): the score of key j for query i gains −slope·|j − i| (ALiBi; BLOOM,
      MPT); constants, no gradient.
    A call with modifiers resolves its own key (its features); an SDPA backend can win it only where SDPA
    computes the same (a window as a boolean mask, ALiBi as a float bias, the mask itself).

    Inputs that require grad (with grad mode on) get a backward: the fused FA2 backward kernel, through
    autograd (`register_autograd`), also under torch.compile.

    What the kernel does not run -- CPU tensors outside the Triton interpreter, bf16 under it, dtypes/head
    dims/layouts check_inputs rejects, bad modifiers -- raises TypeError/ValueError naming the problem.
    `fallback=True` sends such calls to torch SDPA instead, for calls SDPA takes as they are (no window,
    softcap, sinks or ALiBi). The default is False because a silent fallback hides that a call is not
    running the tuned kernel (a performance cliff a user swapping SDPA for this function would want to hear
    about), and it cannot be undone afterwards.

    FP8 inference (kernel.fp8, FlashAttention 3's convention): q, k, v in torch.float8_e4m3fn with the
    dequantisation factors `q_descale`, `k_descale`, `v_descale` (None: 1.0; a one-element fp32 tensor, or fp32
    (B, Hkv) per batch and key/value head), the output in `out_dtype` (bfloat16 by default, or float16). Causal
    and GQA work; score modifiers, gradients and `fallback` do not (errors name them). The four arguments are
    refused (ValueError) for inputs of any other dtype.
    """
    if (q_descale is not None or k_descale is not None or v_descale is not None or out_dtype is not None
            or getattr(query, "dtype", None) in FP8_DTYPES):
        from .fp8 import fp8_attention, refuse_modifiers

        causal = check_bool(is_causal, "is_causal")
        enable_gqa = check_bool(enable_gqa, "enable_gqa")
        refuse_modifiers(attn_mask, dropout_p, window_size, softcap, sinks, alibi_slopes)
        return fp8_attention(query, key, value, causal, scale, enable_gqa, q_descale, k_descale, v_descale,
                             out_dtype)
    causal = is_causal if type(is_causal) is bool else check_bool(is_causal, "is_causal")
    if type(enable_gqa) is not bool:
        enable_gqa = check_bool(enable_gqa, "enable_gqa")
    if type(fallback) is not bool:
        fallback = check_bool(fallback, "fallback")
    if softcap:
        softcap = check_softcap(softcap)
        fallback = False  # SDPA cannot compute a capped call: its problems are raised
    # The common case decides in a few cheap tests.
    if (attn_mask is not None or dropout_p or window_size is not None or sinks is not None
            or alibi_slopes is not None):
        return _modified(query, key, value, attn_mask, dropout_p, causal, scale, enable_gqa, window_size, softcap,
                         sinks, alibi_slopes, fallback)
    mods = capped(softcap)
    if needs_grad(query, key, value):
        try:
            return _trainable(query, key, value, causal, scale, enable_gqa, mods, (softcap,))
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
        plan = dispatch.plan(query, key, value, causal, _CAPPED if softcap else ())
    except (TypeError, ValueError):
        if fallback:
            return _sdpa(query, key, value, None, 0.0, causal, scale, enable_gqa)
        raise
    if plan.grouped and not enable_gqa:
        raise _gqa_error(plan.shape.heads_q, plan.shape.heads_kv)
    if record.ENABLED:
        record.hit(plan.choice.key)
    return _run_planned(query, key, value, plan, causal,
                        plan.default_scale if scale is None else check_scale(scale, plan.shape.head_dim), mods)
