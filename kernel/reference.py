"""The testing reference: attention in float64 with plain PyTorch ops.

Independent of the kernel on purpose (no tiling, no online softmax), so tests and the tuner can
check the kernel against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The fp32 reference runs in chunks of batch·heads whose N×N scores stay under this many bytes.
REFERENCE_BYTES = {"cuda": 4 << 30, "cpu": 256 << 20}
# torch SDPA's math backend upcasts fp16/bf16 to fp32 and materialises the scores, their softmax and,
# when causal, a masked copy: about three fp32 B·H·N·N tensors at its peak.
MATH_SCORE_COPIES = 3


def _heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    group = heads_q // x.shape[1]
    return x.double().repeat_interleave(group, dim=1) if group > 1 else x.double()


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.double(), _heads(k, q.shape[1]).transpose(-1, -2)) * scale
    if causal:
        # Top-left alignment, as torch SDPA is_causal=True: query i sees keys j <= i.
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """softmax(scale·QKᵀ + mask)·V in float64, (B, Hq, Nq, D); GQA by head groups."""
    return torch.matmul(torch.softmax(_scores(q, k, causal, scale), dim=-1), _heads(v, q.shape[1]))


def lse_reference(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False,
                  scale: float | None = None) -> torch.Tensor:
    """Row log-sum-exp of the scaled (masked) scores in float64, (B, Hq, Nq)."""
    return torch.logsumexp(_scores(q, k, causal, scale), dim=-1)


def attention_flops(batch_heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of attention: 4·B·H·Nq·Nk·D, half when causal."""
    flops = 4.0 * batch_heads * seq_q * seq_k * head_dim
    return flops / 2 if causal else flops


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of `flops` done in `ms` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def fp32_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, *,
                   max_bytes: int | None = None) -> torch.Tensor:
    """softmax(QKᵀ/√D [+ causal mask])·V by torch SDPA's math backend on fp32 copies, (B, H, N, D).

    Computed a few (batch, head) slices at a time, so a long sequence never needs the whole
    B·H·N·N score tensor at once.
    """
    b, h, n, d = q.shape
    nk = k.shape[2]
    if max_bytes is None:
        max_bytes = REFERENCE_BYTES.get(q.device.type, REFERENCE_BYTES["cpu"])
    chunk = max(1, max_bytes // (MATH_SCORE_COPIES * n * nk * 4))
    qf, kf, vf = (x.flatten(0, 1) for x in (q, k, v))
    out = torch.empty(b * h, n, d, dtype=torch.float32, device=q.device)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        for lo in range(0, b * h, chunk):
            hi = min(lo + chunk, b * h)
            out[lo:hi] = F.scaled_dot_product_attention(qf[lo:hi].float(), kf[lo:hi].float(),
                                                        vf[lo:hi].float(), is_causal=causal)
    return out.view(b, h, n, d)


def output_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out − ref|, ‖out − ref‖ / ‖ref‖) in fp32; (inf, inf) when `out` holds a NaN or inf."""
    diff = out.float() - ref
    if not bool(torch.isfinite(diff).all()):
        return math.inf, math.inf
    rel = torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref).clamp_min(1e-30)
    return float(diff.abs().max()), float(rel)
