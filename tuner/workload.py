"""What the tuner needs to know about one op: the `OpSpec` each op module fills in, and the `Workload`
its benchmark runs.

The loop, the session, the benchmark harness and `tune` never name an op: they ask `tuner.ops` for
the key's `OpSpec` and use what it gives -- the candidate configs, the default, the FLOP count of
the rate column, whether torch SDPA's backends compete, and the benchmark inputs with their
reference check. An op lives in its own module (`op_fwd`, `op_bwd`, ...) and is one entry of
`tuner.ops.OPS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..db.types import Config, Key

if TYPE_CHECKING:
    import torch

    from .gpu import GpuInfo
    from .space import Candidate

HEADS = 16  # query heads of the benchmark inputs when B·Hq allows: one Hq for every bucket shares compiles


def split_heads(batch_heads: int, group: int = 1) -> tuple[int, int]:
    """(B, Hq) for benchmark inputs of `batch_heads` = B·Hq with Hq a multiple of `group`.

    B·Hq is exact whenever Hq can divide it, else as near as possible in log2 (a group of 3 and a
    bucket of 64: 7 × 9 = 63). Among equally near splits the one with Hq nearest HEADS wins, so
    that buckets share one Hq and hence one compiled kernel (Triton specialises on head counts).
    """
    if batch_heads < 1 or group < 1:
        raise ValueError(f"batch_heads and group must be positive, got {batch_heads} and {group}")
    target = group * max(1, round(HEADS / group))
    best: tuple[float, int, int, int] | None = None
    for heads in range(group, max(target, group) + 1, group):
        batch = max(1, round(batch_heads / heads))
        score = (abs(math.log2(batch * heads / batch_heads)), abs(heads - target), batch, heads)
        best = score if best is None or score[:2] < best[:2] else best
    assert best is not None
    return best[2], best[3]


def compile_batch(batch: int) -> int:
    """The smallest batch B' that every kernel launched on a workload of `batch` sequences compiles
    the same for: the compile pool's inputs (tuner.compile_pool) use it to save GPU memory.

    Triton specialises an integer argument on whether it equals 1 and whether it is divisible by 16
    (and on its width, which no benchmark size here reaches). The kernels get B only through the
    grid and through products B·x (the TMA kernel's persistent work count B·H·blocks), and a size-1
    batch changes the strides some launches pass (the TMA launch zeroes a size-1 dim's stride); so
    B' keeps B's gcd with 16 (then B'·x is divisible by 16 exactly when B·x is) and B' = 1 only
    when B = 1: 48 → 16, 12 → 4, 6 → 2, an odd B > 1 → 3.
    """
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    if batch == 1:
        return 1
    common = math.gcd(batch, 16)
    return common if common > 1 else min(batch, 3)


def relative_error(out: "torch.Tensor", ref: "torch.Tensor") -> float:
    """‖out − ref‖ / ‖ref‖ in fp32; inf when `out` has a NaN or inf."""
    from ..kernel.testing import output_errors

    return output_errors(out, ref)[1]


def output_problem(output: "torch.Tensor", reference: "torch.Tensor | None", tolerance: float,
                   against: str) -> str | None:
    """Why `output` is wrong: its relative error against `reference` above `tolerance` (the text names
    the reference, `against`), or None. A workload built for the compile pool has no reference."""
    if reference is None:
        raise RuntimeError("the compile pool's inputs have no reference to check against")
    err = relative_error(output, reference)
    return None if err <= tolerance else f"relative error {err:.3g} > {tolerance:g} against {against}"


def poisoned(buffers: Any) -> Any:
    """`buffers` (a tensor or a tuple of them, as `Workload.buffers` gives) NaN-filled, so that an element a
    candidate leaves unwritten fails the check instead of passing on what an earlier candidate wrote there."""
    for tensor in buffers if isinstance(buffers, tuple) else (buffers,):
        tensor.fill_(math.nan)
    return buffers


class Workload(Protocol):
    """One key's benchmark inputs on the bench device, built once per key (and once more, with the
    next seed, for the careful pass's second validation)."""

    key: Key
    batch_heads: int

    def run(self, config: Config, out: Any = None) -> tuple[Any, Any]:
        """One launch with `config`: (its output, Triton's compiled kernel(s) or None). `out`: buffers
        from `buffers()` to write into (timing), or None to allocate."""
        ...

    def check(self, output: Any) -> str | None:
        """Why `output` of `run` is wrong against the op's reference (one line), or None if it is right."""
        ...

    def buffers(self) -> Any:
        """Output buffers the timed launches write into, allocated once per timing pass."""
        ...


@dataclass(frozen=True)
class OpSpec:
    """Everything op-specific the tuner uses; one per op, registered in `tuner.ops.OPS`.

    `space(key, gpu)`: the kernel configs to time for `key` on `gpu` (pruned: every one fits its
    shared memory); `smem(config, head_dim, dtype, arch)`: a config's estimated shared memory;
    `plan(head_dim, dtype, gpu)`: the op's base space with each config's estimated
    shared memory and why it was dropped, for `tune --dry-run`; `default(key, gpu)`: the config the
    dispatcher uses untuned, always timed; `flops(key, batch_heads)`: the work of one call, for the
    TFLOP/s column; `sdpa_providers`: whether torch SDPA's backends compete for the key;
    `inputs`: the op's workload class, whose `build(key, batch_heads, device, seed, warm=False)` draws
    the benchmark inputs and reference (`workload`) or, with `warm`, the compile pool's inputs
    (`warm_workload`); `bytes(key, batch_heads)`: for a memory-bound op, the bytes one call must
    move, so that `tune` prints TB/s beside the TFLOP/s column (None: compute-bound, no TB/s).
    """

    name: str
    space: Callable[[Key, "GpuInfo"], list[Config]]
    smem: Callable[[Config, int, str, str], int]
    plan: Callable[[int, str, "GpuInfo"], list["Candidate"]]
    default: Callable[[Key, "GpuInfo"], Config]
    flops: Callable[[Key, int], float]
    sdpa_providers: bool
    inputs: Any
    bytes: Callable[[Key, int], int] | None = None

    def workload(self, key: Key, batch_heads: int, device: "torch.device", seed: int) -> Workload:
        """The benchmark inputs of `key` at `batch_heads`, drawn with `seed`, and their reference."""
        return self.inputs.build(key, batch_heads, device, seed)

    def warm_workload(self, key: Key, batch_heads: int, device: "torch.device") -> Workload:
        """The same inputs without the reference and with the batch cut to compile_batch(B): every
        launch compiles exactly as on `workload`'s, for the compile pool, which only fills Triton's
        cache (its `check` is never called)."""
        return self.inputs.build(key, batch_heads, device, warm=True)
