"""`attention_kvcache`: a few new queries against a KV cache (decoding, chunked prefill, speculation).

The checked public entry point and the unchecked launch of the split-KV kernel (kernel/decode.py).
`attention()` stays the SDPA drop-in (top-left causal); this one follows flash_attn's cache
conventions: per-sequence valid lengths and bottom-right causal alignment.
"""
from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Any

import torch

from ..db.types import Config

from . import device as _device
from . import fastlaunch
from .decode import (DecodePlan, combine_block_s, combine_warps, decode_combine_kernel, decode_knobs,
                     decode_split_kernel, default_decode_config, estimate_decode_smem, plan_decode,
                     ragged_min_splits)
from .errors import launch_failure
from .launch import AttnShape, check_qkv, check_runnable, check_scale, needs_grad

__all__ = ["DecodeLaunch", "attention_kvcache", "check_cache_seqlens", "check_decode_config",
           "check_kvcache_inputs", "decode_config_for", "decode_partials", "launch_decode", "run_planned",
           "split_geometry"]

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
    return _check_lengths(cache_seqlens, shape.batch, shape.seq_q, shape.seq_k, device, causal, check_values)


def _check_lengths(cache_seqlens: Any, batch: int, seq_q: int, seq_kv: int, device: torch.device, causal: bool,
                   check_values: bool) -> torch.Tensor | None:
    # check_cache_seqlens on plain sizes: the planned path has the exact cache length Nmax = seq_kv
    # per call while its plan is shared by every length of a bucket.
    if cache_seqlens is None:
        if causal and seq_q > seq_kv:
            raise ValueError(f"causal=True needs at least as many cached keys as queries: Nq={seq_q} > "
                             f"Nmax={seq_kv} (query 0 would see no key with bottom-right alignment)")
        return None
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be None or an int32 torch.Tensor of shape ({batch},), got "
                        f"{type(cache_seqlens).__name__}")
    if cache_seqlens.is_nested or cache_seqlens.layout is not torch.strided:
        raise TypeError("cache_seqlens must be a dense (strided) tensor")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens has dtype {cache_seqlens.dtype}; it must be torch.int32 "
                        "(convert with .to(torch.int32))")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},) (one length per sequence), got "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device}; it must be on q's device {device}")
    if check_values and _lengths_checkable(cache_seqlens):
        lengths = cache_seqlens.cpu()
        bad = (lengths < 0) | (lengths > seq_kv)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache_seqlens[{i}] = {int(lengths[i])} is out of range: lengths must be from 0 to "
                             f"the cache length Nmax={seq_kv}")
        if causal:
            short = (lengths > 0) & (lengths < seq_q)
            if bool(short.any()):
                i = int(short.nonzero()[0, 0])
                raise ValueError(f"cache_seqlens[{i}] = {int(lengths[i])} is shorter than the {seq_q} queries "
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

_LOG2E = 1.4426950408889634  # log2(e): exp2 in-kernel
_CACHE_STRIDES = slice(12, 20)  # k's and v's strides among pass 1's arguments (after 7 tensors, stride_s, q's)
_LAUNCHERS_LIMIT = 64  # specialisations kept per plan; a new one beyond goes through the JIT once more


def decode_partials(shape: AttnShape, plan: DecodePlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh scratch for pass 1: ACC (B·Hq·Nq, S, D) and LSE (B·Hq·Nq, S), fp32."""
    rows = shape.batch * shape.heads_q * shape.seq_q
    return (torch.empty((rows, plan.num_splits, shape.head_dim), device=device, dtype=torch.float32),
            torch.empty((rows, plan.num_splits), device=device, dtype=torch.float32))


def split_geometry(seq_kv: int, block_n: int, requested: int, ragged_rows: int = 0) -> tuple[int, int]:
    """(split_size, num_splits) for a cache of `seq_kv` keys: kernel.decode.plan_decode's rule on plain ints.

    split_size = BLOCK_N · cdiv(cdiv(Nmax, requested), BLOCK_N), then cdiv(Nmax, split_size) splits;
    with cache_seqlens (`ragged_rows` = G·Nq, 0 without) at least `ragged_min_splits`. The
    per-call path uses this instead of plan_decode (which builds a Config lookup and a dataclass per
    call); tests/test_decode_host.py checks that the two agree.
    """
    if ragged_rows:
        requested = max(requested, ragged_min_splits(seq_kv, ragged_rows))
    tiles = -(-seq_kv // block_n)
    split_size = -(-tiles // min(requested, tiles)) * block_n
    return split_size, -(-seq_kv // split_size)


def _split_constexprs(head_dim: int, block_d: int, config: Config, causal: bool, has_lens: bool, split: bool,
                      fp32_precision: str) -> dict[str, Any]:
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                CAUSAL=bool(causal), HAS_SEQLENS=has_lens, SPLIT=split, PRECISION=fp32_precision,
                num_warps=config.num_warps, num_stages=config.num_stages)


def _combine_constexprs(head_dim: int, block_d: int, num_splits: int, has_lens: bool) -> dict[str, Any]:
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=combine_block_s(num_splits), HAS_SEQLENS=has_lens,
                num_warps=combine_warps(block_d), num_stages=1)


def _split_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, acc: torch.Tensor,
                lse: torch.Tensor, lens: torch.Tensor, stride_s: int, o_strides: tuple[int, ...], heads_kv: int,
                seq_q: int, seq_kv: int, group: int, split_size: int, num_splits: int, num_m_blocks: int,
                scale: float) -> tuple[Any, ...]:
    """Pass 1's positional arguments (decode_split_kernel's order)."""
    return (q, k, v, o, acc, lse, lens, stride_s, *q.stride(), *k.stride(), *v.stride(), *o_strides,
            heads_kv, seq_q, seq_kv, group, split_size, num_splits, num_m_blocks, scale * _LOG2E)


def _combine_args(acc: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, lens: torch.Tensor, stride_s: int,
                  o_strides: tuple[int, ...], heads_q: int, seq_q: int, seq_kv: int, split_size: int,
                  num_splits: int) -> tuple[Any, ...]:
    """Pass 2's positional arguments (decode_combine_kernel's order)."""
    return (acc, lse, o, lens, stride_s, *o_strides, heads_q, seq_q, seq_kv, split_size, num_splits)


def launch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, shape: AttnShape, *,
                  cache_seqlens: torch.Tensor | None, causal: bool, scale: float, config: Config,
                  out: torch.Tensor | None = None, partials: tuple[torch.Tensor, torch.Tensor] | None = None,
                  fp32_precision: str = "ieee") -> tuple[torch.Tensor, tuple[Any, ...]]:
    """Launch the split-KV kernel with no input checks; returns (o, compiled kernels of the passes run).

    The tuner and the explicit-config path call this after validating once (`check_kvcache_inputs`,
    `check_cache_seqlens`, `check_decode_config`); it always goes through Triton's JIT. Unknown
    config knobs raise ValueError; Triton's own errors (OutOfResources, CompilationError) propagate
    unchanged so the tuner can record them. `out` (laid out like q, any strides) and `partials`
    (from `decode_partials`) may be given preallocated; the compiled-kernel tuple holds pass 1, then
    pass 2 when it ran (entries are None under the interpreter).
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
    stride_s = lens.stride(0) if has_lens else 0
    o_strides = o.stride()
    grid = (plan.num_m_blocks * plan.num_splits * shape.batch * shape.heads_kv,)
    first = decode_split_kernel[grid](
        *_split_args(q, k_cache, v_cache, o, acc, lse, lens, stride_s, o_strides, shape.heads_kv, shape.seq_q,
                     shape.seq_k, shape.group, plan.split_size, plan.num_splits, plan.num_m_blocks, scale),
        **_split_constexprs(shape.head_dim, plan.block_d, config, causal, has_lens, plan.split, fp32_precision))
    if not plan.split:
        return o, (first,)
    second = decode_combine_kernel[(shape.batch * shape.heads_q * shape.seq_q,)](
        *_combine_args(acc, lse, o, lens, stride_s, o_strides, shape.heads_q, shape.seq_q, shape.seq_k,
                       plan.split_size, plan.num_splits),
        **_combine_constexprs(shape.head_dim, plan.block_d, plan.num_splits, has_lens))
    return o, (first, second)


