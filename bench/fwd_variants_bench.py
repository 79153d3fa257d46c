"""Forward kernel variants on one GPU: the pointer kernel, the TMA kernel (ws off/on × configs ×
schedules), torch SDPA's cuDNN and flash backends, all in one process.

Shapes: 16k tokens (B = 16384 / N), H·D = 2048, D in --head-dim (64, 128), N in --seq (4096, 16384), fp16 and
bf16, causal both ways. Per shape, every candidate is first run once on NaN-poisoned output and checked
against torch SDPA's math backend in fp32 (chunked; kernel.testing.fp32_reference) with the tuner's
tolerances: a NaN or a wrong result is `wrong_result` and is never timed or best. Compile failures
(Triton's MLIR pass failures arrive as RuntimeError) are `compile_error` with their first line;
`out_of_resources` likewise. The survivors are timed interleaved (tuner.timing: CUDA events, L2 flushed
before each repetition, median), then the best of each variant is re-validated on fresh random inputs.
TFLOP/s = 4·B·H·N²·D, half when causal.

Kernels compile first, in a thread pool (Triton's LLVM and ptxas steps release the GIL), on small inputs
that share the real shapes' specialisation (TMA kernels compile-only through fwd_tma.compile_tma), so the
timing loop only loads them; then each new TMA kernel's first launch runs alone on the small inputs. A
watchdog ends the run (writing everything measured so far, the step it hung in recorded as `timeout`)
if one step makes no progress for --step-timeout seconds, e.g. a miscompiled warp-specialised kernel
waiting on a barrier forever; rerun with --skip REGEX to leave that config out. A sticky CUDA error
(illegal address) marks the rest `skipped`.

Writes <out>/fwd_variants_bench.json (every (variant, config, shape) outcome and time, the miscompiles by
Triton version, the best per shape, and the registers / shared memory / HGMMA and TMA instructions of the
best TMA kernel at D=128, N=4096) and prints a table last.

    python3 bench/fwd_variants_bench.py --out bench/results/h200                  # the H200, ~3-4 min
    TRITON_INTERPRET=1 python3 bench/fwd_variants_bench.py --smoke --out /tmp/x   # CPU, tiny shapes
    python3 bench/fwd_variants_bench.py --smem-offline smem.jsonl --head-dim 128   # CPU: the smem model
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    Runs,
    Shapes,
    arguments,
    error_line,
    import_flashtune,
    interleaved_ms,
    out_dir,
    print_table,
    provenance,
    require_gpu,
    use_interpreter,
    write_json,
)

use_interpreter("--smoke" in sys.argv)  # before triton is first imported (by flashtune.kernel below)

import_flashtune()

import triton
from flashtune.db.types import Config
from flashtune.kernel.checks import check_inputs
from flashtune.kernel.device import triton_interprets
from flashtune.kernel.ops import fwd_tma
from flashtune.kernel.ops.fwd import launch
from flashtune.kernel.testing import (
    attention_flops,
    fp32_reference,
    output_errors,
    tflops,
)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Relative-norm error allowed against the fp32 reference: the tuner's (tuner/bench.py TOLERANCE).
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-3}
TOKENS, HIDDEN = 16384, 2048

# The pointer kernel: its H200 winners at N >= 4096 (bench/results/h200/kernel_fwd_summary.json) and a neighbour.
PTR_GRID = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2)]
# The TMA kernel without warp specialisation: the pointer kernel's winner, the tutorial's Hopper picks.
TMA_GRID = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3)]
# With it: Triton's Hopper pass specialises 4-warp kernels only (1 producer + 2 consumer warpgroups,
# 12 warps in all); other warp counts compile without it, so only num_warps=4 is worth timing.
TMA_WS_GRID = [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2)]
SMOKE_PTR = [(16, 16, 2, 1), (32, 16, 4, 2)]
SMOKE_TMA = [(16, 16, 2, 1), (32, 16, 4, 2)]
SDPA_BACKENDS = ("sdpa_cudnn", "sdpa_flash")
STICKY = re.compile(r"illegal (memory )?address|unspecified launch failure|misaligned address|"
                    r"an illegal instruction|device-side assert|CUDA error: (an )?unknown", re.IGNORECASE)


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    seq: int
    head_dim: int
    dtype: str
    causal: bool

    @property
    def label(self) -> str:
        return f"{self.dtype} D={self.head_dim:3d} N={self.seq:5d} {'causal' if self.causal else 'full  '}"

    @property
    def flops(self) -> float:
        return attention_flops(self.batch * self.heads, self.seq, self.seq, self.head_dim, self.causal)


@dataclass(frozen=True)
class Candidate:
    variant: str  # "ptr", "tma" (knobs in the config), or an SDPA backend
    config: Config | None = None

    @property
    def label(self) -> str:
        return f"{self.variant}:{self.config}" if self.config is not None else self.variant

    @property
    def kernel_key(self) -> str:
        """Candidates that share one compiled binary (heavy_first is a run-time flag of the grid kernel)."""
        if self.config is None:
            return self.variant
        extra = {k: v for k, v in self.config.extra if k != "schedule"}
        persistent = self.config.extra_dict.get("schedule") == "persistent"
        return f"{self.variant}:{self.config.block_m}-{self.config.block_n}-{self.config.num_warps}-" \
               f"{self.config.num_stages}-{sorted(extra.items())}-{persistent}"


@dataclass
class Outcome:
    variant: str
    config: str | None
    knobs: dict[str, Any]
    shape: dict[str, Any]
    outcome: str  # ok, wrong_result, compile_error, out_of_resources, crashed, timeout, skipped, unavailable
    ms: float | None = None
    tflops: float | None = None
    rel_err: float | None = None
    max_abs_err: float | None = None
    compile_s: float | None = None
    error: str | None = None
    revalidated: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def classify(exc: BaseException) -> str:
    if isinstance(exc, triton.runtime.errors.OutOfResources) or "out of resource" in str(exc).lower():
        return "out_of_resources"
    if STICKY.search(str(exc)):
        return "crashed"
    return "compile_error"


class Watchdog:
    """Ends the process (after `on_timeout` saves the results) when one step runs past its limit."""

    def __init__(self, limit_s: float, on_timeout: Callable[[str], None]) -> None:
        self.limit_s, self.on_timeout = limit_s, on_timeout
        self.step, self.since = "start", time.monotonic()
        self.lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def beat(self, step: str) -> None:
        with self.lock:
            self.step, self.since = step, time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            with self.lock:
                late = time.monotonic() - self.since > self.limit_s
                step = self.step
            if late:
                try:
                    self.on_timeout(step)
                finally:
                    os._exit(3)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.results: list[Outcome] = []
        self.compile_errors: dict[tuple[str, int, str, bool], tuple[str, str, float]] = {}
        self.compile_s: dict[tuple[str, int, str, bool], float] = {}
        self.asm: list[dict[str, Any]] = []
        self.best: list[dict[str, Any]] = []
        self.context_lost: str | None = None
        self.failed_shapes: list[dict[str, Any]] = []
        self.started = time.time()
        self.provenance = provenance()
        self.gpu = self.provenance["gpu"]
        if self.cuda:
            from flashtune.kernel.device import device_arch, device_smem_limit
            self.arch, self.smem_limit = device_arch(0), device_smem_limit(0)
        else:
            self.arch, self.smem_limit = None, None
        self.watchdog: Watchdog | None = None
        self.current: tuple[Candidate, Shape] | None = None

    def beat(self, step: str, cand: Candidate | None = None, shape: Shape | None = None) -> None:
        """Progress for the watchdog; `cand` on `shape` is what a timeout is blamed on."""
        self.current = (cand, shape) if cand is not None else None
        if self.watchdog is not None:
            self.watchdog.beat(step)

    # --- the candidates ---------------------------------------------------------------------

    def shapes(self) -> list[Shape]:
        a = self.args
        if a.smoke:
            # fp16 only: the interpreter computes bf16 dots wrongly (numpy has no bf16).
            return [Shape(1, 2, n, d, "fp16", c)
                    for (d, n), c in itertools.product(((16, 40), (32, 64)), (False, True))]
        return [Shape(max(1, TOKENS // n), HIDDEN // d, n, d, dt, c)
                for d, dt, c, n in itertools.product(a.head_dim, a.dtype, a.causal, a.seq)]

    def candidates(self, shape: Shape) -> list[Candidate]:
        smoke = self.args.smoke
        out = [Candidate("ptr", Config(*c)) for c in (SMOKE_PTR if smoke else PTR_GRID)]
        # heavy_first only reorders blocks of equal cost when not causal: not worth the GPU time there.
        schedules = fwd_tma.SCHEDULES if shape.causal else ("grid", "persistent")
        for ws, grid in ((False, SMOKE_TMA if smoke else TMA_GRID), (True, SMOKE_TMA if smoke else TMA_WS_GRID)):
            for c, schedule in itertools.product(grid, schedules):
                out.append(Candidate("tma", fwd_tma.tma_config(*c, ws=ws, schedule=schedule)))
        if self.cuda:
            out += [Candidate(name) for name in SDPA_BACKENDS]
        if smoke:
            out.append(Candidate("nan_probe"))  # a kernel that writes NaN: must end as wrong_result, never best
        if self.args.skip:
            out = [c for c in out if not re.search(self.args.skip, c.label)]
        return out

    def refusal(self, cand: Candidate, shape: Shape) -> str | None:
        """Why a candidate is not run at all (shared memory over the limit, no TMA, ...)."""
        if cand.variant == "tma":
            reason = fwd_tma.tma_supported(self.arch, shape.head_dim, extra=cand.config.extra_dict)
            if reason:
                return reason
            if self.smem_limit is not None:
                need = fwd_tma.estimate_tma_smem(cand.config, shape.head_dim, DTYPE_NAME[shape.dtype], self.arch)
                if need > self.smem_limit:
                    return f"estimated shared memory {need} B > {self.smem_limit} B"
        if cand.variant == "ptr" and self.smem_limit is not None:
            from flashtune.kernel.ops.fwd import estimate_smem
            need = estimate_smem(cand.config, shape.head_dim, DTYPE_NAME[shape.dtype], self.arch)
            if need > self.smem_limit:
                return f"estimated shared memory {need} B > {self.smem_limit} B"
        return None

    # --- running one candidate --------------------------------------------------------------

    def run(self, cand: Candidate, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            out: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        scale = q.shape[-1] ** -0.5
        if cand.variant == "ptr":
            o, _, compiled = launch(q, k, v, check_inputs(q, k, v), causal=causal, scale=scale, config=cand.config,
                                    out=out)
            return o, compiled
        if cand.variant == "tma":
            o, _, compiled = fwd_tma.launch_tma(q, k, v, check_inputs(q, k, v), causal=causal, scale=scale,
                                                config=cand.config, out=out)
            return o, compiled
        if cand.variant == "nan_probe":
            o = torch.full_like(q, float("nan")) if out is None else out.fill_(float("nan"))
            return o, None
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}[cand.variant]
        with sdpa_kernel(backend):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if out is not None:
            out.copy_(o)  # the copy is outside the timed call (timing passes out=None)
            o = out
        return o, None

    def timed(self, cand: Candidate, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              buf: torch.Tensor) -> Callable[[], object]:
        """The call to time: inputs validated once outside it, the kernels writing into one buffer."""
        scale = q.shape[-1] ** -0.5
        attn = check_inputs(q, k, v)
        if cand.variant == "ptr":
            return lambda: launch(q, k, v, attn, causal=causal, scale=scale, config=cand.config, out=buf)
        if cand.variant == "tma":
            return lambda: fwd_tma.launch_tma(q, k, v, attn, causal=causal, scale=scale, config=cand.config, out=buf)
        return lambda: self.run(cand, q, k, v, causal)

    def inputs(self, shape: Shape, seed: int, seq: int | None = None, batch: int | None = None
               ) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed + seed)
        n = seq or shape.seq
        b = batch or shape.batch
        return tuple(torch.randn(b, shape.heads, n, shape.head_dim, device=self.device, dtype=DTYPES[shape.dtype],
                                 generator=gen) for _ in range(3))

    # --- 1. compile ---------------------------------------------------------------------------

    def precompile(self, shapes: list[Shape]) -> None:
        """Every kernel binary compiled in threads on small inputs of the same specialisation, then its
        first launch on them one at a time, so a kernel that hangs or crashes is named."""
        jobs: dict[tuple[str, int, str, bool], tuple[Candidate, Shape]] = {}
        for shape in shapes:
            for cand in self.candidates(shape):
                if cand.config is None or self.refusal(cand, shape):
                    continue
                jobs.setdefault((cand.kernel_key, shape.head_dim, shape.dtype, shape.causal), (cand, shape))
        if not jobs:
            return

        def small(shape: Shape) -> tuple[torch.Tensor, ...]:
            # Same heads and a length divisible by 16: the pointer kernel specialises ints on
            # divisibility by 16 and == 1; the TMA kernel does not specialise its sizes at all.
            return self.inputs(shape, seed=1, seq=shape.seq if self.args.smoke else 256, batch=1)

        def build(item: tuple[tuple[str, int, str, bool], tuple[Candidate, Shape]]):
            key, (cand, shape) = item
            q, k, v = small(shape)
            t0 = time.perf_counter()
            try:
                if cand.variant == "tma":  # compile only: its first launch comes below, alone
                    fwd_tma.compile_tma(q, k, v, check_inputs(q, k, v), causal=shape.causal,
                                        scale=shape.head_dim ** -0.5, config=cand.config)
                else:  # the pointer kernel (tuned and validated before): compile by running it
                    self.run(cand, q, k, v, shape.causal)
                    if self.cuda:
                        torch.cuda.synchronize()
                return key, None, time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - every failure is a data point
                return key, exc, time.perf_counter() - t0

        t0 = time.perf_counter()
        items = sorted(jobs.items(), key=lambda kv: str(kv[0]))
        threads = max(1, self.args.threads)
        done = 0
        self.beat("compiling")
        # One kernel of each variant alone first: Triton sets up its per-device caches on a kernel's
        # first call, which is not safe to race.
        leaders = list({cand.variant: (key, (cand, shape)) for key, (cand, shape) in reversed(items)}.values())
        rest = [item for item in items if item not in leaders]
        with ThreadPoolExecutor(threads) as pool:
            for key, exc, secs in itertools.chain(map(build, leaders), pool.map(build, rest)):
                done += 1
                self.beat(f"compiling ({done}/{len(items)})")
                self.compile_s[key] = secs
                if exc is not None:
                    self.compile_errors[key] = (classify(exc), error_line(exc), secs)
        # Anything that failed next to other compiles gets one more try alone.
        for key in list(self.compile_errors):
            if self.compile_errors[key][0] == "crashed":
                continue
            self.beat(f"recompiling {key[0]} alone")
            _, exc, secs = build((key, jobs[key]))
            if exc is None:
                del self.compile_errors[key]
            else:
                self.compile_errors[key] = (classify(exc), error_line(exc), secs)
        print(f"compiled {len(items)} kernels in {time.perf_counter() - t0:.1f} s on {threads} threads, "
              f"{len(self.compile_errors)} failed", flush=True)
        # First launches of the new kernels, one at a time under the watchdog.
        for key, (cand, shape) in items:
            if cand.variant != "tma" or key in self.compile_errors or self.context_lost:
                continue
            self.beat(f"first launch of {cand.label} ({shape.label})", cand, shape)
            q, k, v = small(shape)
            try:
                self.run(cand, q, k, v, shape.causal)
                if self.cuda:
                    torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001
                self.compile_errors[key] = (classify(exc), error_line(exc), self.compile_s.get(key, 0.0))
                if self.compile_errors[key][0] == "crashed":
                    self.context_lost = f"CUDA context lost at the first launch of {cand.label}"
        for key, (outcome, text, _) in sorted(self.compile_errors.items(), key=lambda kv: str(kv[0])):
            print(f"  {outcome}: {key[0]} D={key[1]} {key[2]} causal={int(key[3])}: {text}", flush=True)

    # --- 2. validate and time -------------------------------------------------------------------

    def record(self, cand: Candidate, shape: Shape, outcome: str, **kw: Any) -> Outcome:
        knobs = dict(cand.config.extra) if cand.config is not None else {}
        o = Outcome(cand.variant, str(cand.config) if cand.config is not None else None, knobs, asdict(shape),
                    outcome, **kw)
        self.results.append(o)
        return o

    def bench_shape(self, shape: Shape, index: int) -> None:
        tol = TOLERANCE[DTYPES[shape.dtype]]
        q, k, v = self.inputs(shape, seed=1000 + index)
        self.beat(f"{shape.label}: reference")
        ref = fp32_reference(q, k, v, shape.causal)
        records: dict[Candidate, Outcome] = {}
        for cand in self.candidates(shape):
            if self.context_lost:
                self.record(cand, shape, "skipped", error=self.context_lost)
                continue
            reason = self.refusal(cand, shape)
            if reason:
                self.record(cand, shape, "skipped", error=reason)
                continue
            key = (cand.kernel_key, shape.head_dim, shape.dtype, shape.causal)
            if key in self.compile_errors:
                outcome, text, secs = self.compile_errors[key]
                self.record(cand, shape, outcome, error=text, compile_s=secs)
                continue
            self.beat(f"{shape.label}: validating {cand.label}", cand, shape)
            try:
                poisoned = torch.full_like(q, float("nan"))
                o, _ = self.run(cand, q, k, v, shape.causal, out=poisoned)
                if self.cuda:
                    torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001
                outcome = classify(exc)
                if cand.config is None and outcome == "compile_error":
                    outcome = "unavailable"  # an SDPA backend that does not take this shape
                self.record(cand, shape, outcome, error=error_line(exc), compile_s=self.compile_s.get(key))
                if outcome == "crashed":
                    self.context_lost = f"CUDA context lost at {cand.label} on {shape.label}"
                continue
            max_abs, rel = output_errors(o, ref)
            if not rel <= tol:
                self.record(cand, shape, "wrong_result", rel_err=rel, max_abs_err=max_abs,
                            compile_s=self.compile_s.get(key),
                            error=f"relative error {rel:.3g} > {tol:g} against SDPA math (fp32)"
                            + ("; NaN/inf in the output" if math.isinf(rel) else ""))
                continue
            records[cand] = self.record(cand, shape, "ok", rel_err=rel, max_abs_err=max_abs,
                                        compile_s=self.compile_s.get(key))
        del ref
        if not records:
            return
        valid = list(records)
        self.beat(f"{shape.label}: timing {len(valid)} candidates interleaved")
        buf = torch.empty_like(q)
        fns = [self.timed(c, q, k, v, shape.causal, buf) for c in valid]
        warmup, reps = (1, 1) if self.args.smoke else (self.args.warmup, self.args.reps)
        try:
            times = interleaved_ms(fns, warmup=warmup, reps=reps, cuda=self.cuda)
        except Exception:  # noqa: BLE001 - one at a time instead, so a bad candidate costs only itself
            times = []
            for cand, fn in zip(valid, fns):
                self.beat(f"{shape.label}: timing {cand.label}", cand, shape)
                try:
                    times.append(interleaved_ms([fn], warmup=warmup, reps=reps, cuda=self.cuda)[0])
                except Exception as exc:  # noqa: BLE001
                    times.append(math.nan)
                    records[cand].outcome, records[cand].error = classify(exc), error_line(exc)
                    if records[cand].outcome == "crashed":
                        self.context_lost = f"CUDA context lost timing {cand.label} on {shape.label}"
                        break
        for cand, ms in zip(valid, times):
            if records[cand].outcome == "ok" and math.isfinite(ms):
                records[cand].ms, records[cand].tflops = ms, tflops(shape.flops, ms)
        self.summarise(shape, records, index)

    def summarise(self, shape: Shape, records: dict[Candidate, Outcome], index: int) -> None:
        """Best per variant (TMA split by ws), re-validated on fresh inputs; one line per shape."""
        groups: dict[str, list[tuple[Candidate, Outcome]]] = {}
        for cand, rec in records.items():
            if rec.outcome != "ok" or rec.ms is None:
                continue
            name = cand.variant
            if cand.variant == "tma":
                name = "tma_ws" if cand.config.extra_dict.get("ws") else "tma"
            groups.setdefault(name, []).append((cand, rec))
        best: dict[str, Any] = {"shape": asdict(shape)}
        if not self.context_lost:
            q2, k2, v2 = self.inputs(shape, seed=50_000 + index)
            ref2 = fp32_reference(q2, k2, v2, shape.causal)
        for name, entries in groups.items():
            # The fastest whose result holds on a second random input too (what the tuner does before
            # storing a winner); one that fails is wrong_result, and the next fastest is tried.
            for cand, rec in sorted(entries, key=lambda e: e[1].ms):
                if cand.config is not None and not self.context_lost:
                    self.beat(f"{shape.label}: re-validating {cand.label}", cand, shape)
                    try:
                        o, _ = self.run(cand, q2, k2, v2, shape.causal, out=torch.full_like(q2, float("nan")))
                        rec.revalidated = output_errors(o, ref2)[1] <= TOLERANCE[DTYPES[shape.dtype]]
                    except Exception as exc:  # noqa: BLE001
                        rec.revalidated, rec.error = False, error_line(exc)
                    if not rec.revalidated:
                        rec.outcome = "wrong_result"
                        rec.error = (rec.error or "") + " (failed re-validation on a second random input)"
                        continue
                best[name] = {"config": rec.config, "ms": rec.ms, "tflops": rec.tflops}
                break
        self.best.append(best)
        cells = []
        for name in ("ptr", "tma", "tma_ws", "sdpa_cudnn", "sdpa_flash"):
            b = best.get(name)
            cells.append(f"{name} {b['tflops']:6.1f}" if b else f"{name}    n/a")
        print(f"[{index + 1}] {shape.label}: " + " | ".join(cells), flush=True)

    # --- 3. what the best TMA kernel compiled to ---------------------------------------------------

    def inspect_asm(self) -> None:
        want = (32, 64) if self.args.smoke else (128, 4096)
        for b in self.best:
            s = b["shape"]
            if (s["head_dim"], s["seq"]) != want or self.context_lost:
                continue
            for name in ("tma", "tma_ws", "ptr"):
                if name not in b:
                    continue
                config = Config.parse(b[name]["config"])
                shape = Shape(**s)
                q, k, v = self.inputs(shape, seed=7, seq=256, batch=1)
                try:
                    _, compiled = self.run(Candidate("ptr" if name == "ptr" else "tma", config), q, k, v, shape.causal)
                    info = describe_compiled(compiled)
                except Exception as exc:  # noqa: BLE001
                    info = {"error": error_line(exc)}
                info.update(variant=name, config=str(config), shape=s)
                self.asm.append(info)
                print(f"asm {shape.label} {name} {config}: " + ", ".join(
                    f"{k}={v}" for k, v in info.items() if k not in ("variant", "config", "shape")), flush=True)

    # --- 4. output ---------------------------------------------------------------------------------

    def miscompiles(self) -> list[dict[str, Any]]:
        """TMA (variant, config) pairs that failed to compile or gave wrong results, with where."""
        by: dict[tuple[str, str], dict[str, Any]] = {}
        for r in self.results:
            if r.variant != "tma" or r.outcome not in ("compile_error", "wrong_result", "crashed", "timeout"):
                continue
            entry = by.setdefault((r.config, r.outcome), {"config": r.config, "outcome": r.outcome, "shapes": [],
                                                          "error": r.error, "triton": triton.__version__})
            s = r.shape
            entry["shapes"].append(f"{s['dtype']} D={s['head_dim']} N={s['seq']} {'causal' if s['causal'] else 'full'}")
        return sorted(by.values(), key=lambda e: (e["outcome"], e["config"]))

    def write(self, note: str | None = None) -> Path:
        name = "fwd_variants_bench_smoke.json" if self.args.smoke else "fwd_variants_bench.json"
        meta = dict(self.provenance, has_warp_specialize=fwd_tma.HAS_WARP_SPECIALIZE, wall_s=time.time() - self.started,
                    interpreter=not self.cuda, context_lost=self.context_lost, note=note,
                    tolerance={str(k).removeprefix("torch."): v for k, v in TOLERANCE.items()})
        doc = {"meta": meta, "results": [asdict(r) for r in self.results], "best": self.best, "asm": self.asm,
               "miscompiles": self.miscompiles(), "failed_shapes": self.failed_shapes}
        return write_json(out_dir(self.args.out) / name, doc)

    def table(self) -> None:
        rows = []
        for b in self.best:
            s = Shape(**b["shape"])
            val = {n: (b[n]["tflops"] if n in b else None)
                   for n in ("ptr", "tma", "tma_ws", "sdpa_cudnn", "sdpa_flash")}
            ours = [(val[n], b[n]["config"]) for n in ("ptr", "tma", "tma_ws") if val[n]]
            top = max(ours, default=(None, None))
            tma_best = max([(val[n], b[n]["config"]) for n in ("tma", "tma_ws") if val[n]], default=(None, "-"))
            ratio = f"x{top[0] / val['sdpa_cudnn']:.2f}" if top[0] and val["sdpa_cudnn"] else None
            rows.append([s.label, *(val[n] or "n/a" for n in ("ptr", "tma", "tma_ws", "sdpa_cudnn", "sdpa_flash")),
                         ratio, short(tma_best[1])])
        print_table(["shape", "ptr", "tma", "tma_ws", "cudnn", "flash", "best/cudnn", "best TMA config"], rows,
                    title="TFLOP/s, forward, 16k tokens, H*D=2048 (best of each grid; tma_ws = warp-specialised):",
                    floats=".1f")
        bad = self.miscompiles()
        if bad:
            print(f"\nTMA configs that miscompile on Triton {triton.__version__} (compile error or wrong result):")
            for e in bad:
                print(f"  {e['outcome']:14s} {e['config']}: {len(e['shapes'])} shape(s), e.g. {e['shapes'][0]}; "
                      f"{e['error']}")


DTYPE_NAME = {"fp16": "float16", "bf16": "bfloat16"}


def short(config_text: str) -> str:
    """'m128-n64-w4-s3 ws heavy_first' for a TMA config's canonical text."""
    if not config_text or "+" not in config_text:
        return config_text
    config = Config.parse(config_text)
    knobs = config.extra_dict
    return f"{config_text.split('+')[0]}{' ws' if knobs.get('ws') else ''} {knobs.get('schedule', 'grid')}"


