"""The forward op: its knobs and variants, default config, shared-memory model and launch.

The pointer kernel (kernel/jit/fwd.py) is the base variant; the knob `loads="tma"` selects the
tensor-descriptor variant (kernel/ops/fwd_tma.py) and `loads="gluon"` the Gluon Hopper variant
(kernel/ops/fwd_gluon.py); each has its own launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping

import torch

from ...db.arch import ARCH_SMEM, normalize_arch
from ...db.types import DTYPE_BYTES, Config, ExtraValue, normalize_dtype

from .. import device as _device
from ..checks import AttnShape, check_bool, check_inputs, check_precision, check_scale, device_limits, needs_grad
from ..jit.common import LOG2E, one_axis_grid, softcap_factors
from ..jit.fwd import attn_fwd_kernel
from ..mods import NO_MODS, ScoreMods, check_mods
from .common import FALLBACK_SMEM, check_smem, padded_head_dim
from .fwd_gluon import check_gluon_config, estimate_gluon_smem, launch_gluon
from .fwd_tma import estimate_tma_smem, launch_tma, tma_knobs

GRAD_UNSUPPORTED = ("inputs that require grad (attention_fwd is the explicit-config inference launch: train "
                    "through flashtune.kernel.attention, which has a backward, or call this under torch.no_grad())")


@dataclass(frozen=True)
class Knob:
    """One `Config.extra` knob: its name, the values it accepts and the kernel constexpr it sets."""

    name: str
    values: tuple[ExtraValue, ...]
    constexpr: str


@dataclass(frozen=True)
class Variant:
    """What launch() runs for a config: the @triton.jit kernel and the knobs' constexpr arguments."""

    kernel: Any
    constexprs: Mapping[str, ExtraValue]
    launch: Callable[..., Any] | None = None  # a variant with its own launch (kernel.ops.fwd.launch's contract)


FWD_KNOBS: Mapping[str, Knob] = {}  # the forward kernel's knobs, by name


def _same(a: ExtraValue, b: ExtraValue) -> bool:
    # True == 1 in Python, but a bool knob given 1 (or an int knob given True) is a different value.
    return type(a) is type(b) and a == b


def resolve_variant(config: Config, knobs: Mapping[str, Knob], kernel: Any) -> Variant:
    """The variant of `kernel` that `config.extra` selects under `knobs`; ValueError for a knob that is
    not in `knobs` or a value the knob does not accept."""
    constexprs: dict[str, ExtraValue] = {}
    for name, value in config.extra:
        knob = knobs.get(name)
        if knob is None:
            known = ", ".join(sorted(knobs)) or "none"
            raise ValueError(f"config {config}: the kernel does not know the knob {name!r} "
                             f"(known knobs: {known})")
        if not any(_same(value, allowed) for allowed in knob.values):
            raise ValueError(f"config {config}: knob {name}={value!r} is not one of "
                             f"{', '.join(map(repr, knob.values))}")
        constexprs[knob.constexpr] = value
    return Variant(kernel, constexprs)


LOADS_KNOB = "loads"


@dataclass(frozen=True)
class Fp8Scales:
    """What an fp8 launch adds (kernel.fp8 builds it): the q, k and v dequantisation factors, each an fp32
    (B, Hkv) tensor or a broadcast view of one (strides 0 for a per-tensor factor), and the output dtype."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out_dtype: torch.dtype

    def kernel_args(self) -> dict[str, Any]:
        """The pointer kernel's fp8 keyword arguments."""
        return {"QD": self.q, "KD": self.k, "VD": self.v, "stride_qdb": self.q.stride(0),
                "stride_qdh": self.q.stride(1), "stride_kdb": self.k.stride(0), "stride_kdh": self.k.stride(1),
                "stride_vdb": self.v.stride(0), "stride_vdh": self.v.stride(1), "FP8": True}


FP8_MIN_K = 32  # NVIDIA's 8-bit MMAs reduce over at least 32 elements: fp8 tiles are >= 32 keys and columns wide

