"""flashtune attention inside Hugging Face transformers models (transformers 5.x).

    from flashtune.kernel.integrations.transformers import register
    model.set_attn_implementation(register())          # or from_pretrained(..., attn_implementation=register())

`register()` adds two functions under one name (default "tuned_attention"; transformers reads any name
containing "flash" as a request for its flash-attn kernels, so such names are refused here):

- the mask function (`AttentionMaskInterface`): builds SDPA's boolean mask, but first reads the 2D padding
  mask once per forward and, where the mask has a form the kernels take, says so. Without this
  registration transformers would pass no mask at all, padding included.
- the attention function (`AttentionInterface`): transformers calls it per layer with q (B, Hq, Nq, D),
  k/v (B, Hkv, Nk, D) and returns (B, Nq, Hq, D). It routes:

  | mask | queries vs keys | runs |
  |---|---|---|
  | none (plain causal), Nq == Nk | prefill, training | `attention(is_causal=True, enable_gqa=True)` |
  | none, Nq < Nk | decode step, chunked prefill against a cache | `attention_kvcache(causal=True)` (bottom-right) |
  | right padding / a static cache's unfilled slots | | the same, on the first `end` keys (a view), or `cache_seqlens` for one query |
  | left padding, sliding windows, custom masks, dropout, sinks | | transformers' own SDPA function, counted and warned once |

  Logit softcapping (Gemma 2 passes `softcap`) runs in the kernels on every path above.

  No mask means: causal over every key, the queries being the last Nq positions (the flash-attn
  convention); this module's mask function returns None only where that is right for every real token.

Right-padded prefill runs the causal kernel on the whole padded block: every real token sees exactly
the keys SDPA's mask lets it see (the padding comes after it), while the padding rows' own outputs
differ from SDPA's (they see padding keys). Those rows feed nothing real: later real tokens never
attend to them and losses ignore them (flash-attn's varlen path returns zeros there).

`fallback_counts()` tells how many calls went to transformers' SDPA function and why; `kernel_counts()` which
flashtune kernel path ran; `backend_counts()` the calls whose tuned winner is a torch SDPA backend, which
`attention()` runs for them (per path and backend, e.g. "causal/sdpa_cudnn"): what ran, not what was asked.
Under torch.compile the mask function builds SDPA's mask without inspecting it (reading the padding
would break the graph), so compiled models run transformers' SDPA function in every layer.
"""
from __future__ import annotations

import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import causal_mask_function, sdpa_mask
except ImportError as _error:  # pragma: no cover - exercised only where transformers is missing
    raise ImportError("flashtune.kernel.integrations.transformers needs Hugging Face transformers 5.x: "
                      "pip install transformers (from a flashtune checkout: pip install '.[transformers]')") from _error

from .. import dispatch
from ..api import attention
from ..kvcache import run_planned
from ..mods import capped
from ..checks import check_bool, needs_grad

__all__ = ["NAME", "SDPAFallbackWarning", "backend_counts", "fallback_counts", "kernel_counts", "register",
           "reset_counts",
           "tuned_attention_forward", "tuned_mask"]

NAME = "tuned_attention"
_FORM_ATTR = "_flashtune_form"  # set on the mask tensors this module's mask function builds


class SDPAFallbackWarning(UserWarning):
    """A transformers attention call ran torch SDPA instead of flashtune (warned once per reason)."""


# --- what the mask function found -----------------------------------------------------------

@dataclass(frozen=True)
class MaskForm:
    """A causal mask the kernels run without the mask tensor.

    keys: attend over the first `keys` keys only (a view of the cache); the queries are the last
    positions before `keys`, so "causal" means bottom-right aligned. lengths: int32 (B,) valid lengths
    for a single query per sequence (each sequence sees its first lengths[b] keys), or None.
    """

    keys: int
    lengths: Tensor | None = None


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def causal_form(attention_mask: Tensor | None, q_length: int, kv_length: int, q_offset: int,
                kv_offset: int) -> MaskForm | None:
    """The MaskForm of transformers' causal mask with this 2D padding mask, or None if the kernels have none.

    Queries sit at positions q_offset .. q_offset+Nq-1 and key j at kv_offset + j; a key is valid where
    the 2D mask is True (missing columns: a static cache's unfilled slots, invalid). Keys at or past
    end = q_offset + Nq are invisible to every query (causality), so only [0, end) is read. Reads the
    mask on the host: one small device-to-host copy per forward, as SDPA's own mask skip does.
    """
    end = q_offset + q_length
    if kv_offset != 0 or end > kv_length or q_length > kv_length:
        return None  # a sliding cache (keys not starting at position 0), or queries without keys
    if attention_mask is None:
        return MaskForm(end)
    valid = attention_mask[:, :end].to("cpu", torch.bool)
    if valid.shape[-1] == end and bool(valid.all()):
        return MaskForm(end)  # no padding (every decode step of an unpadded batch): one check
    if valid.shape[-1] < end:  # columns past the 2D mask are unfilled cache slots
        valid = F.pad(valid, (0, end - valid.shape[-1]), value=False)
    lengths = valid.sum(-1)
    if not bool((valid == (torch.arange(end) < lengths[:, None])).all()):
        return None  # not right padding: left padding or holes
    if bool((lengths == end).all()):
        return MaskForm(end)
    if not bool((lengths > 0).all()):
        return None  # an empty sequence: SDPA's all-masked rows, nothing to match
    if q_offset == 0:
        # Right-padded prefill: top-left causal over the block is exact for every real token.
        return MaskForm(q_length)
    if q_length == 1:
        # One query per sequence: it sees the first lengths[b] keys, whether it is real or padding.
        return MaskForm(end, lengths.to(device=attention_mask.device, dtype=torch.int32))
    return None


