"""Logit softcapping (`softcap=c`: scores s become c·tanh(s/c)) through `attention()`, the explicit `attention_fwd`
and training, against float64 PyTorch (kernel.testing) with caps small enough to saturate; bad caps named."""
from __future__ import annotations

import math

import pytest
import torch

from flashtune.db.types import Config
from flashtune.kernel import attention, attention_fwd, dispatch
from flashtune.kernel.testing import attention_reference, lse_reference
from helpers import dtypes, rel

BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
GRAD_BOUND = {torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _qkv(device: str, dtype: torch.dtype, hq: int, hkv: int, n: int, nk: int, d: int, grad: bool = False,
         spread: float = 3.0) -> tuple[torch.Tensor, ...]:
    """Fresh random inputs scaled by `spread`, so that scores reach well past small caps (tanh saturates)."""
    gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,))))
    shapes = ((2, hq, n, d), (2, hkv, nk, d), (2, hkv, nk, d))
    return tuple((torch.randn(s, generator=gen, device=device) * spread).to(dtype).requires_grad_(grad)
                 for s in shapes)


CASES = [  # (Hq, Hkv, Nq, Nk, D, causal, cap)
    (2, 2, 33, 33, 16, False, 2.0),
    (4, 2, 40, 40, 32, True, 5.0),
    (2, 1, 17, 50, 24, False, 12.0),
    (4, 4, 64, 64, 64, True, 1.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}-{c[1]}-n{c[2]}x{c[3]}-d{c[4]}-c{int(c[5])}-cap{c[6]:g}")
def test_forward_matches_float64(case, kernel_device: str) -> None:
    hq, hkv, n, nk, d, causal, cap = case
    for dtype in dtypes(kernel_device):
        q, k, v = _qkv(kernel_device, dtype, hq, hkv, n, nk, d)
        out = attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv, softcap=cap)
        ref = attention_reference(q, k, v, causal=causal, softcap=cap)
        assert rel(out, ref, floor=0.1) < BOUND[dtype]
        # The cap changes the result (the inputs reach it): the check above cannot pass by chance.
        assert rel(attention_reference(q, k, v, causal=causal), ref, floor=0.1) > 50 * BOUND[dtype]


def test_the_lse_is_the_capped_scores(kernel_device: str) -> None:
    q, k, v = _qkv(kernel_device, torch.float32, 2, 2, 29, 29, 32)
    out, lse = attention_fwd(q, k, v, causal=True, return_lse=True, softcap=3.0)
    assert rel(out, attention_reference(q, k, v, causal=True, softcap=3.0), floor=0.1) < 2e-5
    assert float((lse.double() - lse_reference(q, k, causal=True, softcap=3.0)).abs().max()) < 1e-5


def test_a_capped_call_is_its_own_plan(kernel_device: str) -> None:
    q, k, v = _qkv(kernel_device, torch.float32, 2, 2, 16, 16, 16)
    capped, plain = dispatch.plan(q, k, v, False, (("softcap", True),)), dispatch.plan(q, k, v, False)
    assert capped.features == (("softcap", True),) and not plain.features and capped is not plain
    # One then the other, twice: each call gets its own result, never the other's memoised plan.
    for _ in range(2):
        assert rel(attention(q, k, v, softcap=2.0), attention_reference(q, k, v, softcap=2.0), floor=0.1) < 2e-5
        assert rel(attention(q, k, v), attention_reference(q, k, v), floor=0.1) < 2e-5


@pytest.mark.parametrize("cap", [-1.0, math.inf, math.nan, "2", True])
def test_a_bad_cap_is_named(cap, kernel_device: str) -> None:
    q, k, v = _qkv(kernel_device, torch.float32, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="softcap must be 0 .off. or a finite number > 0"):
        attention(q, k, v, softcap=cap)
    with pytest.raises(ValueError, match="softcap"):
        attention(q, k, v, softcap=cap, fallback=True)  # an argument error, not an input SDPA could run
    with pytest.raises(ValueError, match="softcap"):
        attention_fwd(q, k, v, softcap=cap)


def test_a_capped_masked_call_runs_the_kernel(kernel_device: str) -> None:
    q, k, v = _qkv(kernel_device, torch.float32, 2, 2, 8, 8, 16)
    mask = torch.rand(8, 8, device=kernel_device) > 0.3
    out = attention(q, k, v, attn_mask=mask, softcap=2.0, fallback=True)  # SDPA has no cap: never the fallback
    assert rel(out, attention_reference(q, k, v, attn_mask=mask, softcap=2.0), floor=0.1) < 2e-5


