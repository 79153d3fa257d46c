"""`attention()` and `attention_kvcache` with score modifiers (window, softcap, sinks, ALiBi, attn_mask, dropout),
end to end through the dispatcher: results and gradients against float64 PyTorch (kernel.testing), the
features the calls resolve and record, SDPA where it computes the same, and bad values named."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashtune.db.types import Config, Key, bucket
from flashtune.kernel import attention, attention_kvcache, dispatch, record
from flashtune.kernel.mods import dropout_keep_mask
from flashtune.kernel.testing import attention_reference
from helpers import dtypes, rel

BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
GRAD_BOUND = {torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _draw(device: str, dtype: torch.dtype, b: int, hq: int, hkv: int, nq: int, nk: int, d: int,
          grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Fresh random q, k, v (a new seed every run), scaled so that the scores spread."""
    gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,))))
    return tuple((torch.randn(s, generator=gen, device=device) * 2).to(dtype).requires_grad_(grad)
                 for s in ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d)))


def _mask(device: str, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    if kind == "bool":
        return torch.rand(shape, device=device) > 0.3
    return torch.randn(shape, device=device) * 2


# (name, attention() keywords, the reference's keywords); tensors are built per call from (device, hq, nq, nk).
def _cases(device: str, b: int, hq: int, nq: int, nk: int) -> dict[str, tuple[dict, dict]]:
    sinks = torch.randn(hq, device=device) + 8  # about a row's largest score: the sink takes a real share
    slopes = torch.rand(hq, device=device) * 0.5
    bool_mask = _mask(device, (b, 1, nq, nk), "bool")
    float_mask = _mask(device, (nq, nk), "float")
    return {
        "window": ({"window_size": (5, 3)}, {"window_size": (5, 3)}),
        "window_left": ({"window_size": (7, -1)}, {"window_size": (7, -1)}),
        "sinks": ({"sinks": sinks}, {"sinks": sinks}),
        "alibi": ({"alibi_slopes": slopes}, {"alibi_slopes": slopes}),
        "bool_mask": ({"attn_mask": bool_mask}, {"attn_mask": bool_mask}),
        "float_mask": ({"attn_mask": float_mask}, {"attn_mask": float_mask}),
        "window_softcap": ({"window_size": (6, 0), "softcap": 3.0}, {"window_size": (6, 0), "softcap": 3.0}),
        "window_sinks": ({"window_size": (4, 0), "sinks": sinks}, {"window_size": (4, 0), "sinks": sinks}),
    }


NAMES = ["window", "window_left", "sinks", "alibi", "bool_mask", "float_mask", "window_softcap", "window_sinks"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_matches_float64(name: str, causal: bool, kernel_device: str) -> None:
    b, hq, hkv, n, d = 2, 4, 2, 37, 24
    for dtype in dtypes(kernel_device):
        q, k, v = _draw(kernel_device, dtype, b, hq, hkv, n, n, d)
        given, ref_kw = _cases(kernel_device, b, hq, n, n)[name]
        if causal and "attn_mask" in given:
            continue  # SDPA takes a mask or is_causal, not both: so does attention()
        out = attention(q, k, v, is_causal=causal, enable_gqa=True, **given)
        ref = attention_reference(q, k, v, causal=causal, **ref_kw)
        assert rel(out, ref, floor=0.1) < BOUND[dtype], name
        # The modifier changes the result: the check above cannot pass without it.
        assert rel(attention_reference(q, k, v, causal=causal), ref, floor=0.1) > 20 * BOUND[dtype], name


@pytest.mark.parametrize("name", ["window", "sinks", "alibi", "bool_mask", "float_mask", "window_sinks"])
def test_training_matches_float64_autograd(name: str, kernel_device: str) -> None:
    b, hq, hkv, n, d = 1, 4, 2, 33, 16
    for dtype in dtypes(kernel_device):
        q, k, v = _draw(kernel_device, dtype, b, hq, hkv, n, n, d, grad=True)
        given, ref_kw = _cases(kernel_device, b, hq, n, n)[name]
        causal = "attn_mask" not in given
        sinks = given.get("sinks")
        if sinks is not None:
            sinks = sinks.clone().requires_grad_(True)
            given = {**given, "sinks": sinks}
        out = attention(q, k, v, is_causal=causal, enable_gqa=True, **given)
        grad_out = torch.randn(out.shape, device=kernel_device).to(dtype)
        out.backward(grad_out)
        ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        ref_sinks = None if sinks is None else sinks.detach().double().requires_grad_(True)
        ref = attention_reference(*ref_in, causal=causal, **{**ref_kw, **({"sinks": ref_sinks} if sinks is not None
                                                                         else {})})
        ref.backward(grad_out.double())
        assert rel(out.detach(), ref.detach(), floor=0.1) < BOUND[dtype], name
        for got, want in zip((q.grad, k.grad, v.grad), ref_in):
            assert rel(got, want.grad, floor=0.1) < GRAD_BOUND[dtype], name
        if sinks is not None:
            assert sinks.grad is not None and sinks.grad.shape == sinks.shape
            assert rel(sinks.grad, ref_sinks.grad, floor=0.1) < GRAD_BOUND[dtype]


def test_dropout_replays_under_manual_seed_and_matches_the_reference_given_its_mask(kernel_device: str) -> None:
    b, h, n, d, p = 1, 2, 29, 16, 0.2
    q, k, v = _draw(kernel_device, torch.float32, b, h, h, n, n, d, grad=True)
    torch.manual_seed(1234)
    out = attention(q, k, v, dropout_p=p, is_causal=True)
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # the draw attention() made
    keep = dropout_keep_mask(seed, p, b, h, n, n, kernel_device)
    assert 0.6 < float(keep.float().mean()) < 0.95  # about 1 − p kept
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*ref_in, causal=True, dropout_keep=keep, dropout_p=p)
    ref.backward(grad_out.double())
    assert rel(out.detach(), ref.detach(), floor=0.1) < BOUND[torch.float32]
    for got, want in zip((q.grad, k.grad, v.grad), ref_in):
        assert rel(got, want.grad, floor=0.1) < GRAD_BOUND[torch.float32]
    # The same seed replays the same output; another draw gives another mask.
    torch.manual_seed(1234)
    assert torch.equal(attention(q, k, v, dropout_p=p, is_causal=True).detach(), out.detach())
    assert not torch.equal(attention(q, k, v, dropout_p=p, is_causal=True).detach(), out.detach())


def test_a_fully_hidden_row_gives_zeros_as_sdpa(kernel_device: str) -> None:
    q, k, v = _draw(kernel_device, torch.float32, 1, 2, 2, 12, 20, 16)
    mask = torch.rand(12, 20, device=kernel_device) > 0.4
    mask[3] = False
    out = attention(q, k, v, attn_mask=mask)
    assert bool(torch.isfinite(out).all()) and float(out[:, :, 3].abs().max()) == 0.0
    if kernel_device == "cpu":  # SDPA's math backend gives the same convention
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=2e-5, rtol=2e-5)


