"""The one runner of the scripts in bench/: their shared options, timing, provenance and output.

A script builds its parser with `arguments()` (the shared `--out`, `--smoke`, `--seed` and timing budgets)
and adds only its own options; times calls with `Timer` (triton.testing.do_bench on CUDA, the wall clock
under the Triton interpreter), `interleaved_ms` (CUDA events, runs interleaved round-robin) or
`loop_times`/`host_rounds`/`synced_s` (host time), short calls as CUDA-graph replays (`cuda_graph`); a script
that checks and times one call after another keeps its state in a `Runner` (seeded inputs, notes, `measure`);
records `provenance()` beside its results; writes them with `write_json`/`write_csv`/`write_text` under its out
folder, which belongs under bench/results/<gpu>/; and prints `print_table` last.

torch, triton and flashtune are imported inside the functions that use them, so a script can call
`use_interpreter()` before the kernels are imported, and the CPU-only scripts import none of them;
`import_flashtune()` loads flashtune from a plain checkout where it is not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

BENCH = Path(__file__).resolve().parent
OUT_HELP = "results directory, e.g. bench/results/h200 (results belong under bench/results/<gpu>/)"


# --- options ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """triton.testing.do_bench's budget in ms: `--warmup` and `--rep` (also spelt as each of `rep_flags`)."""

    warmup: float = 10
    rep: float = 100
    rep_flags: tuple[str, ...] = ("--rep",)


@dataclass(frozen=True)
class Runs:
    """A count of runs: `--warmup` untimed runs, then `--reps` timed ones (median)."""

    warmup: int
    reps: int
    what: str = "each candidate"


@dataclass(frozen=True)
class HostLoop:
    """The host-time loop's budget: `--calls` back-to-back calls per loop, `--repeats` interleaved rounds."""

    calls: int
    repeats: int


@dataclass(frozen=True)
class Shapes:
    """The shape grid's options, each a comma list: --seq, --head-dim, --dtype (None: the script names its own)
    and --causal (0, 1 or both)."""

    seq: str
    head_dim: str = "64,128"
    dtype: str | None = "fp16,bf16"
    causal: str = "0,1"


Timing = Budget | Runs | HostLoop


def arguments(doc: str, *, out: Literal["required", "optional", "positional"] | None = "required",
              out_help: str = OUT_HELP, out_default: Path | None = None, smoke: str | None = None,
              seed: bool = False, timing: Sequence[Timing] = (), shapes: Shapes | None = None,
              whole_doc: bool = False) -> argparse.ArgumentParser:
    """A script's parser holding the shared options; the script adds its own.

    `doc` is the script's docstring (its first line is the description, or all of it with `whole_doc`);
    `out` how the output folder is given (`--out DIR`, required or not, or a positional OUTDIR); `smoke`
    the help of `--smoke` where the script has a CPU mode; `seed` adds `--seed`, an offset to every input
    seed; `timing` the budgets of the ways the script times calls; `shapes` the defaults of its shape grid
    (parsed into lists)."""
    parser = argparse.ArgumentParser(
        description=doc if whole_doc else doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter if whole_doc else argparse.HelpFormatter)
    if out == "positional":
        parser.add_argument("out", metavar="OUTDIR", type=Path, help=out_help)
    elif out is not None:
        parser.add_argument("--out", type=Path, required=out == "required", default=out_default, help=out_help)
    if smoke is not None:
        parser.add_argument("--smoke", action="store_true", help=smoke)
    if seed:
        parser.add_argument("--seed", type=int, default=0,
                            help="added to every input's seed (default 0: the inputs of the recorded results)")
    if shapes is not None:
        parser.add_argument("--seq", type=int_list, default=shapes.seq, help="sequence lengths")
        parser.add_argument("--head-dim", type=int_list, default=shapes.head_dim, help="head dims")
        if shapes.dtype is not None:
            parser.add_argument("--dtype", type=str_list, default=shapes.dtype, help="dtypes (fp16, bf16)")
        parser.add_argument("--causal", type=bool_list, default=shapes.causal, help="0 (full), 1 (causal) or 0,1")
    for kind in timing:
        if isinstance(kind, Budget):
            parser.add_argument("--warmup", type=type(kind.warmup), default=kind.warmup,
                                help="do_bench warm-up budget, ms")
            parser.add_argument(*kind.rep_flags, dest="rep", type=type(kind.rep), default=kind.rep,
                                help="do_bench repetition budget, ms")
        elif isinstance(kind, Runs):
            parser.add_argument("--warmup", type=int, default=kind.warmup, help=f"warm-up runs of {kind.what}")
            parser.add_argument("--reps", type=int, default=kind.reps, help=f"timed runs of {kind.what} (median)")
        else:
            parser.add_argument("--calls", type=int, default=kind.calls, help="calls per timed loop")
            parser.add_argument("--repeats", type=int, default=kind.repeats,
                                help="interleaved rounds of every loop (median reported)")
    return parser


