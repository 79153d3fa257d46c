"""The forward attention kernel with Q/K/V loaded through tensor descriptors (TMA on sm_90 and newer).

Same math and semantics as kernel/jit/fwd.py: online softmax in base 2 with the scale folded into one
multiply, fp32 accumulation, causal top-left aligned like torch SDPA, GQA by `head // group`, any
sequence length, output in q's layout, optional natural-log LSE. What differs is how tiles move:
each program builds 2-D descriptors (rows × head dim) over its own (batch, head) slices, so the
descriptor bounds zero-fill rows past the sequence end and columns past the head dim (a head dim
that is not a power of two of at least 16, e.g. 8, 24, 80 or 200, loads a power-of-two box of at
least 16 columns whose tail columns read as zeros) and clip the output store.
On Hopper the loads become TMA copies (`cp.async.bulk.tensor`) that feed `wgmma` from shared memory.

Knobs, carried in `Config.extra` (see `TMA_KNOBS`):
- `loads`: "tma" (this variant; kernel/jit/fwd.py is "ptr").
- `ws`: Triton's automatic warp specialisation of the KV loop (`tl.range(..., warp_specialize=True)`).
  Triton's Hopper pass (3.6 and 3.9 alike) applies it to 4-warp kernels only, which it turns into
  one producer warpgroup issuing the TMA loads and two consumer warpgroups splitting the query
  rows (12 warps, FA3's layout without its ping-pong); with other warp counts `ws` compiles to the
  plain kernel (`ws_active`). The pass fails on a kernel holding a second loop after the
  specialised one, or any if/else, so with `ws` the KV loop is one loop that masks every tile
  (the plain kernel splits off the masked diagonal/tail tiles). A no-op under the interpreter.
- `schedule`: the order programs take work in, which matters for causal attention where a query
  block's cost grows with its index:
  "grid" (query blocks in order, as kernel/jit/fwd.py), "heavy_first" (reversed, so the grid ends on
  the cheapest blocks instead of the most expensive ones), "persistent" (about one wave of
  programs striding over work units; causally a unit is the pair of query blocks i and
  last - i of one head, which always costs the same, so the programs stay balanced).

Device-side descriptors need a global scratch buffer from `triton.set_allocator`; `launch_tma`
installs one (torch's caching allocator) if the calling thread has none. Inputs a descriptor cannot
describe (last dim not contiguous, strides or base pointers not 16-byte aligned) are refused with a
ValueError before anything launches (`tma_refusal`), so the caller can fall back to the pointer kernel.

Triton 3.6 (the H200) and 3.9 (here) share the APIs used: `tl.make_tensor_descriptor(base, shape,
strides, block_shape)`, `tl.range(..., warp_specialize=)` and `triton.set_allocator`; the warp
specialisation keyword is still feature-detected so a Triton without it refuses `ws=True` cleanly.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Mapping

import torch
import triton
import triton.language as tl

from ...db.types import DTYPE_BYTES, HEAD_DIMS, HEAD_DIMS_TEXT, Config, normalize_dtype

from .. import device as _device
from ..jit.common import GRID_X_MAX, LOG2E, softcap_factors
from ..jit.fwd_tma import attn_fwd_tma_kernel
from ..mods import NO_MODS, ScoreMods
from .common import padded_head_dim

# --- the shared-memory model ------------------------------------------------------------------

def tma_ws_active(config: Config, arch: str | None) -> bool:
    """Whether Triton really warp-specialises a `ws` config of the TMA kernel: its Hopper pass (Triton
    3.6 and 3.9) takes 4-warp kernels only and makes them 1 producer + 2 consumer warpgroups (12
    warps); with any other count `ws` compiles to the plain single-loop kernel."""
    return (config.extra_dict.get("ws") is True and config.num_warps == 4
            and (arch is None or arch == "sm_90"))


def estimate_tma_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None) -> int:
    """Estimated shared memory (bytes) of the TMA forward kernel compiled with `config` for `arch`.

    Fitted to the compiled kernels'
    `metadata.shared` for sm_90 on Triton 3.6 and 3.9 (compiled offline, no GPU needed:
    `bench/fwd_variants_bench.py --smem-offline`); it is never below them and at most 1 KB above:
    - the Q box once, and K and V boxes `num_stages` deep (TMA writes them straight into shared
      memory, so every stage is resident);
    - the output leaves through a Q-sized staging box; in a grid kernel it reuses the K/V ring once
      the loop is done, so it costs nothing unless the ring is more than twice the Q box (then the
      packing adds 1 KB); in the persistent kernel it lives beside the ring (+ one Q box);
    - warp specialisation (when Triton applies it, `ws_active`) adds a 128-row (at least BLOCK_M)
      staging box for the consumers and its barriers; in the persistent kernel it also buffers the
      Q box `num_stages` deep, since the next tile's Q load is issued early;
    - mbarriers: at most 64 bytes (1 KB with the packing above), up to 768 with warp specialisation;
    - with one stage, K and V take turns in one box; on the mma.sync path (BLOCK_M under 64 or fewer
      than 4 warps) the Q box is reused by the K/V buffers (`num_stages - 1` deep) and P goes
      through a scratch tile, as in the pointer kernel's model (db/smem.py);
    - fp32 (no tensor-core path with IEEE dots) is bounded by the same formula, loosely.
    `arch` None plans for sm_90; the layout is the same on newer TMA archs as far as measured.
    """
    persistent = config.extra_dict.get("schedule") == "persistent"
    elt = DTYPE_BYTES[normalize_dtype(dtype)]
    d = padded_head_dim(head_dim)
    q_box, kv_box = config.block_m * d * elt, config.block_n * d * elt
    stages = max(1, config.num_stages)
    ring = 2 * stages * kv_box
    if tma_ws_active(config, arch):
        q_bufs = stages * q_box if persistent else q_box
        return q_bufs + ring + max(config.block_m, 128) * d * elt + 768
    staging = q_box if persistent else 0
    wgmma = config.block_m % 64 == 0 and config.num_warps >= 4
    if elt == 2 and not wgmma:
        # mma.sync (small query tiles): Q goes to registers and its box is reused; K/V are buffered
        # `num_stages - 1` deep (one box each without pipelining), P converts through a scratch tile.
        ring = max(2 * (stages - 1) * kv_box, kv_box)
        return max(q_box, ring) + config.block_m * config.block_n * elt + staging + 64
    if stages == 1:
        return q_box + kv_box + 64  # nothing in flight: K and V take turns in one box
    return q_box + ring + staging + (1024 if ring > 2 * q_box else 64)


# --- the knob contract -------------------------------------------------------------------------

SCHEDULES: tuple[str, ...] = ("grid", "heavy_first", "persistent")
# Every knob this variant reads from Config.extra, with its legal values; the first is the default.
TMA_KNOBS: dict[str, tuple[Any, ...]] = {
    "loads": ("tma",),
    "ws": (False, True),
    "schedule": SCHEDULES,
}
TMA_ARCHS_MIN = 90  # TMA (cp.async.bulk.tensor) exists from Hopper on

HAS_WARP_SPECIALIZE: bool = "warp_specialize" in inspect.signature(tl.range.__init__).parameters
HAS_TENSOR_DESCRIPTORS: bool = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")

_TMA_ALIGN = 16  # bytes: base addresses and every stride but the last (CUDA tensor-map rules)
_TMA_MAX_STRIDE = 1 << 40  # bytes


def tma_knobs(extra: Mapping[str, Any]) -> tuple[bool, str]:
    """(ws, schedule) from a config's extra knobs; ValueError naming any unknown knob or bad value."""
    unknown = sorted(set(extra) - set(TMA_KNOBS))
    if unknown:
        raise ValueError(f"unknown knob(s) for the TMA forward kernel: {', '.join(unknown)}; "
                         f"known: {', '.join(TMA_KNOBS)}")
    loads = extra.get("loads", "tma")
    if loads != "tma":
        raise ValueError(f"loads={loads!r}: the TMA forward kernel runs loads='tma' only")
    ws = extra.get("ws", False)
    if not isinstance(ws, bool):
        raise ValueError(f"ws={ws!r}: must be true or false")
    schedule = extra.get("schedule", "grid")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: must be one of {', '.join(SCHEDULES)}")
    return ws, schedule


