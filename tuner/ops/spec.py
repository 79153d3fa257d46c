"""What the tuner needs to know about one op: the `OpSpec` each op module fills in, and the `Workload`
its benchmark runs.

The loop, the session, the benchmark harness and `tune` never name an op: they ask `tuner.ops` for
the key's `OpSpec` and use what it gives -- the candidate configs, the default, the FLOP count of
the rate column, whether torch SDPA's backends compete, and the benchmark inputs with their
reference check. An op lives in its own module of this package (`fwd`, `bwd`, `kvcache`) and is
one entry of `tuner.ops.OPS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from ...db.types import Config, Key

if TYPE_CHECKING:
    import torch

    from ..gpu import GpuInfo
    from .inputs import OpInputs
    from .space import Candidate


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
    shared memory); `smem(config, head_dim, dtype, arch)`: a config's estimated shared memory, the
    kernel registry's model of the op (kernel.ops.OPS), the one the dispatcher and the exchange file use;
    `plan(head_dim, dtype, gpu)`: the op's base space with each config's estimated
    shared memory and why it was dropped, for `tune --dry-run`; `default(key, gpu)`: the config the
    dispatcher uses untuned, always timed; `flops(key, batch_heads)`: the work of one call, for the
    TFLOP/s column; `sdpa_providers`: whether torch SDPA's backends compete for the key;
    `inputs`: the op's workload class (a tuner.ops.inputs.OpInputs), whose
    `build(key, batch_heads, device, seed, warm=False)` draws the benchmark inputs and reference
    (`workload`) or, with `warm`, the compile pool's inputs (`warm_workload`); `bytes(key, batch_heads)`:
    for a memory-bound op, the bytes one call must move, so that `tune` prints TB/s beside the
    TFLOP/s column (None: compute-bound, no TB/s). An op composed of others (the training pair) names them
    in `parts`: `tune` times a key's parts (the same key with each part's op) before the key itself, and
    `compose(key, gpu, ranked)` builds the key's candidates from each part's tuned kernel configs, fastest
    first (`ranked`: part op -> configs), in place of `space`.
    """

    name: str
    space: Callable[[Key, "GpuInfo"], list[Config]]
    plan: Callable[[int, str, "GpuInfo"], list["Candidate"]]
    default: Callable[[Key, "GpuInfo"], Config]
    flops: Callable[[Key, int], float]
    sdpa_providers: bool
    inputs: type["OpInputs"]
    bytes: Callable[[Key, int], int] | None = None
    parts: tuple[str, ...] = ()
    # Which keys of an op whose `sdpa_providers` is true SDPA computes the same thing for (None: all).
    sdpa_keys: Callable[[Key], bool] | None = None
    compose: Callable[[Key, "GpuInfo", Mapping[str, Sequence[Config]]], list[Config]] | None = None

    def sdpa_competes(self, key: Key) -> bool:
        """Whether torch SDPA's backends are candidates for `key`."""
        return self.sdpa_providers and (self.sdpa_keys is None or self.sdpa_keys(key))

    def smem(self, config: Config, head_dim: int, dtype: str, arch: str | None) -> int:
        """The op's shared-memory estimate of `config` (kernel.ops.OPS[name].smem)."""
        from ...kernel.ops import OPS

        return OPS[self.name].smem(config, head_dim, dtype, arch)

    def workload(self, key: Key, batch_heads: int, device: "torch.device", seed: int, *,
                 reference_bytes: int | None = None) -> Workload:
        """The benchmark inputs of `key` at `batch_heads`, drawn with `seed`, and their reference
        (computed in chunks of at most `reference_bytes`: see OpInputs.build)."""
        return self.inputs.build(key, batch_heads, device, seed, reference_bytes=reference_bytes)

    def warm_workload(self, key: Key, batch_heads: int, device: "torch.device") -> Workload:
        """The same inputs without the reference and with the batch cut to compile_batch(B): every
        launch compiles exactly as on `workload`'s, for the compile pool, which only fills Triton's
        cache (its `check` is never called)."""
        return self.inputs.build(key, batch_heads, device, warm=True)
