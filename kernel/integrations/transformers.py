"""flashtune attention inside Hugging Face transformers models (transformers 5.x).

    from flashtune.kernel.integrations.transformers import register
    model.set_attn_implementation(register())          # or from_pretrained(..., attn_implementation=register())

`register()` adds two functions under one name (default "tuned_attention"; transformers reads any name
containing "flash" as a request for its flash-attn kernels, so such names are refused here):

- the mask function (`AttentionMaskInterface`): builds SDPA's boolean mask, but first recognises transformers'
  causal and sliding-window causal mask functions, reads the 2D padding mask once per forward and, where the
  mask has a form the kernels run without it, says so. Without this registration transformers would pass no
  mask at all, padding included.
- the attention function (`AttentionInterface`): transformers calls it per layer with q (B, Hq, Nq, D),
  k/v (B, Hkv, Nk, D) and returns (B, Nq, Hq, D). It routes:

  | mask | queries vs keys | runs |
  |---|---|---|
  | none (plain causal), Nq == Nk | prefill, training | `attention(is_causal=True, enable_gqa=True)` |
  | none, Nq < Nk | decode step, chunked prefill against a cache | `attention_kvcache(causal=True)` (bottom-right) |
  | right padding / a static cache's unfilled slots | | the same, on the first `end` keys (a view), or `cache_seqlens` for one query |
  | a sliding window (Mistral, Gemma 2, GPT-OSS, Qwen 2 layers) | | the same with `window_size=(W - 1, 0)` |
  | a packed batch: transformers' packed-sequence mask, or no mask and `cu_seq_lens_q/k` kwargs | | `attention_varlen(causal=True)` on the flattened tokens, window included |
  | any other mask: left padding, custom patterns, bidirectional, float masks | | `attention(attn_mask=mask)` in the kernel |

  On every path the kernels also run Gemma 2's logit softcapping (`softcap`), GPT-OSS's attention sinks
  (`s_aux`, with their gradient) and the attention dropout transformers passes in training (`dropout_p`).
  A call that needs a backward or dropout against a cache (Nq < Nk) runs `attention()` with the mask
  (built bottom-right where transformers gave none): the KV-cache kernel has neither.

  No mask means: causal over every key, the queries being the last Nq positions (the flash-attn
  convention); this module's mask function returns None only where that is right for every real token.

Sliding windows: transformers' mask hides key j from query i unless i - j < W (`sliding_window_overlay`:
kv_idx > q_idx - sliding_window), i.e. flash-attn's window_size=(W - 1, 0). The window is read from the mask
function, not from the `sliding_window` keyword the layers pass, so the kernel computes exactly the mask SDPA
would be given; where the window hides no key of the call (the last query is fewer than W keys past the first)
the call runs as plain causal. A sliding-window cache layer keeps only its last W - 1 keys (kv_offset > 0): the
queries are still the last positions of the keys, so the bottom-right window is the same.

Right-padded prefill runs the causal kernel on the whole padded block: every real token sees exactly
the keys SDPA's mask lets it see (the padding comes after it), while the padding rows' own outputs
differ from SDPA's (they see padding keys). Those rows feed nothing real: later real tokens never
attend to them and losses ignore them (flash-attn's varlen path returns zeros there). A masked call's
rows that see no key at all (left padding's) give zeros, as SDPA's do.

Packed batches (DataCollatorWithFlattening: batch size 1, position_ids restarting per document, labels -100 at
each document's first token): transformers detects the documents from position_ids only without a 2D mask and
without a cache (`use_cache=False`; training usually has none) and composes its causal or sliding mask function
with `packed_sequence_mask_function(document ids)`. The mask function recognises that composition (see
packed_documents) and tags SDPA's block-diagonal mask with the documents' cu_seqlens (one device-to-host copy
of the ids per forward); the attention function runs attention_varlen on the flattened tokens (any batch size:
each row starts a document), forward and backward, counted as "varlen". With a cache transformers' mask is plain
causal over the whole row, attending across documents as SDPA does; flash-attn's varlen kwargs
(`cu_seq_lens_q/k`, `max_length_q/k`, from `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`) then
still give the boundaries, and a call without a mask runs them, as transformers' flash-attn paths do. A mask
that is not the packed one wins over them, as in SDPA, which ignores them. Attention dropout (which
attention_varlen lacks) runs the block-diagonal causal mask in `attention()` instead.

ALiBi: no transformers 5 model hands ALiBi slopes to the attention function. BLOOM and MPT compute attention
inside their own modules (`alibi.baddbmm`, `position_bias`) and ignore `set_attn_implementation`. Falcon with
`alibi=True` routes through this function in transformers 5.25 (5.17 still computes it in its own module) with
the bias already added into a float mask (B, H, Nq, Nk), which runs as `attn_mask` in the kernel.

`fallback_counts()` tells how many calls went to transformers' SDPA function and why (what is left:
`output_attentions`, T5-style `position_bias`, more queries than keys, inputs the kernels refuse);
`kernel_counts()` which flashtune kernel path ran; `backend_counts()` the calls whose tuned winner is a torch
SDPA backend, which `attention()` runs for them (per path and backend, e.g. "causal/sdpa_cudnn"): what ran,
not what was asked. Under torch.compile the mask function builds SDPA's mask without inspecting it (reading
the padding would break the graph), so compiled models run transformers' SDPA function in every layer.
"""
from __future__ import annotations

