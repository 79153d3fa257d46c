"""The benchmark harness for one key: inputs, the fp32 reference, compile, validate and time configs.

`LocalBench` runs in the process that owns the GPU: the worker process in production
(tuner.worker), or the test process itself under the Triton interpreter. A config's first launch
compiles it; first launches of a batch run in threads because Triton's LLVM and ptxas steps release
the GIL, so compiles overlap on the CPU cores.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..db.types import Config, Key
from ..kernel.sdpa import KERNEL, is_refusal, provider_of, run_sdpa
from ..kernel.reference import attention_flops as shape_flops, fp32_reference, output_errors, tflops as rate
from ..kernel.dtypes import TORCH_DTYPES
from ..kernel.errors import is_sticky_cuda_error, launch_failure, trial_error_text
from ..kernel.launch import AttnShape, check_inputs, launch

from .measure import Measurement
from .timing import l2_flush_buffer, median_ms_each

# Relative Frobenius-norm error allowed against the fp32 reference. A correct kernel sits near
# 1e-3 (fp16) and 8e-3 (bf16); a wrong tile schedule is off by tens of percent.
TOLERANCE: dict[str, float] = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 1e-3}
FILL_TOKENS = 1 << 17  # B·H·N of the default benchmark input: enough work for several waves
FILL_WAVES = 2  # at least this many waves of programs for the largest query tile (256)
QUICK = (2, 5)  # (warm-up, repetitions) of the first pass
CAREFUL = (10, 50)  # of the careful timing of the survivors


def fill_batch_heads(seq_len: int, sm_count: int) -> int:
    """B·H for benchmark inputs of length `seq_len`: ~FILL_TOKENS tokens and enough programs for the SMs."""
    by_tokens = math.ceil(FILL_TOKENS / seq_len)
    by_waves = math.ceil(FILL_WAVES * max(sm_count, 1) / math.ceil(seq_len / 256))
    return max(1, by_tokens, by_waves)


def attention_flops(key: Key, batch_heads: int) -> float:
    """Forward FLOPs: 4·B·H·Nq·Nk·D, half when causal."""
    return shape_flops(batch_heads, key.seq_len, key.seq_len_kv, key.head_dim, key.causal)


def tflops(key: Key, batch_heads: int, ms: float) -> float:
    """TFLOP/s of one forward call on (key, batch_heads) that took `ms`."""
    return rate(attention_flops(key, batch_heads), ms)


def classify_compile_error(error: BaseException) -> str:
    """The trial outcome for an exception raised by a config's first launch: kernel.errors'
    classification, and `compile_error` for anything else (the config did not produce a result)."""
    return launch_failure(error) or "compile_error"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32; inf when `out` has a NaN or inf."""
    return output_errors(out, ref)[1]


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


