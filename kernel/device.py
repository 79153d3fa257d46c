"""What the kernel needs to know about a device: its arch string, name and shared-memory limit, and
whether kernels run in the Triton interpreter. The tuner's GPU detection reads the same answers.

Answers are cached per device index: the dispatcher asks on every call and CUDA property queries
cost microseconds.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

from ..db.arch import arch_from_capability


def triton_interprets() -> bool:
    """Whether Triton runs @triton.jit functions in its interpreter, by Triton's own reading of TRITON_INTERPRET.

    Asking Triton keeps the two in agreement: a value Triton reads as off ("2", "false", "garbage") must not
    send CPU tensors to kernels that then fail with Triton's "0 active drivers" instead of the device check.
    """
    try:
        from triton import knobs  # Triton >= 3.4: "1", "true", "on", "yes", "y" (any case) mean on
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"  # older Triton's jit compared the text with "1"
    return bool(knobs.runtime.interpret)


# Under the Triton interpreter kernels run on CPU tensors (tests, debugging). Triton itself reads the
# variable when a @triton.jit function is defined, so reading it once at import agrees with Triton.
INTERPRET: bool = triton_interprets()


def _cuda_index(device: torch.device | int | str) -> int:
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device {dev} is not a CUDA device: flashtune's kernels run on CUDA GPUs")
    return torch.cuda.current_device() if dev.index is None else dev.index


@lru_cache(maxsize=None)
def _arch(index: int) -> str:
    return arch_from_capability(*torch.cuda.get_device_capability(index))


@lru_cache(maxsize=None)
def _props(index: int) -> torch.cuda._CudaDeviceProperties:
    return torch.cuda.get_device_properties(index)


@lru_cache(maxsize=None)
def _smem(index: int) -> int:
    limit = getattr(_props(index), "shared_memory_per_block_optin", None)
    if not limit:
        from triton.runtime import driver  # older torch: ask the driver through Triton

        limit = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit)


def device_arch(device: torch.device | int | str) -> str:
    """'sm_XY' of a CUDA device."""
    return _arch(_cuda_index(device))


def device_smem_limit(device: torch.device | int | str) -> int:
    """Per-block opt-in shared memory of a CUDA device, in bytes."""
    return _smem(_cuda_index(device))


def device_name(device: torch.device | int | str) -> str:
    """Marketing name of a CUDA device, e.g. 'NVIDIA H200'."""
    return _props(_cuda_index(device)).name


def device_sm_count(device: torch.device | int | str) -> int:
    """Number of streaming multiprocessors of a CUDA device (persistent grids, the tuner's records)."""
    return int(_props(_cuda_index(device)).multi_processor_count)
