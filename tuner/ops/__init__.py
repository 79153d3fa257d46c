"""The ops the tuner knows: one `OpSpec` per op name, each op's search space and workload in its own
module (`fwd`, `bwd`, `kvcache`, `train`, `varlen`: the packed forward and backward), on what they share (`spec`: the OpSpec type; `inputs`: the
benchmark inputs' base class; `space`: the space's building blocks).

Adding an op is one module, one import and one entry here (and its name in db.types.OPS).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

from ...db.types import Key

from .bwd import BWD
from .fwd import FWD
from .kvcache import KVCACHE
from .spec import OpSpec
from .train import TRAIN
from .varlen import VARLEN, VARLEN_BWD

__all__ = ["OPS", "OpSpec", "op_spec", "spec_of", "with_parts"]

OPS: dict[str, OpSpec] = {spec.name: spec for spec in (FWD, BWD, KVCACHE, TRAIN, VARLEN, VARLEN_BWD)}


def op_spec(op: str) -> OpSpec:
    """The spec of `op`; ValueError naming the ops the tuner can time."""
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"the tuner cannot time op {op!r}: it knows {', '.join(OPS)}") from None


def spec_of(key: Key) -> OpSpec:
    """The spec of `key.op`."""
    return op_spec(key.op)


def part_keys(key: Key) -> list[Key]:
    """The keys `key`'s op is composed of (its spec's `parts`): the same key with each part's op."""
    return [dataclasses.replace(key, op=part) for part in spec_of(key).parts]


def with_parts(keys: Iterable[Key]) -> list[Key]:
    """`keys` in their order, each composed key preceded by its parts that are not already earlier in the
    list: `tune` times the parts first, and the composed key's candidates come from their trials."""
    out: dict[Key, None] = {}
    for key in keys:
        for part in part_keys(key):
            out.setdefault(part)
        out.setdefault(key)
    return list(out)