import threading
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
        sdpa_mask,
        sliding_window_overlay,
    )
except ImportError as _error:  # pragma: no cover - exercised only where transformers is missing
    raise ImportError("flashtune.kernel.integrations.transformers needs Hugging Face transformers 5.x: "
                      "pip install transformers (from a flashtune checkout: pip install '.[transformers]')") from _error

try:  # transformers >= 5.2x remaps the positions of packed documents; 5.17 has no such step
    from transformers.masking_utils import remap_positions_for_packed_sequence
except ImportError:  # pragma: no cover - depends on the transformers version
    remap_positions_for_packed_sequence = None

from .. import dispatch
from ..api import attention
from ..checks import check_bool, check_inputs, check_kvcache_inputs, needs_grad
from ..kvcache import run_planned
from ..mods import ScoreMods, capped, check_mods
from ..varlen import attention_varlen

__all__ = ["NAME", "MaskForm", "Packing", "SDPAFallbackWarning", "backend_counts", "causal_form", "fallback_counts",
           "kernel_counts", "mask_window", "packed_documents", "packing", "register", "reset_counts",
           "tuned_attention_forward", "tuned_mask"]

NAME = "tuned_attention"
_FORM_ATTR = "_flashtune_form"  # set on the mask tensors this module's mask function builds: their MaskForm
_CAUSAL_ATTR = "_flashtune_causal"  # ... or, for a mask without one, the causal pattern it holds (see tuned_mask)
_PACKED_ATTR = "_flashtune_packed"  # ... or the Packing of a packed batch's block-diagonal causal mask


class SDPAFallbackWarning(UserWarning):
    """A transformers attention call ran torch SDPA instead of flashtune (warned once per reason)."""


# --- what the mask function found -----------------------------------------------------------

@dataclass(frozen=True)
class MaskForm:
    """A causal mask the kernels run without the mask tensor.

    keys: attend over the first `keys` keys only (a view of the cache); the queries are the last
    positions before `keys`, so "causal" means bottom-right aligned. lengths: int32 (B,) valid lengths
    for a single query per sequence (each sequence sees its first lengths[b] keys), or None.
    window: transformers' sliding window W where it hides keys (query i sees key j only if i - j < W,
    bottom-right: flash-attn's window_size=(W - 1, 0)); 0 where it hides nothing.
    """

    keys: int
    lengths: Tensor | None = None
    window: int = 0

    @property
    def window_size(self) -> tuple[int, int] | None:
        """The window as attention() and attention_kvcache take it, or None."""
        return (self.window - 1, 0) if self.window else None


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _free_vars(fn: Callable[..., Any]) -> dict[str, Any]:
    closure = getattr(fn, "__closure__", None) or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, closure)}


