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

from flashtune.kernel.integrations import transformers as ft
from helpers import rel
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

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
    args = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(ids),
            "cache_implementation": cache, "disable_compile": True}
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


def test_left_padded_batch_runs_its_mask_in_the_kernel(model: LlamaForCausalLM) -> None:
    name = ft.register()
    ids, mask = _ids(2, 16), torch.ones(2, 16, dtype=torch.long, device=DEVICE)
    mask[0, :6] = 0
    ref = _run(model, "sdpa", model, ids, attention_mask=mask).logits
    out = _run(model, name, model, ids, attention_mask=mask).logits
    real = mask.bool()  # the padding rows see no key: zeros in the kernel; nothing real reads them
    assert rel(out[real], ref[real]) < 1e-5
    assert ft.kernel_counts() == {"masked": LAYERS} and ft.fallback_counts() == {}


def test_left_padded_greedy_generation_matches_sdpa(model: LlamaForCausalLM) -> None:
    """Batched generation pads on the left: prefill and every decode step run their mask in the kernel."""
    name = ft.register()
    ids, mask = _ids(2, 11), torch.ones(2, 11, dtype=torch.long, device=DEVICE)
    mask[1, :4] = 0
    args = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "attention_mask": mask, "disable_compile": True}
    ref = _run(model, "sdpa", model.generate, ids, **args)
    out = _run(model, name, model.generate, ids, **args)
    assert out.shape == (2, 16) and torch.equal(out, ref)
    assert ft.kernel_counts() == {"masked": 5 * LAYERS} and ft.fallback_counts() == {}


def test_fallback_is_counted_and_warned_once(model: LlamaForCausalLM) -> None:
    """What no kernel path takes (here output_attentions=True) runs transformers' SDPA function, bitwise."""
    attn = model.model.layers[0].self_attn
    q, k, v = (torch.randn(2, 4 if i == 0 else 2, 12, 16, device=DEVICE) for i in range(3))
    ft._warned.discard("output_attentions")  # another test may have triggered it: this one checks it is given once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [ft.tuned_attention_forward(attn, q, k, v, None, scaling=attn.scaling, output_attentions=True)[0]
                for _ in range(2)]
    ref, _ = sdpa_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
    assert all(torch.equal(out, ref) for out in outs)
    assert ft.fallback_counts() == {"output_attentions": 2} and ft.kernel_counts() == {}
    fallbacks = [w for w in caught if issubclass(w.category, ft.SDPAFallbackWarning)]
    assert len(fallbacks) == 1 and "output_attentions" in str(fallbacks[0].message)


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
    form = mask._flashtune_form
    assert form.keys == nk and form.lengths.tolist() == [nk, 11, 23] and form.lengths.dtype == torch.int32
    out, _ = ft.tuned_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    ref, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    assert out.shape == ref.shape == (b, 1, 4, d)
    assert rel(out, ref) < 1e-5
    assert ft.kernel_counts() == {"kvcache_lengths": 1}


def test_a_tagged_mask_with_is_causal_false_runs_as_the_mask(model: LlamaForCausalLM) -> None:
    """SDPA runs a given mask whatever is_causal says: so does the kernel path, length form or not."""
    attn = model.model.layers[0].self_attn
    q, k, v = (torch.randn(2, 4 if i == 0 else 2, 10, 16, device=DEVICE) for i in range(3))
    padding = torch.ones(2, 10, dtype=torch.bool, device=DEVICE)
    padding[1, 7:] = False
    mask = ft.tuned_mask(batch_size=2, q_length=10, kv_length=10, attention_mask=padding, allow_is_causal_skip=False,
                         device=DEVICE)  # a right-padded prefill, materialised
    assert mask._flashtune_form == ft.MaskForm(10)
    out, _ = ft.tuned_attention_forward(attn, q, k, v, mask, scaling=attn.scaling, is_causal=False)
    ref, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=attn.scaling, is_causal=False)
    assert rel(out, ref) < 1e-5  # every row: the mask, not the causal kernel's view of the padding rows
    assert ft.kernel_counts() == {"masked": 1} and ft.fallback_counts() == {}


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


def test_mask_forms_with_a_sliding_window() -> None:
    """transformers' sliding window W (key j visible to query i iff j <= i and i - j < W) as window_size=(W-1, 0),
    kept only where it hides a key; a sliding cache's keys start at kv_offset > 0."""
    def form(rows: list[list[int]] | None, nq: int, nk: int, q_offset: int, kv_offset: int = 0,
             window: int = 4) -> ft.MaskForm | None:
        mask = None if rows is None else torch.tensor(rows, dtype=torch.bool)
        return ft.causal_form(mask, nq, nk, q_offset, kv_offset, window)

    assert form(None, 10, 10, 0) == ft.MaskForm(10, window=4)
    assert form(None, 10, 10, 0).window_size == (3, 0)
    assert form(None, 4, 4, 0) == ft.MaskForm(4)  # 4 keys: the window hides none
    assert form([[1] * 8 + [0, 0]], 10, 10, 0) == ft.MaskForm(10, window=4)  # right-padded prefill
    # A full sliding cache (W - 1 = 3 keys kept, positions 7..9) and the query at position 10: all 4 visible.
    assert form([[1] * 11], 1, 4, 10, kv_offset=7) == ft.MaskForm(4)
    assert form(None, 2, 5, 9, kv_offset=6) == ft.MaskForm(5, window=4)  # two queries: the second hides key 0
    assert form([[1] * 8], 1, 8, 7) == ft.MaskForm(8, window=4)  # a decode step whose window bites
    assert form([[1] * 8, [1] * 6 + [0, 0]], 1, 8, 7) is None  # ... with lengths: transformers slides from 7
    assert form([[1] * 4, [1, 1, 0, 0]], 1, 4, 3).lengths.tolist() == [4, 2]  # no bite: lengths are exact
    assert form([[0] * 2 + [1] * 8], 10, 10, 0) is None  # left padding


