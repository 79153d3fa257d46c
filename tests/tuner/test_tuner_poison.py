"""The harness validates every candidate into NaN-filled outputs, for every op.

A candidate that leaves part of its output unwritten must be a `wrong_result`, also when a correct
candidate wrote the same memory just before it: on CUDA the caching allocator hands a freed output
straight to the next allocation, so without poisoning the stale, correct values would pass the check.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from flashtune.db.types import Config, Key
from flashtune.tuner.bench import LocalBench
from flashtune.tuner.ops import spec_of

GOOD = {"fwd": Config(16, 16, 2, 1), "kvcache": Config(16, 16, 2, 1, {"num_splits": 1}),
        "bwd": Config(16, 16, 2, 1, {"block_m_dq": 16, "block_n_dq": 16})}
LAZY_BLOCK_N = 32  # the lazy candidate differs from the good one in BLOCK_N only


def _lazy(op: str) -> Config:
    good = GOOD[op]
    return Config(good.block_m, LAZY_BLOCK_N, good.num_warps, good.num_stages, dict(good.extra_dict))


class HalfWriting:
    """A real workload whose lazy candidate computes the right answer but writes only the first half of the
    rows of each output. Without `out` it writes into one buffer it keeps, as a caching allocator reuses a
    freed block: the good candidate's output is still there when the lazy one runs."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.key, self.batch_heads = inner, inner.key, inner.batch_heads
        self.kept: Any = None

    def run(self, config: Config, out: Any = None) -> tuple[Any, Any]:
        if out is None:
            self.kept = self.kept if self.kept is not None else self.inner.buffers()
            out = self.kept
        result, compiled = self.inner.run(config, out=self.inner.buffers())
        pairs = zip(out, result) if isinstance(out, tuple) else [(out, result)]
        for target, value in pairs:
            rows = target.shape[-2] // 2 if config.block_n == LAZY_BLOCK_N else target.shape[-2]
            target[..., :rows, :].copy_(value[..., :rows, :])
        return out, compiled

    def check(self, output: Any) -> str | None:
        return self.inner.check(output)

    def buffers(self) -> Any:
        return self.inner.buffers()


def half_writing(key: Key, batch_heads: int, device: torch.device, seed: int, **sizing: Any) -> HalfWriting:
    return HalfWriting(spec_of(key).workload(key, batch_heads, device, seed, **sizing))


@pytest.mark.parametrize("op, seq_q", [("fwd", 32), ("bwd", 32), ("kvcache", 4)])
@pytest.mark.parametrize("careful", [False, True])
def test_a_candidate_that_leaves_rows_unwritten_is_a_wrong_result(op, seq_q, careful, kernel_device):
    key = Key("sm_90", op, seq_q, 16, "float32", False, seq_len_kv=32, batch_heads=2)
    bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 2), workload=half_writing)
    results = {m.config: m for m in bench.measure(key, 2, [GOOD[op], _lazy(op)], careful=careful)}
    assert results[GOOD[op]].outcome == "ok"
    lazy = results[_lazy(op)]
    assert lazy.outcome == "wrong_result" and lazy.median_ms is None
    assert "relative error inf" in lazy.error or "nan" in lazy.error.lower()


def test_the_wrapped_workload_is_right_when_it_writes_everything(kernel_device):
    # The wrapper itself is faithful: the good candidate's output into its kept buffer matches the reference.
    key = Key("sm_90", "fwd", 32, 16, "float32", False, seq_len_kv=32, batch_heads=2)
    work = HalfWriting(spec_of(key).workload(key, 2, torch.device(kernel_device), 0))
    out, _ = work.run(GOOD["fwd"])
    assert work.check(out) is None
    out, _ = work.run(_lazy("fwd"))  # half of it rewritten with the same values
    assert work.check(out) is None
