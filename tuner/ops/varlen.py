"""Packed sequences as tuner ops: "varlen" times attention_varlen's forward, "varlen_bwd" its backward.

A packed key (db.types.Key with `tokens`) holds the longest documents' lengths bucketed (seq_len; the tuner
times packed self-attention, so seq_len_kv equals it), the total query tokens bucketed (`tokens`), Hq bucketed
(`batch_heads`) and the GQA group. Its workload packs `tokens` tokens into documents whose lengths are drawn
uniformly from an eighth of the longest to the longest, the first exactly the longest (so every key runs its
max_seqlen) and the last trimmed to the total; q, k, v are (tokens, Hq or Hkv, D) from N(0, 1), with the key's
window, softcap and sinks (the modifiers attention_varlen takes).

The spaces are the pointer kernels' (the forward's pruned space, tuner.ops.fwd; the backward's, tuner.ops.bwd,
without its atomic-dQ variants: the packed backward is always deterministic). The references are per document:
float64 attention with the key's modifiers (tuner.ops.reference) for the forward, and float64 autograd of it
for the backward, each document on its own. SDPA never competes: it has no packed form that computes the same
thing without an N×N block-diagonal mask.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...db.types import DTYPE_BYTES, Config, Key
from ...kernel.dtypes import TORCH_DTYPES
from ...kernel.ops.bwd import bwd_knobs
from ...kernel.ops.fwd import default_config
from ...kernel.ops.varlen import (
    check_varlen_inputs,
    launch_varlen_bwd,
    launch_varlen_fwd,
    packing,
)
from ...kernel.testing import attention_flops as shape_flops
from .bwd import BWD_FLOP_RATIO, bwd_default, bwd_gpu_plan, bwd_space, gradient_problem
from .bwd import TOLERANCE as BWD_TOLERANCE
from .fwd import TOLERANCE as FWD_TOLERANCE
from .fwd import candidates, fwd_default, fwd_plan
from .inputs import OpInputs
from .mods import workload_mods
from .reference import modified_attention, modified_gradients
from .spec import OpSpec

if TYPE_CHECKING:
    from ..gpu import GpuInfo

SHORTEST = 8  # the shortest drawn document is the longest's 1/SHORTEST


def document_lengths(tokens: int, longest: int, gen: torch.Generator) -> list[int]:
    """Lengths of documents that pack exactly `tokens` tokens, none over `longest`: the first is the longest,
    the others uniform in [longest / SHORTEST, longest] drawn from `gen` (on the CPU), the last trimmed."""
    longest = max(1, min(longest, tokens))
    lengths = [longest]
    low = max(1, longest // SHORTEST)
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(low, longest + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - tokens
    return lengths


def packed_flops(key: Key, heads: int, lengths: list[int]) -> float:
    """Forward FLOPs of one packed call: the dense count of each document (4·H·len²·D, half when causal)."""
    return sum(shape_flops(heads, n, n, key.head_dim, key.causal) for n in lengths)


def _heads(key: Key, batch_heads: int) -> tuple[int, int]:
    heads_q = max(key.group, batch_heads // key.group * key.group)
    return heads_q, heads_q // key.group


def _lengths(key: Key) -> list[int]:
    # A fixed draw per key (not per seed): the FLOP count of the rate column is the workload's.
    return document_lengths(key.tokens, key.seq_len, torch.Generator().manual_seed(key.tokens ^ key.seq_len))


def varlen_flops(key: Key, batch_heads: int) -> float:
    """The forward FLOPs of the key's packed workload (`packed_flops` of its documents)."""
    return packed_flops(key, _heads(key, batch_heads)[0], _lengths(key))


def varlen_bwd_flops(key: Key, batch_heads: int) -> float:
    """The backward's: BWD_FLOP_RATIO × the forward's."""
    return BWD_FLOP_RATIO * varlen_flops(key, batch_heads)