def test_kvcache_takes_window_sinks_and_alibi_bottom_right(kernel_device: str) -> None:
    b, hq, hkv, nq, nmax, d = 2, 4, 1, 3, 45, 16
    q, k, v = _draw(kernel_device, torch.float32, b, hq, hkv, nq, nmax, d)
    lengths = torch.tensor([45, 30], dtype=torch.int32, device=kernel_device)
    sinks = torch.randn(hq, device=kernel_device) + 8
    slopes = torch.rand(hq, device=kernel_device) * 0.3
    for kw in ({"window_size": (8, 0)}, {"sinks": sinks}, {"alibi_slopes": slopes},
               {"window_size": (6, 0), "sinks": sinks, "softcap": 2.0}):
        out = attention_kvcache(q, k, v, cache_seqlens=lengths, causal=True, **kw)
        for i, n in enumerate(lengths.tolist()):
            ref = attention_reference(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], causal=True, diag=n - nq,
                                      **kw)
            assert rel(out[i:i + 1], ref, floor=0.1) < BOUND[torch.float32], kw


@pytest.mark.skipif(torch.cuda.is_available(), reason="routes CPU tensors under the interpreter")
def test_a_call_with_modifiers_resolves_and_records_its_features(tuned_table, launches, monkeypatch) -> None:
    plain = Key(dispatch.INTERPRETER_ARCH, "fwd", 40, 16, "float32", True, batch_heads=bucket(2))
    windowed = Key(dispatch.INTERPRETER_ARCH, "fwd", 40, 16, "float32", True, batch_heads=bucket(2), window=16,
                   sinks=True)
    tuned_table([(plain, Config(32, 16, 2, 1), None), (windowed, Config(16, 32, 2, 1), None)])
    monkeypatch.setattr(record, "ENABLED", True)
    monkeypatch.setattr(record, "_counts", {})
    q, k, v = _draw("cpu", torch.float32, 1, 2, 2, 40, 40, 16)
    sinks = torch.randn(2)
    out = attention(q, k, v, is_causal=True, window_size=(11, 0), sinks=sinks)  # 12 keys: the bucket 16
    attention(q, k, v, is_causal=True)
    tiles = [(x.kwargs["BLOCK_M"], x.kwargs["BLOCK_N"]) for x in launches]
    assert tiles == [(16, 32), (32, 16)]
    assert rel(out, attention_reference(q, k, v, causal=True, window_size=(11, 0), sinks=sinks), floor=0.1) < 2e-5
    assert record.pending() == {windowed: 1, plain: 1}
    choice = dispatch.explain(q, k, v, True, window=16, sinks=True)
    assert choice.key == windowed and choice.config == Config(16, 32, 2, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="routes CPU tensors under the interpreter")
