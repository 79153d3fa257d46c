"""The Gluon forward variant for Hopper (kernel/jit/fwd_gluon.py): knobs, shared-memory model, refusals, launch.

Knobs, carried in `Config.extra` (see `GLUON_KNOBS`):
- `loads`: "gluon" (this variant).
- `ws`: a one-warp TMA producer partition (`gl.warp_specialize`) beside the consumer warps; without it
  the consumer warps issue the loads themselves, `num_stages - 1` key tiles ahead.
- `consumers`: 1 or 2 consumer partitions. With 2 (needs `ws` and `block_m` 128) the block's two 64-row
  halves go to two 4-warp partitions with their own registers and instruction streams (FA3's two consumer
  warpgroups; their phases are not ordered on purpose, as FA3's named barriers do).
- `overlap`: FA3's intra-warpgroup pipeline: the next tile's QKᵀ and this tile's P·V are in flight on the
  tensor cores while the softmax runs (two async wgmma groups, `warpgroup_mma_wait(1)`); without it each
  product is waited on before the softmax that needs it.
- `schedule`: "grid" (query blocks in order), "heavy_first" (reversed, so a causal grid ends on its
  cheapest blocks) or "persistent" (about one wave of programs striding over the units, query-block major,
  causally the costliest blocks first; the K/V ring carries on from one unit to the next).

The tile: `block_m` 64 or 128 query rows with `num_warps = block_m // 16` consumer warps (the wgmma
layout stacks them along the rows), `block_n` 64 or 128 keys, `num_stages` 2 to 4 K/V ring stages.

It takes fp16/bf16, head dims 64 and 128, no score modifiers, layouts tensor descriptors can describe
(kernel.ops.fwd_tma.tma_refusal), on sm_90 CUDA devices; anything else is refused with a ValueError
before launching, so a caller can fall back to the pointer kernel. The variant exists only where the
Gluon module imports and compiles with this Triton's Gluon API (`GLUON_AVAILABLE`); elsewhere the tuner
never lists it and a config naming it is refused.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import torch
import triton

from ...db.types import DTYPE_BYTES, Config, normalize_dtype
from .. import device as _device
from ..jit.common import GRID_X_MAX, LOG2E
from ..mods import NO_MODS, ScoreMods
from .fwd_tma import (
    _clean_strides,
    _sm_resources,
    blocks_per_sm,
    ensure_allocator,
    tma_refusal,
)

try:  # the Gluon API moves between Triton versions: without a usable one the variant is simply absent
    from ..jit.fwd_gluon import attn_fwd_gluon_kernel
    GLUON_IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any failure of an experimental API means "not available"
    attn_fwd_gluon_kernel = None
    GLUON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

GLUON_AVAILABLE: bool = attn_fwd_gluon_kernel is not None

GLUON_SCHEDULES: tuple[str, ...] = ("grid", "heavy_first", "persistent")
# Every knob this variant reads from Config.extra, with its legal values; the first is the default.
GLUON_KNOBS: dict[str, tuple[Any, ...]] = {
    "loads": ("gluon",),
    "ws": (False, True),
    "overlap": (False, True),
    "consumers": (1, 2),
    "schedule": GLUON_SCHEDULES,
}
GLUON_HEAD_DIMS: tuple[int, ...] = (64, 128)
GLUON_DTYPES: tuple[str, ...] = ("float16", "bfloat16")
GLUON_BLOCK_M: tuple[int, ...] = (64, 128)
GLUON_BLOCK_N: tuple[int, ...] = (64, 128)
GLUON_STAGES: tuple[int, ...] = (2, 3, 4)
PRODUCER_REGS = 24  # registers per thread of the load warp: it holds a few indices only
# Registers per thread of the second consumer partition: with the default partition's at most 256 and the
# producer's 24, 4 warps each, the three fit the SM's 64K.
CONSUMER_REGS = 232
# Blocks per SM of each compiled persistent binary, by (device, config, head dim, dtype, flags), from its first launch.
_BLOCKS_PER_SM: dict[tuple[Any, ...], int] = {}


def gluon_knobs(extra: Mapping[str, Any]) -> tuple[bool, bool, str, int]:
    """(ws, overlap, schedule, consumers) from a config's extra knobs; ValueError naming any unknown knob or bad value."""
    unknown = sorted(set(extra) - set(GLUON_KNOBS))
    if unknown:
        raise ValueError(f"unknown knob(s) for the Gluon forward kernel: {', '.join(unknown)}; "
                         f"known: {', '.join(GLUON_KNOBS)}")
    loads = extra.get("loads", "gluon")
    if loads != "gluon":
        raise ValueError(f"loads={loads!r}: the Gluon forward kernel runs loads='gluon' only")
    ws = extra.get("ws", False)
    if not isinstance(ws, bool):
        # ValueError like every knob problem: callers of fwd_variant catch that one (kernel.ops.fwd_tma too).
        raise ValueError(f"ws={ws!r}: must be true or false")  # noqa: TRY004
    overlap = extra.get("overlap", False)
    if not isinstance(overlap, bool):
        raise ValueError(f"overlap={overlap!r}: must be true or false")  # noqa: TRY004
    schedule = extra.get("schedule", "grid")
    if schedule not in GLUON_SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: must be one of {', '.join(GLUON_SCHEDULES)}")
    consumers = extra.get("consumers", 1)
    if isinstance(consumers, bool) or consumers not in (1, 2):
        raise ValueError(f"consumers={consumers!r}: must be 1 or 2")
    if consumers == 2 and not ws:
        raise ValueError("consumers=2 needs ws=true: the second consumer is a warp-specialised partition")
    return ws, overlap, schedule, consumers


