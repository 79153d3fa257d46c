"""The backward as a tuner op: the fused backward's search space, default, FLOPs and workload.

## The space: which configs of the fused backward (kernel/bwd.py) the tuner times

A backward config (kernel.ops.bwd) sets two kernels: the dK/dV pass (`block_m` queries streamed
past a program's `block_n` keys, `num_warps`, `num_stages`) and the dQ pass (`block_m_dq` queries
owned, `block_n_dq` keys streamed), or, with `deterministic: false`, dQ added with fp32 atomics
inside the dK/dV pass (no dQ pass). The full cross product of both passes is thousands of configs;
the space is built from what the two kernels share instead:

- dK/dV tiles: block_n (keys owned) 64 or 128, block_m (queries streamed) 16 to 64, 4 or 8 warps,
  2 or 3 stages;
- the dQ pass mirrors it (FA2): it owns block_m_dq = block_n queries and streams block_n_dq = 32 or
  64 keys, with the dK/dV pass's warps and stages (the knobs' defaults);
- the atomic-dQ variant of each dK/dV tile and warp count, at 2 stages (its extra dQ tile leaves
  little shared memory for a third).

That is 60 configs before pruning (45 kept at D=64 on sm_90, 30 at D=128 fp16; at D > 128 the
register rule leaves none, and the default alone is timed). Rules, each with a reason `tune --dry-run --op bwd` prints:

- legal: the shared-memory estimate (kernel.ops.bwd.estimate_bwd_smem, the larger of the two
  kernels) fits the GPU, and each pass's fp32 accumulators plus its score tiles fit the register
  file (dK and dV: 2·block_n·D; dQ: block_m_dq·D; scores and their gradients: 2 tiles);
- cost: every warp owns at least one 16-row MMA slab of the tile it accumulates (block_n for dK/dV,
  block_m_dq for dQ), as in the forward's rules (tuner.ops.fwd): more warps than slabs duplicate work.

## The workload

A bwd key has the forward key's fields with op "bwd": the gradients of attention on that shape. Its
workload draws q, k, v and dO (real GQA heads, B·Hq split like the forward's), runs the forward
kernel once (default config) for O and the row log-sum-exp, and computes the reference gradients by
fp32 autograd of torch SDPA's math attention (a key with attention features: float64 autograd of the
reference with the same modifiers, tuner.ops.reference; the forward and the backward both take the
workload's modifiers, the dropout seed included). A candidate's run is the backward launch alone
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

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from ...kernel.ops.common import padded_head_dim
from ...db.types import DTYPE_BYTES, Config, Key, normalize_dtype
from ...kernel.ops.bwd import launch_bwd
from ...kernel.ops.bwd import bwd_knobs, default_bwd_config, estimate_bwd_smem
from ...kernel.ops.fwd import default_config
from ...kernel.ops.fwd import launch
from ...kernel.mods import NO_MODS, ScoreMods
from ...kernel.testing import REFERENCE_BYTES, math_attention, query_rows
from ...kernel.testing import attention_flops as shape_flops

from .inputs import Draw, OpInputs, unmodified
from .mods import mods_bytes
from .reference import modified_gradients
from .space import MMA_ROWS, THREAD_FP32_MAX, Candidate
from .spec import OpSpec

if TYPE_CHECKING:
    from ..gpu import GpuInfo

DKDV_BLOCK_N: tuple[int, ...] = (64, 128)  # keys a dK/dV program owns
DKDV_BLOCK_M: tuple[int, ...] = (16, 32, 64)  # queries it streams per step
WARPS: tuple[int, ...] = (4, 8)
STAGES: tuple[int, ...] = (2, 3)
DQ_BLOCK_N: tuple[int, ...] = (32, 64)  # keys the dQ program streams per step
ATOMIC_STAGES = 2

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


def full_bwd_space() -> list[Config]:
    """Every config of the backward's structured space, unpruned (60)."""
    configs = []
    for n, m, w, s, n_dq in itertools.product(DKDV_BLOCK_N, DKDV_BLOCK_M, WARPS, STAGES, DQ_BLOCK_N):
        configs.append(Config(m, n, w, s, {"block_m_dq": n, "block_n_dq": n_dq}))
    for n, m, w in itertools.product(DKDV_BLOCK_N, DKDV_BLOCK_M, WARPS):
        configs.append(Config(m, n, w, ATOMIC_STAGES, {"deterministic": False}))
    return configs


def _per_thread(rows: int, cols: int, acc_tiles: int, head_dim: int, score_cols: int, warps: int) -> int:
    """fp32 values a thread holds: `acc_tiles` rows x D accumulators plus two rows x score_cols tiles."""
    return (acc_tiles * rows * head_dim + 2 * rows * score_cols) // (32 * warps)


