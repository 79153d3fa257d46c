"""The training pair as a tuner op: candidates, default, FLOPs and the one-step workload.

A "train" key has the forward key's fields with op "train": one training step of attention on that shape,
the forward (keeping its row log-sum-exp) and the backward with a random dO. Its candidates
(kernel.ops.train):

- kernel pairs, composed from the tuned trials of the same shape's "fwd" and "bwd" keys (its `parts`,
  which `tune` times first, in the same run): the fastest `PAIR_TOP` forward kernel configs by the
  backward's fastest `PAIR_TOP`, so a pair is never searched over the product of both spaces; and the
  default pair, always;
- each torch SDPA backend, running its own forward and its own backward through autograd: SDPA's
  backward is tied to its forward, so only a pair decision can compare it with flashtune.

A candidate is checked on its output and its three gradients: O against the forward's fp32 reference
(tuner.ops.fwd's tolerance) and dQ, dK, dV against fp32 autograd (tuner.ops.bwd's). It is timed as one
step: the forward launch, then the backward launch (kernel pairs), or the backend's forward and
`torch.autograd.grad` (SDPA), with the same dO.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ...db.types import DTYPE_BYTES, Config, Key
from ...kernel.ops.bwd import launch_bwd
from ...kernel.mods import NO_MODS, ScoreMods
from ...kernel.ops.fwd import launch
from ...kernel.ops.train import estimate_train_smem, pair_config, split_pair
from ...kernel.providers import KERNEL, provider_of
from ...kernel.sdpa import run_sdpa

from .bwd import TOLERANCE as BWD_TOLERANCE, BwdInputs, bwd_default, bwd_flops, fp32_gradients, gradient_errors
from .fwd import TOLERANCE as FWD_TOLERANCE, attention_flops, fwd_default, fwd_reference, sdpa_same
from .inputs import Draw, OpInputs, relative_error
from .space import Candidate
from .spec import OpSpec

if TYPE_CHECKING:
    from ..gpu import GpuInfo

PAIR_TOP = 3  # forward configs by backward configs composed into pairs: 9 pairs and the default


def train_flops(key: Key, batch_heads: int) -> float:
    """One step's FLOPs: the forward's and the backward's."""
    return attention_flops(key, batch_heads) + bwd_flops(key, batch_heads)


def train_default(key: Key, gpu: "GpuInfo") -> Config:
    """The default forward config paired with the default backward config on this GPU."""
    return pair_config(fwd_default(key, gpu), bwd_default(key, gpu))


def compose_pairs(key: Key, gpu: "GpuInfo", ranked: Mapping[str, Sequence[Config]]) -> list[Config]:
    """The kernel pairs of `key`: the fastest PAIR_TOP configs of `ranked["fwd"]` by those of
    `ranked["bwd"]` (each op's tuned kernel configs for the same shape, fastest first), each part's default
    standing in where nothing of that part is tuned; the default pair first."""
    default = train_default(key, gpu)
    forward, backward = split_pair(default)
    fwds = list(ranked.get("fwd", ()))[:PAIR_TOP] or [forward]
    bwds = list(ranked.get("bwd", ()))[:PAIR_TOP] or [backward]
    pairs = [pair_config(f, b) for f, b in itertools.product(fwds, bwds)]
    return list(dict.fromkeys([default, *pairs]))


def train_space(key: Key, gpu: "GpuInfo") -> list[Config]:
    """The key's pairs with nothing of its parts tuned: the default pair alone (what `--dry-run` counts
    before the parts are timed)."""
    return compose_pairs(key, gpu, {})


def train_plan(head_dim: int, dtype: str, gpu: "GpuInfo") -> list[Candidate]:
    """The default pair with its shared-memory estimate: the pairs themselves come from the parts' trials."""
    key = Key(gpu.arch, "train", 1024, head_dim, dtype, False)
    config = train_default(key, gpu)
    return [Candidate(config, estimate_train_smem(config, head_dim, dtype, gpu.arch))]


