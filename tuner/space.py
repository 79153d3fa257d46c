"""The launch-config search space and the rules that prune it before anything is compiled.

Two kinds of rules, applied in order, each with a reason a person can read in `--dry-run`:

- legal: the analytic shared-memory estimate (db.arch.estimate_smem) fits the GPU's per-block
  limit, every warp owns at least one 16-row MMA slab of the query tile (Triton lays the warps of a
  chained dot along M; more warps than slabs duplicate work), and the fp32 accumulator plus score
  tile fit the register file. The exhaustive sweep times this whole set.
- cost: rules of thumb that drop configs which are legal but practically never fastest, so that
  the tuner compiles tens of candidates per key instead of hundreds: a score tile too small to keep
  the warps busy, one stage (no software pipeline at all), and deeper K/V pipelines than the memory
  latency needs for big tiles.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..kernel.ops.fwd import estimate_smem
from ..kernel.ops.common import padded_head_dim
from ..db.types import DTYPE_BYTES, Config, ExtraValue, normalize_dtype

BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
NUM_WARPS: tuple[int, ...] = (2, 4, 8, 16)
NUM_STAGES: tuple[int, ...] = (1, 2, 3, 4, 5, 6)

MMA_ROWS = 16  # rows of one MMA instruction tile per warp (mma.m16n8k16; wgmma splits 64 rows over 4 warps)
THREAD_FP32_MAX = 256  # fp32 accumulator + score values per thread before the registers spill
THREAD_SCORES_MIN = 32  # fewer score values per thread leave the tensor cores idle between loads
KV_IN_FLIGHT_MAX = 96 * 1024  # bytes of K/V prefetched ahead; beyond this more stages only cost occupancy


@dataclass(frozen=True)
class Candidate:
    """A config of the space with its shared-memory estimate and, when pruned, why."""

    config: Config
    smem: int
    dropped_by: str | None = None  # None: kept

    @property
    def kept(self) -> bool:
        """Whether the config survived every rule."""
        return self.dropped_by is None


def full_space(extra: Mapping[str, Sequence[ExtraValue]] | None = None) -> list[Config]:
    """Every combination of tile sizes, warps, stages and the kernel's extra knobs, unpruned."""
    knobs = sorted((extra or {}).items())
    names = [name for name, _ in knobs]
    extras = list(itertools.product(*(values for _, values in knobs))) if knobs else [()]
    return [Config(m, n, w, s, tuple(zip(names, values)))
            for m, n, w, s, values in itertools.product(BLOCK_SIZES, BLOCK_SIZES, NUM_WARPS, NUM_STAGES, extras)]


def legal_reason(config: Config, head_dim: int, dtype: str, smem_limit: int, arch: str | None = None) -> str | None:
    """Why `config` cannot be a sensible launch for (head_dim, dtype) on `arch` with `smem_limit`; None if it can."""
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


def seeded_order(configs: Sequence[Config], seeds: Sequence[Config]) -> list[Config]:
    """`configs` with the seeds first (in their order), then the rest nearest to the first seed first.

    Timing likely winners first gives the first pass a good "best so far" early, so it can drop the
    slow ones after a handful of repetitions.
    """
    present = set(configs)
    head = [s for s in dict.fromkeys(seeds) if s in present]
    if not head:
        return list(configs)
    anchor = head[0]

    def distance(c: Config) -> float:
        return (abs((c.block_m.bit_length()) - anchor.block_m.bit_length())
                + abs(c.block_n.bit_length() - anchor.block_n.bit_length())
                + abs(c.num_warps.bit_length() - anchor.num_warps.bit_length())
                + 0.5 * abs(c.num_stages - anchor.num_stages))

    rest = sorted((c for c in configs if c not in set(head)), key=lambda c: (distance(c), str(c)))
    return head + rest


def variant_candidates(head_dim: int, dtype: str, causal: bool, smem_limit: int, *, arch: str) -> list[Config]:
    """The other kernel variants' configs for a key: the tensor-descriptor (TMA) kernel's tiles, warp
    specialisation and causal schedules on archs with TMA (none elsewhere: `--dry-run --arch sm_86`
    lists none), each fitting `smem_limit` by its own shared-memory model."""
    from ..kernel.ops.fwd_tma import tma_candidates

    return tma_candidates(arch, head_dim, normalize_dtype(dtype), causal, smem_limit)