def bwd_reason(config: Config, head_dim: int, dtype: str, smem_limit: int, arch: str | None = None) -> str | None:
    """Why `config` is not worth timing for (head_dim, dtype) on `arch` with `smem_limit`; None if it is."""
    knobs = bwd_knobs(config)
    smem = estimate_bwd_smem(config, head_dim, dtype, arch)
    if smem > smem_limit:
        return f"smem {smem // 1024} KB > {smem_limit // 1024} KB"
    d = padded_head_dim(head_dim)
    dkdv = _per_thread(knobs.block_n, d, 2, d, knobs.block_m, knobs.num_warps)
    if dkdv > THREAD_FP32_MAX:
        return f"dK/dV pass: {dkdv} fp32 acc+score values per thread > {THREAD_FP32_MAX}"
    if knobs.deterministic:
        dq = _per_thread(knobs.block_m_dq, d, 1, d, knobs.block_n_dq, knobs.num_warps_dq)
        if dq > THREAD_FP32_MAX:
            return f"dQ pass: {dq} fp32 acc+score values per thread > {THREAD_FP32_MAX}"
        if knobs.block_m_dq < MMA_ROWS * knobs.num_warps_dq:
            return f"dQ pass: block_m_dq {knobs.block_m_dq} < {MMA_ROWS} rows x {knobs.num_warps_dq} warps"
    if knobs.block_n < MMA_ROWS * knobs.num_warps:
        return f"dK/dV pass: block_n {knobs.block_n} < {MMA_ROWS} rows x {knobs.num_warps} warps"
    return None


def bwd_plan(head_dim: int, dtype: str, smem_limit: int, arch: str | None = None) -> list[Candidate]:
    """Every config of the backward's space with its shared-memory estimate and the rule that drops it."""
    dtype = normalize_dtype(dtype)
    return [Candidate(c, estimate_bwd_smem(c, head_dim, dtype, arch), bwd_reason(c, head_dim, dtype, smem_limit, arch))
            for c in full_bwd_space()]


@lru_cache(maxsize=256)
def bwd_candidates(head_dim: int, dtype: str, smem_limit: int, arch: str | None = None) -> tuple[Config, ...]:
    """The backward configs the tuner times for (head_dim, dtype) on `arch` with `smem_limit`."""
    return tuple(c.config for c in bwd_plan(head_dim, dtype, smem_limit, arch) if c.kept)


def bwd_flops(key: Key, batch_heads: int) -> float:
    """Backward FLOPs: 2.5 × the forward's 4·B·H·Nq·Nk·D (half when causal)."""
    return BWD_FLOP_RATIO * shape_flops(batch_heads, key.seq_len, key.seq_len_kv, key.head_dim, key.causal)


def bwd_space(key: Key, gpu: "GpuInfo") -> list[Config]:
    """`bwd_candidates` for `key` on `gpu`."""
    return list(bwd_candidates(key.head_dim, key.dtype, gpu.smem_limit, gpu.arch))


def bwd_gpu_plan(head_dim: int, dtype: str, gpu: "GpuInfo") -> list[Candidate]:
    """The backward space with estimates and drop reasons on `gpu` (`tune --dry-run --op bwd`)."""
    return bwd_plan(head_dim, dtype, gpu.smem_limit, gpu.arch)


def bwd_default(key: Key, gpu: "GpuInfo") -> Config:
    """kernel.ops.bwd.default_bwd_config for the key on this GPU's shared memory: the dispatcher's untuned choice."""
    return default_bwd_config(key.arch, key.head_dim, key.dtype, gpu.smem_limit)


