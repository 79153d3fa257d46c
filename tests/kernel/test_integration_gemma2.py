"""Logit softcapping and sliding windows in a transformers model: a tiny random-weight Gemma 2 (attention softcap
made small enough to bite with large query/key weights; a sliding-window layer of 8 keys, then a full one) runs
every attention layer through flashtune, cap and window in the kernels with no fallback, and matches transformers'
eager path (the one that implements softcapping) in fp32 logits, greedy generation past the window and a training
step's gradients."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from flashtune.kernel.integrations import transformers as ft
from helpers.hf_models import logits
from helpers import rel
from transformers import Gemma2Config, Gemma2ForCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 128
CAP = 2.0  # the scores of the random model reach well past it
WINDOW = 8
LAYER_TYPES = ["sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def model() -> Gemma2ForCausalLM:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                          attn_logit_softcapping=CAP, final_logit_softcapping=None, query_pre_attn_scalar=16,
                          sliding_window=WINDOW, layer_types=list(LAYER_TYPES), pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    net = Gemma2ForCausalLM(config).to(DEVICE, torch.float32).eval()
    with torch.no_grad():  # larger query and key projections: scores far past the cap
        for layer in net.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return net


def test_prefill_logits_match_eager_softcapping_and_window(model: Gemma2ForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (2, 24), device=DEVICE)
    ft.reset_counts()
    ours, eager = logits(model, ft.register(), ids), logits(model, "eager", ids)
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"causal": 2}
    assert rel(ours, eager, floor=0.1) < 1e-5
    # The cap matters for these weights: without it the logits differ.
    attentions = [layer.self_attn for layer in model.model.layers]
    for attn in attentions:
        attn.attn_logit_softcapping = None
    try:
        uncapped = logits(model, "eager", ids)
    finally:
        for attn in attentions:
            attn.attn_logit_softcapping = CAP
    assert rel(uncapped, eager, floor=0.1) > 1e-2
    # So does the window (24 tokens, 8 keys): with the first layer full, the logits differ.
    model.config.layer_types = ["full_attention"] * 2  # the mask function per layer follows layer_types
    try:
        unwindowed = logits(model, "eager", ids)
    finally:
        model.config.layer_types = list(LAYER_TYPES)
    assert rel(unwindowed, eager, floor=0.1) > 1e-2


def test_greedy_generation_matches_eager(model: Gemma2ForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (1, 8), device=DEVICE)  # 8 + 6 tokens: the decode steps pass the window
    ft.reset_counts()
    runs = []
    for implementation in (ft.register(), "eager"):
        model.set_attn_implementation(implementation)
        try:
            with torch.no_grad():
                runs.append(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="dynamic"))
        finally:
            model.set_attn_implementation("eager")
    assert torch.equal(runs[0], runs[1])
    assert ft.fallback_counts() == {} and ft.kernel_counts().get("kvcache", 0) > 0


def test_training_gradients_match_eager(model: Gemma2ForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (2, 20), device=DEVICE)
    grads = []
    ft.reset_counts()
    for implementation in (ft.register(), "eager"):
        model.set_attn_implementation(implementation)
        model.zero_grad(set_to_none=True)
        try:
            loss = model(ids, labels=ids).loss
            loss.backward()
        finally:
            model.set_attn_implementation("eager")
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"causal": 2}
    ours, eager = grads
    assert ours.keys() == eager.keys()
    worst = max(rel(ours[n], eager[n], floor=0.1) for n in ours)
    assert worst < 1e-4