# Code objects are shared by every closure a factory returns: these identify transformers' own mask functions.
_AND_CODE = and_masks(causal_mask_function).__code__
_WINDOW_CODE = sliding_window_overlay(1).__code__


def mask_window(mask_function: Callable[..., Any], local_size: int | None = None) -> int | None:
    """0 for transformers' causal mask function, W for its sliding-window causal one
    (`sliding_window_causal_mask_function(W)`: key j visible to query i iff j <= i and i - j < W), None for any
    other (overlays, packed sequences, chunked or bidirectional attention, a user's function).

    Recognised by the code objects of transformers' factories (`and_masks`, `sliding_window_overlay`), so a
    composition of them with anything else is not mistaken for the plain window."""
    if mask_function is causal_mask_function:
        return 0 if local_size is None else None
    if getattr(mask_function, "__code__", None) is not _AND_CODE:
        return None
    parts = _free_vars(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2 or parts[1] is not causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__code__", None) is not _WINDOW_CODE:
        return None
    window = _free_vars(overlay).get("sliding_window")
    if type(window) is not int or window < 1 or (local_size is not None and local_size != window):
        return None
    return window


def causal_form(attention_mask: Tensor | None, q_length: int, kv_length: int, q_offset: int,
                kv_offset: int, window: int = 0) -> MaskForm | None:
    """The MaskForm of transformers' causal mask (sliding window `window`, 0: none) with this 2D padding mask,
    or None if the kernels have none.

    Queries sit at positions q_offset .. q_offset+Nq-1 and key j at kv_offset + j; a key is valid where
    the 2D mask (indexed by position) is True (missing columns: a static cache's unfilled slots, invalid).
    Keys at or past end = q_offset - kv_offset + Nq are invisible to every query (causality), so only [0, end)
    is read. Reads the mask on the host: one small device-to-host copy per forward, as SDPA's own mask skip does.
    """
    start = q_offset - kv_offset  # the first query's own key
    end = start + q_length
    if start < 0 or end > kv_length:
        return None  # queries without their keys
    # The last query sees keys from end - W on: the window hides a key of this call only if end > W.
    window = window if window and end > window else 0
    if attention_mask is None:
        return MaskForm(end, window=window)
    valid = attention_mask[:, kv_offset:kv_offset + end].to("cpu", torch.bool)
    if valid.shape[-1] == end and bool(valid.all()):
        return MaskForm(end, window=window)  # no padding (every decode step of an unpadded batch): one check
    if valid.shape[-1] < end:  # columns past the 2D mask are unfilled cache slots
        valid = F.pad(valid, (0, end - valid.shape[-1]), value=False)
    lengths = valid.sum(-1)
    if not bool((valid == (torch.arange(end) < lengths[:, None])).all()):
        return None  # not right padding: left padding or holes
    if not bool((lengths > 0).all()):
        return None  # an empty sequence: SDPA's all-masked rows, nothing to match
    if start == 0:
        # Right-padded prefill: top-left causal (and window) over the block is exact for every real token.
        return MaskForm(q_length, window=window)
    if q_length == 1 and not window:
        # One query per sequence: it sees the first lengths[b] keys, whether it is real or padding. (With a
        # window that bites, the kernel would slide it from lengths[b], transformers from the query's position.)
        return MaskForm(end, lengths.to(device=attention_mask.device, dtype=torch.int32))
    return None


@dataclass(frozen=True)
class Packing:
    """Documents packed end to end along the flattened (B * N) tokens of a call, as attention_varlen takes them.

    cu_seqlens: int32 (documents + 1,) on the queries' device, the documents' start rows and the total (a batch
    row's end always ends a document); max_seqlen: the longest document; window: transformers' sliding window W
    where the layer has one (flash-attn's window_size=(W - 1, 0)), 0 where it has none.
    """

    cu_seqlens: Tensor
    max_seqlen: int
    window: int = 0

    @property
    def window_size(self) -> tuple[int, int] | None:
        """The window as attention_varlen takes it, or None."""
        return (self.window - 1, 0) if self.window else None


_PACKED_CODE = packed_sequence_mask_function(torch.zeros(1, 1)).__code__
_REMAP_CODE = (None if remap_positions_for_packed_sequence is None
               else remap_positions_for_packed_sequence(causal_mask_function, torch.zeros(1, 1)).__code__)


def packed_documents(mask_function: Callable[..., Any], local_size: int | None = None) -> tuple[Tensor, int] | None:
    """(document ids (B, N), W) for transformers' mask of a packed batch, None for any other mask function.

    transformers detects packing from position_ids (`find_packed_sequence_indices`: a new document wherever the
    position does not grow by 1; only without a 2D mask and a cache) and composes
    `and_masks(base, packed_sequence_mask_function(ids))`, where base is its causal (W = 0) or sliding-window
    causal (W) mask function, wrapped since 5.2x in `remap_positions_for_packed_sequence(base, position_ids)`.
    Inside a document the positions grow by 1 per token, so the remapped base hides exactly what the plain one
    hides: each document is causal (and windowed) from its own first token. Recognised by the factories' code
    objects, as in mask_window; any other composition (an overlay, block-wise attention) gives None."""
    if getattr(mask_function, "__code__", None) is not _AND_CODE:
        return None
    parts = _free_vars(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2 or getattr(parts[1], "__code__", None) is not _PACKED_CODE:
        return None
    documents = _free_vars(parts[1]).get("packed_sequence_mask")
    base = parts[0]
    if _REMAP_CODE is not None and getattr(base, "__code__", None) is _REMAP_CODE:
        base = _free_vars(base).get("mask_function")
    window = mask_window(base, local_size) if callable(base) else None
    if window is None or not isinstance(documents, Tensor) or documents.dim() != 2:
        return None
    return documents, window


def packing(documents: Tensor, window: int = 0) -> Packing:
    """The Packing of document ids (B, N) (equal ids on consecutive tokens: one document; each batch row starts a
    new one). Reads the ids on the host: one small device-to-host copy per forward, as causal_form."""
    ids = documents.to("cpu")
    starts = torch.ones(ids.shape, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    bounds = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([ids.numel()])])
    lengths = bounds.diff()
    window = window if window and int(lengths.max()) > window else 0  # a window no document outgrows hides nothing
    return Packing(bounds.to(device=documents.device, dtype=torch.int32), int(lengths.max()), window)


def tuned_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int | Tensor = 0, kv_offset: int = 0,
               mask_function: Callable[..., Any] = causal_mask_function, attention_mask: Tensor | None = None,
               allow_is_causal_skip: bool = True, **kwargs: Any) -> Tensor | None:
    """transformers' mask function for flashtune: SDPA's boolean mask, tagged with what the kernels run instead.

    Returns None where causal attention over every key gives every real token its keys: no padding and no
    window that hides a key, or right padding in a prefill (the attention function then runs the causal
    kernel); otherwise SDPA's (B, 1, Nq, Nk) boolean mask, carrying the MaskForm the attention function runs
    instead, when there is one. A mask of transformers' causal or sliding-window pattern whose queries and keys
    start at the same position (a left-padded prefill) carries that pattern's window instead (0: plain causal):
    the attention function passes it with the mask so that the kernel skips the tiles it hides. Any other mask
    function (bidirectional, chunked, overlays) gets SDPA's mask untagged. transformers' mask of a packed batch
    (documents detected from position_ids, see packed_documents) carries its Packing: the attention function runs
    attention_varlen on the flattened tokens instead.
    """
    form, pattern, packed = None, None, None
    documents = packed_documents(mask_function, kwargs.get("local_size"))
    if (documents is not None and not _tracing() and attention_mask is None and isinstance(q_offset, int)
            and q_offset == kv_offset == 0 and q_length == kv_length == documents[0].shape[-1]):
        packed = packing(*documents)
    window = mask_window(mask_function, kwargs.get("local_size"))
    if window is not None and not _tracing():
        offset = int(q_offset) if isinstance(q_offset, Tensor) else q_offset  # a static cache's tensor offset
        form = causal_form(attention_mask, q_length, kv_length, offset, kv_offset, window)
        if (form is not None and form.keys == kv_length and form.lengths is None and not form.window
                and allow_is_causal_skip):
            return None
        if form is None and offset == kv_offset and q_length == kv_length:
            pattern = window
    # SDPA's `None` means top-left causal in one case (an empty static cache); this module's None does
    # not, so SDPA's mask is always materialised here.
    mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)
    if (form is not None or pattern is not None or packed is not None) and isinstance(mask, Tensor):
        # generate() makes a static cache's mask contiguous; a copy would lose the tag, so tag a
        # contiguous mask (then .contiguous() returns it as it is).
        mask = mask.contiguous()
        if packed is not None:
            setattr(mask, _PACKED_ATTR, packed)
        elif form is not None:
            setattr(mask, _FORM_ATTR, form)
        else:
            setattr(mask, _CAUSAL_ATTR, pattern)
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
    """Calls that ran a flashtune kernel, per path ("causal", "full", "masked", "kvcache", "kvcache_lengths",
    "varlen": a packed batch)."""
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