# The fp8 arguments of every other launch (always passed: kernel.fastlaunch relaunches only calls that pass
# every parameter); with FP8 off the kernel reads none of them.
_NO_FP8: dict[str, Any] = {"QD": None, "KD": None, "VD": None, "stride_qdb": 0, "stride_qdh": 0, "stride_kdb": 0,
                           "stride_kdh": 0, "stride_vdb": 0, "stride_vdh": 0, "FP8": False}


def fp8_value_layout(v: torch.Tensor) -> torch.Tensor:
    """`v` with its sequence dim contiguous (the same values, (B, H, N, D) view of a (B, H, D, N) tensor).

    Hopper's fp8 warpgroup MMA takes its B operand K-major only; in P·V the reduction runs over the keys, so
    the V tiles must be key-contiguous in shared memory (Triton's fused-attention tutorial passes fp8 V so).
    A `v` already laid out so is returned as it is; otherwise this is one copy of V."""
    if v.shape[2] == 1 or v.stride(2) == 1:
        return v
    return v.transpose(2, 3).contiguous().transpose(2, 3)


LOADS: tuple[str, ...] = ("ptr", "tma", "gluon")


@lru_cache(maxsize=1024)
def fwd_variant(config: Config) -> Variant:
    """The forward kernel variant `config` selects (cached per config); ValueError for unknown knobs."""
    loads = config.extra_dict.get(LOADS_KNOB, "ptr")
    if loads == "tma":
        tma_knobs(config.extra_dict)  # ValueError for a knob or value the TMA kernel does not take
        return Variant(None, {}, launch_tma)
    if loads == "gluon":
        check_gluon_config(config)  # ValueError for a bad knob or tile, or a Triton without the variant
        return Variant(None, {}, launch_gluon)
    if loads != "ptr":
        raise ValueError(f"config {config}: knob loads={loads!r} is not one of {', '.join(map(repr, LOADS))}")
    plain = Config(config.block_m, config.block_n, config.num_warps, config.num_stages,
                   tuple((k, v) for k, v in config.extra if k != LOADS_KNOB))
    return resolve_variant(plain, FWD_KNOBS, attn_fwd_kernel)


PLAIN_FWD = Variant(attn_fwd_kernel, {})  # a config without knobs: the hot path skips the lookup


def _uses_wgmma(config: Config, arch: str) -> bool:
    # Hopper's warpgroup MMA needs whole 64-row warpgroups; smaller query tiles take mma.sync.
    return arch == "sm_90" and config.block_m % 64 == 0 and config.num_warps >= 4