def gluon_tile_problem(config: Config) -> str | None:
    """Why the Gluon kernel cannot take `config`'s tile, or None."""
    if config.block_m not in GLUON_BLOCK_M:
        return f"block_m={config.block_m}: the Gluon forward kernel takes {GLUON_BLOCK_M}"
    if config.block_n not in GLUON_BLOCK_N:
        return f"block_n={config.block_n}: the Gluon forward kernel takes {GLUON_BLOCK_N}"
    if config.num_warps != config.block_m // 16:
        return (f"num_warps={config.num_warps}: the Gluon forward kernel runs block_m // 16 = "
                f"{config.block_m // 16} consumer warps (16 rows each)")
    if config.extra_dict.get("consumers", 1) == 2 and config.block_m != 128:
        return f"block_m={config.block_m}: two consumer partitions split a 128-row block"
    if config.num_stages not in GLUON_STAGES:
        return f"num_stages={config.num_stages}: the Gluon forward kernel's K/V ring takes {GLUON_STAGES}"
    return None


@cache
def check_gluon_config(config: Config) -> tuple[bool, bool, str, int]:
    """(ws, overlap, schedule, consumers) of a Gluon config; ValueError for bad knobs, a bad tile, or a Triton without the variant."""
    knobs = gluon_knobs(config.extra_dict)
    problem = gluon_tile_problem(config)
    if problem:
        raise ValueError(f"config {config}: {problem}")
    if not GLUON_AVAILABLE:
        raise ValueError(f"config {config}: the Gluon forward kernel is not available with Triton "
                         f"{triton.__version__} ({GLUON_IMPORT_ERROR})")
    return knobs


def estimate_gluon_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None) -> int:
    """Estimated shared memory (bytes) of the Gluon kernel: the Q box (reused to stage the output), the K and
    V boxes `num_stages` deep, and the mbarriers (three per stage and Q's). Matches the compiled kernels'
    `metadata.shared` for sm_90 on Triton 3.6 within 512 bytes, never below it (bench/gluon_compile_check.py)."""
    elt = DTYPE_BYTES[normalize_dtype(dtype)]
    q_box, kv_box = config.block_m * head_dim * elt, config.block_n * head_dim * elt
    return q_box + 2 * max(1, config.num_stages) * kv_box + 512