@lru_cache(maxsize=None)
def _config_knobs(config: Config) -> tuple[bool, str]:
    return tma_knobs(config.extra_dict)


def _arch_number(arch: str) -> int | None:
    digits = "".join(ch for ch in str(arch) if ch.isdigit())
    return int(digits) if digits else None


def tma_supported(arch: str | None, head_dim: int, q: Any = None, k: Any = None, v: Any = None, *,
                  out: Any = None, extra: Mapping[str, Any] | None = None) -> str | None:
    """None when this variant can run; else the reason it cannot, in one line.

    `arch` None means the Triton interpreter (CPU tensors). Tensors may be left out to ask about
    the arch, head dim and knobs only (the tuner's space); with tensors, their layout is checked
    too (see `tma_refusal`). Every head dim of flashtune (db.types.HEAD_DIMS, multiples of 8 up to
    256) runs; one that is not a power of two of at least 16 loads a power-of-two box of at least 16
    columns (kernel.ops.common.padded_head_dim) whose extra columns the descriptor bounds zero-fill. TMA's own rules hold for all of them: the
    box's dims are powers of two with at least 16 bytes in the last, and a contiguous row of D
    elements, D a multiple of 8, spans a multiple of 16 bytes in every supported dtype, as the row
    stride must. Strided inputs whose row, batch or head stride breaks that are refused per
    call (`tma_refusal`), and the dispatcher then runs the pointer kernel.
    """
    if not HAS_TENSOR_DESCRIPTORS:
        return f"Triton {triton.__version__} has no tensor descriptors (tl.make_tensor_descriptor, set_allocator)"
    if arch is not None:
        number = _arch_number(arch)
        if number is None or number < TMA_ARCHS_MIN:
            return f"{arch} has no TMA: the tensor-descriptor kernel needs sm_90 or newer"
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim not in HEAD_DIMS:
        return f"head dim {head_dim!r}: the tensor-descriptor kernel takes {HEAD_DIMS_TEXT}"
    if extra is not None:
        try:
            ws, _ = tma_knobs(extra)
        except ValueError as exc:
            return str(exc)
        if ws and not HAS_WARP_SPECIALIZE:
            return f"Triton {triton.__version__} has no tl.range(warp_specialize=...): ws=true cannot run"
    if q is not None:
        return tma_refusal(q, k, v, out)
    return None


