"""Launching an already compiled Triton kernel again, without `JITFunction.run`.

`kernel[grid](*args)` binds the arguments, computes their specialisation (dtypes, 16-byte pointer
alignment, ints equal to 1 or divisible by 16), hashes that into a cache key, finds the compiled
kernel and only then calls its launcher: about 30 µs of host time on an H200 machine, more than
the GPU spends on a small attention call. The dispatcher already memoises a plan per input
signature (shapes, strides, dtypes, device), which fixes every integer argument, so the only
specialisation left to check per call is the pointers' alignment.

A `FastLaunch` keeps what the JIT found for one plan: the `CompiledKernel`, its launcher, the grid,
the argument tuple with the tensors left out, and the alignment the kernel was specialised for.
`call()` checks the alignment, the device and that no launch hooks are installed, then calls the
launcher exactly as `JITFunction.run` does on Triton 3.6 to 3.9:
`compiled.run(gx, gy, gz, stream, compiled.function, compiled.packed_metadata, launch_metadata,
enter_hook, exit_hook, *bound_args)`. Anything else (another alignment, a profiler's hooks, the
kernel's pre-run hooks) returns None and the caller takes the JIT path; an error from the launcher
itself disables the fast path for the process with one warning. Never used under the interpreter.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch

from . import device as _device

__all__ = ["FastLaunch", "build", "disabled"]

_ALIGN = 16  # Triton specialises pointer arguments on 16-byte alignment
_state: dict[str, Any] = {"disabled": _device.INTERPRET, "driver": None}


def disabled() -> bool:
    """Whether the fast path is off in this process (the interpreter, or a launcher that failed)."""
    return bool(_state["disabled"])


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
    from triton import knobs

    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and (getattr(hook, "calls", None) or not hasattr(hook, "calls")):
            return False
    return True


class FastLaunch:
    """One compiled kernel with its arguments prebuilt, relaunched on new tensors of the same signature."""

    __slots__ = ("jit", "run", "function", "packed", "grid", "fixed", "tensors", "aligned", "device")

    def __init__(self, jit: Any, compiled: Any, grid: Sequence[int], bound: Sequence[Any], tensors: int,
                 device: int) -> None:
        self.jit = jit
        self.run = compiled.run  # the launcher (loads the module on first access)
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.tensors = tensors
        self.fixed = tuple(bound[tensors:])  # everything after the leading tensor arguments
        self.aligned = tuple(t.data_ptr() % _ALIGN == 0 for t in bound[:tensors])
        self.device = device

    def call(self, tensors: Sequence[torch.Tensor], replace: dict[int, Any] | None = None) -> bool:
        """Launch on `tensors` (the leading tensor arguments, in order); False where the JIT must decide.

        `replace` maps positions of the non-tensor arguments (counted after the tensors) to new values
        that do not change the specialisation (a float scale).
        """
        if _state["disabled"] or self.jit.pre_run_hooks:
            return False
        for t, aligned in zip(tensors, self.aligned):
            if (t.data_ptr() % _ALIGN == 0) is not aligned:
                return False
        get_device, get_stream = _driver()
        device = get_device()
        if device != self.device or not _hooks_idle():
            return False
        rest: Sequence[Any] = self.fixed
        if replace:
            rest = list(rest)
            for i, value in replace.items():
                rest[i] = value
        try:
            self.run(*self.grid, get_stream(device), self.function, self.packed, None, None, None,
                     *tensors, *rest)
        except (TypeError, ValueError, AttributeError) as error:
            # The launcher refused its arguments before launching: a Triton whose launcher protocol
            # differs. Use the JIT from now on.
            _state["disabled"] = True
            warnings.warn(f"flashtune: the direct kernel launch failed ({type(error).__name__}: {error}); "
                          "launching through Triton's JIT from now on", RuntimeWarning, stacklevel=3)
            return False
        return True


def build(jit: Any, compiled: Any, grid: Sequence[int], args: Sequence[Any], kwargs: dict[str, Any],
          tensors: int) -> FastLaunch | None:
    """A FastLaunch for the call `jit[grid](*args, **kwargs)` that just returned `compiled`, or None.

    The first `tensors` arguments are the per-call tensors; the rest, and the constexpr keyword
    arguments, are fixed. Returns None where the fast path does not apply: the interpreter, a JIT
    or compiled kernel without the attributes this module relies on, or a keyword argument that is
    not a kernel parameter (num_warps and num_stages are launch options, already in `compiled`).
    """
    if _state["disabled"] or compiled is None or len(args) < tensors:
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
        return FastLaunch(jit, compiled, grid, bound, tensors, _driver()[0]())
    except Exception:  # noqa: BLE001 - an unexpected Triton: the JIT path keeps working
        return None