def tuned_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int | Tensor = 0, kv_offset: int = 0,
               mask_function: Callable[..., Any] = causal_mask_function, attention_mask: Tensor | None = None,
               allow_is_causal_skip: bool = True, **kwargs: Any) -> Tensor | None:
    """transformers' mask function for flashtune: SDPA's boolean mask, tagged with its MaskForm.

    Returns None where causal attention over every key gives every real token its keys: no padding, or
    right padding in a prefill (the attention function then runs the causal kernel); otherwise
    SDPA's (B, 1, Nq, Nk) boolean mask, carrying the MaskForm the attention function runs instead,
    when there is one. Any other mask function (sliding windows, bidirectional, overlays) gets SDPA's
    mask unchanged.
    """
    form = None
    if mask_function is causal_mask_function and kwargs.get("local_size") is None and not _tracing():
        offset = int(q_offset) if isinstance(q_offset, Tensor) else q_offset  # a static cache's tensor offset
        form = causal_form(attention_mask, q_length, kv_length, offset, kv_offset)
        if form is not None and form.keys == kv_length and form.lengths is None and allow_is_causal_skip:
            return None
    # SDPA's `None` means top-left causal in one case (an empty static cache); this module's None does
    # not, so SDPA's mask is always materialised here.
    mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)
    if form is not None and isinstance(mask, Tensor):
        # generate() makes a static cache's mask contiguous; a copy would lose the tag, so tag a
        # contiguous mask (then .contiguous() returns it as it is).
        mask = mask.contiguous()
        setattr(mask, _FORM_ATTR, form)
    return mask


# --- counters -------------------------------------------------------------------------------

_lock = threading.Lock()
_fallbacks: Counter[str] = Counter()
_kernels: Counter[str] = Counter()
_backends: Counter[str] = Counter()
_warned: set[str] = set()


def fallback_counts() -> dict[str, int]:
    """Calls that ran transformers' SDPA function instead of flashtune, per reason."""
    return dict(_fallbacks)


def kernel_counts() -> dict[str, int]:
    """Calls that ran a flashtune kernel, per path ("causal", "kvcache", "kvcache_lengths", "full")."""
    return dict(_kernels)


def backend_counts() -> dict[str, int]:
    """Calls that `attention()` ran on a torch SDPA backend because that backend won their key, per path and
    backend ("causal/sdpa_cudnn", "full/sdpa_flash", "kvcache/sdpa_flash")."""
    return dict(_backends)


def reset_counts() -> None:
    """Zero the counters (warnings already given stay given)."""
    with _lock:
        _fallbacks.clear()
        _kernels.clear()
        _backends.clear()


def _attention(path: str, query: Tensor, key: Tensor, value: Tensor, causal: bool, scale: float | None,
               softcap: float) -> Tensor:
    """attention() on the call, counted under what ran: the kernel, or the SDPA backend that won its key.

    Read from the dispatcher's memoised plan after the call (the training plan for a call that requires
    grad): a backend that refused the call's inputs has handed that signature to the kernel config stored
    beside it (dispatch.backend_refused)."""
    out = attention(query, key, value, is_causal=causal, scale=scale, enable_gqa=True, softcap=softcap)
    planned = dispatch.train_plan if needs_grad(query, key, value) else dispatch.plan
    backend = planned(query, key, value, causal, capped(softcap).key_features(key.shape[2])).sdpa
    if backend is None:
        _kernels[path] += 1
    else:
        _backends[f"{path}/{backend}"] += 1
    return out


def _fall_back(reason: str, detail: str) -> None:
    if _tracing():
        return
    _fallbacks[reason] += 1
    with _lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(f"flashtune: transformers attention ran torch SDPA instead of the flashtune kernel: {detail} "
                  "(counted in flashtune.kernel.integrations.transformers.fallback_counts(); warned once)",
                  SDPAFallbackWarning, stacklevel=4)


# --- the KV-cache path ------------------------------------------------------------------------