class DecodeLaunch:
    """attention_kvcache's launch of one config for one plan (kernel.dispatch.KVCachePlan), per call.

    Built once per plan, i.e. per signature with the cache length bucketed: everything but the
    cache length Nmax and the caches' strides is fixed, so the geometry's constants are computed
    here once and a call only sizes its splits for its own Nmax (`split_geometry`: the config's
    num_splits is a count, so the split size follows Nmax). The launch is launch_decode's, with the
    same arguments; on CUDA each pass's compiled kernel is kept and relaunched directly
    (kernel.fastlaunch), keyed by the specialisation of what can still change between the plan's
    calls: the strides of the caches and of cache_seqlens, Nmax, the split size and count (and the
    combine pass's BLOCK_S), and the 16-byte alignment of q, the caches and cache_seqlens. The
    other arguments are fixed by the plan's memo key (q's shape and strides, Hkv, D, causal,
    whether lengths are given), and the output and scratch are fresh allocations, which the CUDA
    caching allocator aligns to 512 bytes. A new key launches through the JIT once (which compiles
    that variant if needed). Never under the interpreter or while torch.compile traces the call.
    """

    __slots__ = ("config", "head_dim", "block_d", "block_n", "requested", "ragged_rows", "heads_q", "heads_kv",
                 "seq_q", "group", "num_m_blocks", "programs", "rows", "causal", "has_lens", "split_kw",
                 "launchers")

    def __init__(self, shape: AttnShape, config: Config, *, causal: bool, ragged: bool) -> None:
        self.requested = decode_knobs(config)  # the split count asked for; ValueError for unknown knobs
        geometry = plan_decode(config, batch=shape.batch, heads_kv=shape.heads_kv, group=shape.group,
                               seq_q=shape.seq_q, seq_kv=shape.seq_k, head_dim=shape.head_dim, ragged=ragged)
        self.config = config
        self.head_dim = shape.head_dim
        self.block_d = geometry.block_d
        self.block_n = config.block_n
        self.ragged_rows = shape.group * shape.seq_q if ragged else 0
        self.heads_q, self.heads_kv, self.seq_q, self.group = shape.heads_q, shape.heads_kv, shape.seq_q, shape.group
        self.num_m_blocks = geometry.num_m_blocks
        self.programs = geometry.num_m_blocks * shape.batch * shape.heads_kv  # pass 1's programs per split
        self.rows = shape.batch * shape.heads_q * shape.seq_q  # pass 2's programs
        self.causal, self.has_lens = bool(causal), ragged
        self.split_kw = {split: _split_constexprs(shape.head_dim, geometry.block_d, config, causal, ragged, split,
                                                  "ieee") for split in (False, True)}
        # specialisation key -> (pass 1, pass 2 or None); None entries launch through the JIT
        self.launchers: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_kv: int,
                 cache_seqlens: torch.Tensor | None, scale: float) -> torch.Tensor:
        """The output for one checked call: q and caches of this plan's signature, `seq_kv` = Nmax."""
        split_size, num_splits = split_geometry(seq_kv, self.block_n, self.requested, self.ragged_rows)
        split = num_splits > 1
        o = torch.empty_like(q)
        if split:
            acc = torch.empty((self.rows, num_splits, self.head_dim), device=q.device, dtype=torch.float32)
            lse = torch.empty((self.rows, num_splits), device=q.device, dtype=torch.float32)
        else:
            acc = lse = o  # unused: pass 1 writes O
        if cache_seqlens is None:
            lens, stride_s = o, 0  # unused when HAS_SEQLENS=False
        else:
            lens, stride_s = cache_seqlens, cache_seqlens.stride(0)
        o_strides = o.stride()
        args = _split_args(q, k_cache, v_cache, o, acc, lse, lens, stride_s, o_strides, self.heads_kv, self.seq_q,
                           seq_kv, self.group, split_size, num_splits, self.num_m_blocks, scale)
        grid = self.programs * num_splits
        combine = (_combine_args(acc, lse, o, lens, stride_s, o_strides, self.heads_q, self.seq_q, seq_kv, split_size,
                                 num_splits) if split else None)
        key = None
        if q.is_cuda and not fastlaunch.disabled() and not torch.compiler.is_compiling():
            key = (combine_block_s(num_splits) if split else 0,
                   *fastlaunch.specialization((stride_s, *args[_CACHE_STRIDES], seq_kv, split_size, num_splits),
                                              (q, k_cache, v_cache, lens)))
            kept = self.launchers.get(key)
            if kept is not None:
                first, second = kept
                stream = fastlaunch.current_stream(first.device) if first is not None else None
                if stream is not None and first.launch(stream, (grid, 1, 1), args):
                    if combine is None or (second is not None and second.launch(stream, (self.rows, 1, 1), combine)):
                        return o
                    self._combine(combine, num_splits)  # pass 1 ran; pass 2 through the JIT
                    return o
                key = None  # launch both passes through the JIT, keep what is kept
        compiled = decode_split_kernel[(grid,)](*args, **self.split_kw[split])
        second = self._combine(combine, num_splits) if combine is not None else None
        if key is not None:
            self._keep(key, (grid,), args, compiled, combine, second, split)
        return o

    def _combine(self, args: tuple[Any, ...], num_splits: int) -> Any:
        return decode_combine_kernel[(self.rows,)](*args, **_combine_constexprs(self.head_dim, self.block_d, num_splits,
                                                                                  self.has_lens))

    def _keep(self, key: tuple[Any, ...], grid: tuple[int], args: tuple[Any, ...], compiled: Any,
              combine: tuple[Any, ...] | None, second: Any, split: bool) -> None:
        first = fastlaunch.build(decode_split_kernel, compiled, grid, args, self.split_kw[split], len(args))
        relaunch_second = None
        if combine is not None:
            relaunch_second = fastlaunch.build(decode_combine_kernel, second, (self.rows,), combine,
                                               _combine_constexprs(self.head_dim, self.block_d, combine[-1],
                                                                   self.has_lens), len(combine))
        if len(self.launchers) >= _LAUNCHERS_LIMIT:
            self.launchers.clear()
        self.launchers[key] = (first, relaunch_second)


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
    (arch, "kvcache", Nq, Nmax, D, dtype, causal, B·Hq bucket, Hq/Hkv), else the rules applied to
    Nmax rounded to its power-of-two bucket (the stored winner there, else the nearest tuned key,
    else the default decode config for this GPU)), memoised per input signature with Nmax bucketed,
    so a growing cache re-plans only when it enters the next bucket; the config's num_splits is a
    count and the split size follows the exact Nmax. On CUDA the compiled passes are relaunched
    directly (DecodeLaunch). A stored config that fails to compile here falls back to the default
    with one warning. Under FLASHTUNE_RECORD=1 the call counts its own key (its exact Nmax) for
    `tune --recorded --op kvcache`.

    Validating cache_seqlens' values reads them on the host: a copy and a sync that wait for the
    GPU's queue, which cost a decode step about as much as the kernel (B=8 ragged 32k cache on the
    H200: 1.77 against 3.64 TB/s). It is skipped during CUDA-graph capture or torch.compile tracing,
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
    return run_planned(q, k_cache, v_cache, cache_seqlens, causal, scale, check_lengths)