@dataclass
class KeyInputs:
    """Random inputs of a key's shape on the bench device, and the torch SDPA (math, fp32) reference.

    B·Hq is `batch_heads`, split by `split_heads`; k and v have Hq / key.group heads (real GQA inputs).
    """

    key: Key
    batch_heads: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: AttnShape
    scale: float
    reference: torch.Tensor

    @classmethod
    def build(cls, key: Key, batch_heads: int, device: torch.device, seed: int = 0) -> "KeyInputs":
        """Inputs drawn from N(0, 1) with a fixed seed; the reference is computed once per key."""
        batch, heads = split_heads(batch_heads, key.group)
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = TORCH_DTYPES[key.dtype]

        def draw(h: int, n: int) -> torch.Tensor:
            return torch.randn(batch, h, n, key.head_dim, generator=gen, device=device, dtype=dtype)

        kv_heads = heads // key.group
        q, k, v = draw(heads, key.seq_len), draw(kv_heads, key.seq_len_kv), draw(kv_heads, key.seq_len_kv)
        scale = 1.0 / math.sqrt(key.head_dim)  # fp32_reference uses SDPA's default, the same
        # The reference has no GQA: each K/V head serves `group` consecutive query heads (the kernel's
        # and SDPA's enable_gqa mapping), so repeat them up to Hq for it.
        rk, rv = (x.repeat_interleave(key.group, dim=1) if key.group > 1 else x for x in (k, v))
        ref = fp32_reference(q, rk, rv, key.causal)
        del rk, rv
        return cls(key, batch_heads, q, k, v, check_inputs(q, k, v), scale, ref)

    def run(self, config: Config, out: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """One launch with `config`; returns (output, Triton's compiled kernel or None). A config with an
        SDPA `provider` runs torch SDPA pinned to that backend (it allocates its own output)."""
        provider = provider_of(config)
        if provider != KERNEL:
            return run_sdpa(provider, self.q, self.k, self.v, causal=self.key.causal, scale=self.scale), None
        o, _, compiled = launch(self.q, self.k, self.v, self.shape, causal=self.key.causal, scale=self.scale,
                                config=config, out=out)
        return o, compiled


class LocalBench:
    """A Bench running in this process on `device` (a CUDA GPU, or the CPU under TRITON_INTERPRET=1).

    A sticky CUDA error is reported as a `crashed` measurement and then re-raised as CudaContextLost
    so that the owner (the worker) can replace the process.
    """

    def __init__(self, device: torch.device | str, *, compile_threads: int = 1, seed: int = 0,
                 quick: tuple[int, int] = QUICK, careful: tuple[int, int] = CAREFUL) -> None:
        self.device = torch.device(device)
        self.compile_threads = max(1, compile_threads)
        self.seed = seed
        self.quick, self.careful = quick, careful
        self._inputs: KeyInputs | None = None
        self._flush = l2_flush_buffer(self.device) if self.device.type == "cuda" else None

    def _inputs_for(self, key: Key, batch_heads: int) -> KeyInputs:
        current = self._inputs
        if current is None or current.key != key or current.batch_heads != batch_heads:
            self._inputs = None  # free the previous key's tensors before allocating the next
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._inputs = KeyInputs.build(key, batch_heads, self.device, self.seed)
        return self._inputs

    def _first_launch(self, inputs: KeyInputs, config: Config) -> tuple[torch.Tensor | None, float, BaseException | None]:
        start = time.perf_counter()
        try:
            out, _ = inputs.run(config)
            return out, time.perf_counter() - start, None
        except Exception as error:  # noqa: BLE001 - ptxas, LLVM and launch failures are all trial outcomes
            return None, time.perf_counter() - start, error

    def measure(self, key: Key, batch_heads: int, configs: Sequence[Config], *,
                careful: bool) -> Iterator[Measurement]:
        """Compile, validate and time `configs`. The first pass times each config as it comes; the
        careful pass times all valid configs together, repetitions interleaved (see median_ms_each),
        the first one twice: its Measurement carries the pass's `noise`."""
        inputs = self._inputs_for(key, batch_heads)
        warmup, reps = self.careful if careful else self.quick
        ready: list[tuple[Config, float]] = []
        for config, out, compile_s, error in self._first_launches(inputs, configs):
            failed = self._check(inputs, config, out, compile_s, error)
            if failed is not None:
                yield failed
            elif careful:
                ready.append((config, compile_s))
            else:
                [ms] = self._time(inputs, [config], warmup, reps)
                yield Measurement(config, "ok", median_ms=ms, compile_s=compile_s)
        if ready:
            ready = list(self._revalidated(key, batch_heads, ready))
            yield from (m for m in ready if isinstance(m, Measurement))
            ready = [r for r in ready if not isinstance(r, Measurement)]
        if ready:
            # The first config (the loop puts the default there) is timed twice, as two interleaved
            # entries: how far apart its two medians land is the noise of this very pass.
            configs = [c for c, _ in ready]
            times = self._time(inputs, [*configs, configs[0]], warmup, reps)
            noise = abs(times[0] - times[-1]) / min(times[0], times[-1]) if min(times[0], times[-1]) > 0 else None
            for i, ((config, compile_s), ms) in enumerate(zip(ready, times)):
                yield Measurement(config, "ok", median_ms=ms, compile_s=compile_s, noise=noise if i == 0 else None)

    def _revalidated(self, key: Key, batch_heads: int, ready: Sequence[tuple[Config, float]]
                     ) -> Iterator[tuple[Config, float] | Measurement]:
        """The careful pass's candidates checked once more on a second random input (another seed)
        before any of them can be timed, stored or win: a miscompile that happens to pass on one
        input (a race, a wrong mask on some rows) is caught here. Each comes back as it was, or as a
        `wrong_result` Measurement."""
        second = KeyInputs.build(key, batch_heads, self.device, self.seed + 1)
        try:
            for config, compile_s in ready:
                try:
                    out, _ = second.run(config)
                    self._sync([config])
                except Exception as error:  # noqa: BLE001 - it ran on the first input: any failure now is wrong
                    if is_sticky_cuda_error(error):
                        raise CudaContextLost([config], error) from error
                    yield Measurement(config, "wrong_result", compile_s=compile_s,
                                      error=f"second input: {trial_error_text(error)}")
                    continue
                failed = self._check(second, config, out, compile_s, None)
                if failed is not None:
                    yield Measurement(config, "wrong_result", compile_s=compile_s,
                                      error=f"second input (seed {self.seed + 1}): {failed.error}")
                else:
                    yield config, compile_s
        finally:
            del second

    def _first_launches(self, inputs: KeyInputs, configs: Sequence[Config]
                        ) -> Iterator[tuple[Config, torch.Tensor | None, float, BaseException | None]]:
        step = self.compile_threads
        for lo in range(0, len(configs), step):
            chunk = list(configs[lo:lo + step])
            if len(chunk) > 1:
                with ThreadPoolExecutor(len(chunk)) as pool:
                    firsts = list(pool.map(lambda c: self._first_launch(inputs, c), chunk))
            else:
                firsts = [self._first_launch(inputs, chunk[0])]
            self._sync(chunk)
            for config, (out, compile_s, error) in zip(chunk, firsts):
                if error is not None and len(chunk) > 1 and classify_compile_error(error) == "compile_error":
                    # Alone this time: an error that only shows up under concurrent compiles is not the config's.
                    out, compile_s, error = self._first_launch(inputs, config)
                    self._sync([config])
                yield config, out, compile_s, error

    def _sync(self, chunk: Sequence[Config]) -> None:
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError as error:
            if is_sticky_cuda_error(error):
                raise CudaContextLost(chunk, error) from error
            raise

    def _check(self, inputs: KeyInputs, config: Config, out: torch.Tensor | None, compile_s: float,
               error: BaseException | None) -> Measurement | None:
        """The failed measurement of a config whose first launch failed or was wrong; None if it is good."""
        text = trial_error_text(error) if error is not None else None
        provider = provider_of(config)
        if error is not None and provider != KERNEL:
            # An SDPA backend that declines these inputs (head dim, dtype, device) is no candidate here.
            why = f"torch refused the {provider} backend" if is_refusal(error) else f"torch SDPA {provider} failed"
            text = f"{why}: {text}"
        if error is not None or out is None:
            outcome = classify_compile_error(error) if error is not None else "compile_error"
            if outcome == "crashed" and error is not None:
                raise CudaContextLost([config], error)
            return Measurement(config, outcome, compile_s=compile_s, error=text)
        err = relative_error(out, inputs.reference)
        tol = TOLERANCE[inputs.key.dtype]
        if not err <= tol:
            return Measurement(config, "wrong_result", compile_s=compile_s,
                               error=f"relative error {err:.3g} > {tol:g} against torch SDPA (fp32)")
        return None

    def _time(self, inputs: KeyInputs, configs: Sequence[Config], warmup: int, reps: int) -> list[float]:
        buffer = torch.empty_like(inputs.q)
        fns = [lambda c=c: inputs.run(c, out=buffer) for c in configs]
        try:
            return median_ms_each(fns, warmup=warmup, reps=reps, flush=self._flush)
        except RuntimeError as run_error:
            if is_sticky_cuda_error(run_error):
                raise CudaContextLost(list(configs), run_error) from run_error
            raise

    def close(self) -> None:
        self._inputs = None
        self._flush = None


class CudaContextLost(RuntimeError):
    """A sticky CUDA error while benchmarking `configs`; this process can no longer use the GPU."""

    def __init__(self, configs: Sequence[Config], error: BaseException) -> None:
        self.configs = list(configs)
        self.error_text = trial_error_text(error)
        super().__init__(f"CUDA context lost while running {', '.join(map(str, self.configs))}: {self.error_text}")
