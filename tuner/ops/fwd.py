"""The forward as a tuner op: its search space (the pointer kernel's pruned configs plus the other
variants'), default, FLOPs and benchmark inputs.

The pointer kernel's space is pruned before anything is compiled, by two kinds of rules applied in
order, each with a reason a person can read in `--dry-run`:

- legal: the analytic shared-memory estimate (db.arch.estimate_smem) fits the GPU's per-block
  limit, every warp owns at least one 16-row MMA slab of the query tile (Triton lays the warps of a
  chained dot along M; more warps than slabs duplicate work), and the fp32 accumulator plus score
  tile fit the register file. The exhaustive sweep times this whole set.
- cost: rules of thumb that drop configs which are legal but practically never fastest, so that
  the tuner compiles tens of candidates per key instead of hundreds: a score tile too small to keep
  the warps busy, one stage (no software pipeline at all), and deeper K/V pipelines than the memory
  latency needs for big tiles.

Validation compares each candidate's output with torch SDPA's math backend in fp32 on the same
inputs (kernel.testing.fp32_reference), by relative Frobenius error (`TOLERANCE`); a key with attention
features (tuner.ops.mods) with the float64 reference of the same modifiers (tuner.ops.reference).
"""
from __future__ import annotations

from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch

from ...kernel.ops.fwd import estimate_smem
from ...kernel.ops.common import padded_head_dim
from ...db.types import DTYPE_BYTES, Config, ExtraValue, Key, normalize_dtype
from ...kernel.ops.fwd import default_config
from ...kernel.ops.fwd import FP8_MIN_K, Fp8Scales, launch
from ...kernel.dtypes import FP8_NAME
from ...kernel.mods import NO_MODS, ScoreMods
from ...kernel.testing import attention_flops as shape_flops, fp32_reference
from ...kernel.providers import KERNEL, provider_of

from .inputs import OpInputs, unmodified
from .mods import has_features
from .reference import modified_attention
from .sdpa import run_provider, sdpa_computes
from .space import MMA_ROWS, THREAD_FP32_MAX, Candidate, full_space
from .spec import OpSpec

if TYPE_CHECKING:
    from ..gpu import GpuInfo

THREAD_SCORES_MIN = 32  # fewer score values per thread leave the tensor cores idle between loads
KV_IN_FLIGHT_MAX = 96 * 1024  # bytes of K/V prefetched ahead; beyond this more stages only cost occupancy
# Relative Frobenius-norm error allowed against the fp32 reference. A correct kernel sits near
# 1e-3 (fp16) and 8e-3 (bf16); a wrong tile schedule is off by tens of percent.
# fp8 (against the reference of the dequantised inputs): P is rounded to e4m3 (unit roundoff u = 2^-4), each
# probability off by a relative error of at most u, about u/√3 ≈ 0.036 RMS; below e4m3's normal range (2^-6)
# the error is absolute (2^-10), a larger relative one for the tail of small probabilities. Independent errors
# average: an emulation of the kernel's roundings errs by ~0.02 on N(0, 1) inputs (tests/kernel/test_fp8.py);
# 2u = 0.125 leaves room for the tail and the bf16 output, while a wrong tile or scale errs by 30% and more.
TOLERANCE: dict[str, float] = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 1e-3, FP8_NAME: 0.125}


def legal_reason(config: Config, head_dim: int, dtype: str, smem_limit: int, arch: str | None = None) -> str | None:
    """Why `config` cannot be a sensible launch for (head_dim, dtype) on `arch` with `smem_limit`; None if it can."""
    if dtype == FP8_NAME and config.block_n < FP8_MIN_K:
        return f"block_n {config.block_n} < {FP8_MIN_K}: the fp8 MMA reduces over at least {FP8_MIN_K} keys"
    smem = estimate_smem(config, head_dim, dtype, arch)
    if smem > smem_limit:
        return f"smem {smem // 1024} KB > {smem_limit // 1024} KB"
    if config.block_m < MMA_ROWS * config.num_warps:
        return f"block_m {config.block_m} < {MMA_ROWS} rows x {config.num_warps} warps"
    threads = 32 * config.num_warps
    per_thread = config.block_m * (padded_head_dim(head_dim) + config.block_n) // threads
    if per_thread > THREAD_FP32_MAX:
        return f"{per_thread} fp32 acc+score values per thread > {THREAD_FP32_MAX}"
    return None