# --- the calls --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Call:
    """What one attention-function call asks beyond q, k, v and the mask."""

    scale: float | None
    softcap: float
    sinks: Tensor | None
    dropout: float
    grad: bool  # autograd differentiates through it (q, k, v or the sinks)


def _attention(path: str, query: Tensor, key: Tensor, value: Tensor, causal: bool, call: _Call, *,
               mask: Tensor | None = None, window: tuple[int, int] | None = None) -> Tensor:
    """attention() on the call, counted under what ran: the kernel, or the SDPA backend that won its key.

    Read from the dispatcher's memoised plan after the call (the training plan for a call that requires
    grad): a backend that refused the call's inputs has handed that signature to the kernel config stored
    beside it (dispatch.backend_refused)."""
    out = attention(query, key, value, attn_mask=mask, dropout_p=call.dropout, is_causal=causal, scale=call.scale,
                    enable_gqa=True, window_size=window, softcap=call.softcap, sinks=call.sinks)
    if mask is None and window is None and call.sinks is None and not call.dropout:
        mods = capped(call.softcap)
    else:  # the key features attention() resolved the call with (the seed does not enter them)
        mods = check_mods(check_inputs(query, key, value), query.device, softcap=call.softcap, window_size=window,
                          sinks=call.sinks, attn_mask=mask, dropout_p=call.dropout, seed=0)
    planned = dispatch.train_plan if call.grad else dispatch.plan
    backend = planned(query, key, value, causal, mods.key_features(key.shape[2])).sdpa
    if backend is None:
        _kernels[path] += 1
    else:
        _backends[f"{path}/{backend}"] += 1
    return out


