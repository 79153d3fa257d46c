"""What a benchmark returns, the interface every benchmark implements, and one driven by a function.

The tuning loop only talks to a `Bench`: the GPU worker process in production, the in-process
harness under the Triton interpreter, or a cost model in tests (`FunctionBench`), so the whole loop
runs without a GPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

from ..db.types import OUTCOMES, Config, Key


@dataclass(frozen=True)
class Measurement:
    """The result of benchmarking one config for one key."""

    config: Config
    outcome: str  # one of db.types.OUTCOMES
    median_ms: float | None = None
    compile_s: float | None = None
    error: str | None = None
    # Careful pass only, on the config timed twice as two interleaved entries (the first of the
    # batch: the loop puts the default there): |t1 − t2| / min(t1, t2), the pass's relative noise.
    noise: float | None = None
    # B·Hq the bench really ran when the GPU's free memory made it shrink the key's batch (tuner.bench);
    # None: the B·Hq asked for.
    batch_heads: int | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}: expected one of {', '.join(OUTCOMES)}")
        if self.outcome == "ok" and (self.median_ms is None or not self.median_ms > 0):
            raise ValueError(f"an ok measurement needs a positive median_ms, got {self.median_ms!r}")

    def to_wire(self) -> dict[str, Any]:
        """Picklable plain form for the worker pipe."""
        data = asdict(self)
        data["config"] = str(self.config)
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Measurement":
        """Inverse of `to_wire`."""
        return cls(**{**data, "config": Config.parse(data["config"])})


class Bench(Protocol):
    """Compiles, validates and times configs for a key; yields one Measurement per config, any order."""

    def measure(self, key: Key, batch_heads: int, configs: Sequence[Config], *,
                careful: bool) -> Iterator[Measurement]:
        """`careful=False` is the short first pass (few repetitions); True the careful timing."""
        ...

    def close(self) -> None:
        """Release what the bench holds (a worker process, GPU memory)."""
        ...


CostFn = Callable[[Key, Config, bool], "float | str | Measurement"]


class FunctionBench:
    """A Bench whose results come from `cost(key, config, careful)`.

    The function returns a time in ms (an `ok` trial), an outcome name (a failed trial), or a full
    Measurement. Tests use it as a deterministic cost model; nothing is compiled or launched. Like
    LocalBench, the careful pass asks for the first config's time twice (not logged in `calls` twice)
    and reports their relative difference as its `noise`.
    """

    def __init__(self, cost: CostFn) -> None:
        self._cost = cost
        self.calls: list[tuple[Key, Config, bool]] = []

    def measure(self, key: Key, batch_heads: int, configs: Sequence[Config], *,
                careful: bool) -> Iterator[Measurement]:
        for i, config in enumerate(configs):
            self.calls.append((key, config, careful))
            result = self._cost(key, config, careful)
            if isinstance(result, Measurement):
                yield result
            elif isinstance(result, str):
                yield Measurement(config, result, error=f"{result} (cost model)")
            else:
                ms, noise = float(result), None
                if careful and i == 0:
                    again = self._cost(key, config, careful)
                    if isinstance(again, (int, float)) and min(ms, again) > 0:
                        noise = abs(ms - again) / min(ms, again)
                yield Measurement(config, "ok", median_ms=ms, compile_s=0.0, noise=noise)

    def close(self) -> None:
        pass
