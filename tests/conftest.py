"""Test setup: run kernels under the Triton interpreter when no CUDA GPU is present; the shared fixtures
(tests/helpers) as plugins."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any @triton.jit function is defined, i.e. before `kernel` is imported.
    os.environ["TRITON_INTERPRET"] = "1"

# Loaded after the lines above: the dispatcher's fixtures import the kernels.
pytest_plugins = ["helpers.db", "helpers.dispatch"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> str:
    """Where kernel tests put their tensors: CUDA when present, else CPU under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


@dataclass(frozen=True)
class Launch:
    """One launch of a flashtune Triton kernel, as `kernel[grid](*args, **kwargs)` made it."""

    name: str  # the @triton.jit function's name, e.g. "attn_bwd_dq_kernel"
    grid: Any
    args: tuple[Any, ...]  # positional arguments (tensors, sizes, strides)
    kwargs: dict[str, Any]  # constexprs and launch options (num_warps, num_stages)


def _flashtune_kernels() -> list[Any]:
    from flashtune.kernel.jit import bwd, decode, fwd, fwd_tma

    found: dict[int, Any] = {}
    for module in (fwd, fwd_tma, bwd, decode):
        for value in vars(module).values():
            if hasattr(value, "add_pre_run_hook") and hasattr(value, "pre_run_hooks"):
                found[id(value)] = value
    return list(found.values())


@pytest.fixture
def launches() -> Iterator[list[Launch]]:
    """Every flashtune Triton kernel launched while the test runs, in order (`Launch`).

    Recorded where Triton's `kernel[grid](...)` goes, the kernel's `run`, which then runs as usual.
    Each kernel also gets a pre-run hook so that a CUDA call cannot bypass `run` through the direct
    launcher (kernel.fastlaunch takes the JIT for kernels with hooks).
    """
    seen: list[Launch] = []
    installed = []
    for kernel in _flashtune_kernels():
        real = kernel.run

        def run(*args: Any, grid: Any, warmup: bool, _real: Any = real, _name: str = kernel.__name__,
                **kwargs: Any) -> Any:
            if not warmup:
                seen.append(Launch(_name, grid, args, dict(kwargs)))
            return _real(*args, grid=grid, warmup=warmup, **kwargs)

        def hook(*args: Any, **kwargs: Any) -> None:
            pass

        own = vars(kernel).get("run")  # an instance attribute to put back, if the kernel had one
        kernel.run = run
        kernel.add_pre_run_hook(hook)
        installed.append((kernel, hook, own))
    try:
        yield seen
    finally:
        for kernel, hook, own in installed:
            if own is None:
                del kernel.run  # the class's run again
            else:
                kernel.run = own
            kernel.pre_run_hooks.remove(hook)
