"""The ops the tuner knows: one `OpSpec` per op name, each defined in its own module.

Adding an op is one import and one entry here (and its name in db.types.OPS).
"""
from __future__ import annotations

from ..db.types import Key

from .op_bwd import BWD
from .op_fwd import FWD
from .op_kvcache import KVCACHE
from .workload import OpSpec

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