def _kvcache(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None, scale: float | None, softcap: float) -> Tensor:
    """attention_kvcache(q, k, v, causal=True, cache_seqlens=lengths, check_lengths=False).

    Straight to its planned path (kernel.kvcache.run_planned): the dispatcher's plan, memoised with
    the cache length bucketed, so a growing cache keeps its plan from token to token, and the
    compiled passes relaunched directly. _route has made attention_kvcache's own argument checks
    (grad, causal). The lengths' values were checked by causal_form once per forward; reading them
    again would cost a device-to-host sync in every layer.
    """
    return run_planned(q, k, v, lengths, True, scale, False, mods=capped(softcap))


# --- the attention function -------------------------------------------------------------------

_UNSUPPORTED_KWARGS = {  # kwargs transformers may pass that change the result; the kernels have none of them
    "position_bias": "an additive position bias",
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "output_attentions": "output_attentions=True (the fused kernels never form the weights)",
}


def _route(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, dropout: float,
           scaling: float | None, is_causal: bool | None, kwargs: dict[str, Any]) -> Tensor | tuple[str, str]:
    """The kernel's (B, Hq, Nq, D) output, or (reason, detail) for a call that must run SDPA."""
    if dropout:
        return "dropout", f"dropout={dropout} (the kernels have no dropout; call model.eval() for inference)"
    if not _UNSUPPORTED_KWARGS.keys().isdisjoint(kwargs):  # the common case, none passed, in one set operation
        for name, what in _UNSUPPORTED_KWARGS.items():
            # output_attentions=False is passed by some models and changes nothing
            if kwargs.get(name) is not None and (name != "output_attentions" or kwargs[name]):
                return name, what
    # Logit softcapping (Gemma 2): the kernels cap the scores themselves; transformers passes None or the cap.
    softcap = kwargs.get("softcap") or 0.0
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if type(causal) is not bool:
        causal = check_bool(causal, "is_causal")  # TypeError: the call goes to SDPA, named as refused
    form: MaskForm | None = None
    if attention_mask is not None:
        form = getattr(attention_mask, _FORM_ATTR, None) if isinstance(attention_mask, Tensor) else None
        if form is None or not causal:
            return "mask", ("a mask without a length form (left padding, a sliding window, packed sequences or a "
                            "custom pattern; only right padding and cache slots run the kernel)")
    if not causal:
        return _attention("full", query, key, value, False, scaling, softcap)
    if form is not None:
        if form.keys != key.shape[2]:
            key, value = key[:, :, :form.keys], value[:, :, :form.keys]
        if form.lengths is not None:
            if needs_grad(query, key, value):
                return "kvcache_grad", "a KV-cache call that requires grad (the KV-cache kernel has no backward)"
            _kernels["kvcache_lengths"] += 1
            return _kvcache(query, key, value, form.lengths, scaling, softcap)
    nq, nk = query.shape[2], key.shape[2]
    if nq == nk:
        return _attention("causal", query, key, value, True, scaling, softcap)
    if nq > nk:
        return "queries", f"more queries ({nq}) than keys ({nk}) with a causal mask"
    if needs_grad(query, key, value):
        return "kvcache_grad", "a KV-cache call that requires grad (the KV-cache kernel has no backward)"
    out = _kvcache(query, key, value, None, scaling, softcap)
    backend = dispatch.kvcache_plan(query, key, value, True, False,
                                    capped(softcap).key_features(key.shape[2])).sdpa  # what ran, as _attention
    if backend is None:
        _kernels["kvcache"] += 1
    else:
        _backends[f"kvcache/{backend}"] += 1
    return out


def tuned_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature: q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> ((B, Nq, Hq, D), None).

    Runs a flashtune kernel where the call allows it (see the module docstring), else transformers'
    own SDPA function with the same arguments, counted per reason and warned once.
    """
    if _tracing():
        routed: Tensor | tuple[str, str] = ("compiling", "torch.compile tracing (the mask is not inspected)")
    else:
        try:
            routed = _route(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
        except (TypeError, ValueError) as error:
            # The kernels' input checks (dtype, head dim, device) name what they refuse.
            routed = (f"refused: {type(error).__name__}", str(error).split("\n")[0])
    if isinstance(routed, Tensor):
        return routed.transpose(1, 2).contiguous(), None  # the kernels lay the output out like the query
    _fall_back(*routed)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register(name: str = NAME) -> str:
    """Register flashtune's attention and mask functions with transformers under `name`; returns `name`.

    `model.set_attn_implementation(register())` then runs flashtune in every attention layer. Names
    containing "flash" are refused: transformers takes them as requests for its flash-attn kernels.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if "flash" in name.lower():
        raise ValueError(f"name {name!r} contains 'flash': transformers treats such names as its flash-attn "
                         f"implementations and raises; use another, e.g. {NAME!r}")
    AttentionInterface.register(name, tuned_attention_forward)
    AttentionMaskInterface.register(name, tuned_mask)
    return name