def fp32_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, causal: bool, scale: float,
                   *, max_bytes: int | None = None,
                   mods: ScoreMods = NO_MODS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in fp32 of softmax(scale·QKᵀ [+ causal mask])·V for output gradient `do`, by autograd
    through torch SDPA's math backend on fp32 copies (kernel.testing.math_attention); GQA by each K/V head
    serving its group of consecutive query heads (autograd sums dK, dV over the group). Computed a few K/V
    heads at a time so that a long sequence never needs all B·H·N·N scores at once. With score modifiers
    `mods`: float64 autograd of the reference with the same modifiers, in fp32 (tuner.ops.reference)."""
    if not unmodified(mods):
        return modified_gradients(q, k, v, do, causal=causal, scale=scale, mods=mods, max_bytes=max_bytes)
    b, hq, n, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    if max_bytes is None:
        max_bytes = REFERENCE_BYTES.get(q.device.type, REFERENCE_BYTES["cpu"])
    per_row = GRAD_SCORE_COPIES * group * nk * 4  # one query row of every head of a K/V head's group
    chunk = max(1, max_bytes // (per_row * n))
    rows = min(n, max(1, max_bytes // per_row))  # fewer query rows at a time when one group's don't fit
    # (B·Hkv, G, N, D): the query heads of one K/V head side by side (Hq = Hkv·G, consecutive).
    qg, dog = (x.reshape(b * hkv, group, n, d) for x in (q, do))
    kg, vg = (x.reshape(b * hkv, 1, nk, d) for x in (k, v))
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=q.device) for t in (qg, kg, vg))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        for lo in range(0, b * hkv, chunk):
            hi = min(lo + chunk, b * hkv)
            ks, vs = (x[lo:hi].float().requires_grad_(True) for x in (kg, vg))
            # Softmax is per query row: dQ of a row block is its own, dK and dV add up over the blocks.
            for r0, r1, mask in query_rows(n, nk, rows, causal, q.device):
                qs = qg[lo:hi, :, r0:r1].float().requires_grad_(True)
                out = math_attention(qs, ks.expand(-1, group, -1, -1), vs.expand(-1, group, -1, -1),
                                     attn_mask=mask, is_causal=causal and mask is None, scale=scale)
                gq, gk, gv = torch.autograd.grad(out, (qs, ks, vs), dog[lo:hi, :, r0:r1].float())
                dq[lo:hi, :, r0:r1] = gq
                dk[lo:hi] += gk
                dv[lo:hi] += gv
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


def gradient_problem(output: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...], tolerance: float,
                     against: str) -> str | None:
    """Why gradients (dQ, dK, dV) are off their reference by more than `tolerance` (the worst of the three, by
    `gradient_errors`), or None."""
    errors = gradient_errors(output, reference)
    worst = max(range(3), key=lambda i: errors[i])
    if errors[worst] <= tolerance:
        return None
    return f"relative error {errors[worst]:.3g} in {('dQ', 'dK', 'dV')[worst]} > {tolerance:g} against {against}"


@dataclass
class BwdInputs(OpInputs):
    """A bwd key's inputs (tuner.ops.inputs) with dO, the forward kernel's O and LSE, and the fp32
    autograd reference gradients (dQ, dK, dV)."""

    do: torch.Tensor = field(init=False)
    o: torch.Tensor = field(init=False)
    lse: torch.Tensor = field(init=False)

    tolerance = TOLERANCE
    against = "fp32 autograd of torch SDPA (math)"

    def prepare(self, draw: Draw) -> None:
        """dO drawn after q, k, v; O and LSE from the forward kernel's default config."""
        key = self.key
        self.do = draw(self.q.shape[1], key.seq_len)
        self.o, self.lse, _ = launch(self.q, self.k, self.v, self.shape, causal=key.causal, scale=self.scale,
                                     return_lse=True, config=default_config(key.arch, key.head_dim, key.dtype),
                                     mods=self.mods)

    def compute_reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dQ, dK, dV) by fp32 autograd (`fp32_gradients`)."""
        return fp32_gradients(self.q, self.k, self.v, self.do, self.key.causal, self.scale,
                              max_bytes=self.reference_bytes, mods=self.mods)

    @classmethod
    def footprint(cls, key: Key, batch_heads: int) -> int:
        """q, k, v, dO, O, the dQ/dK/dV buffers (and an fp32 dQ for the atomic variant), LSE and the
        fp32 reference gradients, and a feature key's modifiers (tuner.ops.mods.mods_bytes)."""
        batch, heads_q, heads_kv = cls.sizes(key, batch_heads)
        q = batch * heads_q * key.seq_len * key.head_dim
        kv = 2 * batch * heads_kv * key.seq_len_kv * key.head_dim
        elt = DTYPE_BYTES[key.dtype]
        return ((4 * q + 2 * kv) * elt + (2 * q + kv) * 4 + batch * heads_q * key.seq_len * 4
                + mods_bytes(key, batch, heads_q))

    def run(self, config: Config, out: tuple[torch.Tensor, ...] | None = None) -> tuple[tuple[torch.Tensor, ...], Any]:
        """The backward launch with `config`: ((dQ, dK, dV), Triton's compiled kernels by name), into `out`
        or new buffers (the benchmark validates into NaN-filled ones: tuner.ops.inputs.poisoned)."""
        if out is None:
            out = self.buffers()
        dq, dk, dv, compiled = launch_bwd(self.do, self.q, self.k, self.v, self.o, self.lse, self.shape,
                                          causal=self.key.causal, scale=self.scale, config=config,
                                          deterministic=False, out=out,  # type: ignore[arg-type]
                                          mods=self.mods)
        return (dq, dk, dv), compiled

    def problem(self, output: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...],
                tolerance: float) -> str | None:
        """Why the gradients are wrong against fp32 autograd (the worst of dQ, dK, dV), or None."""
        return gradient_problem(output, reference, tolerance, self.described)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dQ, dK, dV buffers the timed launches share."""
        return torch.empty_like(self.q), torch.empty_like(self.k), torch.empty_like(self.v)


BWD = OpSpec("bwd", space=bwd_space, plan=bwd_gpu_plan, default=bwd_default, flops=bwd_flops,
             sdpa_providers=False, inputs=BwdInputs)
