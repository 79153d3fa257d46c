"""What the tuner records about the GPU it measures on, or plans for with `--dry-run`.

A tuned config is only as good as its provenance: the winner table keeps the GPU name, SM count,
driver, CUDA, Triton and torch versions beside every config, so they are read once here.
"""
from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import triton

from ..db.arch import normalize_arch, smem_limit
from ..db.store import RunInfo
from ..kernel.device import device_arch, device_name, device_sm_count, device_smem_limit
from ..kernel.version import KERNEL_VERSION


class NoGpuError(RuntimeError):
    """No CUDA GPU is visible to this process."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU, real (`present=True`) or planned from the arch table."""

    name: str
    arch: str
    sm_count: int
    smem_limit: int  # per-block opt-in shared memory, bytes
    driver: str
    cuda: str
    triton_version: str
    torch_version: str
    host: str
    present: bool
    index: int = 0


def _driver_version() -> str:
    """The NVIDIA driver release (e.g. '560.35.03'); the driver's CUDA API version when nvidia-smi is absent."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
            if out.strip():
                return out.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda-api {version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        pass
    return "unknown"


def detect_gpu(index: int = 0) -> GpuInfo:
    """Read the GPU at `index`; NoGpuError when CUDA has no device."""
    if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
        raise NoGpuError("no CUDA GPU is visible (torch.cuda.is_available() is False); "
                         "use --dry-run --arch sm_XY to plan without one")
    # kernel.device answers: the same the dispatcher and the kernels use.
    return GpuInfo(name=device_name(index), arch=device_arch(index), sm_count=device_sm_count(index),
                   smem_limit=device_smem_limit(index), driver=_driver_version(), cuda=str(torch.version.cuda),
                   triton_version=triton.__version__, torch_version=torch.__version__, host=platform.node(),
                   present=True, index=index)


def planned_gpu(arch: str) -> GpuInfo:
    """A stand-in for a GPU of `arch` that is not here, with the arch table's shared-memory limit."""
    arch = normalize_arch(arch)
    return GpuInfo(name=f"planned {arch}", arch=arch, sm_count=0, smem_limit=smem_limit(arch),
                   driver="", cuda="", triton_version=triton.__version__, torch_version=torch.__version__,
                   host=platform.node(), present=False)


def run_info(gpu: GpuInfo, args: Mapping[str, Any], kernel_version: str = KERNEL_VERSION) -> RunInfo:
    """The run record of one tuning session on `gpu` with the command's arguments."""
    return RunInfo(gpu_name=gpu.name, arch=gpu.arch, sm_count=gpu.sm_count, smem_limit=gpu.smem_limit,
                   driver=gpu.driver, cuda=gpu.cuda, triton_version=gpu.triton_version,
                   torch_version=gpu.torch_version, kernel_version=kernel_version, host=gpu.host,
                   args=dict(args))