def fwd_bwd_errors(output: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> tuple[float, ...]:
    """(O's relative error, then dQ's, dK's and dV's) against the reference step."""
    return (relative_error(output[0], reference[0]), *gradient_errors(output[1:], reference[1:]))


@dataclass
class TrainInputs(OpInputs):
    """A train key's inputs (tuner.ops.inputs) with dO, leaf copies of q, k, v for SDPA's autograd, and the
    reference step: the fp32 forward and the fp32 autograd gradients."""

    do: torch.Tensor = field(init=False)
    leaves: tuple[torch.Tensor, ...] = field(init=False)

    tolerance = BWD_TOLERANCE
    against = "the fp32 forward and fp32 autograd of torch SDPA (math)"

    def prepare(self, draw: Draw) -> None:
        """dO drawn after q, k, v."""
        self.do = draw(self.q.shape[1], self.key.seq_len)
        self.leaves = tuple(t.detach().requires_grad_(True) for t in (self.q, self.k, self.v))

    def compute_reference(self) -> tuple[torch.Tensor, ...]:
        """(O, dQ, dK, dV) in fp32, within the workload's reference byte budget."""
        out = fwd_reference(self.q, self.k, self.v, self.key, max_bytes=self.reference_bytes, softcap=self.softcap)
        return (out, *fp32_gradients(self.q, self.k, self.v, self.do, self.key.causal, self.scale,
                                     max_bytes=self.reference_bytes, softcap=self.softcap))

    @classmethod
    def footprint(cls, key: Key, batch_heads: int) -> int:
        """The backward's inputs and buffers (BwdInputs.footprint) with the step's O buffer and the fp32
        reference O."""
        batch, heads_q, _ = cls.sizes(key, batch_heads)
        q = batch * heads_q * key.seq_len * key.head_dim
        return BwdInputs.footprint(key, batch_heads) + q * (DTYPE_BYTES[key.dtype] + 4)

    def run(self, config: Config, out: tuple[torch.Tensor, ...] | None = None) -> tuple[tuple[torch.Tensor, ...], Any]:
        """One step with `config`: ((O, dQ, dK, dV), Triton's compiled kernels by name, or None for SDPA)."""
        provider = provider_of(config)
        if provider != KERNEL:
            with torch.enable_grad():
                o = run_sdpa(provider, *self.leaves, causal=self.key.causal, scale=self.scale)
                grads = torch.autograd.grad(o, self.leaves, self.do)
            return (o.detach(), *grads), None
        forward, backward = split_pair(config)
        o_buf, *grads_buf = out if out is not None else self.buffers()
        o, lse, compiled = launch(self.q, self.k, self.v, self.shape, causal=self.key.causal, scale=self.scale,
                                  config=forward, return_lse=True, out=o_buf,
                                  mods=ScoreMods(softcap=self.softcap) if self.softcap else NO_MODS)
        dq, dk, dv, kernels = launch_bwd(self.do, self.q, self.k, self.v, o, lse, self.shape, causal=self.key.causal,
                                         scale=self.scale, config=backward, deterministic=False,
                                         out=tuple(grads_buf),  # type: ignore[arg-type]
                                         mods=ScoreMods(softcap=self.softcap) if self.softcap else NO_MODS)
        return (o, dq, dk, dv), {"fwd": compiled, **kernels}

    def problem(self, output: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...],
                tolerance: float) -> str | None:
        """Why the step is wrong: O beyond the forward's tolerance, or the worst gradient beyond the backward's."""
        errors = fwd_bwd_errors(output, reference)
        limits = (FWD_TOLERANCE[self.key.dtype], tolerance, tolerance, tolerance)
        worst = max(range(4), key=lambda i: errors[i] / limits[i])
        if errors[worst] <= limits[worst]:
            return None
        what = ("O", "dQ", "dK", "dV")[worst]
        return f"relative error {errors[worst]:.3g} in {what} > {limits[worst]:g} against {self.against}"

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """O, dQ, dK, dV buffers the timed steps share."""
        return (torch.empty_like(self.q), torch.empty_like(self.q), torch.empty_like(self.k),
                torch.empty_like(self.v))


TRAIN = OpSpec("train", space=train_space, plan=train_plan, default=train_default, flops=train_flops,
               sdpa_providers=True, inputs=TrainInputs, parts=("fwd", "bwd"), compose=compose_pairs,
               sdpa_keys=sdpa_same)