def describe_compiled(compiled: Any) -> dict[str, Any]:
    """Registers, spills, shared memory, warps and the Hopper instructions in a compiled Triton kernel."""
    if compiled is None:
        return {"note": "interpreter: nothing compiled"}
    md = compiled.metadata
    info: dict[str, Any] = {"regs": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
                            "shared": getattr(md, "shared", None), "num_warps": getattr(md, "num_warps", None)}
    asm = compiled.asm
    ptx = asm.get("ptx", "") if hasattr(asm, "get") else ""
    ttgir = asm.get("ttgir", "") if hasattr(asm, "get") else ""
    info.update(ptx_wgmma=ptx.count("wgmma.mma_async"), ptx_tma=ptx.count("cp.async.bulk.tensor"),
                ptx_setmaxnreg=ptx.count("setmaxnreg"), warp_specialized="ttg.warp_specialize" in ttgir)
    try:
        sass = asm["sass"]
        info.update(sass_hgmma=len(re.findall(r"\bHGMMA\b", sass)), sass_utmaldg=len(re.findall(r"\bUTMALDG\b", sass)),
                    sass_utmastg=len(re.findall(r"\bUTMASTG\b", sass)), sass_hmma=len(re.findall(r"\bHMMA\b", sass)))
    except Exception as exc:  # noqa: BLE001 - no cuobjdump: the PTX counts stand
        info["sass"] = f"unavailable ({error_line(exc)})"
    return info