def _bottom_right_mask(nq: int, nk: int, window: int, device: torch.device) -> Tensor:
    """(1, 1, Nq, Nk) bool: query i sees keys j <= i + Nk - Nq (and, with a window W, j > i + Nk - Nq - W)."""
    rel = torch.arange(nk, device=device)[None, :] - torch.arange(nq, device=device)[:, None] - (nk - nq)
    visible = rel <= 0
    if window:
        visible &= rel > -window
    return visible.view(1, 1, nq, nk)


def _kvcache(path: str, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None, call: _Call,
             window: tuple[int, int] | None) -> Tensor:
    """attention_kvcache(q, k, v, causal=True, cache_seqlens=lengths, check_lengths=False, window_size=window,
    softcap=..., sinks=...), counted.

    Straight to its planned path (kernel.kvcache.run_planned): the dispatcher's plan, memoised with
    the cache length bucketed, so a growing cache keeps its plan from token to token, and the
    compiled passes relaunched directly. _route has made attention_kvcache's own argument checks
    (no grad, no dropout, causal). The lengths' values were checked by causal_form once per forward; reading
    them again would cost a device-to-host sync in every layer.
    """
    mods: ScoreMods = capped(call.softcap)
    if window is not None or call.sinks is not None:
        mods = check_mods(check_kvcache_inputs(q, k, v), q.device, softcap=call.softcap, window_size=window,
                          sinks=call.sinks)
    out = run_planned(q, k, v, lengths, True, call.scale, False, mods=mods)
    backend = None
    if lengths is None and mods.plain:  # what ran, as _attention (SDPA runs neither lengths nor modifiers)
        backend = dispatch.kvcache_plan(q, k, v, True, lengths is not None, mods.key_features(k.shape[2])).sdpa
    if backend is None:
        _kernels[path] += 1
    else:
        _backends[f"{path}/{backend}"] += 1
    return out


