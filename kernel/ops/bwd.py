"""The backward op: its knobs, default config, shared-memory model and launches.

`attention_bwd` is the checked entry point; `launch_bwd` is what the autograd function, the dispatcher and
the tuner call after validating once. The kernels are kernel/jit/bwd.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...db.arch import ARCH_SMEM, normalize_arch
from ...db.types import DTYPE_BYTES, Config, normalize_dtype

from ..checks import (AttnShape, check_bool, check_bwd_inputs, check_precision, check_scale, check_softcap,
                      device_limits)
from ..jit.bwd import (attn_bwd_dkdv_kernel, attn_bwd_dq_convert_kernel, attn_bwd_dq_kernel,
                       attn_bwd_preprocess_kernel)
from ..jit.common import LOG2E, one_axis_grid, softcap_factors
from ..mods import NO_MODS, UNBOUNDED, ScoreMods, check_mods
from .common import FALLBACK_SMEM, check_smem, padded_head_dim


BWD_EXTRA_KEYS: tuple[str, ...] = ("block_m_dq", "block_n_dq", "num_warps_dq", "num_stages_dq", "deterministic")


@dataclass(frozen=True)
class BwdKnobs:
    """Every launch parameter of the backward, defaults filled in."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_m_dq: int
    block_n_dq: int
    num_warps_dq: int
    num_stages_dq: int
    deterministic: bool