def test_the_tma_kernel_takes_a_cap(kernel_device: str) -> None:
    dtype = torch.float16 if kernel_device == "cuda" else torch.float32
    q, k, v = _qkv(kernel_device, dtype, 2, 2, 64, 64, 64)
    out = attention_fwd(q, k, v, softcap=2.0, config=Config(64, 64, 4, 2, {"loads": "tma"}))
    assert rel(out, attention_reference(q, k, v, softcap=2.0), floor=0.1) < BOUND[dtype]


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"h{c[0]}-{c[1]}-n{c[2]}x{c[3]}-d{c[4]}-c{int(c[5])}")
def test_training_matches_float64_autograd(case, kernel_device: str) -> None:
    hq, hkv, n, nk, d, causal, cap = case
    for dtype in dtypes(kernel_device):
        q, k, v = _qkv(kernel_device, dtype, hq, hkv, n, nk, d, grad=True)
        out = attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv, softcap=cap)
        grad_out = torch.randn(out.shape, device=kernel_device).to(dtype)
        out.backward(grad_out)
        ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        ref = attention_reference(*ref_in, causal=causal, softcap=cap)
        ref.backward(grad_out.double())
        assert rel(out.detach(), ref.detach(), floor=0.1) < BOUND[dtype]
        for got, want in zip((q.grad, k.grad, v.grad), ref_in):
            assert rel(got, want.grad, floor=0.1) < GRAD_BOUND[dtype]


@pytest.mark.skipif(torch.cuda.is_available(), reason="routes CPU tensors under the interpreter")
def test_a_capped_call_takes_its_own_key_s_winner_and_records_it(tuned_table, launches, monkeypatch) -> None:
    import dataclasses

    from flashtune.db.types import Key, bucket
    from flashtune.kernel import record

    plain = Key(dispatch.INTERPRETER_ARCH, "fwd", 24, 16, "float32", True, batch_heads=bucket(2 * 2))
    capped = dataclasses.replace(plain, softcap=True)
    tuned_table([(plain, Config(32, 16, 2, 1), None), (capped, Config(16, 32, 2, 1), None)])
    monkeypatch.setattr(record, "ENABLED", True)
    monkeypatch.setattr(record, "_counts", {})
    q, k, v = _qkv("cpu", torch.float32, 2, 2, 24, 24, 16)
    out = attention(q, k, v, is_causal=True, softcap=4.0)
    attention(q, k, v, is_causal=True)
    tiles = [(x.kwargs["BLOCK_M"], x.kwargs["BLOCK_N"], x.kwargs["SOFTCAP"]) for x in launches]
    assert tiles == [(16, 32, True), (32, 16, False)]
    assert rel(out, attention_reference(q, k, v, causal=True, softcap=4.0), floor=0.1) < 2e-5
    assert record.pending() == {capped: 1, plain: 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="routes CPU tensors under the interpreter")
def test_explain_and_lookup_answer_for_a_capped_call(tuned_table) -> None:
    from flashtune.db.types import Key, bucket

    plain = Key(dispatch.INTERPRETER_ARCH, "fwd", 24, 16, "float32", True, batch_heads=bucket(4))
    capped = Key(dispatch.INTERPRETER_ARCH, "fwd", 24, 16, "float32", True, batch_heads=bucket(4), softcap=True)
    tuned_table([(plain, Config(32, 16, 2, 1), None), (capped, Config(16, 32, 2, 1), None)])
    q, k, v = _qkv("cpu", torch.float32, 2, 2, 24, 24, 16)
    assert dispatch.explain(q, k, v, True).config == Config(32, 16, 2, 1)
    choice = dispatch.explain(q, k, v, True, softcap=True)
    assert choice.config == Config(16, 32, 2, 1) and choice.key == capped and choice.source == "exact"
    found = dispatch.lookup(dispatch.INTERPRETER_ARCH, 24, 16, "float32", True, batch_heads=4, softcap=True)
    assert found.config == Config(16, 32, 2, 1)
    with pytest.raises(TypeError, match="softcap"):
        dispatch.explain(q, k, v, True, softcap="yes")
