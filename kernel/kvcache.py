"""`attention_kvcache`: a few new queries against a KV cache (decoding, chunked prefill, speculation).

The checked public entry point and the unchecked launch of the split-KV kernel (kernel/decode.py).
`attention()` stays the SDPA drop-in (top-left causal); this one follows flash_attn's cache
conventions: per-sequence valid lengths and bottom-right causal alignment.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from ..db.types import Config

from . import device as _device
from .decode import (DecodePlan, combine_block_s, combine_warps, decode_combine_kernel, decode_knobs,
                     decode_split_kernel, default_decode_config, estimate_decode_smem, plan_decode)
from .errors import launch_failure
from .launch import AttnShape, check_qkv, check_runnable, check_scale, needs_grad

__all__ = ["attention_kvcache", "check_cache_seqlens", "check_decode_config",
           "check_kvcache_inputs", "decode_config_for", "decode_partials", "launch_decode"]

_INT32_MAX = 2**31 - 1
_NAMES = ("q", "k_cache", "v_cache")
_STORED = ("exact", "nearest")  # kernel.dispatch's sources of a stored config (EXACT, NEAREST)
_COMPILE_FAILURES = ("compile_error", "out_of_resources")  # another config may work: fall back


# --- validation -----------------------------------------------------------------------------

def check_kvcache_inputs(q: Any, k_cache: Any, v_cache: Any) -> AttnShape:
    """Validate q (B, Hq, Nq, D) and the caches (B, Hkv, Nmax, D), any strides; return the sizes.

    AttnShape.seq_k is Nmax. Raises TypeError for non-tensors, layouts and dtypes, ValueError for
    devices, ranks, sizes and head dims; the message names the argument, the value and what is accepted.
    """
    shape = check_qkv(q, k_cache, v_cache, names=_NAMES)
    check_runnable(q, ", ".join(_NAMES))
    b, hq, nq = shape.batch, shape.heads_q, shape.seq_q
    if b * hq * nq > _INT32_MAX:
        # Only broadcast (stride-0) inputs get here: real memory runs out long before.
        raise ValueError(f"q of shape {tuple(q.shape)} has more than 2**31-1 rows (batch x heads x queries), "
                         "CUDA's grid limit for the combine pass: split the batch")
    return shape


def _lengths_checkable(t: torch.Tensor) -> bool:
    # Reading the lengths is a device-to-host copy: impossible inside CUDA-graph capture, and not
    # traceable under torch.compile. There the kernel's clamp to [0, Nmax] keeps any value in bounds.
    if torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_cache_seqlens(cache_seqlens: Any, shape: AttnShape, device: torch.device, causal: bool, *,
                        check_values: bool = True) -> torch.Tensor | None:
    """Validate cache_seqlens: None, or an int32 (B,) tensor on q's device with values in range.

    Accepted lengths: 0 (an empty slot of a static batch: its rows are zeros) up to Nmax; with
    causal=True a non-empty sequence needs at least Nq keys (query 0 sees keys j <= len − Nq).
    Checking values reads the tensor on the host (one small copy and a sync); it is skipped during
    CUDA-graph capture and torch.compile tracing, and with check_values=False.
    """
    if cache_seqlens is None:
        if causal and shape.seq_q > shape.seq_k:
            raise ValueError(f"causal=True needs at least as many cached keys as queries: Nq={shape.seq_q} > "
                             f"Nmax={shape.seq_k} (query 0 would see no key with bottom-right alignment)")
        return None
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be None or an int32 torch.Tensor of shape ({shape.batch},), got "
                        f"{type(cache_seqlens).__name__}")
    if cache_seqlens.is_nested or cache_seqlens.layout is not torch.strided:
        raise TypeError("cache_seqlens must be a dense (strided) tensor")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens has dtype {cache_seqlens.dtype}; it must be torch.int32 "
                        "(convert with .to(torch.int32))")
    if tuple(cache_seqlens.shape) != (shape.batch,):
        raise ValueError(f"cache_seqlens must have shape ({shape.batch},) (one length per sequence), got "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device}; it must be on q's device {device}")
    if check_values and _lengths_checkable(cache_seqlens):
        lengths = cache_seqlens.cpu()
        bad = (lengths < 0) | (lengths > shape.seq_k)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache_seqlens[{i}] = {int(lengths[i])} is out of range: lengths must be from 0 to "
                             f"the cache length Nmax={shape.seq_k}")
        if causal:
            short = (lengths > 0) & (lengths < shape.seq_q)
            if bool(short.any()):
                i = int(short.nonzero()[0, 0])
                raise ValueError(f"cache_seqlens[{i}] = {int(lengths[i])} is shorter than the {shape.seq_q} queries "
                                 "with causal=True: with bottom-right alignment query i sees keys j <= len − Nq + i, "
                                 "so the first queries would see no key (lengths must be 0 or >= Nq)")
    return cache_seqlens


def check_decode_config(config: Any, shape: AttnShape, smem_limit: int | None, arch: str | None = None, *,
                        ragged: bool = False) -> None:
    """Raise if `config` is not a Config, has unknown knobs, exceeds the grid limit for `shape` (with
    cache_seqlens given when `ragged`), or needs more shared memory than `smem_limit`."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a flashtune.db.types.Config, got {type(config).__name__}")
    decode_knobs(config)
    plan = plan_decode(config, batch=shape.batch, heads_kv=shape.heads_kv, group=shape.group, seq_q=shape.seq_q,
                       seq_kv=shape.seq_k, head_dim=shape.head_dim, ragged=ragged)
    programs = plan.num_m_blocks * plan.num_splits * shape.batch * shape.heads_kv
    if programs > _INT32_MAX:
        raise ValueError(f"config {config} needs {programs} programs for these sizes, more than CUDA's grid limit "
                         "2**31-1: use fewer splits or a larger block_m, or split the batch")
    if smem_limit is not None:
        need = estimate_decode_smem(config, shape.head_dim, shape.dtype, arch)
        if need > smem_limit:
            raise ValueError(f"config {config} needs about {need // 1024} KB of shared memory for head dim "
                             f"{shape.head_dim} {shape.dtype}; this GPU allows {smem_limit // 1024} KB per block")


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def decode_config_for(shape: AttnShape, device: torch.device) -> Config:
    """The default decode config for these sizes on `device` (its SM count, arch and shared memory)."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return default_decode_config(shape.seq_q, shape.seq_k, shape.head_dim, shape.dtype,
                                     batch_heads=shape.batch * shape.heads_q, group=shape.group,
                                     sm_count=_sm_count(index), arch=_device.device_arch(device),
                                     smem_limit=_device.device_smem_limit(device))
    return default_decode_config(shape.seq_q, shape.seq_k, shape.head_dim, shape.dtype,
                                 batch_heads=shape.batch * shape.heads_q, group=shape.group)


# --- launch ---------------------------------------------------------------------------------

def decode_partials(shape: AttnShape, plan: DecodePlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh scratch for pass 1: ACC (B·Hq·Nq, S, D) and LSE (B·Hq·Nq, S), fp32."""
    rows = shape.batch * shape.heads_q * shape.seq_q
    return (torch.empty((rows, plan.num_splits, shape.head_dim), device=device, dtype=torch.float32),
            torch.empty((rows, plan.num_splits), device=device, dtype=torch.float32))