def _layout_problem(name: str, t: torch.Tensor) -> str | None:
    elt = t.element_size()
    if t.shape[3] > 1 and t.stride(3) != 1:
        return f"{name} has last-dim stride {t.stride(3)}: tensor descriptors need a contiguous head dim"
    if t.data_ptr() % _TMA_ALIGN:
        return f"{name} starts at an address that is not 16-byte aligned (data_ptr % 16 = {t.data_ptr() % 16})"
    for dim, label in ((0, "batch"), (1, "head")):
        # These only move the base address (0 is fine: an expanded, shared K/V), which must stay aligned.
        if t.shape[dim] > 1 and (t.stride(dim) * elt) % _TMA_ALIGN:
            return (f"{name} has {label} stride {t.stride(dim)} elements ({t.stride(dim) * elt} bytes): the "
                    "tensor descriptors' base addresses need it to be a multiple of 16 bytes")
    # The row stride goes into the descriptor itself. A size-1 dim's stride addresses nothing (the
    # kernel gets a clean one).
    row_bytes = t.stride(2) * elt
    if t.shape[2] > 1 and (row_bytes % _TMA_ALIGN or not 0 < row_bytes < _TMA_MAX_STRIDE):
        return (f"{name} has sequence stride {t.stride(2)} elements ({row_bytes} bytes): tensor descriptors "
                "need a positive row stride that is a multiple of 16 bytes")
    return None