def test_sdpa_wins_a_window_key_only_as_a_mask_and_never_a_sinks_key(tuned_table, monkeypatch) -> None:
    import flashtune.kernel.api as api

    windowed = Key(dispatch.INTERPRETER_ARCH, "fwd", 40, 16, "float32", False, batch_heads=bucket(2), window=16)
    sinked = Key(dispatch.INTERPRETER_ARCH, "fwd", 40, 16, "float32", False, batch_heads=bucket(2), sinks=True)
    backend = Config(16, 16, 2, 1, {"provider": "sdpa_efficient"})
    tuned_table([(windowed, backend, None), (sinked, backend, None)])
    ran: list[torch.Tensor | None] = []

    def pinned(provider, q, k, v, *, causal, scale, attn_mask=None):
        ran.append(attn_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)

    monkeypatch.setattr(api, "run_sdpa", pinned)
    q, k, v = _draw("cpu", torch.float32, 1, 2, 2, 40, 40, 16)
    out = attention(q, k, v, window_size=(7, 4))
    assert len(ran) == 1 and ran[0] is not None and ran[0].dtype == torch.bool
    assert rel(out, attention_reference(q, k, v, window_size=(7, 4)), floor=0.1) < 2e-5
    sinks = torch.randn(2)
    out = attention(q, k, v, sinks=sinks)  # SDPA has no sinks: the kernel runs, whatever the table says
    assert len(ran) == 1
    assert rel(out, attention_reference(q, k, v, sinks=sinks), floor=0.1) < 2e-5


BAD = [
    ({"window_size": (-2, 0)}, ValueError, "window_size left"),
    ({"window_size": (3,)}, TypeError, "window_size must be a pair"),
    ({"window_size": (1.5, 0)}, TypeError, "window_size left must be an int"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"sinks": "sinks"}, TypeError, "sinks must be a torch.Tensor"),
    ({"sinks": torch.zeros(3)}, ValueError, r"sinks must have shape \(2,\)"),
    ({"sinks": torch.zeros(2, dtype=torch.int32)}, TypeError, "sinks must be a floating-point"),
    ({"alibi_slopes": torch.zeros(5)}, ValueError, "alibi_slopes must have shape"),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p must be a number in \[0, 1\)"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p"),
    ({"attn_mask": torch.ones(3, 7, dtype=torch.bool)}, ValueError, "does not broadcast"),
    ({"attn_mask": torch.ones(16, 16, dtype=torch.int32)}, TypeError, "attn_mask must be bool or floating"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_modifiers_are_named(kwargs: dict, error: type, match: str, kernel_device: str) -> None:
    q, k, v = _draw(kernel_device, torch.float32, 1, 2, 2, 16, 16, 16)
    kwargs = {name: value.to(kernel_device) if isinstance(value, torch.Tensor) else value
              for name, value in kwargs.items()}
    with pytest.raises(error, match=match):
        attention(q, k, v, **kwargs)


def test_a_mask_or_slopes_that_require_grad_are_refused_in_training(kernel_device: str) -> None:
    q, k, v = _draw(kernel_device, torch.float32, 1, 2, 2, 16, 16, 16, grad=True)
    with pytest.raises(NotImplementedError, match="no gradient for attn_mask"):
        attention(q, k, v, attn_mask=torch.randn(16, 16, device=kernel_device, requires_grad=True))
    with pytest.raises(NotImplementedError, match="no gradient for alibi_slopes"):
        attention(q, k, v, alibi_slopes=torch.rand(2, device=kernel_device, requires_grad=True))