def estimate_ptr_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None) -> int:
    """Estimated shared memory (bytes) of the pointer forward kernel (kernel/jit/fwd.py) compiled with `config` for `arch`.

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






def estimate_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None) -> int:
    """Estimated shared memory (bytes) of the forward kernel variant `config` selects (its `loads`
    knob: the pointer kernel, the tensor-descriptor one or the Gluon one), compiled for `arch`."""
    for name, value in config.extra:
        if name == "loads" and value == "tma":
            return estimate_tma_smem(config, head_dim, dtype, arch)
        if name == "loads" and value == "gluon":
            return estimate_gluon_smem(config, head_dim, dtype, arch)
    return estimate_ptr_smem(config, head_dim, dtype, arch)


# Ordered from the best general-purpose choice to the smallest tile; the first one whose estimated
# shared memory fits the GPU wins. The larger tiles need Ampere-class shared memory.
_PREFERENCE: tuple[Config, ...] = (
    Config(128, 64, 8, 3),
    Config(128, 64, 4, 2),
    Config(64, 64, 4, 2),
    Config(64, 32, 4, 2),
    Config(32, 32, 4, 1),
    Config(16, 16, 2, 1),
)


def default_config(arch: str, head_dim: int, dtype: str, smem_limit: int | None = None) -> Config:
    """The first preferred config whose estimated shared memory fits the arch (or the given limit).

    Small head dims prefer a 64-wide key tile for fewer loop trips; big ones (> 128) halve the query
    tile to stay inside the register file.
    """
    dtype = normalize_dtype(dtype)
    try:
        arch = normalize_arch(arch)
        known = True
    except ValueError:
        known = False  # a real but unlisted GPU: plan for the smallest chip and any MMA path
    if smem_limit is None:
        smem_limit = ARCH_SMEM[arch] if known else FALLBACK_SMEM
    # The tiles hold the padded head dim: 72 runs in 128 columns, 136 and up in 256.
    candidates = _PREFERENCE if padded_head_dim(head_dim) <= 128 else _PREFERENCE[2:]
    for config in candidates:
        if estimate_smem(config, head_dim, dtype, arch if known else None) <= smem_limit:
            return config
    return _PREFERENCE[-1]


def check_config(config: Any, shape: AttnShape, smem_limit: int | None, arch: str | None = None) -> None:
    """Raise if `config` is not a Config, has a knob the kernel does not know (kernel.ops.fwd), or
    its estimated shared memory on `arch` exceeds `smem_limit`."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a flashtune.db.types.Config, got {type(config).__name__}")
    fwd_variant(config)
    if smem_limit is not None:
        check_smem(f"config {config}", estimate_smem(config, shape.head_dim, shape.dtype, arch), shape.head_dim,
                   shape.dtype, smem_limit)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttnShape, *, causal: bool,
           scale: float, config: Config, return_lse: bool = False, fp32_precision: str = "ieee",
           out: torch.Tensor | None = None, mods: ScoreMods = NO_MODS, fp8: Fp8Scales | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Launch the kernel with no input checks; returns (o, lse or None, Triton's compiled kernel or None).

    The dispatcher's hot path and the tuner call this after validating once. `config.extra` selects
    the kernel variant (kernel.ops.fwd; ValueError for a knob the kernel does not know, raised
    before anything runs). Triton's own errors (OutOfResources, CompilationError) propagate
    unchanged so the tuner can record them. `mods` (kernel.mods, checked by the caller) modify the
    scores: softcap, window (top-left, diag = 0), sinks, ALiBi, attn_mask, dropout (a TMA config takes the
    first four: ValueError for a mask or dropout). The LSE is then the modified scores' (sinks included, -inf
    for a row that sees no key, whose output is 0); it never includes dropout.

    `fp8`: q, k, v are float8_e4m3fn with these dequantisation factors (kernel.fp8 checks them); the output
    has `fp8.out_dtype`, V is laid out key-contiguous first (`fp8_value_layout`), and only the pointer kernel
    runs (ValueError for a TMA config).
    """
    variant = fwd_variant(config) if config.extra else PLAIN_FWD
    if fp8 is not None:
        if variant.launch is not None:
            raise ValueError(f"config {config}: fp8 inputs run on the pointer kernel only (loads='ptr')")
        if config.block_n < FP8_MIN_K:
            raise ValueError(f"config {config}: fp8 inputs need block_n >= {FP8_MIN_K} (the fp8 MMA reduces over "
                             f"at least {FP8_MIN_K} keys in P·V)")
        v = fp8_value_layout(v)
        o = torch.empty_like(q, dtype=fp8.out_dtype) if out is None else out
        lse = _lse_buffer(q, shape) if return_lse else o
        grid, args, kwargs = _fwd_arguments(q, k, v, o, lse, shape, causal, scale, config, return_lse,
                                            fp32_precision, variant.constexprs, mods, fp8)
        return o, (lse if return_lse else None), variant.kernel[grid](*args, **kwargs)
    if variant.launch is not None:
        return variant.launch(q, k, v, shape, causal=causal, scale=scale, config=config, return_lse=return_lse,
                              fp32_precision=fp32_precision, out=out, mods=mods)
    o = torch.empty_like(q) if out is None else out
    lse = _lse_buffer(q, shape) if return_lse else o
    grid, args, kwargs = _fwd_arguments(q, k, v, o, lse, shape, causal, scale, config, return_lse, fp32_precision,
                                        variant.constexprs, mods)
    compiled = variant.kernel[grid](*args, **kwargs)
    return o, (lse if return_lse else None), compiled


_TENSORS = 5  # q, k, v, o, lse lead the pointer kernel's arguments


_SCALE_AT = 20  # qk_scale's place among the arguments after them: 16 strides, seq_q, seq_k, heads_q, group
_CAP_AT = 21  # then cap_in and cap_out (softcap)


def _lse_buffer(q: torch.Tensor, shape: AttnShape) -> torch.Tensor:
    return torch.empty((shape.batch, shape.heads_q, shape.seq_q), device=q.device, dtype=torch.float32)


# The modifier arguments of a call without window, sinks, ALiBi, mask or dropout: window sides, diag, the
# sinks and ALiBi pointers with ALiBi's strides, the mask pointer with its 4 strides, dropout_p, seed. The
# kernel reads none of them (their flags are off); None pointers compile as constants.
_NO_MOD_ARGS: tuple[Any, ...] = (0, 0, 0, None, None, 0, 0, None, 0, 0, 0, 0, 0.0, 0)


def mod_arguments(mods: ScoreMods, causal: bool, diag: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The pointer kernel's modifier arguments for `mods` (after cap_out, in attn_fwd_kernel's order) and their
    constexpr flags, softcap excepted (it travels with the scale)."""
    if mods.plain:
        return _NO_MOD_ARGS, {"WINDOW": False, "SINKS": False, "ALIBI": False, "MASK": 0, "DROPOUT": False}
    before, after = mods.window_sides(causal)
    alibi, mask = mods.alibi, mods.mask
    args = (before, after, diag, mods.sinks, alibi, *(alibi.stride() if alibi is not None else (0, 0)),
            mask, *(mask.stride() if mask is not None else (0, 0, 0, 0)), float(mods.dropout_p), int(mods.seed))
    flags = {"WINDOW": mods.windowed, "SINKS": mods.sinks is not None, "ALIBI": alibi is not None,
             "MASK": {"none": 0, "bool": 1, "float": 2}[mods.mask_kind], "DROPOUT": bool(mods.dropout_p)}
    return args, flags