def tma_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None) -> str | None:
    """Why the tensor descriptors cannot describe these (already validated) inputs, or None.

    TMA needs the head dim contiguous, the base address and every other stride 16-byte aligned.
    `out`, when given, must also match q's shape and dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        problem = _layout_problem(name, t)
        if problem:
            return problem
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            return (f"out has shape {tuple(out.shape)}, {out.dtype} on {out.device}; "
                    f"expected q's {tuple(q.shape)}, {q.dtype} on {q.device}")
        return _layout_problem("out", out)
    return None


def ws_active(config: Config, arch: str | None) -> bool:
    """Whether Triton really warp-specialises this config (see flashtune.db.smem.tma_ws_active)."""
    _config_knobs(config)  # validates the knobs
    return tma_ws_active(config, arch)


# --- the kernel ----------------------------------------------------------------------------------


# --- launching ---------------------------------------------------------------------------------


def _scratch_allocator(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Device-side descriptors live in this scratch (128 bytes each per program). torch's caching
    # allocator is stream-ordered, so freeing it right after the launch is safe.
    dev = "cuda" if torch.cuda.is_available() and not _device.INTERPRET else "cpu"
    return torch.empty(size, dtype=torch.int8, device=dev)


def ensure_allocator() -> None:
    """Install the descriptor scratch allocator unless this thread already has one.

    Triton keeps the allocator in a ContextVar: every new thread starts without one, so this runs
    on each launch (a ContextVar read) rather than once per process.
    """
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # a Triton with another layout: set ours every time
        pass
    triton.set_allocator(_scratch_allocator)


def _clean_strides(t: torch.Tensor) -> tuple[int, int, int]:
    # Size-1 dims never advance, but their strides still reach the kernel (and the descriptor for
    # the row dim): give them aligned values so that odd-but-harmless strides are no problem.
    b, h, n, d = t.shape
    sb, sh, sn = t.stride(0), t.stride(1), t.stride(2)
    row = -(-d * t.element_size() // _TMA_ALIGN) * _TMA_ALIGN // t.element_size()
    return (0 if b == 1 else sb, 0 if h == 1 else sh, row if n == 1 else sn)


# Blocks per SM of each compiled persistent kernel, by (device, binary). Filled from the compiled
# kernel's own registers, shared memory and warps after its first launch; that first launch (a
# compile, and the tuner's validation run) uses one block per SM.
_BLOCKS_PER_SM: dict[tuple[Any, ...], int] = {}


def blocks_per_sm(compiled: Any, smem_per_sm: int, regs_per_sm: int = 65536, max_warps: int = 64) -> int:
    """Blocks of a compiled Triton kernel that fit on one SM at once (at least 1).

    Registers are allocated per warp in units of 256 (n_regs rounded up to 8 per thread); each block
    also reserves 1 KB of shared memory for the system. With warp specialisation `num_warps` in the
    metadata already counts the producer and consumer warpgroups.
    """
    md = compiled.metadata
    warps = int(getattr(md, "num_warps", 4))
    regs = int(getattr(compiled, "n_regs", 0) or 0)
    shared = int(getattr(md, "shared", 0) or 0)
    by_warps = max_warps // warps
    by_regs = regs_per_sm // (warps * -(-regs * 32 // 256) * 256) if regs else by_warps
    by_smem = smem_per_sm // (shared + 1024)
    return max(1, min(by_warps, by_regs, by_smem, 32))


def _sm_resources(device: torch.device) -> tuple[int, int]:
    """(shared memory, registers) of one SM of `device`."""
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) or _device.device_smem_limit(device) + 1024
    regs = getattr(props, "regs_per_multiprocessor", 0) or 65536
    return int(smem), int(regs)


# The modifier arguments of a call without softcap, window, sinks or ALiBi (cap_in, cap_out, window sides,
# diag, the sinks and ALiBi pointers, ALiBi's strides): the kernel reads none of them.
_NO_MOD_ARGS: tuple[Any, ...] = (0.0, 0.0, 0, 0, 0, None, None, 0, 0)
_NO_MOD_FLAGS: dict[str, bool] = {"SOFTCAP": False, "WINDOW": False, "SINKS": False, "ALIBI": False}


def tma_mod_arguments(mods: ScoreMods, causal: bool, scale: float) -> tuple[tuple[Any, ...], dict[str, bool]]:
    """The TMA kernel's modifier arguments (after `reverse`) and constexpr flags for `mods`; ValueError for
    an attn_mask or dropout, which this kernel does not take (the pointer kernel does)."""
    if mods.plain and not mods.softcap:
        return _NO_MOD_ARGS, _NO_MOD_FLAGS
    if mods.mask is not None or mods.dropout_p:
        raise ValueError("the TMA forward kernel has no attn_mask and no dropout; use a pointer-kernel config")
    before, after = mods.window_sides(causal)
    alibi = mods.alibi
    caps = softcap_factors(scale, mods.softcap) if mods.softcap else (0.0, 0.0)
    args = (*caps, before, after, 0, mods.sinks, alibi, *(alibi.stride() if alibi is not None else (0, 0)))
    return args, {"SOFTCAP": bool(mods.softcap), "WINDOW": mods.windowed, "SINKS": mods.sinks is not None,
                  "ALIBI": alibi is not None}


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Any, causal: bool, scale: float,
             config: Config, return_lse: bool, fp32_precision: str, out: torch.Tensor | None,
             mods: ScoreMods = NO_MODS
             ) -> tuple[tuple[int, ...], tuple[Any, ...], dict[str, Any], torch.Tensor, torch.Tensor, Any]:
    """(grid, args, constexprs and options, o, lse buffer, persistent-binary key or None) of one call."""
    mod_args, flags = tma_mod_arguments(mods, causal, scale)
    ws, schedule = _config_knobs(config)
    if ws and config.num_warps == 4 and flags is not _NO_MOD_FLAGS:
        # Measured on an H100 with Triton 3.6: the warp-specialised kernel (1 producer + 2 consumer warpgroups)
        # returned wrong results with a window and ALiBi, as it does with causal masking (docs: kernels).
        raise ValueError("the warp-specialised TMA forward kernel (ws=true, 4 warps) takes no score modifiers: "
                         "Triton's warp specialisation miscompiles them; use ws=false or a pointer-kernel config")
    if ws and not HAS_WARP_SPECIALIZE:
        raise ValueError(f"ws=true needs tl.range(warp_specialize=...), which Triton {triton.__version__} lacks")
    problem = tma_refusal(q, k, v, out)
    if problem:
        raise ValueError(f"the TMA forward kernel cannot take these inputs: {problem}")
    o = torch.empty_like(q) if out is None else out
    if return_lse:
        lse = torch.empty((shape.batch, shape.heads_q, shape.seq_q), device=q.device, dtype=torch.float32)
    else:
        lse = o  # never written (STORE_LSE=False); any pointer will do
    num_m = triton.cdiv(shape.seq_q, config.block_m)
    persistent = schedule == "persistent"
    binary = None
    if persistent:
        per_head = (num_m + 1) // 2 if causal else num_m
        num_units = shape.batch * shape.heads_q * per_head
        if q.device.type == "cuda":
            binary = (q.device, config, shape.head_dim, q.dtype, bool(causal), bool(return_lse), fp32_precision,
                      scale < 0, ws and shape.seq_k % config.block_n == 0, *flags.values())
            programs = _device.device_sm_count(q.device) * _BLOCKS_PER_SM.get(binary, 1)
        else:
            programs = 3  # the interpreter: a few programs, so each strides over several units
        grid: tuple[int, ...] = (max(1, min(programs, num_units)),)
    else:
        num_units = 0
        grid = (shape.batch * shape.heads_q * num_m,)
        if grid[0] > GRID_X_MAX:
            raise ValueError(f"{grid[0]} query blocks exceed CUDA's grid limit (2**31-1): split the batch")
    args = (q, k, v, o, lse,
            *_clean_strides(q), *_clean_strides(k), *_clean_strides(v), *_clean_strides(o),
            shape.seq_q, shape.seq_k, shape.heads_q, shape.group, scale * LOG2E, num_m, num_units,
            int(schedule == "heavy_first"), *mod_args)
    kwargs = dict(HEAD_DIM=shape.head_dim, BLOCK_D=padded_head_dim(shape.head_dim),
                  BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                  CAUSAL=bool(causal), STORE_LSE=bool(return_lse), PRECISION=fp32_precision,
                  WS=ws, PERSISTENT=persistent, NEG_SCALE=scale < 0,
                  # Only the warp-specialised loop reads it: one binary for the plain kernel.
                  EVEN_N=ws and shape.seq_k % config.block_n == 0, **flags,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    return grid, args, kwargs, o, lse, binary


def launch_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Any, *, causal: bool,
               scale: float, config: Config, return_lse: bool = False, fp32_precision: str = "ieee",
               out: torch.Tensor | None = None, mods: ScoreMods = NO_MODS
               ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Launch the TMA kernel; returns (o, lse or None, Triton's compiled kernel or None).

    `shape` is kernel.ops.fwd.AttnShape (from check_inputs). The same contract as launch.launch,
    plus two cheap checks that raise ValueError before launching: unknown or bad knobs in
    `config.extra` (tma_knobs), and layouts tensor descriptors cannot describe (tma_refusal).
    Triton's own errors (OutOfResources, CompilationError, RuntimeError from an MLIR pass)
    propagate unchanged so the tuner can record them. `mods`: softcap, window, sinks and ALiBi as the
    pointer kernel takes them (ValueError for an attn_mask or dropout).
    """
    grid, args, kwargs, o, lse, binary = _prepare(q, k, v, shape, causal, scale, config, return_lse,
                                                  fp32_precision, out, mods)
    ensure_allocator()
    compiled = attn_fwd_tma_kernel[grid](*args, **kwargs)
    if binary is not None and binary not in _BLOCKS_PER_SM and compiled is not None:
        _BLOCKS_PER_SM[binary] = blocks_per_sm(compiled, *_sm_resources(q.device))
    return o, (lse if return_lse else None), compiled


