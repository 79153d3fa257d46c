"""`attention_kvcache`: a few new queries against a KV cache (decoding, chunked prefill, speculation).

The checked public entry point of the kvcache op (kernel/ops/kvcache.py launches it). `attention()` stays
the SDPA drop-in (top-left causal); this one follows flash_attn's cache conventions: per-sequence valid
lengths and bottom-right causal alignment.
"""
from __future__ import annotations

from typing import Any

import torch

from ..db.types import Config
from . import device as _device
from . import dispatch, record
from .checks import (
    MIN_PAGE_SIZE,
    AttnShape,
    check_block_table_values,
    check_bool,
    check_cache_lengths,
    check_cache_seqlens,
    check_dense,
    check_kvcache_inputs,
    check_paged_inputs,
    check_scale,
    check_softcap,
    needs_grad,
)
from .mods import NO_MODS, ScoreMods, capped, check_mods
from .ops.kvcache import check_decode_config, launch_decode
from .sdpa import is_refusal, run_sdpa

__all__ = ["append_paged_kv", "attention_kvcache", "paged_kv", "run_planned"]


def attention_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                      cache_seqlens: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                      config: Config | None = None, check_lengths: bool = False,
                      window_size: tuple[int, int] | None = None, softcap: float = 0.0, sinks: torch.Tensor | None = None,
                      alibi_slopes: torch.Tensor | None = None, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q against a KV cache with per-sequence lengths; returns (B, Hq, Nq, D) like q.

    q (B, Hq, Nq, D); k_cache, v_cache (B, Hkv, Nmax, D), Hq a multiple of Hkv (GQA/MQA); any
    strides; fp16, bf16 or fp32 (IEEE fp32 dots); head dims: multiples of 8 up to 256.
    cache_seqlens: int32 (B,) valid lengths on q's device, 0..Nmax (0: the rows are zeros), or
    None for Nmax everywhere. The kernel clamps each length into [0, Nmax] on the device, so a
    length outside that range never reads outside the cache: a negative one gives zero rows, one
    past Nmax the whole cache. check_lengths=True (off by default) reads the lengths on the host
    instead and raises ValueError naming the first bad one (a copy and a sync per call, skipped
    during CUDA-graph capture and torch.compile tracing). causal=True aligns bottom-right as
    flash_attn does for a cache: query i sees keys j <= len − Nq + i (non-empty lengths should be
    >= Nq; with fewer keys the first queries see none and get zeros, and check_lengths=True
    refuses them). scale defaults to 1/sqrt(D). softcap c > 0 caps the scaled scores s to c·tanh(s/c)
    before the softmax (Gemma 2; flash_attn's convention); 0.0 (the default) is off, and anything else
    that is not a finite number > 0 is a ValueError. `window_size=(left, right)` (-1: unbounded) keeps
    query i to keys len − Nq + i − left .. len − Nq + i + right (bottom-right aligned, as causal is here), and
    only the window's part of the cache is read; `sinks` (Hq,) logits join each row's denominator;
    `alibi_slopes` (Hq,) or (B, Hq) add −slope·|j − (len − Nq + i)|. kernel.mods has the conventions.

    config=None asks the dispatcher (kernel.dispatch.kvcache_plan: the tuned winner of the key
    (arch, "kvcache", Nq, Nmax, D, dtype, causal, B·Hq bucket, Hq/Hkv), else the rules applied to
    Nmax rounded to its power-of-two bucket (the stored winner there, else the nearest tuned key,
    else the default decode config for this GPU)), memoised per input signature with Nmax bucketed,
    so a growing cache re-plans only when it enters the next bucket; the config's num_splits is a
    count and the split size follows the exact Nmax. On CUDA the compiled passes are relaunched
    directly (DecodeLaunch). A stored config that fails to compile here falls back to the default
    with one warning. Under FLASHTUNE_RECORD=1 the call counts the key its plan uses (Nmax's
    bucket, or the exact key where a winner is stored for it) for `tune --recorded --op kvcache`,
    so a generation loop records one key per bucket it crosses, not one per token.

    check_lengths=True's host read of the lengths waits for the GPU's queue, which costs a decode
    step about as much as the kernel (B=8 ragged 32k cache on the H200: 1.77 against 3.64 TB/s):
    hence off by default. cache_seqlens' type, dtype, shape and device are always checked. With
    cache_seqlens, splits are at most the default's long-cache length
    (kernel.ops.kvcache.ragged_min_splits), so that a ragged batch runs no slower than a uniform
    one of the same total. A plan of one split launches one pass, which writes the output. Inputs
    that require grad under grad mode raise NotImplementedError.

    Paged caches (vLLM's and flash_attn's layout): with `block_table` (B, max_pages) int32 on q's device,
    k_cache and v_cache are (num_pages, page_size, Hkv, D), any strides, page_size a power of two from 16;
    token t of sequence b lives at page block_table[b, t // page_size], slot t % page_size. cache_seqlens
    is then required (lengths up to max_pages·page_size). The kernel clamps a page number outside
    [0, num_pages) into it and a length into [0, max_pages·page_size], so no table reads outside the cache;
    check_lengths=True also reads the table on the host and raises ValueError naming the first bad page
    a sequence uses. The call plans as the contiguous cache of Nmax = max_pages·page_size, under its own key
    with the page size (Key.page_size), which `tune --page-size` times on paged caches.
    """
    if needs_grad(q, k_cache, v_cache):
        raise NotImplementedError("attention_kvcache has no backward: inputs that require grad are not supported "
                                  "(call it under torch.no_grad() or torch.inference_mode())")
    if type(causal) is not bool:
        causal = check_bool(causal, "causal")
    if type(check_lengths) is not bool:
        check_lengths = check_bool(check_lengths, "check_lengths")
    if type(softcap) is not float or softcap != 0.0:
        softcap = check_softcap(softcap)
    mods = capped(softcap)
    if block_table is not None:
        return _paged(q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, config, check_lengths, mods,
                      {"softcap": softcap, "window_size": window_size, "sinks": sinks, "alibi_slopes": alibi_slopes})
    if window_size is not None or sinks is not None or alibi_slopes is not None:
        mods = check_mods(check_kvcache_inputs(q, k_cache, v_cache), q.device, softcap=softcap,
                          window_size=window_size, sinks=sinks, alibi_slopes=alibi_slopes)
    if config is not None:
        shape = check_kvcache_inputs(q, k_cache, v_cache)
        lens = check_cache_seqlens(cache_seqlens, shape, q.device, causal, check_values=check_lengths)
        ragged = lens is not None
        if q.device.type == "cuda":
            check_decode_config(config, shape, _device.device_smem_limit(q.device), _device.device_arch(q.device),
                                ragged=ragged)
        else:
            check_decode_config(config, shape, None, ragged=ragged)
        return launch_decode(q, k_cache, v_cache, shape, cache_seqlens=lens, causal=causal,
                             scale=check_scale(scale, shape.head_dim), config=config, mods=mods)[0]
    return run_planned(q, k_cache, v_cache, cache_seqlens, causal, scale, check_lengths, mods=mods)


def _paged(q: Any, k_cache: Any, v_cache: Any, block_table: Any, cache_seqlens: Any, causal: bool,
           scale: float | None, config: Config | None, check_lengths: bool, mods: ScoreMods,
           mod_args: dict[str, Any]) -> torch.Tensor:
    """attention_kvcache with a block table, after the checks that do not depend on the cache layout."""
    shape, k_view, v_view = check_paged_inputs(q, k_cache, v_cache, block_table)
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required with a block_table: pass each sequence's length, an int32 "
                         f"tensor of shape ({shape.batch},)")
    if (mod_args["window_size"] is not None or mod_args["sinks"] is not None
            or mod_args["alibi_slopes"] is not None):
        mods = check_mods(shape, q.device, **mod_args)
    if config is None:
        return _run_paged(q, k_cache, v_cache, block_table, shape, k_view, v_view, cache_seqlens, causal, scale,
                          check_lengths, mods)
    lens = check_cache_seqlens(cache_seqlens, shape, q.device, causal, check_values=check_lengths)
    if check_lengths:
        check_block_table_values(block_table, lens, k_cache.shape[1], k_cache.shape[0])
    if q.device.type == "cuda":
        check_decode_config(config, shape, _device.device_smem_limit(q.device), _device.device_arch(q.device),
                            ragged=True)
    else:
        check_decode_config(config, shape, None, ragged=True)
    return launch_decode(q, k_cache, v_cache, shape, cache_seqlens=lens, causal=causal,
                         scale=check_scale(scale, shape.head_dim), config=config, mods=mods,
                         block_table=block_table)[0]


def _run_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
               shape: AttnShape, k_view: torch.Tensor, v_view: torch.Tensor, cache_seqlens: Any, causal: bool,
               scale: float | None, check_lengths: bool, mods: ScoreMods) -> torch.Tensor:
    # The plan of the equivalent contiguous cache (k_view, v_view: its sizes, no memory), launched on the pages;
    # its key adds the page size (the page walk changes the best split).
    features = tuple(sorted((*mods.key_features(shape.seq_k), ("page_size", k_cache.shape[1]))))
    plan = dispatch.kvcache_plan(q, k_view, v_view, causal, True, features)
    if record.ENABLED:
        key = dispatch.kvcache_key(plan)
        if key is not None:
            record.hit(key)
    seq_kv = shape.seq_k
    cache_seqlens = check_cache_lengths(cache_seqlens, shape.batch, shape.seq_q, seq_kv, q.device, causal,
                                        check_lengths)
    if check_lengths:
        check_block_table_values(block_table, cache_seqlens, k_cache.shape[1], k_cache.shape[0])
    scale = plan.default_scale if scale is None else check_scale(scale, shape.head_dim)
    # Never an SDPA winner: the plan has lengths, and SDPA cannot read pages.
    try:
        return plan.launch(q, k_cache, v_cache, seq_kv, cache_seqlens, scale, mods, block_table)
    except Exception as error:
        if not dispatch.stored_config_failed(plan.choice, error):
            raise
        plan = dispatch.kvcache_config_failed(q, k_view, v_view, causal, True, plan.choice, error, features)
        return plan.launch(q, k_cache, v_cache, seq_kv, cache_seqlens, scale, mods, block_table)


def append_paged_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    cache_seqlens: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Write new tokens into paged caches in place: k_new, v_new (B, Hkv, Nnew, D) (q's layout) go to key
    positions cache_seqlens[b] + 0 .. Nnew − 1 of each sequence, i.e. page block_table[b, t // page_size],
    slot t % page_size. cache_seqlens is not changed (add Nnew after the call). torch indexing, no host
    sync; the table must already hold pages for the new positions (an index past max_pages is torch's
    index error, a device-side assert on CUDA)."""
    shape, _, _ = check_paged_inputs(k_new, k_cache, v_cache, block_table)
    if not isinstance(v_new, torch.Tensor) or v_new.shape != k_new.shape:
        raise ValueError(f"v_new must be a tensor of k_new's shape {tuple(k_new.shape)}")
    if k_new.shape[1] != k_cache.shape[2]:
        raise ValueError(f"k_new has {k_new.shape[1]} heads; the caches have {k_cache.shape[2]}")
    check_cache_lengths(cache_seqlens, shape.batch, 1, shape.seq_k, k_new.device, False, False)
    page_size = k_cache.shape[1]
    pos = cache_seqlens.long()[:, None] + torch.arange(k_new.shape[2], device=k_new.device)[None, :]  # (B, Nnew)
    pages = block_table.long().gather(1, pos // page_size)
    slots = pos % page_size
    k_cache[pages, slots] = k_new.permute(0, 2, 1, 3).to(k_cache.dtype)
    v_cache[pages, slots] = v_new.permute(0, 2, 1, 3).to(v_cache.dtype)


def paged_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, page_size: int, cache_seqlens: torch.Tensor | None = None,
             *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous caches (B, Hkv, Nmax, D) written into pages: (k_pages, v_pages, block_table), the pages
    (num_pages, page_size, Hkv, D) in a random order drawn from `generator` (a CPU generator; None: torch's
    default), as a serving engine's allocator leaves them. Sequence b gets cdiv(cache_seqlens[b], page_size)
    pages (all Nmax tokens when no lengths are given); the table is (B, cdiv(Nmax, page_size)) int32, its
    entries past a sequence's pages 0. For benchmarks, the tuner and moving an existing cache to pages."""
    check_dense("k_cache", k_cache, "4-D (batch, kv_heads, seq_len, head_dim)")
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < MIN_PAGE_SIZE or (
            page_size & (page_size - 1)):
        raise ValueError(f"page_size must be a power of two from {MIN_PAGE_SIZE}, got {page_size!r}")
    if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must be a tensor of k_cache's shape {tuple(k_cache.shape)}")
    batch, heads_kv, seq_kv, head_dim = k_cache.shape
    device = k_cache.device
    lengths = [seq_kv] * batch if cache_seqlens is None else [min(int(n), seq_kv) for n in cache_seqlens.tolist()]
    owned = [-(-n // page_size) for n in lengths]
    order = torch.randperm(max(1, sum(owned)), generator=generator).to(torch.int32)
    table = torch.zeros(batch, max(1, -(-seq_kv // page_size)), dtype=torch.int32)
    at = 0
    for b, n in enumerate(owned):
        table[b, :n] = order[at:at + n]
        at += n
    table = table.to(device)
    k_pages = k_cache.new_empty((max(1, sum(owned)), page_size, heads_kv, head_dim))
    v_pages = torch.empty_like(k_pages)
    start = torch.zeros(1, dtype=torch.int32, device=device)
    for b, n in enumerate(lengths):
        if n:  # one sequence at a time: each writes only its own pages
            append_paged_kv(k_pages, v_pages, table[b:b + 1], start, k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n])
    return k_pages, v_pages, table


def run_planned(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor | None,
                causal: bool, scale: float | None, check_lengths: bool, *, mods: ScoreMods = NO_MODS,
                block_table: torch.Tensor | None = None) -> torch.Tensor:
    """attention_kvcache(config=None) after its own argument checks (grad, causal a bool, check_lengths
    a bool, `mods` checked: kernel.mods.check_mods): the transformers integration calls this directly.

    The dispatcher's plan (kernel.dispatch.kvcache_plan: memoised per signature with Nmax bucketed,
    the caches still validated per call), the checks that depend on the call's exact Nmax (causal
    with fewer keys than queries; cache_seqlens' type, dtype, shape and device, and its values only
    with check_lengths), then the plan's DecodeLaunch, which relaunches the compiled passes directly
    on CUDA. Under FLASHTUNE_RECORD=1 the call counts its plan's key (dispatch.kvcache_key). A
    stored config that fails to compile falls back to the default with one warning. A call with modifiers
    resolves its own key (their features) and never runs an SDPA winner. `block_table`: paged caches
    (attention_kvcache's "Paged caches"), checked here.
    """
    if block_table is not None:
        shape, k_view, v_view = check_paged_inputs(q, k_cache, v_cache, block_table)
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required with a block_table")
        return _run_paged(q, k_cache, v_cache, block_table, shape, k_view, v_view, cache_seqlens, causal, scale,
                          check_lengths, mods)
    features = mods.key_features(k_cache.shape[2])
    plan = dispatch.kvcache_plan(q, k_cache, v_cache, causal, cache_seqlens is not None, features)
    if record.ENABLED:
        key = dispatch.kvcache_key(plan)
        if key is not None:
            record.hit(key)
    seq_kv = k_cache.shape[2]
    shape = plan.shape
    if cache_seqlens is not None or (causal and shape.seq_q > seq_kv):
        cache_seqlens = check_cache_lengths(cache_seqlens, shape.batch, shape.seq_q, seq_kv, q.device, causal,
                                            check_lengths)
    scale = plan.default_scale if scale is None else check_scale(scale, shape.head_dim)
    if plan.sdpa is not None:  # an SDPA backend won the key, and computes this call: no lengths, all keys seen,
        # no modifiers
        try:
            return run_sdpa(plan.sdpa, q, k_cache, v_cache, causal=False, scale=scale)
        except RuntimeError as error:
            if not is_refusal(error):
                raise
            dispatch.kvcache_backend_refused(q, k_cache, v_cache, causal, False)
    try:
        return plan.launch(q, k_cache, v_cache, seq_kv, cache_seqlens, scale, mods)
    except Exception as error:
        if not dispatch.stored_config_failed(plan.choice, error):
            raise
        plan = dispatch.kvcache_config_failed(q, k_cache, v_cache, causal, cache_seqlens is not None, plan.choice,
                                              error, features)
        return plan.launch(q, k_cache, v_cache, seq_kv, cache_seqlens, scale, mods)
