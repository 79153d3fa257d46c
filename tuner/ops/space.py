"""What every op's search space is made of: the tile, warp and stage values, the per-warp and register
limits the pruning rules share, a config with its verdict (`Candidate`), and the order the loop times
a space in (`seeded_order`). Each op's own rules live beside its workload (tuner.ops.fwd, bwd, kvcache).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

from ...db.types import Config, ExtraValue

BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
NUM_WARPS: tuple[int, ...] = (2, 4, 8, 16)
NUM_STAGES: tuple[int, ...] = (1, 2, 3, 4, 5, 6)

MMA_ROWS = 16  # rows of one MMA instruction tile per warp (mma.m16n8k16; wgmma splits 64 rows over 4 warps)
THREAD_FP32_MAX = 256  # fp32 accumulator + score values per thread before the registers spill


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
