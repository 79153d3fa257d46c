"""Which recorded keys matter most: each key's estimated share of the app's attention time.

`tune --recorded` tunes keys in this order, so that a `--budget` spends its time where the app
spends its own. A key's time is its recorded calls times the time of one call, estimated by a
roofline on the key's op figures (its OpSpec): max(FLOPs / peak FLOP/s, bytes / peak bandwidth),
with each arch's nominal dense fp16 tensor-core rate and memory bandwidth (`PEAKS`). Only the
ratio of the two peaks matters (every key of one ordering is of one arch): it decides when a
memory-bound op (decode, whose OpSpec has `bytes`) outweighs a compute-bound one of more FLOPs.
The call count is the tie-break: the most-called first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..db.types import Key

from .ops import spec_of

# Nominal dense fp16/bf16 tensor-core FLOP/s and memory bytes/s of each arch's flagship data-centre
# (or desktop) part: T4, A100, A10/RTX 3090, Orin, L40S, H100 SXM, B200, RTX 5090.
PEAKS: dict[str, tuple[float, float]] = {
    "sm_75": (65e12, 0.32e12),
    "sm_80": (312e12, 2.0e12),
    "sm_86": (125e12, 0.94e12),
    "sm_87": (43e12, 0.2e12),
    "sm_89": (362e12, 0.86e12),
    "sm_90": (989e12, 3.35e12),
    "sm_100": (2250e12, 8.0e12),
    "sm_120": (210e12, 1.8e12),
}
DEFAULT_PEAKS = PEAKS["sm_90"]  # an arch not listed: Hopper's ratio (about 300 FLOP per byte)


@dataclass(frozen=True)
class Ranked:
    """A recorded key with its calls, the estimated seconds of all of them and their share of the total."""

    key: Key
    calls: int
    seconds: float
    share: float


def call_seconds(key: Key) -> float:
    """Estimated seconds of one call of `key` at its B·Hq bucket (1 for a key without one): the
    roofline of its op's FLOPs and, for a memory-bound op, bytes (`PEAKS`)."""
    spec = spec_of(key)
    batch_heads = max(1, key.batch_heads)
    peak_flops, peak_bytes = PEAKS.get(key.arch, DEFAULT_PEAKS)
    seconds = spec.flops(key, batch_heads) / peak_flops
    if spec.bytes is not None:
        seconds = max(seconds, spec.bytes(key, batch_heads) / peak_bytes)
    return seconds


def by_attention_time(recorded: Iterable[tuple[Key, int]]) -> list[Ranked]:
    """(key, calls) pairs ranked by their estimated share of the attention time, largest first; the
    most-called, then the key's text, break ties. A key given twice counts its calls once per entry."""
    calls: dict[Key, int] = {}
    for key, n in recorded:
        calls[key] = calls.get(key, 0) + n
    seconds = {key: n * call_seconds(key) for key, n in calls.items()}
    total = sum(seconds.values()) or 1.0
    order = sorted(calls, key=lambda k: (-seconds[k], -calls[k], str(k)))
    return [Ranked(k, calls[k], seconds[k], seconds[k] / total) for k in order]
