"""Launching an already compiled Triton kernel again, without `JITFunction.run`.

`kernel[grid](*args)` binds the arguments, computes their specialisation (dtypes, 16-byte pointer
alignment, ints equal to 1 or divisible by 16, 32- or 64-bit ints), hashes that into a cache key,
finds the compiled kernel and only then calls its launcher: about 25-30 µs of host time on an H200
machine, more than the GPU spends on a small attention call or a decode step.

A `FastLaunch` keeps what the JIT found for one call: the `CompiledKernel`, its launcher, the grid,
the arguments that stay fixed (at least the constexpr keyword arguments), and the alignment its
leading tensors had. It relaunches exactly as `JITFunction.run` does on Triton 3.6 to 3.9:
`compiled.run(gx, gy, gz, stream, compiled.function, compiled.packed_metadata, launch_metadata,
enter_hook, exit_hook, *bound_args)`. Two ways to use it:

- `call(tensors, replace)`: the caller's memo key fixes every integer argument (the forward's plan),
  so only the tensors' 16-byte alignment is checked per call;
- `launch(stream, grid, args)`: integer arguments change per call (a decode step's cache length and
  the strides derived from it), so the caller keeps its launchers in a dict keyed by
  `specialization()` of the arguments that can change (Triton's own rule, `int_spec`), and a new
  key goes through the JIT once, which picks or compiles the right variant. `current_stream()`
  checks once per call what both need.

Anything the relaunch cannot reproduce (another alignment, a profiler's launch hooks, the kernel's
pre-run hooks, another current device) makes these return False/None and the caller takes the JIT
path; an error from the launcher itself disables the fast path for the process with one warning.
Never used under the interpreter, and never while torch.compile traces (callers check).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch

from ..db.types import INT32_MAX

from . import device as _device

__all__ = ["FastLaunch", "build", "current_stream", "disabled", "int_spec", "specialization"]

_ALIGN = 16  # Triton specialises pointer arguments on 16-byte alignment
_INT32_MIN, _INT32_MAX = -INT32_MAX - 1, INT32_MAX
_INT64_MAX = 2**63 - 1
_state: dict[str, Any] = {"disabled": _device.INTERPRET, "driver": None, "knobs": None}


def disabled() -> bool:
    """Whether the fast path is off in this process (the interpreter, or a launcher that failed)."""
    return bool(_state["disabled"])


def int_spec(value: int) -> int:
    """The class Triton's JIT specialises an int argument into (`specialize_impl`; tests/kernel/test_decode_host.py
    compares it with the installed Triton's): 1: the value 1 (compiled in as a constant); else the type
    (0: i32, 64: i64, 128: u64) plus 16 where the value is divisible by 16. Two ints of one class run
    the same compiled kernel."""
    if value == 1:
        return 1
    divisible = 0 if value & 15 else 16  # & on Python ints is two's complement, as Triton's val & 15
    if _INT32_MIN <= value <= _INT32_MAX:
        return divisible
    return divisible | (64 if value <= _INT64_MAX else 128)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % _ALIGN == 0


def specialization(ints: Sequence[int], tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """The part of Triton's specialisation that `ints` and `tensors` decide: `int_spec` of each int
    and the 16-byte alignment of each tensor. Equal results mean the same compiled variant (for the
    same dtypes and the same other arguments), so a caller keys its launchers by it."""
    if _INT32_MIN <= min(ints) and max(ints) <= _INT32_MAX:
        # int_spec inlined for the usual all-32-bit case (a decode step pays this every call)
        return tuple([1 if x == 1 else 0 if x & 15 else 16 for x in ints]
                     + [t.data_ptr() % _ALIGN == 0 for t in tensors])
    return (*map(int_spec, ints), *map(_aligned, tensors))


def _driver() -> tuple[Callable[[], int], Callable[[int], int]]:
    """(current device, current raw stream of a device): what JITFunction.run asks the driver each call."""
    found = _state["driver"]
    if found is None:
        from triton.runtime import driver

        active = driver.active
        found = _state["driver"] = (active.get_current_device, active.get_current_stream)
    return found


def _hooks_idle() -> bool:
    """True when no launch hook (a profiler's, e.g. proton) is installed: the launch needs no metadata."""
    knobs = _state["knobs"]
    if knobs is None:  # imported once: an import statement costs a decode step most of a microsecond
        from triton import knobs

        _state["knobs"] = knobs
    runtime = knobs.runtime  # read each call, as JITFunction.run does
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and (getattr(hook, "calls", None) or not hasattr(hook, "calls")):
            return False
    return True


def current_stream(device: int) -> int | None:
    """The raw stream to relaunch on (torch's current stream, the one JITFunction.run would use,
    also during CUDA-graph capture), or None where the JIT must launch: the fast path is off, the
    current device is not `device` (where the launchers were built), or launch hooks are installed."""
    if _state["disabled"]:
        return None
    get_device, get_stream = _driver()
    if get_device() != device or not _hooks_idle():
        return None
    return get_stream(device)


class FastLaunch:
    """One compiled kernel with its fixed arguments prebuilt, relaunched on new per-call arguments."""

    __slots__ = ("jit", "run", "function", "packed", "grid", "fixed", "aligned", "device")

    def __init__(self, jit: Any, compiled: Any, grid: Sequence[int], bound: Sequence[Any], per_call: int,
                 device: int) -> None:
        self.jit = jit
        self.run = compiled.run  # the launcher (loads the module on first access)
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.grid = _grid3(grid)
        self.fixed = tuple(bound[per_call:])  # everything after the per-call arguments
        self.aligned = tuple(_aligned(t) for t in bound[:per_call] if isinstance(t, torch.Tensor))
        self.device = device

    def call(self, tensors: Sequence[torch.Tensor], replace: dict[int, Any] | None = None) -> bool:
        """Launch on `tensors` (the per-call arguments, all tensors, in order) with the grid of the
        build; False where the JIT must decide (another alignment, device, hooks).

        `replace` maps positions of the fixed arguments (counted after the tensors) to new values
        that do not change the specialisation (a float scale).
        """
        for t, aligned in zip(tensors, self.aligned):
            if _aligned(t) is not aligned:
                return False
        stream = current_stream(self.device)
        if stream is None:
            return False
        rest: Sequence[Any] = self.fixed
        if replace:
            rest = list(rest)
            for i, value in replace.items():
                rest[i] = value
        return self._run(self.grid, stream, (*tensors, *rest))

    def launch(self, stream: int, grid: tuple[int, int, int], args: Sequence[Any]) -> bool:
        """Launch with the per-call arguments `args` (then the fixed ones) on `grid`, on `stream`
        from `current_stream(self.device)`. The caller guarantees that `args` have the
        `specialization()` this launcher was built for (it keys its launchers by it). False where
        the JIT must launch: the kernel has pre-run hooks, or the launcher failed."""
        return self._run(grid, stream, (*args, *self.fixed))

    def _run(self, grid: tuple[int, int, int], stream: int, args: tuple[Any, ...]) -> bool:
        if self.jit.pre_run_hooks or _state["disabled"]:
            return False  # the JIT runs the hooks (and the caller's disabled check may be stale)
        try:
            self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed, None, None, None, *args)
        except (TypeError, ValueError, AttributeError, OverflowError) as error:
            # The launcher refused its arguments before launching: a Triton whose launcher protocol
            # differs. Use the JIT from now on.
            _state["disabled"] = True
            warnings.warn(f"flashtune: the direct kernel launch failed ({type(error).__name__}: {error}); "
                          "launching through Triton's JIT from now on", RuntimeWarning, stacklevel=4)
            return False
        return True