def gluon_supported(arch: str | None, head_dim: int, dtype: str) -> str | None:
    """None when the Gluon variant can run for (arch, head dim, dtype); else the reason, in one line."""
    if not GLUON_AVAILABLE:
        return f"Triton {triton.__version__} cannot build the Gluon forward kernel ({GLUON_IMPORT_ERROR})"
    if arch != "sm_90":
        return f"{arch or 'the interpreter'}: the Gluon forward kernel is written for sm_90 (Hopper wgmma)"
    if head_dim not in GLUON_HEAD_DIMS:
        return f"head dim {head_dim}: the Gluon forward kernel takes {GLUON_HEAD_DIMS}"
    if normalize_dtype(dtype) not in GLUON_DTYPES:
        return f"dtype {dtype}: the Gluon forward kernel takes float16 and bfloat16"
    return None


def gluon_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Any, mods: ScoreMods,
                  out: torch.Tensor | None = None) -> str | None:
    """Why the Gluon kernel cannot take these (already validated) inputs, or None."""
    if q.device.type != "cuda" or _device.INTERPRET:
        return "it needs a CUDA device (Gluon kernels do not run under the Triton interpreter)"
    problem = gluon_supported(_device.device_arch(q.device), shape.head_dim, str(q.dtype))
    if problem:
        return problem
    if not (mods is NO_MODS or (mods.plain and not mods.softcap)):
        return "it takes no score modifiers (softcap, window, sinks, ALiBi, attn_mask, dropout)"
    if shape.seq_k == 0 or shape.seq_q == 0:
        return "empty sequences"
    return tma_refusal(q, k, v, out)


def gluon_constexprs(config: Config, head_dim: int, *, causal: bool, return_lse: bool, scale: float
                     ) -> dict[str, Any]:
    """The kernel's constexpr arguments and launch options for a (checked) config: where each knob goes."""
    ws, overlap, schedule, consumers = check_gluon_config(config)
    return {"HEAD_DIM": head_dim, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
            "STAGES": config.num_stages, "CAUSAL": bool(causal), "STORE_LSE": bool(return_lse),
            "NEG_SCALE": scale < 0, "WS": ws, "OVERLAP": overlap, "PERSISTENT": schedule == "persistent",
            "REVERSE": schedule == "heavy_first" or (schedule == "persistent" and bool(causal)),
            "CONSUMERS": consumers, "PRODUCER_REGS": PRODUCER_REGS, "CONSUMER_REGS": CONSUMER_REGS,
            # num_warps: each consumer partition's (the launch's own partition is the first consumer)
            "num_warps": config.num_warps // consumers}


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Any, causal: bool, scale: float,
             config: Config, return_lse: bool, out: torch.Tensor | None, mods: ScoreMods
             ) -> tuple[tuple[int], tuple[Any, ...], dict[str, Any], torch.Tensor, torch.Tensor, Any]:
    check_gluon_config(config)
    problem = gluon_refusal(q, k, v, shape, mods, out)
    if problem:
        raise ValueError(f"the Gluon forward kernel cannot take these inputs: {problem}")
    o = torch.empty_like(q) if out is None else out
    if return_lse:
        lse = torch.empty((shape.batch, shape.heads_q, shape.seq_q), device=q.device, dtype=torch.float32)
    else:
        lse = o  # never written (STORE_LSE=False)
    num_m = triton.cdiv(shape.seq_q, config.block_m)
    num_units = shape.batch * shape.heads_q * num_m
    kwargs = gluon_constexprs(config, shape.head_dim, causal=causal, return_lse=return_lse, scale=scale)
    binary = None
    if kwargs["PERSISTENT"]:
        # Blocks per SM come from the compiled kernel after its first launch (one block per SM until then).
        binary = (q.device, config, shape.head_dim, q.dtype, bool(causal), bool(return_lse), scale < 0)
        programs = _device.device_sm_count(q.device) * _BLOCKS_PER_SM.get(binary, 1)
        grid = (max(1, min(programs, num_units)),)
    else:
        grid = (num_units,)
    if num_units > GRID_X_MAX:
        raise ValueError(f"{num_units} query blocks exceed CUDA's grid limit (2**31-1): split the batch")
    args = (q, k, v, o, lse, *_clean_strides(q), *_clean_strides(k), *_clean_strides(v), *_clean_strides(o),
            shape.seq_q, shape.seq_k, shape.heads_q, shape.group, scale * LOG2E, num_m, num_units)
    return grid, args, kwargs, o, lse, binary