def _documents(attention_mask: Any, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, int, int, int] | None:
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, W) of a packed call, or None.

    From the Packing on transformers' packed-batch mask (the mask SDPA would be given), else, where there is no
    mask at all, from flash-attn's varlen kwargs (`cu_seq_lens_q/k`, `max_length_q/k`, e.g. from
    DataCollatorWithFlattening(return_flash_attn_kwargs=True)), which transformers' flash-attn paths run as
    given. A mask without a Packing wins over the kwargs, as in SDPA, which ignores them."""
    if attention_mask is not None:
        packed = getattr(attention_mask, _PACKED_ATTR, None) if isinstance(attention_mask, Tensor) else None
        if packed is None:
            return None
        return packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen, packed.window
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_k is None:  # flash-attn's self-attention convention: one set for both
        cu_k, max_k = cu_q, max_q
    elif cu_q is None:
        cu_q, max_q = cu_k, max_k
    if not isinstance(cu_q, Tensor) or not isinstance(cu_k, Tensor):
        raise TypeError(f"cu_seq_lens_q/k must be tensors, got {type(cu_q).__name__} and {type(cu_k).__name__}")
    if max_q is None or max_k is None:
        raise ValueError("cu_seq_lens_q/k need max_length_q/k (the longest document), as flash-attn's varlen kwargs")
    return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k), 0


def _block_causal_mask(cu_seqlens: Tensor, total: int) -> Tensor:
    """(1, 1, total, total) bool: causal inside each document of cu_seqlens, nothing across documents."""
    rows = torch.arange(total, device=cu_seqlens.device)
    document = torch.searchsorted(cu_seqlens.long(), rows, right=True)
    return ((document[:, None] == document[None, :]) & (rows[None, :] <= rows[:, None])).view(1, 1, total, total)


def _varlen(query: Tensor, key: Tensor, value: Tensor, documents: tuple[Tensor, Tensor, int, int, int],
            call: _Call) -> Tensor:
    """attention_varlen over the batch's flattened tokens, causal per document: (B, Hq, Nq, D), counted."""
    cu_q, cu_k, max_q, max_k, window = documents
    (b, hq, nq, d), (hkv, nk) = query.shape, key.shape[1:3]
    # (B, H, N, D) -> (B * N, H, D): a view for B = 1 (attention_varlen takes any strides), a copy otherwise.
    out = attention_varlen(query.transpose(1, 2).reshape(b * nq, hq, d), key.transpose(1, 2).reshape(b * nk, hkv, d),
                           value.transpose(1, 2).reshape(b * nk, hkv, d), cu_q, cu_k, max_q, max_k, causal=True,
                           scale=call.scale, window_size=(window - 1, 0) if window else None, softcap=call.softcap,
                           sinks=call.sinks)
    _kernels["varlen"] += 1
    return out.view(b, nq, hq, d).transpose(1, 2)


# --- the attention function -------------------------------------------------------------------

_UNSUPPORTED_KWARGS = {  # kwargs transformers may pass that change the result and that no kernel path takes
    "position_bias": "an additive position bias (T5-style position_bias)",
    "output_attentions": "output_attentions=True (the fused kernels never form the weights)",
}


