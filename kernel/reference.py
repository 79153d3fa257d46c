"""The testing reference: attention in float64 with plain PyTorch ops.

Independent of the kernel on purpose (no tiling, no online softmax), so tests and the tuner can
check the kernel against it.
"""
from __future__ import annotations

import math

import torch


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
