"""The forward as a tuner op: its space (pointer kernel + variants), default, FLOPs and benchmark inputs.

Validation compares each candidate's output with torch SDPA's math backend in fp32 on the same
inputs (kernel.testing.fp32_reference), by relative Frobenius error (`TOLERANCE`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from ..kernel.ops.fwd import estimate_smem
from ..db.types import Config, Key
from ..kernel.ops.fwd import default_config
from ..kernel.dtypes import TORCH_DTYPES
from ..kernel.checks import AttnShape, check_inputs
from ..kernel.ops.fwd import launch
from ..kernel.testing import attention_flops as shape_flops, fp32_reference
from ..kernel.providers import KERNEL, provider_of
from ..kernel.sdpa import run_sdpa

from .space import Candidate, candidates, plan, variant_candidates
from .workload import OpSpec, compile_batch, output_problem, split_heads

if TYPE_CHECKING:
    from .gpu import GpuInfo

# Relative Frobenius-norm error allowed against the fp32 reference. A correct kernel sits near
# 1e-3 (fp16) and 8e-3 (bf16); a wrong tile schedule is off by tens of percent.
TOLERANCE: dict[str, float] = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 1e-3}


def attention_flops(key: Key, batch_heads: int) -> float:
    """Forward FLOPs: 4·B·H·Nq·Nk·D, half when causal."""
    return shape_flops(batch_heads, key.seq_len, key.seq_len_kv, key.head_dim, key.causal)


@lru_cache(maxsize=256)
def _space(head_dim: int, dtype: str, causal: bool, smem_limit: int, arch: str) -> tuple[Config, ...]:
    configs = [*candidates(head_dim, dtype, smem_limit, arch=arch),
               *variant_candidates(head_dim, dtype, causal, smem_limit, arch=arch)]
    return tuple(dict.fromkeys(configs))


def fwd_space(key: Key, gpu: "GpuInfo") -> list[Config]:
    """The pointer kernel's pruned space (tuner.space) and the other variants' configs (the TMA
    kernel's on sm_90) for `key` on `gpu`; computed once per head dim, dtype, causal and GPU."""
    return list(_space(key.head_dim, key.dtype, key.causal, gpu.smem_limit, gpu.arch))


def fwd_plan(head_dim: int, dtype: str, gpu: "GpuInfo") -> list[Candidate]:
    """The pointer kernel's whole space with estimates and drop reasons (`tune --dry-run`)."""
    return plan(head_dim, dtype, gpu.smem_limit, arch=gpu.arch)


def fwd_default(key: Key, gpu: "GpuInfo") -> Config:
    """kernel.ops.fwd.default_config for the key on this GPU's shared memory."""
    return default_config(key.arch, key.head_dim, key.dtype, gpu.smem_limit)


@dataclass
class KeyInputs:
    """Random inputs of a key's shape on the bench device, and the torch SDPA (math, fp32) reference.

    B·Hq is `batch_heads`, split by `split_heads`; k and v have Hq / key.group heads (real GQA inputs).
    `reference` is None for the compile pool's inputs (`warm=True`), which are never checked.
    """

    key: Key
    batch_heads: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: AttnShape
    scale: float
    reference: torch.Tensor | None

    @classmethod
    def build(cls, key: Key, batch_heads: int, device: torch.device, seed: int = 0, *,
              warm: bool = False) -> "KeyInputs":
        """Inputs drawn from N(0, 1) with a fixed seed; the reference is computed once per key.
        `warm`: the compile pool's inputs: compile_batch(B) sequences and no reference."""
        batch, heads = split_heads(batch_heads, key.group)
        batch = compile_batch(batch) if warm else batch
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = TORCH_DTYPES[key.dtype]

        def draw(h: int, n: int) -> torch.Tensor:
            return torch.randn(batch, h, n, key.head_dim, generator=gen, device=device, dtype=dtype)

        kv_heads = heads // key.group
        q, k, v = draw(heads, key.seq_len), draw(kv_heads, key.seq_len_kv), draw(kv_heads, key.seq_len_kv)
        scale = 1.0 / math.sqrt(key.head_dim)  # fp32_reference uses SDPA's default, the same
        if warm:
            return cls(key, batch_heads, q, k, v, check_inputs(q, k, v), scale, None)
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

    def check(self, output: torch.Tensor) -> str | None:
        """Why `output` is wrong against the fp32 SDPA reference, or None."""
        return output_problem(output, self.reference, TOLERANCE[self.key.dtype], "torch SDPA (fp32)")

    def buffers(self) -> torch.Tensor:
        """One output tensor the timed launches share."""
        return torch.empty_like(self.q)


FWD = OpSpec("fwd", space=fwd_space, smem=estimate_smem, plan=fwd_plan, default=fwd_default, flops=attention_flops,
             sdpa_providers=True, inputs=KeyInputs)
