"""Attention sinks in a transformers model: a tiny random-weight GPT-OSS (a sliding-window layer, window 6, then a
full one; one learnt sink logit per head, passed to the attention function as `s_aux`) runs every attention layer
through flashtune, sinks and window in the kernels and no fallback, and matches transformers' eager path in
prefill logits, greedy generation against the caches, and a training step's gradients, the sinks' own included.
The sinks are drawn large enough to take a visible share of each softmax."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from flashtune.kernel.integrations import transformers as ft
from helpers.hf_models import logits, training_grads
from helpers import rel
from transformers import GptOssConfig, GptOssForCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 128
WINDOW = 6
LAYER_TYPES = ["sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def model() -> GptOssForCausalLM:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    config = GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                          sliding_window=WINDOW, layer_types=list(LAYER_TYPES), num_local_experts=2,
                          num_experts_per_tok=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    net = GptOssForCausalLM(config).to(DEVICE, torch.float32).eval()
    with torch.no_grad():
        for layer in net.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
            layer.self_attn.sinks.copy_(torch.randn(4, device=DEVICE) + 1.5)
    return net


@pytest.fixture(autouse=True)
def _counts() -> None:
    ft.reset_counts()


def test_prefill_logits_match_eager_and_sinks_and_window_matter(model: GptOssForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (2, 24), device=DEVICE)
    ours = logits(model, ft.register(), ids)
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"causal": 2}
    eager = logits(model, "eager", ids)
    assert rel(ours, eager) < 1e-5
    # Without the sinks (a logit of -inf takes no share), or with the first layer full, the logits differ.
    sinks = [layer.self_attn.sinks for layer in model.model.layers]
    saved = [s.detach().clone() for s in sinks]
    with torch.no_grad():
        for s in sinks:
            s.fill_(float("-inf"))
    try:
        sinkless = logits(model, "eager", ids)
    finally:
        with torch.no_grad():
            for s, value in zip(sinks, saved):
                s.copy_(value)
    assert rel(sinkless, eager) > 1e-2
    model.config.layer_types = ["full_attention"] * 2  # the mask function per layer follows layer_types
    try:
        unwindowed = logits(model, "eager", ids)
    finally:
        model.config.layer_types = list(LAYER_TYPES)
    assert rel(unwindowed, eager) > 1e-2


def test_greedy_generation_matches_eager(model: GptOssForCausalLM) -> None:
    """Decode steps past the window: the KV-cache kernel with the sinks, and the window in the sliding layer."""
    ids = torch.randint(3, VOCAB, (2, 8), device=DEVICE)
    runs = []
    for implementation in (ft.register(), "eager"):
        model.set_attn_implementation(implementation)
        try:
            with torch.no_grad():
                runs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                                           do_sample=False, cache_implementation="dynamic", disable_compile=True))
        finally:
            model.set_attn_implementation("eager")
    assert runs[0].shape == (2, 13) and torch.equal(runs[0], runs[1])
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"causal": 2, "kvcache": 4 * 2}


def test_training_gradients_match_eager_sinks_included(model: GptOssForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (2, 16), device=DEVICE)
    ours = training_grads(model, ft.register(), ids)
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"causal": 2}
    eager = training_grads(model, "eager", ids)
    sink_grads = [n for n in eager if n.endswith("self_attn.sinks")]
    assert ours.keys() == eager.keys() and len(sink_grads) == 2
    for name in sink_grads:
        assert eager[name].abs().max() > 1e-4  # the sinks do get a gradient to check
        assert rel(ours[name], eager[name]) < 1e-4, name
    worst = max(rel(ours[n], eager[n], floor=0.1) for n in ours)
    assert worst < 1e-4