def test_mask_functions_recognised() -> None:
    """Only transformers' own causal and sliding-window causal functions, not compositions with anything else."""
    from transformers.masking_utils import (
        and_masks,
        bidirectional_mask_function,
        causal_mask_function,
        chunked_causal_mask_function,
        sliding_window_causal_mask_function,
        sliding_window_overlay,
    )

    assert ft.mask_window(causal_mask_function) == 0
    assert ft.mask_window(sliding_window_causal_mask_function(7), 7) == 7
    assert ft.mask_window(sliding_window_causal_mask_function(7)) == 7
    assert ft.mask_window(sliding_window_causal_mask_function(7), 5) is None  # local_size disagrees
    assert ft.mask_window(causal_mask_function, 7) is None
    assert ft.mask_window(and_masks(sliding_window_causal_mask_function(7), bidirectional_mask_function)) is None
    assert ft.mask_window(and_masks(sliding_window_overlay(7), bidirectional_mask_function)) is None
    assert ft.mask_window(chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), 4) is None
    assert ft.mask_window(bidirectional_mask_function) is None
    assert ft.mask_window(lambda b, h, q, kv: kv <= q) is None


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


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().double().requires_grad_() for t in tensors]


def test_dropout_runs_in_the_kernel_with_its_own_draws(model: LlamaForCausalLM) -> None:
    """transformers passes the module's attention dropout in training: attention(dropout_p=...) in the kernel, its
    Philox seed drawn from torch's default generator at the call. Checked exactly: the float64 reference given the
    kernel's own keep mask for that seed, output and gradients."""
    from flashtune.kernel.mods import dropout_keep_mask
    from flashtune.kernel.testing import attention_reference

    attn = model.model.layers[0].self_attn
    b, n, p = 2, 24, 0.3
    q, k, v = (torch.randn(b, 4 if i == 0 else 2, n, 16, device=DEVICE, requires_grad=True) for i in range(3))
    state = torch.random.get_rng_state()
    out, _ = ft.tuned_attention_forward(attn, q, k, v, None, dropout=p, scaling=attn.scaling)
    assert ft.kernel_counts() == {"causal": 1} and ft.fallback_counts() == {}
    torch.random.set_rng_state(state)  # the same draw as attention()'s
    keep = dropout_keep_mask(int(torch.randint(0, 2**62, (), dtype=torch.int64)), p, b, 4, n, n, DEVICE)
    assert 0.55 < keep.float().mean().item() < 0.85
    q64, k64, v64 = _leaves(q, k, v)
    ref = attention_reference(q64, k64, v64, causal=True, scale=attn.scaling, dropout_keep=keep, dropout_p=p)
    assert rel(out.transpose(1, 2), ref) < 1e-5
    with torch.no_grad():
        undropped = attention_reference(q64, k64, v64, causal=True, scale=attn.scaling)
    assert rel(undropped, ref) > 0.1
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.transpose(1, 2).double())
    for ours, exact in ((q, q64), (k, k64), (v, v64)):
        assert rel(ours.grad, exact.grad) < 1e-5


def test_training_mode_attention_dropout_stays_on_the_kernel(model: LlamaForCausalLM) -> None:
    """A model in training mode with attention dropout: no fallback, seeded by torch.manual_seed, and the dropout
    acts (forward only: the exact check of the draws and the backward is the test above)."""
    name = ft.register()
    ids = _ids(1, 12)
    layers = [layer.self_attn for layer in model.model.layers]
    model.train()
    model.set_attn_implementation(name)
    try:
        with torch.no_grad():
            undropped = model(ids).logits
            for attn in layers:
                attn.attention_dropout = 0.3
            runs = []
            for _ in range(2):
                torch.manual_seed(7)
                runs.append(model(ids).logits)
    finally:
        for attn in layers:
            attn.attention_dropout = 0.0
        model.set_attn_implementation("sdpa")
        model.eval()
    assert torch.equal(runs[0], runs[1]) and rel(runs[0], undropped) > 1e-2
    assert ft.kernel_counts() == {"causal": 3 * LAYERS} and ft.fallback_counts() == {}


def test_cache_call_with_grad_runs_the_bottom_right_mask(model: LlamaForCausalLM) -> None:
    """Queries against a longer cache with a backward (the KV-cache kernel has none): attention() with the
    bottom-right causal mask, output and gradients against float64."""
    from flashtune.kernel.testing import attention_reference

    attn = model.model.layers[0].self_attn
    nq, nk = 5, 19
    q = torch.randn(2, 4, nq, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, 2, nk, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    out, _ = ft.tuned_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
    assert ft.kernel_counts() == {"masked": 1} and ft.fallback_counts() == {}
    q64, k64, v64 = _leaves(q, k, v)
    ref = attention_reference(q64, k64, v64, causal=True, scale=attn.scaling, diag=nk - nq)
    assert rel(out.transpose(1, 2), ref) < 1e-5
    with torch.no_grad():  # top-left would differ
        assert rel(attention_reference(q64, k64, v64, causal=True, scale=attn.scaling), ref) > 0.1
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.transpose(1, 2).double())
    for ours, exact in ((q, q64), (k, k64), (v, v64)):
        assert rel(ours.grad, exact.grad) < 1e-5


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