_planning: tuple[ModuleType, ModuleType] | None = None


def _dispatch_and_record() -> tuple[ModuleType, ModuleType]:
    # Imported on first use, not at the top: the tuner imports this module and must not load the
    # database; kept in a global because a function-level import costs every call a microsecond.
    global _planning
    if _planning is None:
        from . import dispatch, record

        _planning = (dispatch, record)
    return _planning


def run_planned(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor | None,
                causal: bool, scale: float | None, check_lengths: bool) -> torch.Tensor:
    """attention_kvcache(config=None) after its own argument checks (grad, causal a bool, check_lengths
    a bool): the transformers integration calls this directly.

    The dispatcher's plan (kernel.dispatch.kvcache_plan: memoised per signature with Nmax bucketed,
    the caches still validated per call), the checks that depend on the call's exact Nmax (causal
    with fewer keys than queries, the lengths' range), then the plan's DecodeLaunch, which
    relaunches the compiled passes directly on CUDA. A stored config that fails to compile falls
    back to the default with one warning.
    """
    dispatch, record = _dispatch_and_record()
    plan = dispatch.kvcache_plan(q, k_cache, v_cache, causal, cache_seqlens is not None)
    seq_kv = k_cache.shape[2]
    if record.ENABLED:
        key = dispatch.kvcache_key(plan, seq_kv)  # the call's own key, with its exact Nmax
        if key is not None:
            record.hit(key)
    shape = plan.shape
    lens = _check_lengths(cache_seqlens, shape.batch, shape.seq_q, seq_kv, q.device, causal, check_lengths)
    scale = plan.default_scale if scale is None else check_scale(scale, shape.head_dim)
    try:
        return plan.launch(q, k_cache, v_cache, seq_kv, lens, scale)
    except Exception as error:
        choice = plan.choice
        if choice.source not in _STORED or launch_failure(error) not in _COMPILE_FAILURES:
            raise
        plan = dispatch.kvcache_config_failed(q, k_cache, v_cache, causal, lens is not None, choice, error)
        return plan.launch(q, k_cache, v_cache, seq_kv, lens, scale)
