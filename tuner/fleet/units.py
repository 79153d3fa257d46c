"""How a job's keys are cut into claim units.

A unit is a sibling class: the keys that differ only in their B·Hq bucket. The tuning loop times
the whole space for the first bucket of a class and only that bucket's fastest configs for the
others (`tuner.loop`, `TuneSettings.sibling_top`), from a ranking it keeps in memory. Dealing a
whole class to one worker keeps that rule exactly as a single-GPU run applies it, so a parallel run
times the same candidates and stores the same winners; a worker that takes over a unit whose
first bucket an earlier (dead) holder finished rebuilds the ranking from that key's stored trials,
as any resumed run does. Taking the ranking from the database instead would make a sibling wait
for, or race, the worker timing its first bucket.
"""
from __future__ import annotations

from typing import Hashable, Sequence

from ...db.types import Key
from ..loop import sibling_class


def family(key: Key) -> Hashable:
    """What keys sharing compiled kernels have in common: all but the lengths and the bucket."""
    return (key.arch, key.op, key.head_dim, key.dtype, key.causal, key.group, key.features)


def claim_units(keys: Sequence[Key]) -> list[tuple[Hashable, list[Key]]]:
    """`keys` (in the order to tune them) as (family, sibling class) units, in order of first
    appearance; within a unit the keys keep their order, so the first bucket listed is timed in full."""
    units: dict[Key, list[Key]] = {}
    for key in dict.fromkeys(keys):
        units.setdefault(sibling_class(key), []).append(key)
    return [(family(unit[0]), unit) for unit in units.values()]