def _check_int(name: str, value: Any, lo: int, hi: int, pow2: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi or (
            pow2 and value & (value - 1)):
        kind = "a power of two" if pow2 else "an int"
        raise ValueError(f"backward config extra {name}={value!r}: must be {kind} from {lo} to {hi}")
    return value


def bwd_knobs(config: Config) -> BwdKnobs:
    """The backward knobs of `config`; TypeError/ValueError naming unknown or malformed extras."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a flashtune.db.types.Config, got {type(config).__name__}")
    extra = config.extra_dict
    unknown = sorted(set(extra) - set(BWD_EXTRA_KEYS))
    if unknown:
        raise ValueError(f"config {config}: unknown backward knob(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(BWD_EXTRA_KEYS)}")
    deterministic = extra.get("deterministic", True)
    if not isinstance(deterministic, bool):
        raise ValueError(f"backward config extra deterministic={deterministic!r}: must be true or false")
    return BwdKnobs(
        config.block_m, config.block_n, config.num_warps, config.num_stages,
        _check_int("block_m_dq", extra.get("block_m_dq", config.block_n), 16, 256, True),
        _check_int("block_n_dq", extra.get("block_n_dq", config.block_m), 16, 256, True),
        _check_int("num_warps_dq", extra.get("num_warps_dq", config.num_warps), 1, 32, True),
        _check_int("num_stages_dq", extra.get("num_stages_dq", config.num_stages), 1, 8, False),
        deterministic,
    )


def _uses_wgmma(rows: int, num_warps: int, dtype: str, arch: str) -> bool:
    # Hopper's warpgroup MMA needs whole 64-row warpgroups; smaller tiles, other archs and IEEE fp32
    # dots (no tensor cores) take the mma.sync / FMA path.
    return arch == "sm_90" and rows % 64 == 0 and num_warps >= 4 and dtype != "float32"


def estimate_dkdv_smem(block_m: int, block_n: int, num_warps: int, num_stages: int, head_dim: int, dtype: str,
                       arch: str, atomic_dq: bool = False, mask_bytes: int = 0) -> int:
    """Estimated shared memory (bytes) of the dK/dV kernel on `arch`.

    K and V are staged once (two block_n x D tiles). On the wgmma path the Q and dO tiles are
    buffered num_stages deep; on the mma.sync path one Q/dO pair plus a conversion scratch of one
    more Q-sized tile, and one extra Q-sized buffer per stage past the second. The fp32 LSE and
    delta rows are buffered num_stages - 1 deep. The atomic-dQ variant adds a K tile (the B operand
    of dSᵀᵀ·K) and room for transposing dSᵀ. An attn_mask of `mask_bytes` per element (0: none) adds one
    staged block_n x block_m mask tile.
    """
    dtype = normalize_dtype(dtype)
    elt = DTYPE_BYTES[dtype]
    d = padded_head_dim(head_dim)
    t_q, t_k = block_m * d * elt, block_n * d * elt
    rows = -(-8 * block_m * max(0, num_stages - 1) // 1024) * 1024  # LSE + delta (fp32), 1 KB-aligned
    rows += block_m * block_n * mask_bytes  # Triton 3.9 stages at most one mask tile (measured: sm_80, sm_90)
    if _uses_wgmma(block_n, num_warps, dtype, arch):
        need = 2 * t_k + num_stages * 2 * t_q + rows
        return need + (t_k + 2 * t_q if atomic_dq else 0)
    need = 2 * t_k + 3 * t_q + max(0, num_stages - 2) * t_q + rows
    return need + (t_q if atomic_dq else 0)


def estimate_dq_smem(block_m: int, block_n: int, num_warps: int, num_stages: int, head_dim: int, dtype: str,
                     arch: str, mask_bytes: int = 0) -> int:
    """Estimated shared memory (bytes) of the dQ kernel on `arch`.

    Q and dO are staged once; the streamed K and V tiles are buffered num_stages deep on the wgmma
    path, and on the mma.sync path one K/V pair plus one K tile per further stage. An attn_mask of
    `mask_bytes` per element (0: none) adds one staged block_m x block_n mask tile.
    """
    dtype = normalize_dtype(dtype)
    elt = DTYPE_BYTES[dtype]
    d = padded_head_dim(head_dim)
    t_q, t_k = block_m * d * elt, block_n * d * elt
    mask = block_m * block_n * mask_bytes
    if _uses_wgmma(block_m, num_warps, dtype, arch):
        return 2 * t_q + num_stages * 2 * t_k + mask
    return 2 * t_q + 2 * t_k + max(0, num_stages - 1) * t_k + mask


def estimate_bwd_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None, mask_bytes: int = 0) -> int:
    """Estimated shared memory (bytes) of the backward with `config`: the larger of its kernels' needs.

    Each kernel is its own launch, so the per-block limit applies to each separately. With
    `deterministic: false` the dK/dV kernel also forms dQ tiles and the dQ pass does not run.
    `arch=None` gives the larger of the wgmma (sm_90) and mma.sync paths, a bound for any GPU. `mask_bytes`:
    the element size of an attn_mask (1 bool, 2 or 4 float; 0 none).
    """
    knobs = bwd_knobs(config)
    if arch is None:
        return max(estimate_bwd_smem(config, head_dim, dtype, "sm_90", mask_bytes),
                   estimate_bwd_smem(config, head_dim, dtype, "sm_80", mask_bytes))
    dkdv = estimate_dkdv_smem(knobs.block_m, knobs.block_n, knobs.num_warps, knobs.num_stages, head_dim, dtype, arch,
                              atomic_dq=not knobs.deterministic, mask_bytes=mask_bytes)
    if not knobs.deterministic:
        return dkdv
    dq = estimate_dq_smem(knobs.block_m_dq, knobs.block_n_dq, knobs.num_warps_dq, knobs.num_stages_dq, head_dim,
                          dtype, arch, mask_bytes)
    return max(dkdv, dq)


def bwd_fits(config: Config, head_dim: int, dtype: str, limit_bytes: int, arch: str | None = None,
             mask_bytes: int = 0) -> bool:
    """Whether the backward estimate fits a shared-memory limit."""
    return estimate_bwd_smem(config, head_dim, dtype, arch, mask_bytes) <= limit_bytes


def _bwd(block_m: int, block_n: int, warps: int, stages: int, m_dq: int, n_dq: int, **extra: Any) -> Config:
    return Config(block_m, block_n, warps, stages, {"block_m_dq": m_dq, "block_n_dq": n_dq, **extra})


# Ordered from the best general-purpose choice to the smallest tiles; the first one that fits wins.
# Chosen from compiled register and shared-memory figures (Triton 3.9, sm_90 and sm_80): the dK/dV
# program keeps dK and dV (two block_n x D fp32 tiles) in registers, so 8 warps, and at D = 128 a
# 64-key tile on the mma.sync archs, where the 128-key one spills heavily. Hopper (wgmma) keeps the
# 128-key tile at D = 128 with a small spill (~80 bytes). Head dims above 128 use 64-key tiles.
# The first entries are the best of bench/bwd_bench.py's grid on the H200 (geomean fwd+bwd TFLOP/s over
# N 4096/8192, causal both ways: D=64 m64-n128-w8-s2 with 128x64 dQ tiles, 317; D=128 m32-n128-w8-s3
# with 128x64 dQ tiles at 8 warps, 2 stages, 330, against 302 for the first, timing-blind default).
_PREFERENCE_SMALL_D: tuple[Config, ...] = (
    _bwd(64, 128, 8, 2, 128, 64),
    _bwd(32, 128, 8, 3, 128, 32),
    _bwd(32, 128, 8, 2, 128, 32),
    _bwd(32, 64, 8, 2, 64, 32),
    _bwd(16, 64, 4, 2, 64, 16),
    _bwd(16, 32, 4, 1, 32, 16),
    _bwd(16, 16, 2, 1, 16, 16),
)


_PREFERENCE_D128_HOPPER: tuple[Config, ...] = (
    _bwd(32, 128, 8, 3, 128, 64, num_warps_dq=8, num_stages_dq=2),
    _bwd(32, 128, 8, 2, 128, 32),
) + _PREFERENCE_SMALL_D[3:]


_PREFERENCE_D128: tuple[Config, ...] = _PREFERENCE_SMALL_D[3:]


_PREFERENCE_BIG_D: tuple[Config, ...] = (
    _bwd(16, 64, 8, 2, 64, 16),
    _bwd(16, 32, 4, 1, 32, 16),
    _bwd(16, 16, 2, 1, 16, 16),
)


def _candidates(arch: str | None, head_dim: int) -> tuple[Config, ...]:
    if head_dim <= 64:
        return _PREFERENCE_SMALL_D
    if head_dim <= 128:
        return _PREFERENCE_D128_HOPPER if arch == "sm_90" else _PREFERENCE_D128
    return _PREFERENCE_BIG_D


def default_bwd_config(arch: str, head_dim: int, dtype: str, smem_limit: int | None = None) -> Config:
    """The first preferred backward config whose estimated shared memory fits the arch (or the limit).

    Always deterministic: the default never uses atomics. An unknown arch plans for the smallest
    chip with the bound over both MMA paths. When nothing fits (IEEE fp32 at head dims over 128,
    a 256-column tile, on a 64 KB sm_75) the smallest config is returned and the launch reports Triton's
    OutOfResources.
    """
    dtype = normalize_dtype(dtype)
    try:
        arch = normalize_arch(arch)
        known = True
    except ValueError:
        known = False
    if smem_limit is None:
        smem_limit = ARCH_SMEM[arch] if known else FALLBACK_SMEM
    candidates = _candidates(arch if known else None, head_dim)
    for config in candidates:
        if estimate_bwd_smem(config, head_dim, dtype, arch if known else None) <= smem_limit:
            return config
    return candidates[-1]


def _elementwise_block(block_d: int) -> int:
    # Rows per program of the elementwise kernels: about 8K elements, i.e. 32-64 registers a thread.
    return max(16, min(128, 8192 // block_d))


# The kernels' modifier arguments: (alibi pointer, mask pointer, their 6 strides, (left, right, diag,
# dropout_p, seed)). Without a modifier the pointers are any tensor (never read) and the values inert.
_ModArgs = tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[Any, ...]]
_INERT_STRIDES = (0,) * 6
_INERT_VALUES = (UNBOUNDED, UNBOUNDED, 0, 0.0, 0)


def _plain_args(any_tensor: torch.Tensor) -> _ModArgs:
    return any_tensor, any_tensor, _INERT_STRIDES, _INERT_VALUES


def _mod_args(mods: ScoreMods, causal: bool, any_tensor: torch.Tensor) -> tuple[_ModArgs, dict[str, Any]]:
    """The kernels' modifier arguments and constexpr flags (WINDOW, ALIBI, MASK, DROPOUT) for `mods`."""
    alibi = any_tensor if mods.alibi is None else mods.alibi
    mask = any_tensor if mods.mask is None else mods.mask
    strides = ((*mods.alibi.stride(),) if mods.alibi is not None else (0, 0)) + (
        (*mods.mask.stride(),) if mods.mask is not None else (0, 0, 0, 0))
    left, right = mods.window_sides(causal) if mods.windowed else (UNBOUNDED, UNBOUNDED)
    dropout = mods.dropout_p > 0.0
    # diag 0: the window is top-left aligned, as attention()'s causal mask.
    values = (left, right, 0, float(mods.dropout_p) if dropout else 0.0, int(mods.seed) if dropout else 0)
    flags = {"WINDOW": mods.windowed, "ALIBI": mods.alibi is not None,
             "MASK": {"none": 0, "bool": 1, "float": 2}[mods.mask_kind], "DROPOUT": dropout}
    return (alibi, mask, strides, values), flags


def launch_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, shape: AttnShape, *, causal: bool, scale: float, config: Config,
               deterministic: bool = True, fp32_precision: str = "ieee",
               out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, mods: ScoreMods = NO_MODS,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Launch the backward with no tensor checks; returns (dq, dk, dv, Triton's compiled kernels by name).

    `scale` is the softmax scale (not folded with log2(e)); `lse` the forward's natural-log LSE.
    dq, dk, dv are allocated with empty_like(q/k/v) (same strides) unless `out` gives them.
    Atomics for dQ are used only when both `deterministic` is False and the config's
    `deterministic` knob is false.

    `mods` (checked by kernel.mods.check_mods) are the forward's score modifiers; `o` and `lse` must come
    from a forward with the same ones (and, with dropout, the same seed). A softcap c > 0 differentiates the
    capped scores c·tanh(scale·QKᵀ/c); the window (top-left diagonal, as attention()'s), ALiBi and the
    mask are recomputed as the forward applied them; dropout regenerates the forward's keep mask. The sinks
    need nothing here, as `lse` includes them: the caller forms their gradient with kernel.mods.sinks_grad.
    A float mask gets no gradient. A row with lse = −inf (it saw no key) gets zero gradients.
    The config's extras and the softcap are checked (ValueError naming them); Triton's own errors
    (OutOfResources, CompilationError) propagate for the tuner to record.
    """
    knobs = bwd_knobs(config)
    softcap = mods.softcap
    if type(softcap) is not float or softcap != 0.0:  # the common uncapped call skips the check
        softcap = check_softcap(softcap)  # a wrong cap would give finite, wrong gradients: refuse it here too
    capped = softcap > 0.0
    cap_in, cap_out = softcap_factors(scale, softcap) if capped else (0.0, 0.0)
    atomic = not deterministic and not knobs.deterministic
    dq, dk, dv = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) if out is None else out
    b, hq, nq, hkv, nk = shape.batch, shape.heads_q, shape.seq_q, shape.heads_kv, shape.seq_k
    block_d = padded_head_dim(shape.head_dim)
    causal = bool(causal)
    qk_scale = scale * LOG2E  # exp2 in-kernel
    compiled: dict[str, Any] = {}
    if mods is NO_MODS:
        mod_args, mod_flags = _plain_args(lse), {}
    else:
        mod_args, mod_flags = _mod_args(mods, causal, lse)

    delta = torch.empty((b, hq, nq), device=q.device, dtype=torch.float32)
    rows = _elementwise_block(block_d)
    compiled["preprocess"] = attn_bwd_preprocess_kernel[one_axis_grid(b, hq, nq, rows)](
        o, do, delta, *o.stride(), *do.stride(), nq, hq,
        HEAD_DIM=shape.head_dim, BLOCK_D=block_d, BLOCK_M=rows, num_warps=4)

    # With atomics the dQ shares land in a zeroed fp32 buffer; otherwise dk stands in (never read).
    dq_acc = torch.zeros((b, hq, nq, shape.head_dim), device=q.device, dtype=torch.float32) if atomic else dk
    dq_acc_strides = dq_acc.stride() if atomic else (0, 0, 0, 0)
    compiled["dkdv"] = attn_bwd_dkdv_kernel[one_axis_grid(b, hkv, nk, knobs.block_n)](
        q, k, v, do, dk, dv, lse, delta, dq_acc, mod_args[0], mod_args[1],
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *lse.stride(),
        *dq_acc_strides, *mod_args[2],
        nq, nk, hkv, shape.group, *mod_args[3], qk_scale, scale, cap_in, cap_out,
        HEAD_DIM=shape.head_dim, BLOCK_D=block_d, BLOCK_M=knobs.block_m, BLOCK_N=knobs.block_n,
        CAUSAL=causal, PRECISION=fp32_precision, ATOMIC_DQ=atomic, SOFTCAP=capped, **mod_flags,
        num_warps=knobs.num_warps, num_stages=knobs.num_stages)

    if atomic:
        compiled["dq_convert"] = attn_bwd_dq_convert_kernel[one_axis_grid(b, hq, nq, rows)](
            dq_acc, dq, *dq_acc.stride(), *dq.stride(), nq, hq, scale,
            HEAD_DIM=shape.head_dim, BLOCK_D=block_d, BLOCK_M=rows, num_warps=4)
    else:
        compiled["dq"] = attn_bwd_dq_kernel[one_axis_grid(b, hq, nq, knobs.block_m_dq)](
            q, k, v, do, dq, lse, delta, mod_args[0], mod_args[1],
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *lse.stride(), *mod_args[2],
            nq, nk, hq, shape.group, *mod_args[3], qk_scale, scale, cap_in, cap_out,
            HEAD_DIM=shape.head_dim, BLOCK_D=block_d, BLOCK_M=knobs.block_m_dq, BLOCK_N=knobs.block_n_dq,
            CAUSAL=causal, PRECISION=fp32_precision, SOFTCAP=capped, **mod_flags,
            num_warps=knobs.num_warps_dq, num_stages=knobs.num_stages_dq)
    return dq, dk, dv, compiled


def check_bwd_config(config: Any, shape: AttnShape, smem_limit: int | None, arch: str | None = None) -> None:
    """Raise if `config` is not a Config, has unknown or malformed backward knobs, or does not fit."""
    bwd_knobs(config)  # TypeError / ValueError naming the problem
    if smem_limit is not None:
        check_smem(f"backward config {config}", estimate_bwd_smem(config, shape.head_dim, shape.dtype, arch),
                   shape.head_dim, shape.dtype, smem_limit)


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, *, causal: bool, scale: float | None, config: Config | None = None,
                  deterministic: bool = True, fp32_precision: str = "ieee", softcap: float = 0.0,
                  window_size: tuple[int, int] | None = None, alibi_slopes: torch.Tensor | None = None,
                  attn_mask: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of O = softmax(scale·QKᵀ [+ causal mask])·V given dO.

    o and lse come from `attention_fwd(q, k, v, causal=..., scale=..., return_lse=True)` with the
    same causal (a bool) and scale (None = 1/sqrt(head_dim)). For GQA/MQA, dk and dv are summed over each
    KV head's query group. The gradients have the dtypes and strides of q, k, v. `config=None`
    takes the device's default backward config. `deterministic=True` (the default) never uses
    atomics, so two runs give bitwise-equal gradients; False lets a config with
    `extra={"deterministic": False}` add dQ with fp32 atomics. float32 inputs use IEEE fp32 dots
    unless fp32_precision="tf32". `softcap` c > 0 (0.0: off) gives the gradients of the softcapped
    attention, scores c·tanh(scale·QKᵀ/c); `window_size`, `alibi_slopes` and `attn_mask` those of the
    forward with them (kernel.mods's conventions; the mask gets no gradient). o and lse must come from the
    forward with the same modifiers; a forward with sinks needs nothing more (its lse includes them, and
    their gradient is kernel.mods.sinks_grad).
    """
    shape = check_bwd_inputs(do, q, k, v, o, lse)
    causal = check_bool(causal, "causal")
    scale = check_scale(scale, shape.head_dim)
    deterministic = check_bool(deterministic, "deterministic")
    fp32_precision = check_precision(fp32_precision)
    softcap = check_softcap(softcap)
    if window_size is None and alibi_slopes is None and attn_mask is None:
        mods = NO_MODS if not softcap else ScoreMods(softcap=softcap)
    else:
        mods = check_mods(shape, q.device, softcap=softcap, window_size=window_size, alibi_slopes=alibi_slopes,
                          attn_mask=attn_mask)
    arch, smem_limit = device_limits(q)
    if config is None:
        config = default_bwd_config(arch or "sm_80", shape.head_dim, shape.dtype, smem_limit)
    check_bwd_config(config, shape, smem_limit, arch)
    dq, dk, dv, _ = launch_bwd(do, q, k, v, o, lse, shape, causal=causal, scale=scale, config=config,
                               deterministic=deterministic, fp32_precision=fp32_precision, mods=mods)
    return dq, dk, dv