def int_list(text: str) -> list[int]:
    """'512,1024' -> [512, 1024]; empty items are skipped (an argparse type)."""
    return [int(x) for x in text.split(",") if x.strip()]


def bool_list(text: str) -> list[bool]:
    """'0,1' -> [False, True] (an argparse type)."""
    return [bool(x) for x in int_list(text)]


def str_list(text: str) -> list[str]:
    """'fp16,bf16' -> ['fp16', 'bf16'] (an argparse type)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def import_flashtune() -> None:
    """Make `flashtune` importable from a plain checkout too: when it is not installed, the repo's kernel/, db/ and
    tuner/ folders are loaded as `flashtune.kernel`, `flashtune.db` and `flashtune.tuner`."""
    try:
        import flashtune.kernel  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util
    import types

    root = BENCH.parent
    pkg = types.ModuleType("flashtune")
    pkg.__path__ = []  # type: ignore[attr-defined]
    sys.modules["flashtune"] = pkg
    for sub in ("db", "kernel", "tuner"):
        spec = importlib.util.spec_from_file_location(f"flashtune.{sub}", root / sub / "__init__.py",
                                                      submodule_search_locations=[str(root / sub)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"flashtune.{sub}"] = module
        spec.loader.exec_module(module)
        setattr(pkg, sub, module)


def require_gpu(unless: bool = False, hint: str = "") -> None:
    """Exit with status 2 and one line ('<script>: needs a CUDA GPU; <hint>') when no CUDA GPU is visible,
    unless `unless` holds (a CPU mode was asked for)."""
    import torch

    if not unless and not torch.cuda.is_available():
        print(f"{Path(sys.argv[0]).name}: needs a CUDA GPU" + (f"; {hint}" if hint else ""), file=sys.stderr)
        raise SystemExit(2)


def use_interpreter(when: bool = True, *, even_with_gpu: bool = False) -> bool:
    """Run the kernels in the Triton interpreter: set TRITON_INTERPRET=1 when `when` holds and no CUDA GPU is
    visible (with `even_with_gpu`, whether or not one is), unless the variable is set already. Call it before
    flashtune's kernels are imported: Triton reads it when a kernel is defined. True when the interpreter is on."""
    if when and not os.environ.get("TRITON_INTERPRET"):
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            gpu = False
        if even_with_gpu or not gpu:
            os.environ["TRITON_INTERPRET"] = "1"
    # Triton's reading of the variable, not ours
    from flashtune.kernel.device import triton_interprets

    return triton_interprets()


