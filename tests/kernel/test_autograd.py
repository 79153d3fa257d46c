"""attention() in training: gradients through the fused backward, against float64 autograd.

CPU tests run the kernels under the Triton interpreter (fp32 and fp16); the bounds are relative
Frobenius-norm errors against float64 autograd of kernel.testing.attention_reference.
"""
from __future__ import annotations

import pytest
import torch

from flashtune.db.types import Config, Key, bucket
from flashtune.kernel import attention, dispatch
from flashtune.kernel.device import device_arch
from flashtune.kernel.testing import attention_reference
from helpers import rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}




def _draw(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=DEVICE).manual_seed(int(torch.randint(0, 2**31, (1,))))
    return tuple(torch.randn(b, h, n, d, generator=gen, device=DEVICE, dtype=dtype)
                 for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))


@pytest.mark.parametrize("b, hq, hkv, nq, nk, d, causal", [
    (1, 2, 2, 37, 37, 16, True),
    (2, 4, 2, 23, 23, 32, False),   # GQA: dK/dV summed over the group
    (1, 4, 1, 19, 41, 16, True),    # MQA, cross lengths, top-left causal
    (1, 2, 2, 1, 1, 64, False),     # N of 1
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_match_float64_autograd(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, causal: bool,
                                          dtype: torch.dtype) -> None:
    q, k, v = (t.requires_grad_(True) for t in _draw(b, hq, hkv, nq, nk, d, dtype))
    grad_out = torch.randn(b, hq, nq, d, device=DEVICE, dtype=dtype)
    out = attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)
    out.backward(grad_out)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*ref_inputs, causal=causal)
    ref.backward(grad_out.double())
    assert rel(out.detach(), ref.detach(), floor=0.1) < BOUND[dtype]
    for got, want in zip((q.grad, k.grad, v.grad), (t.grad for t in ref_inputs)):
        assert got.shape == want.shape and got.dtype == dtype
        assert rel(got, want, floor=0.1) < BOUND[dtype]


def test_strided_views_and_scale() -> None:
    base = [torch.randn(2, 29, 2, 16, device=DEVICE).requires_grad_(True) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)  # (B, N, H, D) storage seen as (B, H, N, D)
    attention(q, k, v, is_causal=True, scale=0.7).square().sum().backward()
    ref_base = [t.detach().double().requires_grad_(True) for t in base]
    attention_reference(*(t.transpose(1, 2) for t in ref_base), causal=True, scale=0.7).square().sum().backward()
    for got, want in zip(base, ref_base):
        assert rel(got.grad, want.grad, floor=0.1) < BOUND[torch.float32]


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "default"])
def test_deterministic_algorithms_keep_an_atomic_dq_winner_off_atomics(tuned_table, launches,
                                                                       deterministic: bool) -> None:
    # The stored backward winner allows atomic dQ ({"deterministic": false}). Under
    # torch.use_deterministic_algorithms(True) its dK/dV pass must run without atomics and the separate dQ
    # pass must compute dQ; otherwise the atomic variant runs (the fp32 buffer and its conversion kernel).
    b, hq, hkv, n, d = 1, 4, 2, 33, 16
    arch = dispatch.INTERPRETER_ARCH if DEVICE == "cpu" else device_arch(0)
    atomic = Config(16, 16, 2, 1, {"deterministic": False})
    tuned_table([(Key(arch, "bwd", n, d, "float32", True, batch_heads=bucket(b * hq), group=hq // hkv), atomic,
                  None)])
    q, k, v = (t.requires_grad_(True) for t in _draw(b, hq, hkv, n, n, d, torch.float32))
    assert dispatch.explain(q, k, v, True, op="bwd").config == atomic
    grad_out = torch.randn(q.shape, generator=torch.Generator(device=DEVICE).manual_seed(7), device=DEVICE)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad_out)
    finally:
        torch.use_deterministic_algorithms(was)
    names = [launch.name for launch in launches]
    [dkdv] = [launch for launch in launches if launch.name == "attn_bwd_dkdv_kernel"]
    assert (dkdv.kwargs["BLOCK_M"], dkdv.kwargs["BLOCK_N"]) == (16, 16)  # the stored winner's tiles
    assert dkdv.kwargs["ATOMIC_DQ"] is not deterministic
    if deterministic:
        assert "attn_bwd_dq_kernel" in names and "attn_bwd_dq_convert_kernel" not in names
    else:
        assert "attn_bwd_dq_convert_kernel" in names and "attn_bwd_dq_kernel" not in names
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    attention_reference(*ref_inputs, causal=True).backward(grad_out.double())
    for got, want in zip((q.grad, k.grad, v.grad), ref_inputs):
        assert rel(got, want.grad, floor=0.1) < BOUND[torch.float32]


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_compiled_training_step_has_no_graph_break(softcap: float) -> None:
    q, k, v = (t.mul(3).requires_grad_(True) for t in _draw(1, 2, 2, 24, 24, 16, torch.float32))

    def step(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return attention(a, b, c, is_causal=True, softcap=softcap).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    compiled(q, k, v).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    step(q, k, v).backward()
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