def launch_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Any, *, causal: bool, scale: float,
                 config: Config, return_lse: bool = False, fp32_precision: str = "ieee",
                 out: torch.Tensor | None = None, mods: ScoreMods = NO_MODS
                 ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Launch the Gluon kernel; returns (o, lse or None, Triton's compiled kernel).

    kernel.ops.fwd.launch's contract. ValueError before launching for bad knobs or tiles, inputs the
    kernel does not take (`gluon_refusal`) and any score modifier; `fp32_precision` is unused (no fp32).
    """
    grid, args, kwargs, o, lse, binary = _prepare(q, k, v, shape, causal, scale, config, return_lse, out, mods)
    ensure_allocator()  # the in-kernel tensor descriptors live in a global scratch buffer
    compiled = attn_fwd_gluon_kernel[grid](*args, **kwargs)
    if binary is not None and binary not in _BLOCKS_PER_SM and compiled is not None:
        _BLOCKS_PER_SM[binary] = blocks_per_sm(compiled, *_sm_resources(q.device))
    return o, (lse if return_lse else None), compiled


def compile_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Any, *, causal: bool, scale: float,
                  config: Config, return_lse: bool = False) -> Any:
    """Compile (or load from Triton's cache) the binary `launch_gluon` would run, without running it."""
    grid, args, kwargs, _, _, _ = _prepare(q, k, v, shape, causal, scale, config, return_lse, None, NO_MODS)
    return attn_fwd_gluon_kernel.warmup(*args, grid=grid, **kwargs)


# Tiles worth trying: FA3's 128×128 (D 64/128) and narrower key tiles for register pressure.
_TILES: tuple[tuple[int, int, int, int], ...] = (
    (128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 2),
)


def gluon_candidates(arch: str, head_dim: int, dtype: str, causal: bool, smem_limit: int) -> list[Config]:
    """The Gluon variant's configs for a tuner's space: none unless the variant is available, the arch is sm_90
    and it takes the head dim and dtype; each fitting `smem_limit` by estimate_gluon_smem."""
    if gluon_supported(arch, head_dim, dtype):
        return []
    schedules = GLUON_SCHEDULES if causal else ("grid", "persistent")
    out = []
    for (bm, bn, w, st), ws, overlap, schedule, consumers in (
            (t, ws, ov, sc, n) for t in _TILES for ws in (False, True) for ov in (False, True) for sc in schedules
            for n in (1, 2)):
        if consumers == 2 and not (ws and bm == 128):
            continue
        config = gluon_config(bm, bn, w, st, ws=ws, overlap=overlap, schedule=schedule, consumers=consumers)
        if estimate_gluon_smem(config, head_dim, dtype, arch) <= smem_limit:
            out.append(config)
    return out


def gluon_config(block_m: int, block_n: int, num_warps: int, num_stages: int, *, ws: bool = False,
                 overlap: bool = False, schedule: str = "grid", consumers: int = 1) -> Config:
    """A Config for this variant with its knobs in canonical form (ValueError for bad knobs or tiles); the
    `consumers` knob is left out at its default, 1."""
    gluon_knobs({"ws": ws, "overlap": overlap, "schedule": schedule, "consumers": consumers})
    extra = (("loads", "gluon"), ("overlap", overlap), ("schedule", schedule), ("ws", ws))
    if consumers != 1:
        extra = (("consumers", consumers), *extra)
    config = Config(block_m, block_n, num_warps, num_stages, extra)
    problem = gluon_tile_problem(config)
    if problem:
        raise ValueError(f"config {config}: {problem}")
    return config