# --- timing ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timer:
    """Milliseconds per call of a callable: triton.testing.do_bench on CUDA (`warmup` and `rep` ms, the `mode`
    of the runs, the L2 flushed between them), or under the Triton interpreter the median wall time of two
    calls, which only shows that the path runs."""

    cuda: bool = True
    warmup: float = 10
    rep: float = 100
    mode: Literal["median", "mean"] = "median"

    @classmethod
    def from_args(cls, args: argparse.Namespace, cuda: bool = True,
                  mode: Literal["median", "mean"] = "median") -> Timer:
        """The timer of a parser built with `Budget`."""
        return cls(cuda, args.warmup, args.rep, mode)

    def __call__(self, fn: Callable[[], Any], grad_to_none: Sequence[Any] | None = None) -> float:
        if self.cuda:
            import triton

            return float(triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep,
                                                 grad_to_none=list(grad_to_none) if grad_to_none else None,
                                                 return_mode=self.mode))
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


_FLUSH: dict[str, Any] = {}  # the L2 flush buffer, allocated once per process


def interleaved_ms(fns: Sequence[Callable[[], Any]], *, warmup: int, reps: int, cuda: bool) -> list[float]:
    """Median ms of each of `fns`, their runs interleaved round-robin (the tuner's timing: CUDA events, the L2
    flushed before each run; the wall clock on the CPU)."""
    from flashtune.tuner.timing import l2_flush_buffer, median_ms_each

    if cuda and "cuda" not in _FLUSH:
        _FLUSH["cuda"] = l2_flush_buffer("cuda")
    return median_ms_each(fns, warmup=warmup, reps=reps, flush=_FLUSH["cuda"] if cuda else None)


