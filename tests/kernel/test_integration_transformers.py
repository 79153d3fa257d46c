"""flashtune inside a transformers model: a tiny random-weight Llama, flashtune's attention vs SDPA's.

On the CPU the kernels run under the Triton interpreter, in fp32 (its bf16 dots are wrong). SDPA's
implementation in the same model is the reference: fp32 logits within a relative error of 1e-5,
identical greedy tokens, and in training the loss within 1e-6 and every parameter's gradient within
1e-5 (relative Frobenius norm; measured 4e-7 at worst), the kernel's fused backward against torch's.
"""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from flashtune.kernel.integrations import transformers as ft  # noqa: E402
from helpers import rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS = 2
VOCAB = 128




@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """hidden 64, 4 query heads of 16 over 2 KV heads (GQA), random weights: nothing is downloaded."""
    torch.manual_seed(1234)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).to(DEVICE, torch.float32).eval()


@pytest.fixture(autouse=True)
def _counts() -> None:
    ft.reset_counts()


def _run(model: LlamaForCausalLM, implementation: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return fn(*args, **kwargs)
    finally:
        model.set_attn_implementation("sdpa")


def _ids(batch: int, n: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, n), device=DEVICE)


def test_register_returns_a_name_transformers_accepts(model: LlamaForCausalLM) -> None:
    name = ft.register()
    assert name == ft.NAME and "flash" not in name
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="contains 'flash'"):
        ft.register("flashtune")
    with pytest.raises(ValueError, match="non-empty string"):
        ft.register("")


def test_prefill_logits_match_sdpa(model: LlamaForCausalLM) -> None:
    name = ft.register()
    ids = _ids(2, 37)
    ref = _run(model, "sdpa", model, ids).logits
    out = _run(model, name, model, ids).logits
    assert rel(out, ref) < 1e-5
    assert ft.kernel_counts() == {"causal": LAYERS} and ft.fallback_counts() == {}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_matches_sdpa(model: LlamaForCausalLM, cache: str) -> None:
    """Prefill, then decode steps against the cache: the same tokens as SDPA's, all on the kernels."""
    name = ft.register()
    ids = _ids(2, 19)
    # On CUDA transformers compiles the decode step of a static cache, and compiled models run SDPA
    # (the module docstring says why): the kernel path is the eager one.
    args = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids),
                cache_implementation=cache, disable_compile=True)
    ref = _run(model, "sdpa", model.generate, ids, **args)
    out = _run(model, name, model.generate, ids, **args)
    assert out.shape == (2, 27) and torch.equal(out, ref)
    # One prefill and 7 decode steps per layer (the 8th token needs no forward of its own).
    assert ft.kernel_counts() == {"causal": LAYERS, "kvcache": 7 * LAYERS}
    assert ft.fallback_counts() == {}


def test_right_padded_batch_runs_the_kernel(model: LlamaForCausalLM) -> None:
    name = ft.register()
    ids, mask = _ids(3, 24), torch.ones(3, 24, dtype=torch.long, device=DEVICE)
    mask[1, 17:] = 0
    mask[2, 5:] = 0
    ref = _run(model, "sdpa", model, ids, attention_mask=mask).logits
    out = _run(model, name, model, ids, attention_mask=mask).logits
    real = mask.bool()
    # Every real token matches; padding rows are left unspecified (module docstring).
    assert rel(out[real], ref[real]) < 1e-5
    assert ft.kernel_counts() == {"causal": LAYERS} and ft.fallback_counts() == {}


def test_left_padded_batch_falls_back_to_sdpa_counted_and_warned_once(model: LlamaForCausalLM) -> None:
    name = ft.register()
    ids, mask = _ids(2, 16), torch.ones(2, 16, dtype=torch.long, device=DEVICE)
    mask[0, :6] = 0
    ref = _run(model, "sdpa", model, ids, attention_mask=mask).logits
    ft._warned.discard("mask")  # another test may have triggered it: this one checks it is given once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(model, name, model, ids, attention_mask=mask).logits
    assert torch.equal(out, ref)  # the very same SDPA function with the very same mask
    assert ft.fallback_counts() == {"mask": LAYERS} and ft.kernel_counts() == {}
    fallbacks = [w for w in caught if issubclass(w.category, ft.SDPAFallbackWarning)]
    assert len(fallbacks) == 1 and "left padding" in str(fallbacks[0].message)


def test_one_query_against_right_padded_cache_uses_cache_seqlens(model: LlamaForCausalLM) -> None:
    """A decode step whose sequences have different valid cache lengths: the lengths form, vs SDPA's mask."""
    attn = model.model.layers[0].self_attn
    b, nk, d = 3, 29, 16
    q = torch.randn(b, 4, 1, d, device=DEVICE)
    k, v = (torch.randn(b, 2, nk, d, device=DEVICE) for _ in range(2))
    padding = torch.ones(b, nk, dtype=torch.bool, device=DEVICE)
    padding[1, 11:] = False  # sequence 1 holds 11 keys, sequence 2 holds 23
    padding[2, 23:] = False
    mask = ft.tuned_mask(batch_size=b, q_length=1, kv_length=nk, q_offset=nk - 1, attention_mask=padding,
                         device=DEVICE)
    form = getattr(mask, "_flashtune_form")
    assert form.keys == nk and form.lengths.tolist() == [nk, 11, 23] and form.lengths.dtype == torch.int32
    out, _ = ft.tuned_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    ref, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    assert out.shape == ref.shape == (b, 1, 4, d)
    assert rel(out, ref) < 1e-5
    assert ft.kernel_counts() == {"kvcache_lengths": 1}