def _grid3(grid: Sequence[int]) -> tuple[int, int, int]:
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


def build(jit: Any, compiled: Any, grid: Sequence[int], args: Sequence[Any], kwargs: dict[str, Any],
          per_call: int) -> FastLaunch | None:
    """A FastLaunch for the call `jit[grid](*args, **kwargs)` that just returned `compiled`, or None.

    The first `per_call` arguments are passed again on every relaunch (`call`: the leading tensors;
    `launch`: `args` in full, tensors and ints); the rest, and the constexpr keyword arguments, are
    fixed. Returns None where the fast path does not apply: the interpreter, a JIT or compiled
    kernel without the attributes this module relies on, or a keyword argument that is not a
    kernel parameter (num_warps and num_stages are launch options, already in `compiled`).
    """
    if _state["disabled"] or compiled is None or len(args) < per_call:
        return None
    try:
        names = list(jit.arg_names)
        if len(names) < len(args) or not isinstance(jit.pre_run_hooks, list):
            return None
        params = {name: kwargs[name] for name in names[len(args):] if name in kwargs}
        if len(params) != len(names) - len(args):
            return None  # a parameter with a default the call did not pass: let the JIT bind it
        bound = [*args, *(params[name] for name in names[len(args):])]
        for attr in ("run", "function", "packed_metadata"):
            if not hasattr(compiled, attr):
                return None
        return FastLaunch(jit, compiled, grid, bound, per_call, _driver()[0]())
    except Exception:  # noqa: BLE001 - an unexpected Triton: the JIT path keeps working
        return None