def _fwd_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                   shape: AttnShape, causal: bool, scale: float, config: Config, return_lse: bool,
                   fp32_precision: str, constexprs: Any, mods: ScoreMods = NO_MODS,
                   fp8: Fp8Scales | None = None) -> tuple[tuple[int], tuple[Any, ...], dict[str, Any]]:
    """The pointer kernel's (grid, positional arguments, keyword arguments) for one call."""
    grid = one_axis_grid(shape.batch, shape.heads_q, shape.seq_q, config.block_m)
    softcap = mods.softcap
    cap_in, cap_out = softcap_factors(scale, softcap) if softcap else (0.0, 0.0)
    mod_args, flags = mod_arguments(mods, causal)
    args = (q, k, v, o, lse,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            shape.seq_q, shape.seq_k, shape.heads_q, shape.group, scale * LOG2E, cap_in, cap_out, *mod_args)
    block_d = padded_head_dim(shape.head_dim) if fp8 is None else max(FP8_MIN_K, padded_head_dim(shape.head_dim))
    kwargs = dict(HEAD_DIM=shape.head_dim, BLOCK_D=block_d,
                  BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                  CAUSAL=bool(causal), STORE_LSE=return_lse, PRECISION=fp32_precision, SOFTCAP=bool(softcap),
                  **flags, **(_NO_FP8 if fp8 is None else fp8.kernel_args()),
                  num_warps=config.num_warps, num_stages=config.num_stages, **constexprs)
    return grid, args, kwargs


