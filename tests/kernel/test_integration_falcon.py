"""ALiBi in a transformers model. No transformers 5 model hands ALiBi slopes to the attention function: BLOOM and
MPT compute attention inside their own modules and keep "eager" whatever `set_attn_implementation` is given
(checked below), while Falcon with `alibi=True` (where its attention goes through the attention interface, as in
transformers 5.25) adds the ALiBi bias into a float mask (B, H, Nq, Nk) that the kernel runs as `attn_mask`.
A tiny random-weight ALiBi Falcon: every layer on the kernel with no fallback, logits as eager's, a
left-padded batch and a training step's gradients too."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from flashtune.kernel.integrations import transformers as ft
from helpers.hf_models import logits, training_grads
from helpers import rel
from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM
from transformers.models.falcon import modeling_falcon

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 128
LAYERS = 2

routed = pytest.mark.skipif(not hasattr(modeling_falcon, "ALL_ATTENTION_FUNCTIONS"),
                            reason="this transformers' Falcon computes attention in its own module")


@pytest.fixture(scope="module")
def model() -> FalconForCausalLM:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    config = FalconConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=VOCAB,
                          alibi=True, multi_query=False, new_decoder_architecture=False, parallel_attn=True,
                          bias=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    net = FalconForCausalLM(config).to(DEVICE, torch.float32).eval()
    with torch.no_grad():  # sharper attention, so that the bias moves the weights
        for block in net.transformer.h:
            block.self_attention.query_key_value.weight.mul_(3.0)
    return net


@pytest.fixture(autouse=True)
def _counts() -> None:
    ft.reset_counts()


def test_bloom_keeps_its_own_attention() -> None:
    """BLOOM's attention is `alibi.baddbmm` in BloomAttention.forward: transformers leaves it eager."""
    net = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    net.set_attn_implementation(ft.register())
    assert net.config._attn_implementation == "eager"


@routed
def test_alibi_logits_match_eager_and_alibi_matters(model: FalconForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (2, 24), device=DEVICE)
    ours = logits(model, ft.register(), ids)
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"masked": LAYERS}
    eager = logits(model, "eager", ids)
    assert rel(ours, eager) < 1e-5
    model.transformer.use_alibi = False  # the causal mask alone (the layers still skip rotary embeddings)
    try:
        unbiased = logits(model, "eager", ids)
    finally:
        model.transformer.use_alibi = True
    assert rel(unbiased, eager) > 1e-2


@routed
def test_left_padded_alibi_batch_matches_eager(model: FalconForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (2, 20), device=DEVICE)
    mask = torch.ones(2, 20, dtype=torch.long, device=DEVICE)
    mask[1, :6] = 0
    ours = logits(model, ft.register(), ids, attention_mask=mask)
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"masked": LAYERS}
    eager = logits(model, "eager", ids, attention_mask=mask)
    real = mask.bool()
    assert rel(ours[real], eager[real]) < 1e-5


@routed
def test_alibi_training_gradients_match_eager(model: FalconForCausalLM) -> None:
    ids = torch.randint(3, VOCAB, (2, 16), device=DEVICE)
    ours = training_grads(model, ft.register(), ids)
    assert ft.fallback_counts() == {} and ft.kernel_counts() == {"masked": LAYERS}
    eager = training_grads(model, "eager", ids)
    assert ours.keys() == eager.keys() and len(ours) > 0
    worst = max(rel(ours[n], eager[n], floor=0.1) for n in ours)
    assert worst < 1e-4
