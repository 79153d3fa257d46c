"""What the transformers integration tests share: a model's logits or a training step's gradients under one
attention implementation, the model left on eager afterwards."""
from __future__ import annotations

from typing import Any

import torch


def logits(model: Any, implementation: str, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The model's logits for `ids` with `implementation` as its attention, under no_grad."""
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return model(ids, **kwargs).logits
    finally:
        model.set_attn_implementation("eager")


def training_grads(model: Any, implementation: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parameters' gradients of one language-model training step on `ids` (labels = ids) with
    `implementation` as the model's attention; the model is back in eval mode on eager afterwards."""
    model.train()
    model.set_attn_implementation(implementation)
    model.zero_grad(set_to_none=True)
    try:
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.set_attn_implementation("eager")
        model.zero_grad(set_to_none=True)
        model.eval()
