"""The fp8 (e4m3) inference forward: attention() with float8_e4m3fn q, k, v and their descales (kernel.fp8).

Two kinds of numeric checks, both against float64 on the dequantised inputs:
- exact-probability inputs (every device, the interpreter included): small-integer q, k and power-of-two
  descales with scale = ln 2 make every score an integer in base 2, so every probability the kernel rounds to
  e4m3 is a power of two >= 2^-8, which e4m3 holds exactly. The output must then match to fp32 sums and the
  output rounding: a wrong scale, descale index, mask or tile shows at once. (The Triton interpreter's fp32 to
  fp8 conversion drops the carry of a round-up into the exponent, e.g. 0.4987 -> 0.25, so random inputs
  cannot be checked under it.)
- random N(0, 1) inputs quantised per tensor or per head (GPU): within kernel.testing.fp8_error_bound, the
  elementwise bound derived from e4m3 rounding of P.
"""
from __future__ import annotations

import math

import pytest
import torch

from flashtune.kernel import attention
from flashtune.kernel.checks import check_inputs
from flashtune.kernel.fp8 import check_fp8
from flashtune.kernel.ops.fwd import Config, attention_fwd, launch
from flashtune.kernel.testing import attention_reference, dequantize_fp8, fp8_error_bound, quantize_fp8

FP8 = torch.float8_e4m3fn
LN2 = math.log(2.0)


def _exact_inputs(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, descales: str, device: str,
                  gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """fp8 q, k, v and descales (`descales`: "head" per (batch, kv head), "tensor", or "none": all None) whose
    real scores q·kᵀ are integers in [-2, 2]: with scale = ln 2 every probability is a power of two.

    The real q and k hold -1, 0 or 1 in two columns; they are stored divided by their descales (powers of
    two: exact), so qd·kd (1 or 2) only splits the values, and a wrong factor or index changes the scores.
    v is random, stored divided by its power-of-two descale."""
    def ternary(h: int, n: int) -> torch.Tensor:
        x = torch.zeros(b, h, n, d)
        x[..., :2] = torch.randint(-1, 2, (b, h, n, 2), generator=gen).float()
        return x

    q, k, v = ternary(hq, nq), ternary(hkv, nk), torch.randn(b, hkv, nk, d, generator=gen)
    if descales == "none":
        return tuple(t.to(device, FP8) for t in (q, k, v)) + (None, None, None)
    if descales == "head":
        qd = torch.exp2(torch.randint(-2, 3, (b, hkv), generator=gen).float())
        kd = torch.exp2(torch.randint(0, 2, (b, hkv), generator=gen).float()) / qd
        vd = torch.exp2(torch.randint(-3, 1, (b, hkv), generator=gen).float())
        per_q = qd.repeat_interleave(hq // hkv, dim=1)[:, :, None, None]
        per_k, per_v = kd[:, :, None, None], vd[:, :, None, None]
    else:
        qd, kd, vd = torch.tensor([4.0]), torch.tensor([0.5]), torch.tensor([0.25])
        per_q, per_k, per_v = qd, kd, vd
    stored = ((q / per_q).to(FP8), (k / per_k).to(FP8), (v / per_v).to(FP8))
    return tuple(t.to(device) for t in (*stored, qd, kd, vd))


def _real(q8, k8, v8, qd, kd, vd):
    # q's descale is per kv head: each query head uses its group's factor.
    group = q8.shape[1] // k8.shape[1]
    qd_heads = qd.repeat_interleave(group, dim=1) if qd is not None and qd.dim() == 2 else qd
    return dequantize_fp8(q8, qd_heads), dequantize_fp8(k8, kd), dequantize_fp8(v8, vd)


EXACT_CASES = [
    # b, hq, hkv, nq, nk, d, causal, descales
    (2, 2, 2, 40, 40, 16, False, "tensor"),
    (2, 4, 2, 40, 40, 32, True, "head"),
    (1, 4, 1, 33, 70, 64, False, "head"),
    (1, 2, 1, 70, 70, 24, True, "tensor"),
    (1, 2, 2, 50, 50, 32, True, "none"),
]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,descales", EXACT_CASES)
def test_exact_probabilities_match_float64(kernel_device, b, hq, hkv, nq, nk, d, causal, descales):
    gen = torch.Generator().manual_seed(nq * 1000 + nk * 10 + d)
    q8, k8, v8, qd, kd, vd = _exact_inputs(b, hq, hkv, nq, nk, d, descales, kernel_device, gen)
    out_dtypes = [torch.float16] + ([torch.bfloat16] if kernel_device == "cuda" else [])
    ref = attention_reference(*_real(q8, k8, v8, qd, kd, vd), causal=causal, scale=LN2)
    assert ref.abs().max() > 0.01  # the check below means something
    for out_dtype in out_dtypes:
        out = attention(q8, k8, v8, is_causal=causal, scale=LN2, enable_gqa=hq != hkv, q_descale=qd, k_descale=kd,
                        v_descale=vd, out_dtype=out_dtype)
        assert out.dtype == out_dtype and out.shape == (b, hq, nq, d)
        ulp = 2.0 ** -8 if out_dtype == torch.bfloat16 else 2.0 ** -11
        err = (out.double() - ref).abs()
        assert torch.isfinite(out).all()
        assert (err <= ulp * ref.abs() + 1e-5 * ref.abs().max()).all(), float(err.max())


def test_launch_writes_every_element_of_a_poisoned_output(kernel_device):
    gen = torch.Generator().manual_seed(7)
    q8, k8, v8, qd, kd, vd = _exact_inputs(1, 2, 1, 37, 37, 16, "head", kernel_device, gen)
    shape, scales = check_fp8(q8, k8, v8, qd, kd, vd, torch.float16)
    out = torch.full((1, 2, 37, 16), math.nan, dtype=torch.float16, device=kernel_device)
    launch(q8, k8, v8, shape, causal=True, scale=LN2, config=Config(32, 32, 4, 1), out=out, fp8=scales)
    ref = attention_reference(*_real(q8, k8, v8, qd, kd, vd), causal=True, scale=LN2)
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).abs() <= 2.0 ** -11 * ref.abs() + 1e-5).all()