def loop_times(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """(host µs/call, wall µs/call) of `calls` back-to-back calls: the host figure stops the clock before the
    final synchronisation, so it is what the CPU spent issuing the calls."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CPU: a smoke run
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    sync()
    wall = time.perf_counter() - t0
    return host / calls * 1e6, wall / calls * 1e6


def host_rounds(ways: Mapping[str, Callable[[], Any]], calls: int, repeats: int) -> dict[str, dict[str, float]]:
    """way -> host_us and wall_us (medians over `repeats` rounds, every way once per round, each a loop of
    `calls` calls) and host_us_min."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            samples[name].append(loop_times(fn, calls))
    return {name: {"host_us": statistics.median(h for h, _ in pairs),
                   "wall_us": statistics.median(w for _, w in pairs),
                   "host_us_min": min(h for h, _ in pairs)} for name, pairs in samples.items()}


def synced_s(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call, the GPU synchronised before and after (host-bound work: a whole model)."""
    return loop_times(fn, 1)[1] * 1e-6


def peak_extra_bytes(fn: Callable[[], Any], cuda: bool = True) -> int | None:
    """Bytes allocated at the peak of one call above what was allocated before it (None on the CPU)."""
    if not cuda:
        return None
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def cuda_graph(fn: Callable[[], Any], warmup: int = 2) -> Callable[[], Any]:
    """One call of `fn` captured in a CUDA graph after `warmup` runs on a side stream; its replay (short calls
    lose their launch cost)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


class Runner:
    """A script's run on one device: seeded inputs, notes, memory, and `measure`, which checks and times one call.

    On CUDA unless `args.smoke` (then on the CPU, under the interpreter, where the first call's wall time stands
    for the time); timed by `Timer.from_args(args)`, so the script's parser holds `--smoke`, `--seed` and a
    `Budget`. A script subclasses it with its own rows and tables."""

    def __init__(self, args: argparse.Namespace, dtype: Any) -> None:
        import torch

        self.torch, self.args, self.smoke = torch, args, bool(args.smoke)
        self.cuda = torch.cuda.is_available() and not self.smoke
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = dtype
        self.timer = Timer.from_args(args, self.cuda)
        self.notes: list[str] = []

    def gen(self, *parts: Any) -> Any:
        """A generator seeded by `parts` (and --seed): each case draws the same inputs whatever ran before it."""
        seed = self.args.seed + zlib.crc32(repr(parts).encode())
        return self.torch.Generator(device=self.device).manual_seed(seed)

    def randn(self, *shape: int, gen: Any, dtype: Any = None, grad: bool = False) -> Any:
        """Normal random values on the run's device, in the run's dtype unless `dtype` is given."""
        x = self.torch.randn(*shape, generator=gen, device=self.device, dtype=dtype or self.dtype)
        return x.requires_grad_(grad)

    def note(self, text: str) -> None:
        """Print `text` and keep it among the run's notes."""
        print(f"  note: {text}", flush=True)
        self.notes.append(text)

    def free(self) -> None:
        """Give back what the finished calls held (collected first: a failed call's tensors may sit in a cycle)."""
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()

    def free_bytes(self) -> int:
        """Free GPU memory in bytes; on the CPU a number no smoke-size buffer reaches."""
        return self.torch.cuda.mem_get_info()[0] if self.cuda else 1 << 62

    def measure(self, fn: Callable[[], Any], grads: Sequence[Any] | None = None, graph: bool = False,
                keep: Callable[[Any], Any] = lambda out: out) -> tuple[Any, float | None, str | None]:
        """(keep(output of one call), median ms or None, error or None).

        One call first: `keep` takes its output before the timing starts (what the script checks; the rest is
        let go), and with `grads` their .grad are that call's gradients; under --smoke its wall time stands for
        the time. Then `timer` times `fn`, with `graph` as the replay of a CUDA graph (`cuda_graph`; eagerly,
        with a note, where capture fails). A failure is returned as the error, not raised: a refusal or an
        out-of-memory is a result, not the end of the run."""
        for g in grads or ():
            g.grad = None
        kept, ms, error = None, None, None
        try:
            t0 = time.perf_counter()
            kept = keep(fn())
            if self.cuda:
                self.torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            if not self.smoke:
                call = fn
                if graph:
                    try:
                        call = cuda_graph(fn)
                    except Exception as exc:  # noqa: BLE001
                        self.note(f"CUDA graph capture failed ({error_line(exc, 120)}): timed eagerly")
                ms = None  # a timing that fails gives no time
                ms = self.timer(call, grad_to_none=grads)
        except Exception as exc:  # noqa: BLE001 - a refusal or OOM is a result, not the end of the run
            error = error_line(exc, 200)
        if error:  # outside the handler: the traceback no longer holds the failed call's tensors
            self.free()
        return kept, ms, error


def error_line(exc: BaseException, limit: int = 300) -> str:
    """'Type: the line that says what failed' of an exception (for Triton's MLIR failures, the line naming the
    failed pass rather than the IR printed before it), at most `limit` characters."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    line = next((ln for ln in lines if "PassManager" in ln or "error:" in ln), lines[0] if lines else "")
    return f"{type(exc).__name__}: {line}"[:limit]


# --- provenance ------------------------------------------------------------------------------------

def _attempt(fn: Callable[[], Any]) -> Any:
    """fn(), or None when it fails: provenance must never cost a run its results."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


def _git(*args: str) -> str | None:
    done = subprocess.run(["git", "-C", str(BENCH), *args], capture_output=True, text=True, timeout=10, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str | None:
    """The checkout's commit, with '-dirty' when tracked files differ from it; None outside a git checkout."""
    commit = _attempt(lambda: _git("rev-parse", "HEAD"))
    if not commit:
        return None
    dirty = _attempt(lambda: _git("status", "--porcelain", "--untracked-files=no"))
    return f"{commit}-dirty" if dirty else commit


def _gpu(index: int) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        from flashtune.kernel.device import triton_interprets

        interpreted = triton_interprets()
        return {"gpu": "cpu (Triton interpreter)" if interpreted else "cpu", "arch": None, "sm_count": None,
                "smem_limit": None, "driver": None, "cuda": torch.version.cuda}
    from flashtune.tuner.gpu import detect_gpu

    gpu = detect_gpu(index)
    return {"gpu": gpu.name, "arch": gpu.arch, "sm_count": gpu.sm_count, "smem_limit": gpu.smem_limit,
            "driver": gpu.driver, "cuda": gpu.cuda}


def _versions() -> dict[str, Any]:
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


def _kernel_versions() -> dict[str, Any]:
    from flashtune.kernel.version import KERNEL_VERSION, OP_VERSIONS

    return {"kernel_version": KERNEL_VERSION, "op_versions": dict(OP_VERSIONS)}


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(device: int = 0) -> dict[str, Any]:
    """Where, when and with what a result was measured: the GPU (name, arch, SM count, shared-memory limit,
    driver, CUDA), torch, Triton and Python versions, flashtune's kernel versions (each op's and the combined
    one), the host, the time (UTC), the git commit and the command line. A part that cannot be read is None."""
    gpu = _attempt(lambda: _gpu(device)) or dict.fromkeys(("gpu", "arch", "sm_count", "smem_limit", "driver", "cuda"))
    versions = _attempt(_versions) or {"torch": None, "triton": None}
    kernel = _attempt(_kernel_versions) or {"kernel_version": None, "op_versions": None}
    return {**gpu, **versions, "python": platform.python_version(), **kernel, "host": platform.node(),
            "time": utc_now(), "git_commit": git_commit(),
            "command": shlex.join([Path(sys.executable).name, *sys.argv])}


# --- the kernels' explicit-config launches ----------------------------------------------------------

def explicit_api() -> dict[str, Callable[..., Any]]:
    """The explicit-config launches (`fwd`, `bwd`, `kvcache`) and `Config` of the installed flashtune, wherever
    its version keeps them: a script comparing two trees runs under each."""
    from flashtune import kernel

    try:  # the public surface
        return {"fwd": kernel.attention_fwd, "bwd": kernel.attention_bwd, "kvcache": kernel.attention_kvcache,
                "Config": kernel.Config}
    except AttributeError:  # the modules that held them before there was one
        from flashtune.db.types import Config
        from flashtune.kernel.bwd_launch import attention_bwd  # type: ignore[import-not-found]
        from flashtune.kernel.kvcache import attention_kvcache
        from flashtune.kernel.launch import attention_fwd  # type: ignore[import-not-found]
        return {"fwd": attention_fwd, "bwd": attention_bwd, "kvcache": attention_kvcache, "Config": Config}


# --- output ----------------------------------------------------------------------------------------

def out_dir(path: str | Path) -> Path:
    """The output folder, created if missing."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` whole: a reader never sees half a file, even if the run is killed meanwhile."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(path: str | Path, data: Any, *, sort_keys: bool = False) -> Path:
    """`data` as indented JSON (values it cannot encode as their str)."""
    return write_text(path, json.dumps(data, indent=1, default=str, sort_keys=sort_keys) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON document at `path`."""
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path | None:
    """`rows` as CSV, the columns every key of every row in order of appearance; nothing when there are none."""
    import csv
    import io

    if not rows:
        return None
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


Cell = str | int | float | bool | None
_NUMBER = re.compile(r"^[-+x×]?\s*(\d[\d,]*(\.\d*)?|\.\d+)(e[-+]?\d+)?\s*%?$|^-$|^n/a$", re.IGNORECASE)


def _text(cell: Cell, floats: str) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, float):
        return format(cell, floats)
    return str(cell)


def print_table(header: Sequence[str], rows: Iterable[Sequence[Cell]], *, title: str | None = None,
                markdown: bool = False, floats: str = ".2f") -> None:
    """Print a table after a blank line and `title`: one row per line, columns padded (numbers to the right,
    text to the left) or as Markdown. A None cell prints as '-', a float with the `floats` format."""
    cells = [[_text(c, floats) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells if i < len(r)]) for i, h in enumerate(header)]
    right = [bool(cells) and all(_NUMBER.match(r[i]) for r in cells if i < len(r) and r[i])
             for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        parts = [(c.rjust(w) if r else c.ljust(w)) for c, w, r in zip(row, widths, right)]
        return f"| {' | '.join(parts)} |" if markdown else "  ".join(parts).rstrip()

    print(f"\n{title}" if title else "")
    print(line(list(header)))
    print(f"|{'|'.join('-' * (w + 2) for w in widths)}|" if markdown else "  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
