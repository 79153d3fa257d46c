"""kernel.sdpa's direct backend calls: a call routed to a torch SDPA backend runs that backend's aten op
without SDPA's `sdpa_kernel` context manager, and must give what F.scaled_dot_product_attention pinned
to the backend gives, bitwise, gradients included, refusals included.

On the CPU the fused backends' ops do not run, so CPU calls take the pinned path: checked against
float64 attention. The bitwise comparisons need a CUDA GPU (`gpu` marker):
`python -m pytest -m gpu tests/kernel/test_sdpa_direct.py`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashtune.kernel.providers import SDPA_BACKENDS
from flashtune.kernel.sdpa import available_providers, direct_op, is_refusal, run_pinned, run_sdpa, takes_direct
from flashtune.kernel.testing import attention_reference
from helpers import qkv, rel

PROVIDERS = list(SDPA_BACKENDS)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))


# --- CPU: the provider table, the path decision, the pinned path's results --------------------------

def test_every_provider_of_this_torch_resolves_to_its_aten_op() -> None:
    assert available_providers() == tuple(PROVIDERS)
    for provider, op_name in (("sdpa_cudnn", "cudnn"), ("sdpa_flash", "flash"), ("sdpa_efficient", "efficient")):
        direct = direct_op(provider)
        assert direct is not None, f"{provider}: this torch's op schema is not the one the direct call is written for"
        assert direct.op.__name__ == f"_scaled_dot_product_{op_name}_attention"
        assert direct_op(provider) is direct  # resolved once
    assert direct_op("sdpa_flash").head_dim_multiple == 8  # flash's front end pads other head dims
    assert not direct_op("sdpa_flash").lse_arg and direct_op("sdpa_cudnn").lse_arg


def test_an_unknown_provider_is_named() -> None:
    with pytest.raises(ValueError, match="sdpa_math"):
        direct_op("sdpa_math")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cpu_tensors_take_the_pinned_path(provider: str) -> None:
    q, k, v = qkv(1, 4, 2, 12, 12, 16, torch.float32, "cpu", _gen())
    assert not takes_direct(provider, q, k, v, True)  # the backend's own gate declines CPU tensors


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2])
def test_flash_on_cpu_gives_sdpa_pinned_result(causal: bool, hkv: int) -> None:
    """torch's CPU flash backend runs: run_sdpa is SDPA pinned to it, bitwise, and right to fp32 rounding,
    forward and backward."""
    q, k, v = qkv(2, 4, hkv, 24, 40 if not causal else 24, 16, torch.float32, "cpu", _gen())
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = run_sdpa("sdpa_flash", q, k, v, causal=causal, scale=0.3)
    extra = {"enable_gqa": True} if hkv != 4 else {}
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, **extra))
    ref_inputs = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = attention_reference(*ref_inputs, causal=causal, scale=0.3)
    assert rel(out.detach(), ref) < 2e-6
    grad = torch.randn(out.shape, generator=_gen())
    out.backward(grad)
    ref.backward(grad.double())
    for got, want in zip((q.grad, k.grad, v.grad), ref_inputs):
        assert rel(got, want.grad, floor=0.1) < 2e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors")
@pytest.mark.parametrize("provider", ["sdpa_cudnn", "sdpa_efficient"])
def test_a_backend_without_a_cpu_kernel_refuses_as_a_refusal(provider: str) -> None:
    q, k, v = qkv(1, 2, 2, 16, 16, 16, torch.float32, "cpu", _gen())
    with pytest.raises(RuntimeError) as refused:
        run_sdpa(provider, q, k, v, causal=False, scale=None)
    assert is_refusal(refused.value)


def test_refusal_classification() -> None:
    assert is_refusal(RuntimeError("No available kernel. Aborting execution."))
    assert is_refusal(RuntimeError("No viable backend for scaled_dot_product_attention was found."))
    assert not is_refusal(RuntimeError("CUDA out of memory"))
    assert not is_refusal(ValueError("No available kernel"))  # only torch's RuntimeError is a refusal


# --- GPU: bitwise SDPA pinned to the backend ----------------------------------------------------------

def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """`x` (B, H, N, D) as contiguous, or as the transpose of a (B, N, H, D) tensor (a projection's
    output), or as a slice of a wider head dim (a fused QKV projection's view; last stride still 1)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "bnhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.cat([x, torch.full_like(x, float("nan"))], dim=-1)
    return wide[..., :x.shape[-1]]


def _leaves(tensors: tuple[torch.Tensor, ...], layout: str, grad: bool) -> list[torch.Tensor]:
    return [_layout(x.detach().clone(), layout).requires_grad_(grad) for x in tensors]


def _run(fn, provider: str, inputs: list[torch.Tensor], causal: bool, scale: float | None,
         grad_out: torch.Tensor | None) -> tuple[torch.Tensor | None, list[torch.Tensor], BaseException | None]:
    try:
        out = fn(provider, *inputs, causal=causal, scale=scale)
    except RuntimeError as error:
        return None, [], error
    grads = []
    if grad_out is not None:
        grads = list(torch.autograd.grad(out, inputs, grad_out))
    return out, grads, None


CASES = [  # (B, Hq, Hkv, Nq, Nk): self-attention, GQA, cross-attention against 77 text tokens, decode
    (2, 4, 4, 200, 200), (2, 8, 2, 200, 200), (2, 4, 4, 256, 77), (1, 8, 2, 1, 300),
]


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "bnhd", "sliced"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_direct_call_is_sdpa_pinned_bitwise(provider: str, dtype: torch.dtype, head_dim: int, causal: bool,
                                            layout: str, grad: bool) -> None:
    gen = _gen()
    for b, hq, hkv, nq, nk in CASES:
        base = qkv(b, hq, hkv, nq, nk, head_dim, dtype, "cuda", gen)
        scale = None if nq % 2 else 0.11
        grad_out = torch.randn(b, hq, nq, head_dim, generator=gen).to("cuda", dtype) if grad else None
        direct = _leaves(base, layout, grad)
        pinned = _leaves(base, layout, grad)
        # The direct path is taken exactly where SDPA pinned to the backend runs (the same gate).
        decided = takes_direct(provider, *direct, causal)
        want, want_grads, refused = _run(run_pinned, provider, pinned, causal, scale, grad_out)
        got, got_grads, error = _run(run_sdpa, provider, direct, causal, scale, grad_out)
        case = (f"{provider} {dtype} D={head_dim} causal={causal} {layout} grad={grad} "
                f"B,Hq,Hkv,Nq,Nk={b, hq, hkv, nq, nk}")
        if refused is not None:
            assert is_refusal(refused), case
            assert error is not None and is_refusal(error) and not decided, case
            continue
        assert error is None and decided, case
        assert got.shape == want.shape and got.stride() == want.stride() and got.dtype == want.dtype, case
        assert torch.equal(got, want), case
        if grad:
            # A fused backward may accumulate with atomics (flash's dQ, cuDNN): bitwise where SDPA's own
            # backward reproduces itself, else within what two of its runs differ by (plus rounding).
            again = _leaves(base, layout, True)
            _, repeat_grads, _ = _run(run_pinned, provider, again, causal, scale, grad_out)
            for name, g, w, r in zip("qkv", got_grads, want_grads, repeat_grads):
                assert g.shape == w.shape and g.stride() == w.stride(), case
                if torch.equal(w, r):
                    assert torch.equal(g, w), f"d{name}: {case}"
                else:
                    spread = (w.double() - r.double()).abs().max().item()
                    assert (g.double() - w.double()).abs().max().item() <= 2 * spread + 1e-2, f"d{name}: {case}"


@pytest.mark.gpu
def test_the_routed_call_takes_the_direct_path_on_this_gpu() -> None:
    """The premise of the host-time claim: on an sm80+ GPU each backend takes the common shape directly."""
    q, k, v = qkv(1, 8, 8, 256, 77, 64, torch.float16, "cuda", _gen())
    for provider in PROVIDERS:
        assert takes_direct(provider, q, k, v, False), provider
    assert not takes_direct("sdpa_flash", q, k, v, True)  # flash declines causal with Nq != Nk
    odd = [x[..., :72].contiguous() for x in (q, k, v)]
    assert takes_direct("sdpa_flash", *odd, False)
    odd = [x[..., :60].contiguous() for x in (q, k, v)]
    assert not takes_direct("sdpa_flash", *odd, False)  # flash's front end would pad 60 to 64: pinned path
    out = run_sdpa("sdpa_flash", *odd, causal=False, scale=None)
    assert torch.equal(out, run_pinned("sdpa_flash", *odd, causal=False, scale=None))