@dataclass
class VarlenInputs(OpInputs):
    """A packed key's inputs: q (tokens, Hq, D), k and v (tokens, Hkv, D), the documents' cu_seqlens and their
    device-side table (kernel.ops.varlen.packing); the per-document float64 reference output."""

    lengths: list[int] = field(default_factory=list)
    cu: Any = None
    pack: Any = None

    tolerance = FWD_TOLERANCE
    against = "float64 attention per document"
    against_modified = "float64 attention per document with the key's modifiers"

    @classmethod
    def check_key(cls, key: Key) -> None:
        """ValueError for a key no packed self-attention call has: no token bucket, unequal lengths, or features
        attention_varlen does not take."""
        super().check_key(key)
        if not key.tokens:
            raise ValueError(f"{key}: a {key.op} key needs its total-token bucket (tokens)")
        if key.seq_len != key.seq_len_kv:
            raise ValueError(f"{key}: the tuner times packed self-attention (seq_len_kv equal to seq_len)")

    @classmethod
    def sizes(cls, key: Key, batch_heads: int) -> tuple[int, int, int]:
        """(documents, Hq, Hkv): batch_heads is Hq's bucket here."""
        heads_q, heads_kv = _heads(key, batch_heads)
        return len(_lengths(key)), heads_q, heads_kv

    @classmethod
    def footprint(cls, key: Key, batch_heads: int) -> int:
        """q, k, v, the output and an fp32 reference of q's shape; the backward adds its own (VarlenBwdInputs)."""
        heads_q, heads_kv = _heads(key, batch_heads)
        q = key.tokens * heads_q * key.head_dim
        kv = 2 * key.tokens * heads_kv * key.head_dim
        return (2 * q + kv) * DTYPE_BYTES[key.dtype] + 4 * q

    @classmethod
    def build(cls, key: Key, batch_heads: int, device: torch.device, seed: int = 0, *,
              warm: bool = False, reference_bytes: int | None = None) -> VarlenInputs:
        """The packed inputs drawn with `seed` (the documents are the key's own draw, `document_lengths`); the
        compile pool's (`warm`) are the same sizes without the reference: a packed launch's compile does not
        depend on the token count."""
        cls.check_key(key)
        lengths = _lengths(key)
        heads_q, heads_kv = _heads(key, batch_heads)
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = TORCH_DTYPES[key.dtype]

        def draw(heads: int, n: int) -> torch.Tensor:
            return torch.randn(n, heads, key.head_dim, generator=gen, device=device, dtype=dtype)

        q, k, v = draw(heads_q, key.tokens), draw(heads_kv, key.tokens), draw(heads_kv, key.tokens)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        longest = max(lengths)
        shape = check_varlen_inputs(q, k, v, cu, cu, longest, longest)
        inputs = cls(key, batch_heads, q, k, v, shape, 1.0 / math.sqrt(key.head_dim),
                     reference_bytes=reference_bytes, mods=workload_mods(key, shape, gen, device, dtype),
                     lengths=lengths, cu=cu, pack=packing(cu, cu, key.tokens, key.tokens, longest, longest))
        inputs.prepare(draw)
        if not warm:
            inputs.reference = inputs.compute_reference()
        return inputs

    def documents(self) -> list[tuple[int, int]]:
        """(start, end) rows of each document."""
        return list(itertools.pairwise([0, *itertools.accumulate(self.lengths)]))

    @staticmethod
    def dense(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Rows a..b of a packed (tokens, H, D) tensor as one (1, H, len, D) sequence."""
        return x[a:b].transpose(0, 1).unsqueeze(0)

    def compute_reference(self) -> torch.Tensor:
        """Per document: float64 attention with the key's modifiers (tuner.ops.reference), in fp32."""
        out = torch.empty(self.q.shape, dtype=torch.float32, device=self.q.device)
        for a, b in self.documents():
            o = modified_attention(*(self.dense(x, a, b) for x in (self.q, self.k, self.v)), causal=self.key.causal,
                                   scale=self.scale, mods=self.mods, max_bytes=self.reference_bytes)
            out[a:b] = o[0].transpose(0, 1)
        return out

    def run(self, config: Config, out: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """One packed forward launch with `config` (no compiled kernel handle: the launch keeps none)."""
        o, _ = launch_varlen_fwd(self.q, self.k, self.v, self.pack, self.shape, causal=self.key.causal,
                                 scale=self.scale, config=config, mods=self.mods, return_lse=False, out=out)
        return o, None


@dataclass
class VarlenBwdInputs(VarlenInputs):
    """A packed backward key's inputs: the forward's, dO, O and the LSE from the default forward config, and the
    per-document float64 autograd gradients."""

    do: Any = None
    o: Any = None
    lse: Any = None

    tolerance = BWD_TOLERANCE
    against = "float64 autograd per document"
    against_modified = "float64 autograd per document with the key's modifiers"

    @classmethod
    def footprint(cls, key: Key, batch_heads: int) -> int:
        """The forward's, plus dO, O, the gradient buffers and their fp32 references."""
        heads_q, heads_kv = _heads(key, batch_heads)
        q = key.tokens * heads_q * key.head_dim
        kv = 2 * key.tokens * heads_kv * key.head_dim
        return (4 * q + 2 * kv) * DTYPE_BYTES[key.dtype] + (2 * q + kv) * 4 + 8 * key.tokens * heads_q

    def prepare(self, draw: Any) -> None:
        """dO drawn after q, k, v; O and the LSE from the forward's default config."""
        self.do = draw(self.q.shape[1], self.q.shape[0])
        self.o, self.lse = launch_varlen_fwd(self.q, self.k, self.v, self.pack, self.shape, causal=self.key.causal,
                                             scale=self.scale, mods=self.mods,
                                             config=default_config(self.key.arch, self.key.head_dim, self.key.dtype))

    def compute_reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dQ, dK, dV) per document by float64 autograd (tuner.ops.reference.modified_gradients), in fp32."""
        grads = [torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in (self.q, self.k, self.v)]
        for a, b in self.documents():
            parts = modified_gradients(*(self.dense(x, a, b) for x in (self.q, self.k, self.v, self.do)),
                                       causal=self.key.causal, scale=self.scale, mods=self.mods,
                                       max_bytes=self.reference_bytes)
            for grad, part in zip(grads, parts):
                grad[a:b] = part[0].transpose(0, 1)
        return grads[0], grads[1], grads[2]

    def run(self, config: Config, out: tuple[torch.Tensor, ...] | None = None) -> tuple[tuple[torch.Tensor, ...], Any]:
        """The packed backward launch with `config`: ((dQ, dK, dV), None)."""
        dq, dk, dv, _ = launch_varlen_bwd(self.do, self.q, self.k, self.v, self.o, self.lse, self.pack, self.shape,
                                          causal=self.key.causal, scale=self.scale, config=config, mods=self.mods,
                                          out=out)
        return (dq, dk, dv), None

    def problem(self, output: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...],
                tolerance: float) -> str | None:
        """Why the gradients are wrong (the worst of dQ, dK, dV), or None."""
        return gradient_problem(output, reference, tolerance, self.described)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dQ, dK, dV buffers the timed launches share."""
        return torch.empty_like(self.q), torch.empty_like(self.k), torch.empty_like(self.v)


def varlen_space(key: Key, gpu: GpuInfo) -> list[Config]:
    """The pointer forward kernel's pruned space (the packed forward takes no variant knob)."""
    return candidates(key.head_dim, key.dtype, gpu.smem_limit, arch=gpu.arch)


def varlen_bwd_space(key: Key, gpu: GpuInfo) -> list[Config]:
    """The backward's space without the atomic-dQ variants (the packed backward is always deterministic)."""
    return [c for c in bwd_space(key, gpu) if bwd_knobs(c).deterministic]


VARLEN = OpSpec("varlen", space=varlen_space, plan=fwd_plan, default=fwd_default, flops=varlen_flops,
                sdpa_providers=False, inputs=VarlenInputs)
VARLEN_BWD = OpSpec("varlen_bwd", space=varlen_bwd_space, plan=bwd_gpu_plan, default=bwd_default,
                    flops=varlen_bwd_flops, sdpa_providers=False, inputs=VarlenBwdInputs)