def compile_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Any, *, causal: bool, scale: float,
                config: Config, return_lse: bool = False, fp32_precision: str = "ieee") -> Any:
    """Compile (or load from Triton's cache) the binary `launch_tma` would run, without running it.

    Safe to call from many threads at once (nothing runs on the GPU), so the tuner and the benchmark
    can compile a batch in parallel and take first launches one at a time. Sizes are not specialised
    on, so small inputs of the same dtype, head dim and layout give the real shapes' binary.
    Returns Triton's compiled kernel (None under the interpreter, which compiles nothing).
    """
    grid, args, kwargs, _, _, _ = _prepare(q, k, v, shape, causal, scale, config, return_lse, fp32_precision,
                                           None)
    if _device.INTERPRET:
        return None
    return attn_fwd_tma_kernel.warmup(*args, grid=grid, **kwargs)


# Tile configs worth trying, from the Triton tutorial's Hopper grid and the pointer kernel's H200 winners.
# Warp specialisation only with 4 warps (the only count Triton's Hopper pass takes).
_TILES: tuple[tuple[int, int, int, int], ...] = (
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
    (128, 64, 4, 2), (128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2),
)
_WS_TILES: tuple[tuple[int, int, int, int], ...] = (
    (128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2), (128, 32, 4, 3), (128, 32, 4, 4),
)