def test_defaults_are_unit_descales_and_bf16_output(kernel_device):
    gen = torch.Generator().manual_seed(3)
    q8, k8, v8, *_ = _exact_inputs(1, 2, 2, 20, 20, 16, "none", kernel_device, gen)
    ref = attention_reference(q8.double(), k8.double(), v8.double(), scale=LN2)
    if kernel_device == "cuda":  # the interpreter's fp32 to bf16 conversion is not checked here
        out = attention(q8, k8, v8, scale=LN2)
        assert out.dtype == torch.bfloat16
        assert ((out.double() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-5 * ref.abs().max()).all()
    out = attention(q8, k8, v8, scale=LN2, out_dtype=torch.float16)
    assert ((out.double() - ref).abs() <= 2.0 ** -11 * ref.abs() + 1e-5 * ref.abs().max()).all()


# --- the API's refusals (CPU and GPU alike) ---------------------------------------------------------


def _fp8_qkv(device: str, hq: int = 2, hkv: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(1, h, 16, 16, generator=gen).to(device, FP8) for h in (hq, hkv, hkv))


@pytest.mark.parametrize("arg", ["q_descale", "k_descale", "v_descale", "out_dtype"])
def test_fp8_arguments_are_refused_for_other_dtypes(kernel_device, arg):
    q, k, v = (torch.randn(1, 2, 16, 16, device=kernel_device, dtype=torch.float16) for _ in range(3))
    value = torch.float16 if arg == "out_dtype" else torch.ones(1, device=kernel_device)
    with pytest.raises(ValueError, match="apply only to torch.float8_e4m3fn"):
        attention(q, k, v, **{arg: value})


def test_bad_descales_and_out_dtype_are_named(kernel_device):
    q, k, v = _fp8_qkv(kernel_device)
    with pytest.raises(TypeError, match="q_descale has dtype torch.float16"):
        attention(q, k, v, q_descale=torch.ones(1, dtype=torch.float16, device=kernel_device))
    with pytest.raises(TypeError, match="k_descale must be None or a float32"):
        attention(q, k, v, k_descale=2.0)
    with pytest.raises(ValueError, match=r"v_descale has shape \(2, 1\)"):
        attention(q, k, v, v_descale=torch.ones(2, 1, device=kernel_device))
    with pytest.raises(TypeError, match="out_dtype must be"):
        attention(q, k, v, out_dtype=torch.float32)


def test_gradients_modifiers_and_mixed_dtypes_are_refused(kernel_device):
    q, k, v = _fp8_qkv(kernel_device)
    with pytest.raises(NotImplementedError, match="query requires grad"):
        attention(q.clone().requires_grad_(), k, v)
    with pytest.raises(ValueError, match="softcap was given"):
        attention(q, k, v, softcap=30.0)
    with pytest.raises(ValueError, match="window_size was given"):
        attention(q, k, v, window_size=(4, 0))
    with pytest.raises(ValueError, match="attn_mask was given"):
        attention(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool, device=kernel_device))
    with pytest.raises(TypeError, match="must share one dtype"):
        attention(q, k.to(torch.float16), v)
    qg, kg, vg = _fp8_qkv(kernel_device, hq=4, hkv=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attention(qg, kg, vg)


def test_other_entry_points_refuse_fp8(kernel_device):
    q, k, v = _fp8_qkv(kernel_device)
    with pytest.raises(TypeError, match="fp8 inputs run only in flashtune.kernel.attention"):
        attention_fwd(q, k, v)
    with pytest.raises(TypeError, match="fp8 inputs run only"):
        check_inputs(q, k, v)


# --- random inputs within the derived bound (GPU: the interpreter's fp8 rounding is wrong) -----------


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_random_inputs_within_the_e4m3_bound(causal, hq, hkv, per_head, out_dtype):
    gen = torch.Generator().manual_seed(11)
    b, n, d = 2, 1000, 128
    x = [torch.randn(b, h, n, d, generator=gen).cuda() for h in (hq, hkv, hkv)]
    (q8, qs), (k8, ks), (v8, vs) = (quantize_fp8(t, per_head) for t in x)
    if per_head and hq != hkv:
        # q's descale is per (batch, kv head): requantise q with its group's largest factor.
        qs = qs.view(b, hkv, hq // hkv).amax(-1)
        q8 = (x[0] / qs.repeat_interleave(hq // hkv, 1)[:, :, None, None]).to(FP8)
    out = attention(q8, k8, v8, is_causal=causal, enable_gqa=hq != hkv, q_descale=qs, k_descale=ks, v_descale=vs,
                    out_dtype=out_dtype)
    qr, kr, vr = _real(q8, k8, v8, qs, ks, vs)
    ref = attention_reference(qr, kr, vr, causal=causal)
    bound = fp8_error_bound(qr, kr, vr, causal=causal, out_dtype=out_dtype)
    assert torch.isfinite(out).all()
    ratio = ((out.double() - ref).abs() / bound).max().item()
    assert ratio <= 1.0, ratio
    # The bound is not vacuous: a wrong v descale (2x) is far outside it.
    assert (((2 * out.double()) - ref).abs() > bound).any()


def _emulated_fp8_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, block_n: int,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """The kernel's arithmetic in torch on dequantised float64 inputs (one kv head per query head): the online
    softmax over key tiles of `block_n`, P rounded to e4m3 (torch's round-to-nearest-even) in units of the
    running max, the row sum of the unrounded P, the output rounded to `out_dtype`."""
    n, nk, scale = q.shape[-2], k.shape[-2], q.shape[-1] ** -0.5
    m = torch.full(q.shape[:-1], -math.inf, dtype=torch.float64)
    l = torch.zeros(q.shape[:-1], dtype=torch.float64)
    acc = torch.zeros_like(q)
    for lo in range(0, nk, block_n):
        s = (q @ k[..., lo:lo + block_n, :].transpose(-1, -2)) * scale
        if causal:
            cols = torch.arange(lo, min(lo + block_n, nk))
            s = s.masked_fill(cols[None, :] > torch.arange(n)[:, None], -math.inf)
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m_new[..., None])
        alpha = torch.exp(m - m_new)
        l = l * alpha + p.sum(-1)
        p8 = p.float().to(FP8).double()
        acc = acc * alpha[..., None] + p8 @ v[..., lo:lo + block_n, :]
        m = m_new
    return (acc / l[..., None]).to(out_dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_the_error_bound_covers_the_kernels_arithmetic(causal, out_dtype):
    # The bound itself, on the CPU: an emulation of the kernel's roundings stays inside it, a 2x error does not.
    gen = torch.Generator().manual_seed(5)
    x = [torch.randn(1, 2, n, 64, generator=gen) for n in (300, 300, 300)]
    q, k, v = (dequantize_fp8(*quantize_fp8(t)) for t in x)
    out = _emulated_fp8_forward(q, k, v, causal, 64, out_dtype).double()
    ref = attention_reference(q, k, v, causal=causal)
    bound = fp8_error_bound(q, k, v, causal=causal, out_dtype=out_dtype)
    assert ((out - ref).abs() <= bound).all(), float(((out - ref).abs() / bound).max())
    assert float(((out - ref).abs() / bound).max()) > 0.05  # the bound is not loose by orders of magnitude
    assert ((2 * out - ref).abs() > bound).any()