def smem_offline(args: argparse.Namespace) -> int:
    """Compile the TMA kernel for sm_90 without a GPU over a config grid; compare estimate_tma_smem with
    the compiled `metadata.shared` (exact / over / under), and note compile failures and whether Triton
    warp-specialised each kernel. Writes one JSON line per kernel to args.smem_offline."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = fwd_tma.attn_fwd_tma_kernel
    dims = args.head_dim
    jobs = list(itertools.product(dims, (64, 128), (32, 64, 128), (4, 8), (2, 3, 4), (False, True), (False, True)))
    jobs = jobs[: args.max_kernels or None]

    def compile_one(job: tuple[int, int, int, int, int, bool, bool]) -> dict[str, Any]:
        d, bm, bn, w, st, ws, persistent = job
        config = fwd_tma.tma_config(bm, bn, w, st, ws=ws, schedule="persistent" if persistent else "grid")
        consts = {"HEAD_DIM": d, "BLOCK_D": triton.next_power_of_2(d), "BLOCK_M": bm, "BLOCK_N": bn, "CAUSAL": True,
                  "STORE_LSE": False, "PRECISION": "ieee", "WS": ws, "PERSISTENT": persistent, "NEG_SCALE": False,
                  "EVEN_N": ws}
        sig, attrs = {}, {}
        for i, name in enumerate(kernel.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name in ("Q", "K", "V", "O", "LSE") or name.startswith("stride"):
                sig[name] = "*fp16" if name in "QKVO" else "*fp32" if name == "LSE" else "i32"
                attrs[(i,)] = [["tt.divisibility", 16]]  # what the launch specialises them to
            else:
                sig[name] = "fp32" if name == "qk_scale" else "i32"
        row = {"config": str(config), "head_dim": d, "dtype": "float16", "triton": triton.__version__,
               "estimate": fwd_tma.estimate_tma_smem(config, d, "float16", "sm_90")}
        try:
            compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": w, "num_stages": st})
        except Exception as exc:  # noqa: BLE001 - a data point
            row["error"] = error_line(exc)
            return row
        row.update(shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                   warp_specialized="ttg.warp_specialize" in compiled.asm.get("ttgir", ""))
        return row

    counts = {"exact": 0, "over": 0, "under": 0, "error": 0}
    worst = {"over": 0, "under": 0}
    with ThreadPoolExecutor(max(1, args.threads)) as pool, open(args.smem_offline, "w") as f:
        for row in pool.map(compile_one, jobs):
            f.write(json.dumps(row) + "\n")
            if "error" in row:
                counts["error"] += 1
                continue
            diff = row["estimate"] - row["shared"]
            kind = "exact" if diff == 0 else "over" if diff > 0 else "under"
            counts[kind] += 1
            if kind != "exact":
                worst[kind] = max(worst[kind], abs(diff))
    print(f"Triton {triton.__version__}, sm_90, {len(jobs)} TMA kernels: {counts['exact']} exact, {counts['over']} "
          f"over (at most {worst['over']} B), {counts['under']} under (at most {worst['under']} B), "
          f"{counts['error']} failed to compile; rows in {args.smem_offline}")
    return 0


def main() -> int:
    ap = arguments(__doc__, out="optional", smoke="tiny shapes; runs on CPU under TRITON_INTERPRET=1", seed=True,
                   timing=[Runs(warmup=3, reps=12)], shapes=Shapes(seq="4096,16384"))
    ap.add_argument("--skip", default="", help="regex: leave out candidates whose label matches "
                    "(variant:config, e.g. 'm128-n64-w4-s3.*\"ws\":true' after a hang)")
    ap.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 2), help="compile threads")
    ap.add_argument("--step-timeout", type=float, default=120.0,
                    help="seconds one step (a compile batch, a validation, a shape's timing) may take")
    ap.add_argument("--smem-offline", metavar="JSONL", default="",
                    help="no GPU needed: compile the TMA kernel for sm_90 over a config grid and compare the "
                    "shared-memory estimate with the compiled figure (rows to JSONL); nothing is run")
    ap.add_argument("--max-kernels", type=int, default=0, help="--smem-offline: only the first K of the grid")
    args = ap.parse_args()
    if args.smem_offline:
        return smem_offline(args)
    if args.out is None:
        ap.error("--out is required (unless --smem-offline)")
    require_gpu(unless=args.smoke, hint="run with --smoke (tiny shapes under TRITON_INTERPRET=1)")
    if not torch.cuda.is_available() and not triton_interprets():
        print("on CPU, set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    bench = Bench(args)

    def on_timeout(step: str) -> None:
        print(f"\nwatchdog: no progress for {args.step_timeout:.0f} s during: {step}; saving and exiting",
              flush=True)
        if bench.current is not None:
            cand, shape = bench.current
            bench.record(cand, shape, "timeout", error=f"no progress for {args.step_timeout:.0f} s: {step}")
        print(f"results: {bench.write(note=f'ended by the watchdog during: {step}')}", flush=True)
        bench.table()

    bench.watchdog = Watchdog(args.step_timeout, on_timeout)
    shapes = bench.shapes()
    print(f"{bench.gpu}, Triton {triton.__version__}, torch {torch.__version__}; {len(shapes)} shapes", flush=True)
    try:
        bench.precompile(shapes)
        for i, shape in enumerate(shapes):
            try:
                bench.bench_shape(shape, i)
            except Exception as exc:  # noqa: BLE001 - one shape's failure (a reference OOM, ...) ends only it
                traceback.print_exc()
                bench.failed_shapes.append({"shape": asdict(shape), "error": error_line(exc)})
            bench.write()
        bench.inspect_asm()
    except Exception:  # noqa: BLE001 - save what we have, then say what broke
        traceback.print_exc()
        print(f"results so far: {bench.write(note='ended by an exception')}", flush=True)
        bench.table()
        return 1
    path = bench.write()
    bench.table()
    print(f"\nwrote {path} ({time.time() - bench.started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
