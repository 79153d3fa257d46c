"""The backward as a tuner op: the fused backward's space (tuner.bwd_space), default, FLOPs and workload.

A bwd key has the forward key's fields with op "bwd": the gradients of attention on that shape. Its
workload draws q, k, v and dO (real GQA heads, B·Hq split like the forward's), runs the forward
kernel once (default config) for O and the row log-sum-exp, and computes the reference gradients by
fp32 autograd of torch SDPA's math attention. A candidate's run is the backward launch alone
(`launch_bwd`: the delta preprocess, the dK/dV pass, the dQ pass or the atomic dQ conversion), the
same the training path runs, with dQ atomics allowed (what `attention()` does unless
torch.use_deterministic_algorithms is on), so a `deterministic: false` config is timed with them.

No torch SDPA backend competes for a bwd key: SDPA's backward is tied to its own forward (it needs
the forward's saved statistics in the backend's own format and runs only through autograd on a
graph that backend built), so it cannot stand in for flashtune's backward after flashtune's
forward. A key whose forward SDPA won trains through SDPA's forward and backward anyway
(kernel.api), which `tune --op fwd` decides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..db.types import Config, Key
from ..kernel.ops.bwd import launch_bwd
from ..kernel.ops.bwd import default_bwd_config, estimate_bwd_smem
from ..kernel.ops.fwd import default_config
from ..kernel.dtypes import TORCH_DTYPES
from ..kernel.checks import AttnShape, check_inputs
from ..kernel.ops.fwd import launch
from ..kernel.testing import REFERENCE_BYTES
from ..kernel.testing import attention_flops as shape_flops

from .bwd_space import bwd_candidates, bwd_plan
from .space import Candidate
from .workload import OpSpec, compile_batch, split_heads

if TYPE_CHECKING:
    from .gpu import GpuInfo

BWD_FLOP_RATIO = 2.5  # backward FLOPs per forward FLOP: five N×N matmuls (S, dP, dV, dQ, dK) against two
# Relative Frobenius error allowed per gradient against fp32 autograd (the worst of dQ, dK, dV).
# Measured under the interpreter with the default and the first space configs, atomic dQ included
# (N 1 to 128, D 16 to 64, causal both ways, GQA 2 and 4, cross lengths): fp16 at most 3.6e-4,
# fp32 (IEEE) at most 3.5e-7 (9e-5 for one key, where dQ and dK are zero and only rounding noise is
# measured against ZERO_FLOOR). fp16: 1e-2, over 25x that; bf16's unit roundoff is 8x fp16's, so the
# forward's 5e-2; fp32 the forward's 1e-3. The same inputs with a 10 % larger softmax scale are off
# by 5e-2 to 1.4e-1 in the worst gradient.
TOLERANCE: dict[str, float] = {"float16": 1e-2, "bfloat16": 5e-2, "float32": 1e-3}
# A gradient that is exactly zero (dQ and dK with one key) is measured against this fraction of the
# largest reference gradient's RMS instead of its own zero norm.
ZERO_FLOOR = 1e-3
GRAD_SCORE_COPIES = 6  # fp32 N×N tensors SDPA's math forward and its autograd hold at once, about


def bwd_flops(key: Key, batch_heads: int) -> float:
    """Backward FLOPs: 2.5 × the forward's 4·B·H·Nq·Nk·D (half when causal)."""
    return BWD_FLOP_RATIO * shape_flops(batch_heads, key.seq_len, key.seq_len_kv, key.head_dim, key.causal)


def bwd_space(key: Key, gpu: "GpuInfo") -> list[Config]:
    """tuner.bwd_space's pruned configs for `key` on `gpu`."""
    return list(bwd_candidates(key.head_dim, key.dtype, gpu.smem_limit, gpu.arch))


def bwd_gpu_plan(head_dim: int, dtype: str, gpu: "GpuInfo") -> list[Candidate]:
    """The backward space with estimates and drop reasons on `gpu` (`tune --dry-run --op bwd`)."""
    return bwd_plan(head_dim, dtype, gpu.smem_limit, gpu.arch)


def bwd_default(key: Key, gpu: "GpuInfo") -> Config:
    """kernel.ops.bwd.default_bwd_config for the key on this GPU's shared memory: the dispatcher's untuned choice."""
    return default_bwd_config(key.arch, key.head_dim, key.dtype, gpu.smem_limit)


