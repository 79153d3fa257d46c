"""The training op: one forward config and one backward config, decided together as one training step.

A training call runs the forward (keeping its row log-sum-exp) and, later, the backward of the same shape.
Tuned apart, the two cannot be compared with torch SDPA, whose backward is tied to its own forward; decided
as a pair they can: a `train` key's candidates are kernel pairs and each SDPA backend's own forward and
backward, all timed as one step.

A pair is one `Config`: the forward's own fields and knobs, with the backward config's fields and knobs
beside them under the `bwd_` prefix (`bwd_block_m`, `bwd_block_n`, `bwd_num_warps`, `bwd_num_stages`,
`bwd_block_m_dq`, `bwd_deterministic`, ...), so a pair is stored, exchanged and read like any config.
"""
from __future__ import annotations

from functools import lru_cache

from ...db.types import Config

from . import bwd, fwd

PREFIX = "bwd_"
_SIZES = ("block_m", "block_n", "num_warps", "num_stages")


def pair_config(forward: Config, backward: Config) -> Config:
    """The training pair of `forward` (a forward config) and `backward` (a backward config)."""
    sizes = tuple((PREFIX + name, getattr(backward, name)) for name in _SIZES)
    knobs = tuple((PREFIX + name, value) for name, value in backward.extra)
    return Config(forward.block_m, forward.block_n, forward.num_warps, forward.num_stages,
                  forward.extra + sizes + knobs)


@lru_cache(maxsize=1024)
def split_pair(config: Config) -> tuple[Config, Config]:
    """(forward config, backward config) of a training pair; ValueError when a backward size is missing."""
    extra = config.extra_dict
    missing = [PREFIX + name for name in _SIZES if PREFIX + name not in extra]
    if missing:
        raise ValueError(f"config {config} is no training pair: it lacks {', '.join(missing)}")
    sizes = [extra[PREFIX + name] for name in _SIZES]
    if any(isinstance(s, bool) or not isinstance(s, int) for s in sizes):
        raise ValueError(f"config {config}: the backward sizes {', '.join(PREFIX + n for n in _SIZES)} "
                         "must be integers")
    knobs = tuple((name[len(PREFIX):], value) for name, value in config.extra
                  if name.startswith(PREFIX) and name[len(PREFIX):] not in _SIZES)
    backward = Config(*sizes, knobs)  # type: ignore[arg-type]
    forward = Config(config.block_m, config.block_n, config.num_warps, config.num_stages,
                     tuple((name, value) for name, value in config.extra if not name.startswith(PREFIX)))
    return forward, backward


def train_knobs(config: Config) -> tuple[Config, Config]:
    """The pair's two configs, each checked by its own op's knob rules (ValueError/TypeError naming the
    problem)."""
    forward, backward = split_pair(config)
    fwd.fwd_variant(forward)
    bwd.bwd_knobs(backward)
    return forward, backward


def estimate_train_smem(config: Config, head_dim: int, dtype: str, arch: str | None = None) -> int:
    """The larger of the two passes' shared-memory estimates (they never run at once)."""
    forward, backward = split_pair(config)
    return max(fwd.estimate_smem(forward, head_dim, dtype, arch), bwd.estimate_bwd_smem(backward, head_dim, dtype, arch))


def default_train_config(arch: str, head_dim: int, dtype: str, smem_limit: int | None = None) -> Config:
    """The default forward config paired with the default backward config."""
    return pair_config(fwd.default_config(arch, head_dim, dtype, smem_limit),
                       bwd.default_bwd_config(arch, head_dim, dtype, smem_limit))