def cost_reason(config: Config, head_dim: int, dtype: str) -> str | None:
    """Why a legal `config` is not worth timing; None if it is."""
    threads = 32 * config.num_warps
    scores = config.block_m * config.block_n // threads
    if scores < THREAD_SCORES_MIN:
        return f"{scores} score values per thread < {THREAD_SCORES_MIN}"
    if config.num_stages < 2:
        return "1 stage: no software pipeline"
    kv_stage = 2 * config.block_n * padded_head_dim(head_dim) * DTYPE_BYTES[normalize_dtype(dtype)]
    max_stages = max(2, 1 + KV_IN_FLIGHT_MAX // kv_stage)
    if config.num_stages > max_stages:
        return f"{config.num_stages} stages > {max_stages} for a {kv_stage // 1024} KB K/V stage"
    return None


def plan(head_dim: int, dtype: str, smem_limit: int, *, arch: str | None = None, cost_rules: bool = True,
         extra: Mapping[str, Sequence[ExtraValue]] | None = None,
         configs: Iterable[Config] | None = None) -> list[Candidate]:
    """Every config of the space (or of `configs`) with its estimate and the first rule that drops it."""
    dtype = normalize_dtype(dtype)
    out = []
    for config in (full_space(extra) if configs is None else configs):
        reason = legal_reason(config, head_dim, dtype, smem_limit, arch)
        if reason is None and cost_rules:
            reason = cost_reason(config, head_dim, dtype)
        out.append(Candidate(config, estimate_smem(config, head_dim, dtype, arch), reason))
    return out


def candidates(head_dim: int, dtype: str, smem_limit: int, *, arch: str | None = None, cost_rules: bool = True,
               extra: Mapping[str, Sequence[ExtraValue]] | None = None) -> list[Config]:
    """The configs the tuner times for (head_dim, dtype) on `arch` with `smem_limit` bytes per block."""
    return [c.config for c in plan(head_dim, dtype, smem_limit, arch=arch, cost_rules=cost_rules, extra=extra)
            if c.kept]


def variant_candidates(head_dim: int, dtype: str, causal: bool, smem_limit: int, *, arch: str) -> list[Config]:
    """The other kernel variants' configs for a key: the tensor-descriptor (TMA) kernel's tiles, warp
    specialisation and causal schedules on archs with TMA (none elsewhere: `--dry-run --arch sm_86`
    lists none), and the Gluon kernel's on sm_90 where this Triton builds it, each fitting `smem_limit` by
    its own shared-memory model."""
    from ...kernel.ops.fwd_gluon import gluon_candidates
    from ...kernel.ops.fwd_tma import tma_candidates

    dtype = normalize_dtype(dtype)
    return [*tma_candidates(arch, head_dim, dtype, causal, smem_limit),
            *gluon_candidates(arch, head_dim, dtype, causal, smem_limit)]


def attention_flops(key: Key, batch_heads: int) -> float:
    """Forward FLOPs: 4·B·H·Nq·Nk·D, half when causal."""
    return shape_flops(batch_heads, key.seq_len, key.seq_len_kv, key.head_dim, key.causal)


@lru_cache(maxsize=256)
def _space(head_dim: int, dtype: str, causal: bool, smem_limit: int, arch: str,
           variants: bool = True) -> tuple[Config, ...]:
    configs = [*candidates(head_dim, dtype, smem_limit, arch=arch),
               *(variant_candidates(head_dim, dtype, causal, smem_limit, arch=arch) if variants else ())]
    return tuple(dict.fromkeys(configs))


def fwd_space(key: Key, gpu: "GpuInfo") -> list[Config]:
    """The pointer kernel's pruned space (`candidates`) and the other variants' configs (the TMA
    kernel's on sm_90) for `key` on `gpu`; computed once per head dim, dtype, causal and GPU. A key with
    attention features, or fp8 inputs, gets the pointer kernel's alone: the TMA kernel takes neither."""
    variants = not has_features(key) and key.dtype != FP8_NAME
    return list(_space(key.head_dim, key.dtype, key.causal, gpu.smem_limit, gpu.arch, variants))


def sdpa_same(key: Key) -> bool:
    """Whether torch SDPA computes `key`'s call: not with a softcap, sinks or dropout (tuner.ops.sdpa)."""
    return sdpa_computes(key)


def fwd_plan(head_dim: int, dtype: str, gpu: "GpuInfo") -> list[Candidate]:
    """The pointer kernel's whole space with estimates and drop reasons (`tune --dry-run`)."""
    return plan(head_dim, dtype, gpu.smem_limit, arch=gpu.arch)


def fwd_default(key: Key, gpu: "GpuInfo") -> Config:
    """kernel.ops.fwd.default_config for the key on this GPU's shared memory."""
    return default_config(key.arch, key.head_dim, key.dtype, gpu.smem_limit)


def fwd_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: Key, *,
                  max_bytes: int | None = None, mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """SDPA's math attention in fp32 for `key`'s inputs, `max_bytes` of scores at a time. It has no GQA: each
    K/V head serves `key.group` consecutive query heads (the kernel's and SDPA's enable_gqa mapping), so they
    are repeated up to Hq. With score modifiers `mods`: the float64 reference of the same modifiers, in fp32
    (tuner.ops.reference)."""
    if not unmodified(mods):
        return modified_attention(q, k, v, causal=key.causal, scale=q.shape[-1] ** -0.5, mods=mods,
                                  max_bytes=max_bytes)
    rk, rv = (x.repeat_interleave(key.group, dim=1) if key.group > 1 else x for x in (k, v))
    return fp32_reference(q, rk, rv, key.causal, max_bytes=max_bytes)  # SDPA's default scale, as ours


class KeyInputs(OpInputs):
    """A forward key's inputs (tuner.ops.inputs) and the torch SDPA (math, fp32) reference; an fp8 key's
    inputs are quantised per tensor, its reference that of the dequantised inputs (exact in fp32: the scales
    are powers of two), its output bf16."""

    tolerance = TOLERANCE
    against = "torch SDPA (fp32)"
    fp8 = True

    @property
    def described(self) -> str:
        """What the reference is (of the dequantised inputs, for an fp8 key)."""
        return super().described + (" on the dequantised inputs" if self.descales is not None else "")

    @cached_property
    def fp8_scales(self) -> Fp8Scales | None:
        """The fp8 launch's descales (per tensor) and bf16 output; None for other keys."""
        if self.descales is None:
            return None
        b, hkv = self.shape.batch, self.shape.heads_kv
        qd, kd, vd = (d.reshape(()).expand(b, hkv) for d in self.descales)
        return Fp8Scales(qd, kd, vd, torch.bfloat16)

    def compute_reference(self) -> torch.Tensor:
        """`fwd_reference` of the inputs (dequantised for fp8), within the workload's reference byte budget."""
        q, k, v = self.q, self.k, self.v
        if self.descales is not None:
            q, k, v = (x.float() * d for x, d in zip((q, k, v), self.descales))
        return fwd_reference(q, k, v, self.key, max_bytes=self.reference_bytes, mods=self.mods)

    def buffers(self) -> torch.Tensor:
        """One output tensor the timed launches share (bf16 for an fp8 key)."""
        return torch.empty_like(self.q, dtype=torch.bfloat16 if self.descales is not None else None)

    def run(self, config: Config, out: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """One launch with `config`; returns (output, Triton's compiled kernel or None). A config with an
        SDPA `provider` runs torch SDPA pinned to that backend (it allocates its own output), with the attn_mask
        of the workload's modifiers where they need one."""
        provider = provider_of(config)
        if provider != KERNEL:
            return run_provider(provider, self.q, self.k, self.v, causal=self.key.causal, scale=self.scale,
                                attn_mask=self.sdpa_attn_mask), None
        o, _, compiled = launch(self.q, self.k, self.v, self.shape, causal=self.key.causal, scale=self.scale,
                                config=config, out=out, mods=self.mods, fp8=self.fp8_scales)
        return o, compiled


FWD = OpSpec("fwd", space=fwd_space, plan=fwd_plan, default=fwd_default, flops=attention_flops,
             sdpa_providers=True, inputs=KeyInputs, sdpa_keys=sdpa_same)
