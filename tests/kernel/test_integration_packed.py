"""Packed batches (transformers' DataCollatorWithFlattening) through flashtune: attention_varlen per document.

A packed row of three documents must give the logits, loss and gradients of the documents run alone (with
transformers' own SDPA function: an independent reference), and must differ from the same tokens run as one
unbroken causal sequence. Tiny random-weight models in fp32 (the Triton interpreter's bf16 dots are wrong).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from flashtune.kernel.integrations import transformers as ft
from transformers import (
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 64
TOL = 1e-4  # measured ~1e-7 on the CPU


def _model(kind: str) -> torch.nn.Module:
    """One layer, hidden 32, 2 query heads over 1 KV head (GQA); Mistral with a sliding window of 6 tokens, which
    every document outgrows (the window runs in the kernel)."""
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": VOCAB, "max_position_embeddings": 128}
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=6, **common)).to(DEVICE, torch.float32)
    return LlamaForCausalLM(LlamaConfig(**common)).to(DEVICE, torch.float32)


def _documents() -> list[list[int]]:
    lengths = torch.randint(9, 17, (3,)).tolist()  # ~40 tokens in all
    return [torch.randint(3, VOCAB, (n,)).tolist() for n in lengths]


def _packed(documents: list[list[int]], flash_kwargs: bool) -> dict[str, torch.Tensor]:
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": d} for d in documents])
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: next-token cross entropy, -100 ignored (the first token of each document)."""
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)


def _alone(model: torch.nn.Module, documents: list[list[int]]) -> torch.Tensor:
    """(1, total, V) logits of each document run alone with transformers' SDPA, concatenated."""
    model.set_attn_implementation("sdpa")
    return torch.cat([model(input_ids=torch.tensor([d], device=DEVICE), use_cache=False).logits
                      for d in documents], dim=1)


def _flashtune(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: bool) -> torch.Tensor:
    model.set_attn_implementation(ft.register())
    try:
        return model(**batch, **kwargs).logits
    finally:
        model.set_attn_implementation("sdpa")


@pytest.fixture(autouse=True)
def _counts() -> None:
    ft.reset_counts()


# The packed mask (position_ids restarting per document; transformers builds it only without a cache), or
# flash-attn's cu_seq_lens kwargs (with a cache too: then transformers' mask is plain causal).
@pytest.mark.parametrize("kind,flash_kwargs,use_cache", [("llama", False, False), ("llama", True, True),
                                                          ("mistral", False, False)])
def test_packed_inference_matches_documents_alone(kind: str, flash_kwargs: bool, use_cache: bool) -> None:
    model, documents = _model(kind).eval(), _documents()
    batch = _packed(documents, flash_kwargs)
    with torch.no_grad():
        packed = _flashtune(model, batch, use_cache=use_cache)
        alone = _alone(model, documents)
        unbroken = _flashtune(model, {"input_ids": batch["input_ids"]}, use_cache=False)
    assert ft.kernel_counts() == {"varlen": 1, "causal": 1}  # the packed run, then the unbroken one
    assert ft.fallback_counts() == {}
    assert (packed - alone).abs().max().item() < TOL
    assert abs(_loss(packed, batch["labels"]).item() - _loss(alone, batch["labels"]).item()) < TOL
    # Attending across documents changes every later document: the test can tell.
    assert (unbroken - alone).abs().max().item() > 100 * TOL


def test_packed_training_step_matches_documents_alone() -> None:
    model, documents = _model("llama").train(), _documents()
    batch = _packed(documents, flash_kwargs=False)
    packed = _flashtune(model, batch, use_cache=False)
    assert ft.kernel_counts() == {"varlen": 1} and ft.fallback_counts() == {}
    loss = _loss(packed, batch["labels"])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    alone = _alone(model, documents)
    reference = _loss(alone, batch["labels"])
    expected = torch.autograd.grad(reference, list(model.parameters()))
    assert abs(loss.item() - reference.item()) < TOL
    for got, want in zip(grads, expected, strict=True):
        assert (got - want).norm().item() <= TOL * max(want.norm().item(), 1e-3)
    with torch.no_grad():
        unbroken = _flashtune(model, {"input_ids": batch["input_ids"]}, use_cache=False)
    assert (unbroken - alone).abs().max().item() > 100 * TOL  # attending across documents: the test can tell


def test_packing_from_document_ids() -> None:
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]])
    packed = ft.packing(ids, window=3)
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 12] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 4 and packed.window_size == (2, 0)
    assert ft.packing(ids, window=4).window == 0  # no document outgrows it: nothing hidden


def test_cu_seq_lens_without_max_length_is_refused_by_name() -> None:
    model = _model("llama").eval()
    batch = _packed(_documents(), flash_kwargs=True)
    del batch["max_length_q"], batch["max_length_k"]
    with torch.no_grad(), warnings.catch_warnings():  # warned once per reason: maybe before this test
        warnings.simplefilter("ignore", ft.SDPAFallbackWarning)
        _flashtune(model, batch, use_cache=True)  # with a cache the mask is plain causal: the kwargs are read
    assert ft.fallback_counts() == {"refused: ValueError": 1} and ft.kernel_counts() == {}


def test_packed_rows_of_a_larger_batch_match_sdpa() -> None:
    """Two rows, each packing two documents (position_ids restarting): transformers' own SDPA with its
    block-diagonal mask is the reference."""
    model = _model("llama").eval()
    cuts = torch.randint(5, 15, (2,)).tolist()
    positions = torch.tensor([list(range(cut)) + list(range(20 - cut)) for cut in cuts], device=DEVICE)
    ids = torch.randint(3, VOCAB, (2, 20), device=DEVICE)
    with torch.no_grad():
        packed = _flashtune(model, {"input_ids": ids, "position_ids": positions}, use_cache=False)
        reference = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        unbroken = model(input_ids=ids, use_cache=False).logits
    assert ft.kernel_counts() == {"varlen": 1} and ft.fallback_counts() == {}
    assert (packed - reference).abs().max().item() < TOL
    assert (unbroken - reference).abs().max().item() > 100 * TOL


def test_block_causal_mask_for_dropout() -> None:
    """attention_varlen has no dropout: a packed call with dropout and only cu_seq_lens runs this mask."""
    lengths = torch.randint(1, 9, (4,))
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    total = int(lengths.sum())
    document = torch.repeat_interleave(torch.arange(4), lengths)
    expected = (document[:, None] == document[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    assert torch.equal(ft._block_causal_mask(cu, total)[0, 0], expected)