def fp32_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, causal: bool, scale: float,
                   *, max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in fp32 of softmax(scale·QKᵀ [+ causal mask])·V for output gradient `do`, by autograd
    through torch SDPA's math backend on fp32 copies; GQA by each K/V head serving its group of
    consecutive query heads (autograd sums dK, dV over the group). Computed a few K/V heads at a
    time so that a long sequence never needs all B·H·N·N scores at once."""
    b, hq, n, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    if max_bytes is None:
        max_bytes = REFERENCE_BYTES.get(q.device.type, REFERENCE_BYTES["cpu"])
    chunk = max(1, max_bytes // (GRAD_SCORE_COPIES * group * n * nk * 4))
    # (B·Hkv, G, N, D): the query heads of one K/V head side by side (Hq = Hkv·G, consecutive).
    qg, dog = (x.reshape(b * hkv, group, n, d) for x in (q, do))
    kg, vg = (x.reshape(b * hkv, 1, nk, d) for x in (k, v))
    grads = [torch.empty(t.shape, dtype=torch.float32, device=q.device) for t in (qg, kg, vg)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        for lo in range(0, b * hkv, chunk):
            hi = min(lo + chunk, b * hkv)
            qs, ks, vs = (x[lo:hi].float().requires_grad_(True) for x in (qg, kg, vg))
            out = F.scaled_dot_product_attention(qs, ks.expand(-1, group, -1, -1), vs.expand(-1, group, -1, -1),
                                                 is_causal=causal, scale=scale)
            for grad, part in zip(grads, torch.autograd.grad(out, (qs, ks, vs), dog[lo:hi].float())):
                grad[lo:hi] = part
    dq, dk, dv = grads
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def gradient_errors(got: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> tuple[float, ...]:
    """‖got − ref‖ / ‖ref‖ (fp32) for each of dQ, dK, dV; inf for a NaN or inf. A reference gradient
    below ZERO_FLOOR × the largest reference RMS (zero: one key) is measured against that floor."""
    rms = max(float(torch.linalg.vector_norm(r)) / math.sqrt(max(r.numel(), 1)) for r in ref)
    errors = []
    for g, r in zip(got, ref):
        diff = g.float() - r
        if not bool(torch.isfinite(diff).all()):
            errors.append(math.inf)
            continue
        floor = ZERO_FLOOR * rms * math.sqrt(r.numel())
        errors.append(float(torch.linalg.vector_norm(diff)) / max(float(torch.linalg.vector_norm(r)), floor, 1e-30))
    return tuple(errors)


@dataclass
class BwdInputs:
    """A bwd key's inputs on the bench device: q, k, v, dO, the forward kernel's O and LSE, and the
    fp32 autograd reference gradients (dQ, dK, dV); None for the compile pool's inputs (`warm`)."""

    key: Key
    batch_heads: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    o: torch.Tensor
    lse: torch.Tensor
    shape: AttnShape
    scale: float
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None

    @classmethod
    def build(cls, key: Key, batch_heads: int, device: torch.device, seed: int = 0, *,
              warm: bool = False) -> "BwdInputs":
        """Inputs drawn from N(0, 1) with a fixed seed; O and LSE from the forward kernel's default
        config; the reference gradients computed once per key. `warm`: the compile pool's inputs:
        compile_batch(B) sequences and no reference."""
        batch, heads = split_heads(batch_heads, key.group)
        batch = compile_batch(batch) if warm else batch
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = TORCH_DTYPES[key.dtype]

        def draw(h: int, n: int) -> torch.Tensor:
            return torch.randn(batch, h, n, key.head_dim, generator=gen, device=device, dtype=dtype)

        kv_heads = heads // key.group
        q, k, v = draw(heads, key.seq_len), draw(kv_heads, key.seq_len_kv), draw(kv_heads, key.seq_len_kv)
        do = draw(heads, key.seq_len)
        scale = 1.0 / math.sqrt(key.head_dim)
        shape = check_inputs(q, k, v)
        o, lse, _ = launch(q, k, v, shape, causal=key.causal, scale=scale, return_lse=True,
                           config=default_config(key.arch, key.head_dim, key.dtype))
        reference = None if warm else fp32_gradients(q, k, v, do, key.causal, scale)
        return cls(key, batch_heads, q, k, v, do, o, lse, shape, scale, reference)  # type: ignore[arg-type]

    def run(self, config: Config, out: tuple[torch.Tensor, ...] | None = None) -> tuple[tuple[torch.Tensor, ...], Any]:
        """The backward launch with `config`: ((dQ, dK, dV), Triton's compiled kernels by name), into `out`
        or new buffers (the benchmark validates into NaN-filled ones: tuner.workload.poisoned)."""
        if out is None:
            out = self.buffers()
        dq, dk, dv, compiled = launch_bwd(self.do, self.q, self.k, self.v, self.o, self.lse, self.shape,
                                          causal=self.key.causal, scale=self.scale, config=config,
                                          deterministic=False, out=out)  # type: ignore[arg-type]
        return (dq, dk, dv), compiled

    def check(self, output: tuple[torch.Tensor, ...]) -> str | None:
        """Why the gradients are wrong against fp32 autograd (the worst of dQ, dK, dV), or None."""
        if self.reference is None:
            raise RuntimeError("the compile pool's inputs have no reference to check against")
        errors = gradient_errors(output, self.reference)
        worst = max(range(3), key=lambda i: errors[i])
        tol = TOLERANCE[self.key.dtype]
        if errors[worst] <= tol:
            return None
        return (f"relative error {errors[worst]:.3g} in {('dQ', 'dK', 'dV')[worst]} > {tol:g} against fp32 autograd "
                "of torch SDPA (math)")

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dQ, dK, dV buffers the timed launches share."""
        return torch.empty_like(self.q), torch.empty_like(self.k), torch.empty_like(self.v)


BWD = OpSpec("bwd", space=bwd_space, smem=estimate_bwd_smem, plan=bwd_gpu_plan, default=bwd_default, flops=bwd_flops,
             sdpa_providers=False, inputs=BwdInputs)
