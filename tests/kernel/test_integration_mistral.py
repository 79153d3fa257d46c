"""Sliding-window attention in a transformers model: a tiny random-weight Mistral whose window (6 keys) is much
shorter than its sequences runs every attention layer through flashtune with the window in the kernels (no
fallback), and matches transformers' eager path: prefill logits, a left-padded batch (its mask in the kernel),
greedy generation against the sliding caches (which keep only the last W - 1 keys), and a training step's
gradients. Query/key weights are scaled up so that attention is sharp and the window changes the logits."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from flashtune.kernel.integrations import transformers as ft
from helpers.hf_models import logits, training_grads
from helpers import rel
from transformers import MistralConfig, MistralForCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 128
WINDOW = 6
LAYERS = 2


@pytest.fixture(scope="module")
def model() -> MistralForCausalLM:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                           sliding_window=WINDOW, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    net = MistralForCausalLM(config).to(DEVICE, torch.float32).eval()
    with torch.no_grad():
        for layer in net.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return net


@pytest.fixture(autouse=True)
def _counts() -> None:
    ft.reset_counts()


def _unwindowed(model: MistralForCausalLM, ids: torch.Tensor, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Eager logits of the same weights without the window (Mistral reads config.sliding_window per forward)."""
    model.config.sliding_window = None
    try:
        return logits(model, "eager", ids, **kwargs)
    finally:
        model.config.sliding_window = WINDOW


def test_prefill_logits_match_eager_and_the_window_matters(model: MistralForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (2, 24), device=DEVICE)
    ours = logits(model, ft.register(), ids)
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"causal": LAYERS}
    eager = logits(model, "eager", ids)
    assert rel(ours, eager) < 1e-5
    assert rel(_unwindowed(model, ids), eager) > 1e-2


def test_left_padded_batch_runs_its_mask_in_the_kernel(model: MistralForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (3, 20), device=DEVICE)
    mask = torch.ones(3, 20, dtype=torch.long, device=DEVICE)
    mask[0, :7] = 0
    mask[2, :2] = 0
    ours = logits(model, ft.register(), ids, attention_mask=mask)
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"masked": LAYERS}
    eager = logits(model, "eager", ids, attention_mask=mask)
    real = mask.bool()  # padding rows: zeros here, eager's uniform average there; nothing reads them
    assert rel(ours[real], eager[real]) < 1e-5
    assert rel(_unwindowed(model, ids, attention_mask=mask)[real], eager[real]) > 1e-2


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_past_the_window_matches_eager(model: MistralForCausalLM, cache: str) -> None:
    """A 9-token prompt and 6 new tokens, window 6: the prefill runs the window, the decode steps the sliding
    cache's last keys (transformers' kv_offset > 0), every call on the kernels."""
    ids = torch.randint(3, VOCAB, (2, 9), device=DEVICE)
    args = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(ids),
            "cache_implementation": cache, "disable_compile": True}
    runs = []
    for implementation in (ft.register(), "eager"):
        model.set_attn_implementation(implementation)
        try:
            with torch.no_grad():
                runs.append(model.generate(ids, **args))
        finally:
            model.set_attn_implementation("eager")
    assert runs[0].shape == (2, 15) and torch.equal(runs[0], runs[1])
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"causal": LAYERS, "kvcache": 5 * LAYERS}


def test_training_gradients_match_eager(model: MistralForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (2, 16), device=DEVICE)
    ours = training_grads(model, ft.register(), ids)
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"causal": LAYERS}
    eager = training_grads(model, "eager", ids)
    assert ours.keys() == eager.keys() and len(ours) == 3 + 9 * LAYERS
    worst = max(rel(ours[n], eager[n], floor=0.1) for n in ours)
    assert worst < 1e-4
