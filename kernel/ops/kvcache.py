"""The kvcache op (split-KV decode): its knobs, split planning, default config, shared-memory model and the
launch of its two passes (kernel/jit/decode.py), with the direct relaunch of a decode loop (DecodeLaunch)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import triton

from ...db.arch import ARCH_SMEM, normalize_arch
from ...db.types import INT32_MAX, Config, normalize_dtype

from .. import device as _device
from .. import fastlaunch
from ..checks import AttnShape
from ..jit.common import GRID_X_MAX, LOG2E, softcap_factors
from ..jit.decode import decode_combine_kernel, decode_split_kernel
from ..mods import NO_MODS, ScoreMods
from .common import check_smem, padded_head_dim
from .fwd import estimate_smem


SPLITS_KNOB = "num_splits"


def _cdiv(a: int, b: int) -> int:
    """Ceiling division of ints on the host: triton.cdiv is a JIT function, whose every host call
    goes through the launcher's argument binding (about 10 us; the plan of a decode call makes four)."""
    return -(-a // b)


# Split sizing for the default config (the tuner searches num_splits itself); the H200 measurements
# behind these numbers are in `default_num_splits`.
TARGET_PROGRAMS_PER_SM = 2  # occupancy floor: programs per SM, rounded down (see default_num_splits)


MAX_SPLIT_KEYS = 2048  # the split length for long caches; a ragged batch then launches as a uniform one


MIN_SPLIT_TILES = 4  # a split shorter than this many BLOCK_N tiles is mostly prologue and epilogue


DEFAULT_SM_COUNT = 132  # H100/H200; used when no device is known (planning, the interpreter)


def decode_block_d(head_dim: int) -> int:
    """The padded head-dim tile: the next power of two, at least 16 (kernel.ops.common.padded_head_dim)."""
    return padded_head_dim(head_dim)


def decode_knobs(config: Config) -> int:
    """The config's num_splits after checking its knobs: ValueError naming a knob the decode kernel
    does not know (it takes `num_splits`, a positive int) or a bad value."""
    for name, value in config.extra:
        if name == SPLITS_KNOB:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config {config}: {SPLITS_KNOB} must be a positive int, got {value!r}")
        elif not (name == "provider" and value == "kernel"):
            raise ValueError(f"config {config}: the decode kernel does not know the knob {name!r} "
                             f"(it takes {SPLITS_KNOB})")
    return int(config.extra_dict.get(SPLITS_KNOB, 1))


def num_splits_of(config: Config) -> int:
    """The config's requested split count (`extra["num_splits"]`, 1 when absent)."""
    return int(config.extra_dict.get(SPLITS_KNOB, 1))


@dataclass(frozen=True)
class DecodePlan:
    """The launch geometry for one call: split size (keys, a multiple of BLOCK_N) and counts."""

    split_size: int
    num_splits: int  # effective: cdiv(Nmax, split_size), may be less than the config asked for
    num_m_blocks: int
    block_d: int

    @property
    def split(self) -> bool:
        """Whether pass 2 runs (more than one split)."""
        return self.num_splits > 1


def plan_decode(config: Config, *, batch: int, heads_kv: int, group: int, seq_q: int, seq_kv: int,
                head_dim: int, ragged: bool = False) -> DecodePlan:
    """Split size and grid counts for `config` on these sizes.

    split_size = BLOCK_N · cdiv(cdiv(Nmax, num_splits), BLOCK_N); the effective split count is then
    cdiv(Nmax, split_size), so no split is empty for a full-length sequence (e.g. Nmax=100,
    num_splits=3, BLOCK_N=64 runs 2 splits of 64 keys).

    `ragged` (the call passes cache_seqlens): the split count is at least the one that keeps splits
    to the default's long-cache length (`ragged_min_splits`). A ragged batch's time is that of its
    longest sequences' splits; a config tuned on full caches may ask for a few long splits (2 of
    16k keys won B=8 Nk=32k on the H200), which the long sequences of a ragged batch then run alone
    while most programs exit at once (1.30x the time of the uniform batch of the same total).
    """
    requested = max(1, num_splits_of(config))
    if ragged:
        requested = max(requested, ragged_min_splits(seq_kv, group * seq_q))
    tiles = _cdiv(seq_kv, config.block_n)
    split_size = _cdiv(tiles, min(requested, tiles)) * config.block_n
    num_splits = _cdiv(seq_kv, split_size)
    num_m_blocks = _cdiv(group * seq_q, config.block_m)
    return DecodePlan(split_size, num_splits, num_m_blocks, decode_block_d(head_dim))


def ragged_min_splits(seq_kv: int, rows: int) -> int:
    """The fewest splits a call with cache_seqlens runs: splits of at most the default's long-cache
    length, MAX_SPLIT_KEYS · max(1, rows // 16) keys (`default_num_splits`)."""
    return _cdiv(seq_kv, MAX_SPLIT_KEYS * max(1, rows // 16))


def estimate_decode_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None) -> int:
    """Estimated shared memory of pass 1 with `config`: the forward kernel's model at the padded D.

    The inner loop is the forward kernel's (a Q tile staged once, K/V tiles buffered by the
    pipeline, P converted through shared memory on the mma.sync path), so `kernel.ops.fwd` applies with
    the head dim padded as this kernel pads it (to at least 16). Pass 2 uses no shared memory to
    speak of. Not yet measured against compiled kernels over the decode space.
    """
    return estimate_smem(config, decode_block_d(head_dim), dtype, arch)


_DECODE_PREFERENCE: tuple[tuple[int, int, int], ...] = (
    # (block_n, num_warps, num_stages), best first; the first that fits the arch's shared memory wins.
    # n64-w4-s2 won 6 of the 11 H200 decode cases (bench/results/h200/decode_bench.csv) and was within 5 %
    # of the best in 4 more; 3 stages won 2 and lost up to 10 % elsewhere.
    (64, 4, 2), (64, 4, 3), (32, 4, 2), (32, 4, 1), (16, 2, 1),
)


def default_decode_config(seq_q: int, seq_kv: int, head_dim: int, dtype: str, *, batch_heads: int, group: int,
                          sm_count: int | None = None, arch: str | None = None,
                          smem_limit: int | None = None) -> Config:
    """The decode config a call gets when nothing was tuned for it.

    batch_heads is B·Hq and group Hq/Hkv, as in the tuning key. M tile: the packed rows G·Nq
    rounded up to a power of two, 16 to 64 (128 for D <= 64). Tile, warps and stages: the first of
    `_DECODE_PREFERENCE` that fits the shared memory. Splits: `default_num_splits`.
    """
    dtype = normalize_dtype(dtype)
    rows = group * seq_q
    block_m = min(max(16, triton.next_power_of_2(rows)), 128 if head_dim <= 64 else 64)
    try:
        known = normalize_arch(arch) if arch is not None else None
    except ValueError:
        known = None
    if smem_limit is None:
        smem_limit = ARCH_SMEM[known] if known else min(ARCH_SMEM.values())
    block_n, warps, stages = _DECODE_PREFERENCE[-1]
    for bn, w, s in _DECODE_PREFERENCE:
        if head_dim > 128 and bn > 32:
            continue  # a 64 x 256 K/V tile pair crowds the register file at a 16-row query tile
        if estimate_decode_smem(Config(block_m, bn, w, s), head_dim, dtype, known) <= smem_limit:
            block_n, warps, stages = bn, w, s
            break
    splits = default_num_splits(seq_kv, block_n, batch_heads_kv=max(1, batch_heads // max(1, group)),
                                rows=rows, block_m=block_m, sm_count=sm_count)
    return Config(block_m, block_n, warps, stages, ((SPLITS_KNOB, splits),))


def default_num_splits(seq_kv: int, block_n: int, *, batch_heads_kv: int, rows: int = 1, block_m: int = 16,
                       sm_count: int | None = None) -> int:
    """The split count of `default_decode_config`. `rows` = G·Nq per KV head, `seq_kv` = Nmax.

    splits = max(cdiv(Nmax, MAX_SPLIT_KEYS · max(1, rows // 16)),
                 TARGET_PROGRAMS_PER_SM · SMs // (B·Hkv · row blocks)),
    then no split shorter than MIN_SPLIT_TILES tiles and at most the grid limit.

    Derived from the H200 sweep (bench/results/h200/decode_bench.csv: bf16, D=128, Hq=32, Hkv=8, 132
    SMs; num_splits timed at the old rule's choice, its half and its double):
    - Long caches want splits of about 2048 keys: B=8 Nk=32k won with 16 splits (4.13 TB/s; 32
      splits of 1024 keys 4.07, 64 splits 3.96), B=8 Nk=16k with 8, the ragged and uniform B=32
      batches with 8-16. Shorter splits add partials traffic and per-program prologues for nothing.
    - A batch with few KV heads needs the splits for occupancy, but about 2 programs per SM are
      enough, rounded down: B=8 (64 KV heads) Nk=4k ran at 2.46-2.60 TB/s with 4 splits (256
      programs) and 1.07-1.35 with 9 or 18 (the old rule, 4 per SM rounded up, picked 9: 1.15).
    - A batch with many KV heads needs no split: B=64 Nk=2k (512 KV heads) 3.94 TB/s with 1 split,
      3.77 with 2, 3.63 with 4; B=64 Nq=8 the same (3.86 with 1, 3.16 with 2).
    The split-length cap grows with the rows per KV head: each split writes rows·D fp32 partials
    (and pass 2 reads them back) against split·D·2 elements of K and V, so the cap keeps that
    traffic near 2·rows/MAX_SPLIT_KEYS of the cache's (under 1 % for 8 rows), never the bulk.

    Ragged batches: the split size is one number for the batch, chosen from Nmax, and splits past
    a sequence's length exit at once, so a batch runs about Σ cdiv(len_b, split_size)·Hkv live
    programs. Whenever the length term decides (B·Hkv·Nmax/MAX_SPLIT_KEYS ≥ 2 programs per SM, e.g.
    any B=8 Hkv=8 batch of 8k keys or more) the split size is MAX_SPLIT_KEYS·max(1, rows // 16)
    for the ragged batch and for the uniform batch of the same total length alike, so both launch
    the same number of live programs. Where the occupancy term decides (short caches, few heads)
    a ragged batch, whose Nmax exceeds its mean length, gets longer splits than the uniform one.
    """
    sms = sm_count or DEFAULT_SM_COUNT
    tiles = _cdiv(seq_kv, block_n)
    programs = batch_heads_kv * _cdiv(rows, block_m)  # per split
    splits = max(ragged_min_splits(seq_kv, rows), TARGET_PROGRAMS_PER_SM * sms // programs)
    splits = min(splits, max(1, tiles // MIN_SPLIT_TILES))
    splits = min(splits, max(1, GRID_X_MAX // programs))
    return max(1, splits)


def decode_bytes(*, batch: int, heads_q: int, heads_kv: int, seq_q: int, kv_tokens: int, head_dim: int,
                 elt: int) -> int:
    """Bytes a decode call must move: K and V of the live tokens (summed over the batch), Q and O."""
    return 2 * heads_kv * kv_tokens * head_dim * elt + 2 * batch * heads_q * seq_q * head_dim * elt


def combine_block_s(num_splits: int) -> int:
    """Splits merged per step of pass 2: all of them (rounded up to a power of two, at least 2) up to 16,
    else chunks of 16. Plain int arithmetic: triton.next_power_of_2 is a constexpr function, whose host
    call costs a decode step about a microsecond."""
    return min(16, max(2, 1 << (num_splits - 1).bit_length()))


def combine_warps(block_d: int) -> int:
    """Warps of pass 2: it is a tiny (BLOCK_S x BLOCK_D) reduction."""
    return 4 if block_d >= 128 else 2


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
    if programs > INT32_MAX:
        raise ValueError(f"config {config} needs {programs} programs for these sizes, more than CUDA's grid limit "
                         "2**31-1: use fewer splits or a larger block_m, or split the batch")
    if smem_limit is not None:
        check_smem(f"config {config}", estimate_decode_smem(config, shape.head_dim, shape.dtype, arch),
                   shape.head_dim, shape.dtype, smem_limit)


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


_LAUNCHERS_LIMIT = 64  # specialisations kept per plan; a new one beyond goes through the JIT once more


def decode_partials(shape: AttnShape, plan: DecodePlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh scratch for pass 1: ACC (B·Hq·Nq, S, D) and LSE (B·Hq·Nq, S), fp32."""
    rows = shape.batch * shape.heads_q * shape.seq_q
    return (torch.empty((rows, plan.num_splits, shape.head_dim), device=device, dtype=torch.float32),
            torch.empty((rows, plan.num_splits), device=device, dtype=torch.float32))


def split_geometry(seq_kv: int, block_n: int, requested: int, ragged_rows: int = 0) -> tuple[int, int]:
    """(split_size, num_splits) for a cache of `seq_kv` keys: kernel.ops.kvcache.plan_decode's rule on plain ints.

    split_size = BLOCK_N · cdiv(cdiv(Nmax, requested), BLOCK_N), then cdiv(Nmax, split_size) splits;
    with cache_seqlens (`ragged_rows` = G·Nq, 0 without) at least `ragged_min_splits`. The
    per-call path uses this instead of plan_decode (which builds a Config lookup and a dataclass per
    call); tests/kernel/test_decode_host.py checks that the two agree.
    """
    if ragged_rows:
        requested = max(requested, ragged_min_splits(seq_kv, ragged_rows))
    tiles = -(-seq_kv // block_n)
    split_size = -(-tiles // min(requested, tiles)) * block_n
    return split_size, -(-seq_kv // split_size)


# Pass 1's modifier arguments after cap_in, cap_out for a call without window, sinks or ALiBi (window sides,
# the sinks and ALiBi pointers, ALiBi's strides), and pass 2's after num_splits (window sides, sinks): the
# kernels read none of them (their flags are off); None pointers compile as constants.
_NO_SPLIT_MODS: tuple[Any, ...] = (0, 0, None, None, 0, 0)
_NO_COMBINE_MODS: tuple[Any, ...] = (0, 0, None)
_NO_MOD_FLAGS = (False, False, False)
# Pass 1's block-table arguments (Table, stride_tb, num_pages) for a contiguous cache: PAGED=False never reads them.
_NO_PAGES: tuple[Any, ...] = (None, 0, 0)


def _split_constexprs(head_dim: int, block_d: int, config: Config, causal: bool, has_lens: bool, split: bool,
                      fp32_precision: str, capped: bool,
                      flags: tuple[bool, bool, bool] = _NO_MOD_FLAGS, page_size: int = 0) -> dict[str, Any]:
    """Pass 1's constexprs; `flags` = (WINDOW, SINKS, ALIBI) from `decode_mod_args`; `page_size` > 0 for a
    paged cache (PAGED, PAGE_SIZE), 0 for a contiguous one."""
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                CAUSAL=bool(causal), HAS_SEQLENS=has_lens, SPLIT=split, PRECISION=fp32_precision, SOFTCAP=capped,
                WINDOW=flags[0], SINKS=flags[1], ALIBI=flags[2], PAGED=page_size > 0, PAGE_SIZE=page_size or 16,
                num_warps=config.num_warps, num_stages=config.num_stages)


_NO_CAP = (0.0, 0.0)  # pass 1's cap_in, cap_out when SOFTCAP=False: it never reads them


def _cap_args(scale: float, softcap: float) -> tuple[float, float]:
    """Pass 1's (cap_in, cap_out) for cap `softcap` (0.0: off, then unused zeros)."""
    return softcap_factors(scale, softcap) if softcap else _NO_CAP


def _combine_constexprs(head_dim: int, block_d: int, num_splits: int, has_lens: bool,
                        flags: tuple[bool, bool] = (False, False)) -> dict[str, Any]:
    """Pass 2's constexprs; `flags` = (WINDOW, SINKS) from `decode_mod_args`."""
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=combine_block_s(num_splits), HAS_SEQLENS=has_lens,
                WINDOW=flags[0], SINKS=flags[1], num_warps=combine_warps(block_d), num_stages=1)




def decode_mod_args(mods: ScoreMods, causal: bool) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[bool, bool, bool]]:
    """(pass 1's modifier arguments, pass 2's, (WINDOW, SINKS, ALIBI)) for `mods` (softcap apart: `_cap_args`).
    ValueError for a mask or dropout, which the decode kernel does not take."""
    if mods.plain:
        return _NO_SPLIT_MODS, _NO_COMBINE_MODS, _NO_MOD_FLAGS
    if mods.mask is not None or mods.dropout_p:
        raise ValueError("the decode kernel takes no attn_mask and no dropout")
    before, after = mods.window_sides(causal)
    alibi = mods.alibi
    split = (before, after, mods.sinks, alibi, *(alibi.stride() if alibi is not None else (0, 0)))
    return split, (before, after, mods.sinks), (mods.windowed, mods.sinks is not None, alibi is not None)


def _split_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, acc: torch.Tensor,
                lse: torch.Tensor, lens: torch.Tensor, stride_s: int, o_strides: tuple[int, ...], heads_kv: int,
                seq_q: int, seq_kv: int, group: int, split_size: int, num_splits: int, num_m_blocks: int,
                scale: float, caps: tuple[float, float],
                mod_args: tuple[Any, ...] = _NO_SPLIT_MODS, block_table: torch.Tensor | None = None) -> tuple[Any, ...]:
    """Pass 1's positional arguments (decode_split_kernel's order); `caps` from `cap_args`, `mod_args` from
    `decode_mod_args`. With `block_table`, k and v are the paged caches (num_pages, page_size, Hkv, D), passed
    as their (num_pages, Hkv, page_size, D) views: the kernel reads the page stride where a contiguous cache
    has its batch stride."""
    if block_table is None:
        pages = _NO_PAGES
    else:
        pages = (block_table, block_table.stride(0), k.shape[0])
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    return (q, k, v, o, acc, lse, lens, stride_s, *q.stride(), *k.stride(), *v.stride(), *o_strides,
            heads_kv, seq_q, seq_kv, group, split_size, num_splits, num_m_blocks, scale * LOG2E, *caps, *mod_args,
            *pages)


def _combine_args(acc: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, lens: torch.Tensor, stride_s: int,
                  o_strides: tuple[int, ...], heads_q: int, seq_q: int, seq_kv: int, split_size: int,
                  num_splits: int, mod_args: tuple[Any, ...] = _NO_COMBINE_MODS) -> tuple[Any, ...]:
    """Pass 2's positional arguments (decode_combine_kernel's order)."""
    return (acc, lse, o, lens, stride_s, *o_strides, heads_q, seq_q, seq_kv, split_size, num_splits, *mod_args)


def launch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, shape: AttnShape, *,
                  cache_seqlens: torch.Tensor | None, causal: bool, scale: float, config: Config,
                  out: torch.Tensor | None = None, partials: tuple[torch.Tensor, torch.Tensor] | None = None,
                  fp32_precision: str = "ieee", mods: ScoreMods = NO_MODS,
                  block_table: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """Launch the split-KV kernel with no input checks; returns (o, compiled kernels of the passes run).

    The tuner and the explicit-config path call this after validating once (`check_kvcache_inputs`,
    `check_cache_seqlens`, `check_decode_config`); it always goes through Triton's JIT. Unknown
    config knobs raise ValueError; Triton's own errors (OutOfResources, CompilationError) propagate
    unchanged so the tuner can record them. `out` (laid out like q, any strides) and `partials`
    (from `decode_partials`) may be given preallocated; the compiled-kernel tuple holds pass 1, then
    pass 2 when it ran (entries are None under the interpreter). `mods` (kernel.mods, checked by the caller):
    softcap, window and ALiBi bottom-right aligned like causal (query i's diagonal key is len − Nq + i),
    sinks; NO_MODS compiles today's kernels. ValueError for an attn_mask or dropout (decode has neither).
    `block_table` (B, max_pages) int32 (checked: kernel.checks.check_block_table): the caches are paged,
    (num_pages, page_size, Hkv, D), and `shape` is the equivalent contiguous one (seq_k = max_pages·page_size);
    the splits walk the sequence's key positions, each column reading its page through the table.
    """
    decode_knobs(config)
    split_mods, combine_mods, (window, sinks, alibi) = decode_mod_args(mods, causal)
    softcap = mods.softcap
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
                     shape.seq_k, shape.group, plan.split_size, plan.num_splits, plan.num_m_blocks, scale,
                     _cap_args(scale, softcap), split_mods, block_table),
        **_split_constexprs(shape.head_dim, plan.block_d, config, causal, has_lens, plan.split, fp32_precision,
                            bool(softcap), (window, sinks, alibi),
                            0 if block_table is None else k_cache.shape[1]))
    if not plan.split:
        return o, (first,)
    second = decode_combine_kernel[(shape.batch * shape.heads_q * shape.seq_q,)](
        *_combine_args(acc, lse, o, lens, stride_s, o_strides, shape.heads_q, shape.seq_q, shape.seq_k,
                       plan.split_size, plan.num_splits, combine_mods),
        **_combine_constexprs(shape.head_dim, plan.block_d, plan.num_splits, has_lens, (window, sinks)))
    return o, (first, second)


class DecodeLaunch:
    """attention_kvcache's launch of one config for one plan (kernel.dispatch.KVCachePlan), per call.

    Built once per plan, i.e. per signature with the cache length bucketed: everything but the
    cache length Nmax and the caches' strides is fixed, so the geometry's constants are computed
    here once and a call only sizes its splits for its own Nmax (`split_geometry`: the config's
    num_splits is a count, so the split size follows Nmax). One split runs pass 1 alone, writing O;
    several run both passes, with one fp32 scratch allocation holding ACC then LSE.

    The launch is launch_decode's, with the same arguments; on CUDA each pass's compiled kernel is
    kept and relaunched directly (kernel.fastlaunch), keyed by the specialisation of what can still
    change between the plan's calls: the strides of the caches and of cache_seqlens, Nmax, the
    split size and count (and the combine pass's BLOCK_S), whether the call caps its scores (pass 1's
    SOFTCAP; the cap itself is a runtime argument, so the plan holds nothing cap-specific and serves
    calls with and without one), and the 16-byte alignment of q, the caches and cache_seqlens. The
    other arguments are fixed by the plan's memo key (q's shape and strides, Hkv, D, causal, whether
    lengths are given), and the output and scratch are fresh allocations, which the CUDA caching
    allocator aligns to 512 bytes (LSE starts R·S·D floats in, a multiple of 32 bytes). A relaunch
    passes the tensors' addresses as ints: Triton's launcher takes an int pointer as it is, where a
    tensor costs it a `data_ptr()` call and a driver query (cuPointerGetAttribute) per pointer argument.
    A new key launches through the JIT once (which compiles that variant if needed). Never under the
    interpreter or while torch.compile traces the call.
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
        # (split, capped) -> pass 1's constexprs: the cap comes per call, as the plan is shared by calls
        # with and without one
        self.split_kw = {(split, capped): _split_constexprs(shape.head_dim, geometry.block_d, config, causal, ragged,
                                                            split, "ieee", capped)
                         for split in (False, True) for capped in (False, True)}
        # specialisation key -> (pass 1, pass 2 or None); None entries launch through the JIT
        self.launchers: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_kv: int,
                 cache_seqlens: torch.Tensor | None, scale: float, mods: ScoreMods = NO_MODS,
                 block_table: torch.Tensor | None = None) -> torch.Tensor:
        """The output for one checked call: q and caches of this plan's signature, `seq_kv` = Nmax, `mods` the
        checked modifiers (kernel.mods; no mask, no dropout). The cap selects pass 1's SOFTCAP variant per
        call (part of the relaunch key); calls with a window, sinks or ALiBi (not `mods.plain`) launch
        through the JIT. `block_table` (checked): paged caches (launch_decode), with seq_kv = max_pages·page_size;
        such calls launch through the JIT too."""
        softcap = mods.softcap
        capped = softcap != 0.0
        split_size, num_splits = split_geometry(seq_kv, self.block_n, self.requested, self.ragged_rows)
        o = torch.empty_like(q)
        partials = self.rows * num_splits * self.head_dim  # ACC's floats; LSE follows
        scratch = (torch.empty(partials + self.rows * num_splits, device=o.device, dtype=torch.float32)
                   if num_splits > 1 else None)
        if (mods is not NO_MODS and not mods.plain) or block_table is not None:  # the plain step: one identity test
            return self._jit(q, k_cache, v_cache, o, scratch, partials, seq_kv, cache_seqlens, split_size,
                             num_splits, scale, mods, None, block_table)
        if q.is_cuda and not fastlaunch.disabled() and not torch.compiler.is_compiling():
            q_ptr, k_ptr, v_ptr, o_ptr = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), o.data_ptr()
            if cache_seqlens is None:
                lens_ptr, stride_s = o_ptr, 0  # unused when HAS_SEQLENS=False
            else:
                lens_ptr, stride_s = cache_seqlens.data_ptr(), cache_seqlens.stride(0)
            k_strides, v_strides = k_cache.stride(), v_cache.stride()
            ints = (stride_s, *k_strides, *v_strides, seq_kv, split_size, num_splits)
            key = (combine_block_s(num_splits) if scratch is not None else 0, capped,
                   *fastlaunch.specialization(ints, ()),
                   q_ptr % 16 == 0, k_ptr % 16 == 0, v_ptr % 16 == 0, lens_ptr % 16 == 0)
            kept = self.launchers.get(key)
            if kept is not None:
                first, second = kept
                stream = fastlaunch.current_stream(first.device) if first is not None else None
                if stream is not None:
                    o_strides = o.stride()
                    if scratch is None:
                        acc_ptr = lse_ptr = o_ptr  # unused: pass 1 writes O
                    else:
                        acc_ptr = scratch.data_ptr()
                        lse_ptr = acc_ptr + 4 * partials
                    args = (q_ptr, k_ptr, v_ptr, o_ptr, acc_ptr, lse_ptr, lens_ptr, stride_s, *q.stride(), *k_strides,
                            *v_strides, *o_strides, self.heads_kv, self.seq_q, seq_kv, self.group, split_size,
                            num_splits, self.num_m_blocks, scale * LOG2E,
                            *_cap_args(scale, softcap), *_NO_SPLIT_MODS, *_NO_PAGES)
                    if first.launch(stream, (self.programs * num_splits, 1, 1), args):
                        if scratch is None:
                            return o
                        combine = (acc_ptr, lse_ptr, o_ptr, lens_ptr, stride_s, *o_strides, self.heads_q,
                                   self.seq_q, seq_kv, split_size, num_splits, *_NO_COMBINE_MODS)
                        if second is None or not second.launch(stream, (self.rows, 1, 1), combine):
                            # pass 1 ran; pass 2 through the JIT, which needs tensors where the relaunch took ints
                            acc, lse = self._partials(scratch, partials, num_splits)
                            lens = o if cache_seqlens is None else cache_seqlens
                            self._combine(_combine_args(acc, lse, o, lens, stride_s, o_strides, self.heads_q,
                                                        self.seq_q, seq_kv, split_size, num_splits), num_splits)
                        return o
                key = None  # launch both passes through the JIT, keep what is kept
        else:
            key = None
        return self._jit(q, k_cache, v_cache, o, scratch, partials, seq_kv, cache_seqlens, split_size, num_splits,
                         scale, mods, key)

    def _jit(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, o: torch.Tensor,
             scratch: torch.Tensor | None, partials: int, seq_kv: int, cache_seqlens: torch.Tensor | None,
             split_size: int, num_splits: int, scale: float, mods: ScoreMods,
             key: tuple[Any, ...] | None, block_table: torch.Tensor | None = None) -> torch.Tensor:
        """Both passes through Triton's JIT on tensors (views of the scratch); keeps the compiled passes
        under `key` for direct relaunch (None: keep nothing; always for calls that are not `mods.plain` and
        for paged ones, `block_table` given)."""
        softcap = mods.softcap
        split_mods, combine_mods, flags = decode_mod_args(mods, self.causal)
        split = scratch is not None
        if split:
            acc, lse = self._partials(scratch, partials, num_splits)
        else:
            acc = lse = o  # unused: pass 1 writes O
        if cache_seqlens is None:
            lens, stride_s = o, 0  # unused when HAS_SEQLENS=False
        else:
            lens, stride_s = cache_seqlens, cache_seqlens.stride(0)
        o_strides = o.stride()
        args = _split_args(q, k_cache, v_cache, o, acc, lse, lens, stride_s, o_strides, self.heads_kv, self.seq_q,
                           seq_kv, self.group, split_size, num_splits, self.num_m_blocks, scale,
                           _cap_args(scale, softcap), split_mods, block_table)
        capped = softcap != 0.0
        grid = self.programs * num_splits
        combine = (_combine_args(acc, lse, o, lens, stride_s, o_strides, self.heads_q, self.seq_q, seq_kv, split_size,
                                 num_splits, combine_mods) if split else None)
        if mods.plain and block_table is None:
            compiled = decode_split_kernel[(grid,)](*args, **self.split_kw[split, capped])
            second = self._combine(combine, num_splits) if combine is not None else None
        else:
            compiled = decode_split_kernel[(grid,)](*args, **_split_constexprs(
                self.head_dim, self.block_d, self.config, self.causal, self.has_lens, split, "ieee", capped, flags,
                0 if block_table is None else k_cache.shape[1]))
            second = self._combine(combine, num_splits, flags[:2]) if combine is not None else None
        if key is not None:
            self._keep(key, (grid,), args, compiled, combine, second, split, capped, num_splits)
        return o

    def _partials(self, scratch: torch.Tensor, partials: int, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ACC (R, S, D) and LSE (R, S), the views of the scratch whose addresses the relaunch passes."""
        return (scratch[:partials].view(self.rows, num_splits, self.head_dim),
                scratch[partials:].view(self.rows, num_splits))

    def _combine(self, args: tuple[Any, ...], num_splits: int, flags: tuple[bool, bool] = (False, False)) -> Any:
        return decode_combine_kernel[(self.rows,)](*args, **_combine_constexprs(self.head_dim, self.block_d, num_splits,
                                                                                  self.has_lens, flags))

    def _keep(self, key: tuple[Any, ...], grid: tuple[int], args: tuple[Any, ...], compiled: Any,
              combine: tuple[Any, ...] | None, second: Any, split: bool, capped: bool, num_splits: int) -> None:
        first = fastlaunch.build(decode_split_kernel, compiled, grid, args, self.split_kw[split, capped], len(args))
        relaunch_second = None
        if combine is not None:
            relaunch_second = fastlaunch.build(decode_combine_kernel, second, (self.rows,), combine,
                                               _combine_constexprs(self.head_dim, self.block_d, num_splits,
                                                                   self.has_lens), len(combine))
        if len(self.launchers) >= _LAUNCHERS_LIMIT:
            self.launchers.clear()
        self.launchers[key] = (first, relaunch_second)
