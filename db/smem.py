"""The kernel's shared-memory model: what a config needs, estimated before anything compiles.

The tuner prunes its space with it and the dispatcher refuses stored configs that would not fit; the
compiled kernel's own `metadata.shared` is the truth it is measured against (README, "Shared memory").
"""
from __future__ import annotations

from .types import DTYPE_BYTES, Config, normalize_dtype


MIN_BLOCK_D = 16  # tl.dot's smallest K: the QK^T product runs over the head-dim tile


def padded_head_dim(head_dim: int) -> int:
    """The head-dim tile every kernel runs `head_dim` through: the next power of two, at least 16.

    Triton tiles are powers of two and a dot needs K >= 16, so D=8 runs in a 16-column tile and
    D=24, 48, 72, 200 in 32, 64, 128, 256; the extra columns are masked (pointer kernels) or
    zero-filled by the descriptor bounds (TMA). Shared-memory estimates use this width.
    """
    p = MIN_BLOCK_D
    while p < head_dim:
        p *= 2
    return p


def _uses_wgmma(config: Config, arch: str) -> bool:
    # Hopper's warpgroup MMA needs whole 64-row warpgroups; smaller query tiles take mma.sync.
    return arch == "sm_90" and config.block_m % 64 == 0 and config.num_warps >= 4


def estimate_ptr_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None) -> int:
    """Estimated shared memory (bytes) of the pointer forward kernel (kernel/fwd.py) compiled with `config` for `arch`.

    The model follows how Triton 3.x lays the kernel out: the Q tile is staged once; K and V tiles
    are buffered by the software pipeline, `num_stages` deep on the wgmma path (sm_90) and
    `num_stages - 1` deep on the mma.sync path, one tile when there is no pipelining; and on the
    mma.sync path small query tiles convert P through a shared-memory scratch tile. It equals the
    compiled kernels' own `metadata.shared` for every config measured (see README, "Shared memory").
    `arch=None` gives the larger of the two paths, a safe bound for any GPU.
    """
    if arch is None:
        return max(estimate_ptr_smem(config, head_dim, dtype, "sm_90"),
                   estimate_ptr_smem(config, head_dim, dtype, "sm_80"))
    elt = DTYPE_BYTES[normalize_dtype(dtype)]
    d = padded_head_dim(head_dim)
    q_tile, kv_tile = config.block_m * d * elt, config.block_n * d * elt
    wgmma = _uses_wgmma(config, arch)
    if config.num_stages == 1:
        buffers = 1
    else:
        buffers = 2 * (config.num_stages if wgmma else config.num_stages - 1)
    scratch = 0
    if not wgmma and (config.block_m < 64 or (config.block_m == 64 and d >= 128)):
        scratch = config.block_m * config.block_n * elt
    return q_tile + buffers * kv_tile + scratch


def fits(config: Config, head_dim: int, dtype: str, limit_bytes: int, arch: str | None = None) -> bool:
    """Whether the estimate fits a shared-memory limit."""
    return estimate_smem(config, head_dim, dtype, arch) <= limit_bytes


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


def estimate_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None) -> int:
    """Estimated shared memory (bytes) of the forward kernel variant `config` selects (its `loads`
    knob: the pointer kernel, or the tensor-descriptor one), compiled for `arch`."""
    for name, value in config.extra:
        if name == "loads" and value == "tma":
            return estimate_tma_smem(config, head_dim, dtype, arch)
    return estimate_ptr_smem(config, head_dim, dtype, arch)