def _route(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, dropout: float,
           scaling: float | None, is_causal: bool | None, kwargs: dict[str, Any]) -> Tensor | tuple[str, str]:
    """The kernel's (B, Hq, Nq, D) output, or (reason, detail) for a call that must run SDPA."""
    if not _UNSUPPORTED_KWARGS.keys().isdisjoint(kwargs):  # the common case, none passed, in one set operation
        for name, what in _UNSUPPORTED_KWARGS.items():
            # output_attentions=False is passed by some models and changes nothing
            if kwargs.get(name) is not None and (name != "output_attentions" or kwargs[name]):
                return name, what
    # Attention sinks (GPT-OSS passes its per-head `sinks` parameter as s_aux); Gemma 2's logit softcap
    # (None or the cap); dropout (transformers passes the module's rate in training, 0 otherwise).
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    grad = needs_grad(query, key, value) or (sinks is not None and torch.is_grad_enabled()
                                             and bool(getattr(sinks, "requires_grad", False)))
    call = _Call(scaling, kwargs.get("softcap") or 0.0, sinks, dropout or 0.0, grad)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if type(causal) is not bool:
        causal = check_bool(causal, "is_causal")  # TypeError: the call goes to SDPA, named as refused
    documents = _documents(attention_mask, kwargs) if causal else None
    if documents is not None:
        if call.dropout:  # attention_varlen has no dropout: the block-diagonal causal mask in attention()
            if attention_mask is None:
                if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
                    return "packed", "dropout in a packed call given only as cu_seq_lens with batch > 1 or Nq != Nk"
                attention_mask = _block_causal_mask(documents[0], query.shape[2])
            return _attention("masked", query, key, value, False, call, mask=attention_mask)
        return _varlen(query, key, value, documents, call)
    form: MaskForm | None = None
    if attention_mask is not None:
        form = getattr(attention_mask, _FORM_ATTR, None) if isinstance(attention_mask, Tensor) else None
        if form is None or not causal:
            # The mask as it is (as SDPA takes it, whatever is_causal says); where it holds transformers' causal
            # pattern with queries and keys aligned, that pattern too (it hides nothing the mask shows), so that
            # the kernel skips the tiles it hides.
            pattern = getattr(attention_mask, _CAUSAL_ATTR, None)
            window = (pattern - 1, 0) if pattern else None
            return _attention("masked", query, key, value, pattern is not None, call, mask=attention_mask,
                              window=window)
    if not causal:
        return _attention("full", query, key, value, False, call)
    window = None
    if form is not None:
        window = form.window_size
        if form.keys != key.shape[2]:
            key, value = key[:, :, :form.keys], value[:, :, :form.keys]
        if form.lengths is not None:
            if call.grad or call.dropout:  # the KV-cache kernel has neither: the mask, in attention()
                return _attention("masked", query, key, value, False, call, mask=attention_mask[..., :form.keys])
            return _kvcache("kvcache_lengths", query, key, value, form.lengths, call, window)
    nq, nk = query.shape[2], key.shape[2]
    if nq == nk:
        return _attention("causal", query, key, value, True, call, window=window)
    if nq > nk:
        return "queries", f"more queries ({nq}) than keys ({nk}) with a causal mask"
    if call.grad or call.dropout:
        # Against a cache with a backward or dropout: attention() with the bottom-right mask (the KV-cache
        # kernel has neither).
        mask = _bottom_right_mask(nq, nk, form.window if form is not None else 0, query.device)
        return _attention("masked", query, key, value, False, call, mask=mask)
    return _kvcache("kvcache", query, key, value, None, call, window)


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
    containing "flash" are refused: transformers takes them as requests for its flash-attn implementations.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if "flash" in name.lower():
        raise ValueError(f"name {name!r} contains 'flash': transformers treats such names as its flash-attn "
                         f"implementations and raises; use another, e.g. {NAME!r}")
    AttentionInterface.register(name, tuned_attention_forward)
    AttentionMaskInterface.register(name, tuned_mask)
    return name