def test_mask_forms() -> None:
    """Which padding masks have a form the kernels run, read from the 2D mask and the offsets."""
    def form(rows: list[list[int]], nq: int, nk: int, q_offset: int) -> ft.MaskForm | None:
        return ft.causal_form(torch.tensor(rows, dtype=torch.bool), nq, nk, q_offset, 0)

    assert form([[1, 1, 1, 1]], 4, 4, 0) == ft.MaskForm(4)
    assert form([[1, 1, 1, 0], [1, 1, 0, 0]], 4, 4, 0) == ft.MaskForm(4)  # right-padded prefill
    assert form([[1, 1, 1]], 3, 8, 0) == ft.MaskForm(3)  # an empty static cache: the first 3 slots
    assert form([[1, 1, 1, 1, 1]], 1, 8, 4) == ft.MaskForm(5)  # a static cache's decode step
    assert form([[0, 1, 1, 1]], 4, 4, 0) is None  # left padding
    assert form([[1, 0, 1, 1, 1]], 1, 5, 4) is None  # a hole
    assert form([[1, 1, 0, 0]], 2, 4, 2) is None  # a chunk whose queries are partly padding
    assert form([[0, 0, 0, 0]], 4, 4, 0) is None  # an empty sequence
    decode = form([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], 1, 5, 4)
    assert decode is not None and decode.keys == 5 and decode.lengths.tolist() == [5, 2]


def test_training_step_loss_and_gradients_match_sdpa(model: LlamaForCausalLM) -> None:
    """A real client of the backward: one training step's loss and every parameter gradient vs SDPA's."""
    name = ft.register()
    ids = _ids(2, 23)
    grads = {}
    losses = {}
    model.train()
    try:
        for implementation in ("sdpa", name):
            model.set_attn_implementation(implementation)
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses[implementation] = loss.detach()
            grads[implementation] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    finally:
        model.set_attn_implementation("sdpa")
        model.zero_grad(set_to_none=True)
        model.eval()
    assert rel(losses[name], losses["sdpa"]) < 1e-6
    assert grads[name].keys() == grads["sdpa"].keys() and len(grads[name]) == 3 + 9 * LAYERS
    for param, ref in grads["sdpa"].items():
        assert rel(grads[name][param], ref) < 1e-5, (param, rel(grads[name][param], ref))
    assert ft.kernel_counts() == {"causal": LAYERS} and ft.fallback_counts() == {}


def test_is_causal_that_is_not_a_bool_goes_to_sdpa(model: LlamaForCausalLM) -> None:
    """A string is_causal was truthy: "False" ran the causal kernel. Now it is refused, named, and left to SDPA."""
    attn = model.model.layers[0].self_attn
    q, k, v = (torch.randn(1, 4 if i == 0 else 2, 8, 16, device=DEVICE) for i in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.SDPAFallbackWarning)  # warned once per reason, maybe earlier
        with pytest.raises(TypeError):  # torch SDPA, given the same is_causal, refuses it in turn
            ft.tuned_attention_forward(attn, q, k, v, None, scaling=attn.scaling, is_causal="False")
    assert ft.kernel_counts() == {} and ft.fallback_counts() == {"refused: TypeError": 1}


def test_recorded_generation_counts_one_kvcache_key_per_cache_length_bucket(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path) -> None:
    """FLASHTUNE_RECORD during a generate() of 128 new tokens: every decode step counts the key its plan
    uses (the cache length's bucket), so the database gets a handful of kvcache keys, not one per token.
    One layer, hidden 32 (2 query heads of 16 over 1 KV head): 127 decode steps under the interpreter."""
    from flashtune.db.store import Store
    from flashtune.kernel import record

    torch.manual_seed(99)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(DEVICE, torch.float32).eval()
    name = ft.register()
    ids = _ids(1, 6)
    url = f"sqlite:///{tmp_path / 'recorded.db'}"
    record.flush(url)  # nothing of other tests in the counts
    monkeypatch.setattr(record, "ENABLED", True)
    try:
        out = _run(model, name, model.generate, ids, max_new_tokens=128, min_new_tokens=128, do_sample=False,
                   attention_mask=torch.ones_like(ids), disable_compile=True)
    finally:
        monkeypatch.setattr(record, "ENABLED", False)
        written = record.flush(url)
    assert out.shape == (1, 6 + 128) and written > 0
    assert ft.kernel_counts() == {"causal": 1, "kvcache": 127}
    with Store.open(url, create=False) as store:
        kvcache = [r for r in store.recorded() if r.key.op == "kvcache"]
    # Cache lengths 7..133 (the prompt, then one more key per step): buckets 8, 16, 32, 64, 128.
    assert sorted(r.key.seq_len_kv for r in kvcache) == [8, 16, 32, 64, 128]
    assert len(kvcache) <= 8 and sum(r.calls for r in kvcache) == 127
