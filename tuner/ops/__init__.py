"""The ops the tuner knows: one `OpSpec` per op name, each op's search space and workload in its own
module (`fwd`, `bwd`, `kvcache`), on what they share (`spec`: the OpSpec type; `inputs`: the
benchmark inputs' base class; `space`: the space's building blocks).

Adding an op is one module, one import and one entry here (and its name in db.types.OPS).
"""
from __future__ import annotations

from ...db.types import Key

from .bwd import BWD
from .fwd import FWD
from .kvcache import KVCACHE
from .spec import OpSpec

__all__ = ["OPS", "OpSpec", "op_spec", "spec_of"]

OPS: dict[str, OpSpec] = {spec.name: spec for spec in (FWD, BWD, KVCACHE)}


def op_spec(op: str) -> OpSpec:
    """The spec of `op`; ValueError naming the ops the tuner can time."""
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"the tuner cannot time op {op!r}: it knows {', '.join(OPS)}") from None


def spec_of(key: Key) -> OpSpec:
    """The spec of `key.op`."""
    return op_spec(key.op)