def launch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, shape: AttnShape, *,
                  cache_seqlens: torch.Tensor | None, causal: bool, scale: float, config: Config,
                  out: torch.Tensor | None = None, partials: tuple[torch.Tensor, torch.Tensor] | None = None,
                  fp32_precision: str = "ieee") -> tuple[torch.Tensor, tuple[Any, ...]]:
    """Launch the split-KV kernel with no input checks; returns (o, compiled kernels of the passes run).

    The tuner and the dispatcher call this after validating once (`check_kvcache_inputs`,
    `check_cache_seqlens`, `check_decode_config`). Unknown config knobs raise ValueError; Triton's
    own errors (OutOfResources, CompilationError) propagate unchanged so the tuner can record them.
    `out` (laid out like q, any strides) and `partials` (from `decode_partials`) may be given
    preallocated; the compiled-kernel tuple holds pass 1, then pass 2 when it ran (entries are None
    under the interpreter).
    """
    decode_knobs(config)
    plan = plan_decode(config, batch=shape.batch, heads_kv=shape.heads_kv, group=shape.group, seq_q=shape.seq_q,
                       seq_kv=shape.seq_k, head_dim=shape.head_dim, ragged=cache_seqlens is not None)
    o = torch.empty_like(q) if out is None else out
    if plan.split:
        acc, lse = decode_partials(shape, plan, q.device) if partials is None else partials
    else:
        acc = lse = o  # unused: pass 1 writes O
    has_lens = cache_seqlens is not None
    lens = cache_seqlens if has_lens else o  # unused when HAS_SEQLENS=False
    grid = (plan.num_m_blocks * plan.num_splits * shape.batch * shape.heads_kv,)
    first = decode_split_kernel[grid](
        q, k_cache, v_cache, o, acc, lse, lens, lens.stride(0) if has_lens else 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *o.stride(),
        shape.heads_kv, shape.seq_q, shape.seq_k, shape.group, plan.split_size, plan.num_splits,
        plan.num_m_blocks, scale * 1.4426950408889634,  # log2(e): exp2 in-kernel
        HEAD_DIM=shape.head_dim, BLOCK_D=plan.block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=bool(causal), HAS_SEQLENS=has_lens, SPLIT=plan.split, PRECISION=fp32_precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not plan.split:
        return o, (first,)
    second = decode_combine_kernel[(shape.batch * shape.heads_q * shape.seq_q,)](
        acc, lse, o, lens, lens.stride(0) if has_lens else 0, *o.stride(),
        shape.heads_q, shape.seq_q, shape.seq_k, plan.split_size, plan.num_splits,
        HEAD_DIM=shape.head_dim, BLOCK_D=plan.block_d, BLOCK_S=combine_block_s(plan.num_splits),
        HAS_SEQLENS=has_lens, num_warps=combine_warps(plan.block_d), num_stages=1,
    )
    return o, (first, second)


def attention_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                      cache_seqlens: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                      config: Config | None = None, check_lengths: bool = True) -> torch.Tensor:
    """Attention of q against a KV cache with per-sequence lengths; returns (B, Hq, Nq, D) like q.

    q (B, Hq, Nq, D); k_cache, v_cache (B, Hkv, Nmax, D), Hq a multiple of Hkv (GQA/MQA); any
    strides; fp16, bf16 or fp32 (IEEE fp32 dots); head dims: multiples of 8 up to 256.
    cache_seqlens: int32 (B,) valid lengths on q's device, 0..Nmax (0: the rows are zeros), or
    None for Nmax everywhere. causal=True aligns bottom-right as flash_attn does for a cache:
    query i sees keys j <= len − Nq + i (then each non-empty length must be >= Nq). scale defaults
    to 1/sqrt(D).

    config=None asks the dispatcher (kernel.dispatch.kvcache_plan: the tuned winner of the key
    (arch, "kvcache", Nq, Nmax, D, dtype, causal, B·Hq bucket, Hq/Hkv), else the nearest tuned key,
    else the default decode config for this GPU), memoised per input signature; a stored config
    that fails to compile here falls back to the default with one warning. Under FLASHTUNE_RECORD=1
    the call counts its key for `tune --recorded --op kvcache`.

    Validating cache_seqlens' values reads them on the host: a copy and a sync that wait for the
    GPU's queue, which cost a decode step about as much as the kernel (B=8 ragged 32k cache on the
    H200: 1.94 against 3.01 TB/s). It is skipped during CUDA-graph capture or torch.compile tracing,
    and with check_lengths=False (a serving loop that maintains its own lengths); the tensor's
    type, dtype, shape and device are always checked, and the kernel clamps lengths to [0, Nmax], so
    no value reads outside the cache. With cache_seqlens, splits are at most the default's
    long-cache length (kernel.decode.ragged_min_splits), so that a ragged batch runs no slower than
    a uniform one of the same total. Inputs that require grad under grad mode raise NotImplementedError.
    """
    if needs_grad(q, k_cache, v_cache):
        raise NotImplementedError("attention_kvcache has no backward: inputs that require grad are not supported "
                                  "(call it under torch.no_grad() or torch.inference_mode())")
    causal = bool(causal)
    if type(check_lengths) is not bool:
        raise TypeError(f"check_lengths must be a bool, got {type(check_lengths).__name__}")
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
                             scale=check_scale(scale, shape.head_dim), config=config)[0]
    # Imported here, not at the top: the tuner imports this module and must not load the database.
    from . import dispatch, record

    has_lens = cache_seqlens is not None
    plan = dispatch.kvcache_plan(q, k_cache, v_cache, causal, has_lens)
    shape, choice = plan.shape, plan.choice
    if record.ENABLED and choice.key is not None:
        record.hit(choice.key)
    lens = check_cache_seqlens(cache_seqlens, shape, q.device, causal, check_values=check_lengths)
    scale = plan.default_scale if scale is None else check_scale(scale, shape.head_dim)
    try:
        return launch_decode(q, k_cache, v_cache, shape, cache_seqlens=lens, causal=causal, scale=scale,
                             config=choice.config)[0]
    except Exception as error:
        if choice.source not in _STORED or launch_failure(error) not in _COMPILE_FAILURES:
            raise
        plan = dispatch.kvcache_config_failed(q, k_cache, v_cache, causal, has_lens, choice, error)
        return launch_decode(q, k_cache, v_cache, shape, cache_seqlens=lens, causal=causal, scale=scale,
                             config=plan.choice.config)[0]