def tma_candidates(arch: str, head_dim: int, dtype: str, causal: bool, smem_limit: int) -> list[Config]:
    """The TMA variant's configs for a tuner's space: none on archs without TMA; `heavy_first` only
    when causal (it reorders blocks of equal cost otherwise); each fitting `smem_limit` by
    estimate_tma_smem."""
    if tma_supported(arch, head_dim):
        return []
    schedules = SCHEDULES if causal else ("grid", "persistent")
    out = []
    for tiles, ws in ((_TILES, False), (_WS_TILES, True)):
        if ws and (not HAS_WARP_SPECIALIZE or _arch_number(arch) != 90):
            continue  # elsewhere ws would compile to the plain kernel: the same config twice
        for (bm, bn, w, st), schedule in ((t, sc) for t in tiles for sc in schedules):
            config = tma_config(bm, bn, w, st, ws=ws, schedule=schedule)
            if estimate_tma_smem(config, head_dim, dtype, arch) <= smem_limit:
                out.append(config)
    return out


def tma_config(block_m: int, block_n: int, num_warps: int, num_stages: int, *, ws: bool = False,
               schedule: str = "grid") -> Config:
    """A Config for this variant with its knobs in canonical form."""
    tma_knobs({"ws": ws, "schedule": schedule})
    return Config(block_m, block_n, num_warps, num_stages,
                  (("loads", "tma"), ("schedule", schedule), ("ws", bool(ws))))
