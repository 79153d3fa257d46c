"""What the tests share: one relative-error measure, one q/k/v factory, the dtypes a device checks, and (in
this package's modules) the database fixtures (`helpers.db`, registered in conftest.py through
`pytest_plugins`), subprocess environments, loading bench/ scripts, CUDA-graph replay and the fleet's cost
model."""
from __future__ import annotations

import math

import torch


def rel(out: torch.Tensor, ref: torch.Tensor, *, floor: float = 0.0) -> float:
    """‖out − ref‖ / ‖ref‖ in float64, after checking that `out` is finite (a NaN-poisoned element nothing
    wrote fails here). `floor`: the RMS below which `ref`'s norm is not divided by, so that where the exact
    value is about zero (a gradient of one key) the bound is absolute."""
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    denominator = max(ref.double().norm().item(), floor * math.sqrt(ref.numel()), 1e-300)
    return float((out.double() - ref.double()).norm().item() / denominator)


def qkv(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, dtype: torch.dtype, device: str | torch.device,
        gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh N(0, 1) q (b, hq, nq, d) and k, v (b, hkv, nk, d) from `gen`, drawn in fp32 on the CPU (the same
    values on every device) and cast to `dtype` on `device`."""
    def draw(h: int, n: int) -> torch.Tensor:
        return torch.randn(b, h, n, d, generator=gen, dtype=torch.float32).to(device, dtype)

    return draw(hq, nq), draw(hkv, nk), draw(hkv, nk)


def dtypes(device: str, *, fp32_on_gpu: bool = True) -> list[torch.dtype]:
    """The dtypes a kernel test checks on `device`. The interpreter's bf16 dot is wrong on CPU (numpy has no
    bf16), so bf16 is checked on the GPU only; fp32 on the GPU too unless `fp32_on_gpu` is off."""
    if device == "cuda":
        return [torch.float16, torch.bfloat16] + ([torch.float32] if fp32_on_gpu else [])
    return [torch.float32, torch.float16]