def launch_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttnShape, *, causal: bool,
                  scale: float, config: Config, return_lse: bool, cache: dict[Any, Any], mods: ScoreMods = NO_MODS
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """launch() for a caller that keeps `cache` per input signature (the dispatcher's Plan): (o, lse or None).

    The first call goes through Triton's JIT and keeps its compiled kernel in `cache`; later calls
    relaunch it directly (kernel.fastlaunch), allocating only the output (and the LSE when asked), as
    long as the pointers keep the 16-byte alignment the kernel was specialised for (else the JIT
    decides, as before). Only the pointer kernel: the TMA variant has its own launch, with tensor
    descriptors, and always takes it. Never under the interpreter. Softcap on or off is compiled in: a
    `cache` serves calls of one of the two (the dispatcher's plans are per key, softcap a key field).
    Calls with other modifiers (`mods.plain` false: their tensors and window change per call) always
    take launch(), through the JIT.
    """
    if mods is not NO_MODS and not mods.plain:  # identity first: the plain call pays one comparison
        return launch(q, k, v, shape, causal=causal, scale=scale, config=config, return_lse=return_lse,
                      mods=mods)[:2]
    softcap = mods.softcap
    fast = cache.get(return_lse)
    if fast is None and not _device.INTERPRET and q.device.type == "cuda":
        variant = fwd_variant(config) if config.extra else PLAIN_FWD
        if variant.launch is not None:
            cache[return_lse] = False  # the TMA kernel: never fast, do not ask again
        else:
            from .. import fastlaunch

            o = torch.empty_like(q)
            lse = _lse_buffer(q, shape) if return_lse else o
            grid, args, kwargs = _fwd_arguments(q, k, v, o, lse, shape, causal, scale, config, return_lse,
                                                "ieee", variant.constexprs, mods)
            compiled = variant.kernel[grid](*args, **kwargs)
            cache[return_lse] = fastlaunch.build(variant.kernel, compiled, grid, args, kwargs, _TENSORS) or False
            return o, (lse if return_lse else None)
    out = None
    if fast:
        out = torch.empty_like(q)
        lse = _lse_buffer(q, shape) if return_lse else out
        replace = {_SCALE_AT: scale * LOG2E}
        if softcap:  # an uncapped launcher was built with the factors at 0.0 and keeps them
            replace[_CAP_AT], replace[_CAP_AT + 1] = softcap_factors(scale, softcap)
        if fast.call((q, k, v, out, lse), replace):
            return out, (lse if return_lse else None)
    return launch(q, k, v, shape, causal=causal, scale=scale, config=config, return_lse=return_lse, out=out,
                  mods=mods)[:2]


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: float | None = None, config: Config | None = None, return_lse: bool = False,
                  fp32_precision: str = "ieee", softcap: float = 0.0, window_size: tuple[int, int] | None = None,
                  sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward, O = softmax(scale·QKᵀ [+ causal mask] [+ modifiers])·V, with an explicit config.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq a multiple of Hkv; any strides. `causal` (a bool)
    is top-left aligned like torch SDPA's is_causal. `config=None` takes the device's default.
    float32 inputs use IEEE fp32 dots unless fp32_precision="tf32". With return_lse, also returns
    the fp32 row log-sum-exp of the scaled (modified) scores, (B, Hq, Nq), the sinks included.

    Score modifiers (kernel.mods; a TMA config takes all but attn_mask): `softcap` c > 0
    caps the scaled scores to c·tanh(s/c); `window_size` (left, right) lets query i see keys i − left ..= i +
    right (-1: unbounded); `sinks` (Hq,) join each row's softmax denominator; `alibi_slopes` (Hq,) or (B, Hq)
    subtract slope·|j − i|; `attn_mask` (SDPA's, broadcastable to (B, Hq, Nq, Nk)) bool (True: take part)
    or float (added). A row that sees no key gives 0 (lse -inf). No dropout: this is the inference launch.
    Inputs that require grad while grad mode is on raise NotImplementedError: train through
    `flashtune.kernel.attention`, which has a backward.
    """
    shape = check_inputs(q, k, v)
    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    if needs_grad(q, k, v):
        raise NotImplementedError(f"attention_fwd does not support {GRAD_UNSUPPORTED}")
    scale = check_scale(scale, shape.head_dim)
    mods = check_mods(shape, q.device, softcap=softcap, window_size=window_size, sinks=sinks,
                      alibi_slopes=alibi_slopes, attn_mask=attn_mask)
    if mods.plain and not mods.softcap:
        mods = NO_MODS
    precision = check_precision(fp32_precision)
    arch, smem_limit = device_limits(q)
    if config is None:
        config = default_config(arch or "sm_80", shape.head_dim, shape.dtype, smem_limit)
    check_config(config, shape, smem_limit, arch)
    o, lse, _ = launch(q, k, v, shape, causal=causal, scale=scale, config=config,
                       return_lse=return_lse, fp32_precision=precision, mods=mods)
    return (o, lse) if return_lse else o
