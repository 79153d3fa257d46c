"""`kernel.attention` on CPU under the Triton interpreter: results, the SDPA-compatible argument
handling, fallback, and torch.compile(fullgraph=True) through the custom op."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashtune import kernel
from flashtune.kernel import api, attention, dispatch
from flashtune.kernel.testing import attention_reference
from helpers.subproc import repo_env

REPO = Path(__file__).resolve().parents[2]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs under the interpreter (conftest)


def qkv(b: int = 1, hq: int = 2, hkv: int = 2, nq: int = 24, nk: int = 24, d: int = 16,
        dtype: torch.dtype = torch.float32, device: str = DEVICE, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype)
                 for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_exports() -> None:
    assert set(kernel.__all__) == {"Config", "attention", "attention_bwd", "attention_fwd", "attention_kvcache",
                                   "attention_varlen", "dispatch", "explain", "record"}
    assert kernel.attention is api.attention and kernel.dispatch is sys.modules["flashtune.kernel.dispatch"]
    assert kernel.explain is kernel.dispatch.explain and kernel.Config is sys.modules["flashtune.db.types"].Config
    assert kernel.attention_fwd is sys.modules["flashtune.kernel.ops.fwd"].attention_fwd
    assert kernel.attention_bwd is sys.modules["flashtune.kernel.ops.bwd"].attention_bwd
    assert kernel.attention_kvcache is sys.modules["flashtune.kernel.kvcache"].attention_kvcache
    assert kernel.record is sys.modules["flashtune.kernel.record"]
    assert kernel.attention_varlen is sys.modules["flashtune.kernel.varlen"].attention_varlen
    q, k, v = qkv(hq=4, hkv=2, nq=24, nk=40)
    plan = kernel.dispatch.plan(q, k, v, True)
    assert (plan.shape.batch, plan.shape.heads_q, plan.shape.heads_kv, plan.shape.seq_q, plan.shape.seq_k,
            plan.shape.head_dim, plan.shape.dtype) == (1, 4, 2, 24, 40, 16, "float32")
    assert plan.grouped and plan.default_scale == 0.25 and plan.choice == dispatch.explain(q, k, v, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_fp64_reference(kernel_device: str, dtype: torch.dtype, causal: bool) -> None:
    # Nq != Nk and lengths that are not tile multiples: masking and top-left causal alignment.
    q, k, v = qkv(nq=40, nk=72, dtype=dtype, device=kernel_device)
    if kernel_device == "cpu" and dtype == torch.bfloat16:
        # The interpreter's bf16 dot is wrong (numpy has no bf16): refused, SDPA on request.
        with pytest.raises(TypeError, match="bfloat16 on the CPU: the Triton interpreter"):
            attention(q, k, v, is_causal=causal)
        out = attention(q, k, v, is_causal=causal, fallback=True)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=0, rtol=0)
        return
    close(attention(q, k, v, is_causal=causal), attention_reference(q, k, v, causal=causal), dtype)


@pytest.mark.parametrize("is_causal", ["False", "no", 2.5, [], None, 1, torch.tensor(False)])
def test_is_causal_must_be_a_bool_like_sdpa(is_causal: object) -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError):  # what torch SDPA raises for these
        F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    for fallback in (False, True):  # an argument error, not something SDPA would run
        with pytest.raises(TypeError, match=f"is_causal must be a bool.*of type {type(is_causal).__name__}"):
            attention(q, k, v, is_causal=is_causal, fallback=fallback)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        dispatch.explain(q, k, v, is_causal=is_causal)


def test_numpy_bool_is_causal() -> None:
    q, k, v = qkv()
    close(attention(q, k, v, is_causal=np.bool_(True)), attention_reference(q, k, v, causal=True), torch.float32)
    close(attention(q, k, v, is_causal=np.bool_(False)), attention_reference(q, k, v), torch.float32)


def test_strided_nested_tensor_is_the_documented_type_error() -> None:
    q, k, v = qkv()
    for layout in (torch.strided, torch.jagged):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the strided layout is a "prototype" in torch
            nested = torch.nested.nested_tensor([q[0], q[0, :, :5]], layout=layout)
        with pytest.raises(TypeError, match="q has layout nested"):
            attention(nested, k, v)


def test_scale_gqa_and_strides_match_sdpa(kernel_device: str) -> None:
    q, k, v = qkv(hq=4, hkv=2, nq=33, nk=33, d=32, device=kernel_device)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, H, D) memory, viewed as (B, H, N, D)
    out = attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    ref = attention_reference(q, k, v, causal=True, scale=0.3)
    close(out, ref, torch.float32)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                                                   enable_gqa=True), atol=2e-5, rtol=2e-5)
    assert out.stride() == torch.empty_like(q).stride()  # laid out like query


def test_gqa_needs_enable_gqa_like_sdpa() -> None:
    q, k, v = qkv(hq=4, hkv=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attention(q, k, v)


def test_a_mask_runs_the_kernel_and_fallback_serves_what_it_cannot() -> None:
    q, k, v = qkv()
    mask = torch.ones(24, 24, dtype=torch.bool, device=DEVICE).tril()
    # A causal pattern given as a mask: the kernel computes it, as SDPA would.
    close(attention(q, k, v, attn_mask=mask), attention_reference(q, k, v, causal=True), torch.float32)
    if DEVICE == "cpu":  # without the interpreter's kernel, fallback=True hands SDPA the same arguments
        cpu = [t.clone() for t in (q, k, v)]
        torch.testing.assert_close(attention(*cpu, attn_mask=mask, fallback=True),
                                   F.scaled_dot_product_attention(*cpu, attn_mask=mask), atol=2e-5, rtol=2e-5)


def _float64_grads(inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor, **kwargs: object) -> list[torch.Tensor]:
    """Gradients of float64 attention (kernel.testing) at `inputs`, by autograd."""
    ref = [t.detach().double().requires_grad_(True) for t in inputs]
    attention_reference(*ref, **kwargs).backward(grad_out.double())
    return [t.grad for t in ref]


@pytest.mark.parametrize("needs", ["qkv", "q", "kv"])
def test_inputs_that_require_grad_train_through_the_kernel(needs: str, launches) -> None:
    q, k, v = qkv(hq=4, hkv=2, nq=24, nk=40, seed=int(torch.randint(0, 2**31, (1,))))
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(name in needs)
    out = attention(q, k, v, is_causal=True, enable_gqa=True)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), device=DEVICE)
    out.backward(grad_out)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), _float64_grads((q, k, v), grad_out, causal=True)):
        if name in needs:
            close(got, want, torch.float32)
        else:
            assert got is None  # no gradient for an input that does not require one
    names = [launch.name for launch in launches]
    # The kernels, not a fallback: the forward that keeps the LSE, then the fused backward.
    assert names[0] == "attn_fwd_kernel" and launches[0].kwargs["STORE_LSE"] is True
    assert {"attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel"} <= set(names[1:])


def test_tensors_the_kernel_rejects_fall_back_only_when_asked() -> None:
    q, k, v = qkv(d=20)  # an unsupported head dim
    with pytest.raises(ValueError, match="head dim 20"):
        attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v, fallback=True), F.scaled_dot_product_attention(q, k, v))
    qd, kd, vd = (t.double() for t in qkv())
    with pytest.raises(TypeError, match="float64"):
        attention(qd, kd, vd)
    torch.testing.assert_close(attention(qd, kd, vd, is_causal=True, fallback=True),
                               F.scaled_dot_product_attention(qd, kd, vd, is_causal=True))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention([1.0], k, v)
    with pytest.raises(ValueError, match="scale"):
        attention(*qkv(), scale=float("nan"))


def test_cpu_tensors_outside_the_interpreter() -> None:
    # Planning for another arch (explain(arch=...)) runs nothing, so CPU tensors are fine for it.
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from flashtune.kernel import attention, dispatch
        q = torch.randn(1, 2, 8, 16)
        try:
            attention(q, q, q)
        except ValueError as exc:
            print("ERROR", exc)
        out = attention(q, q, q, is_causal=True, fallback=True)
        print("FALLBACK", torch.equal(out, F.scaled_dot_product_attention(q, q, q, is_causal=True)))
        choice = dispatch.explain(q.half(), q.half(), q.half(), is_causal=True, arch="sm_90")
        print("PLANNED", choice.arch, choice.key)
        try:
            dispatch.explain(q, q, q)
        except ValueError as exc:
            print("OWN DEVICE", exc)
    """)
    env = repo_env(drop=("TRITON_INTERPRET",), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "ERROR q, k, v are on cpu" in result.stdout and "FALLBACK True" in result.stdout
    assert "PLANNED sm_90 sm_90/fwd/N=8/D=16/float16/causal" in result.stdout
    assert "OWN DEVICE q, k, v are on cpu" in result.stdout


def test_custom_op_passes_opcheck() -> None:
    q, k, v = qkv(nq=20, nk=36)
    torch.library.opcheck(torch.ops.flashtune.attention_fwd.default, (q, k, v, True, 0.25))
    torch.library.opcheck(torch.ops.flashtune.attention_fwd.default, (q, k, v, True, 0.25, 2.0))  # softcap


@pytest.mark.parametrize("dynamic, softcap", [(False, 0.0), (True, 0.0), (True, 3.0)])
def test_torch_compile_fullgraph_no_graph_breaks(dynamic: bool, softcap: float) -> None:
    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q * 2.0, k, v, is_causal=True, softcap=softcap).sum(dim=1)

    def want(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention_reference(q * 2.0, k, v, causal=True, softcap=softcap).sum(dim=1)

    q, k, v = qkv(nq=40, nk=40)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(block, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    close(compiled(q, k, v), want(q, k, v), torch.float32)
    q2, k2, v2 = qkv(nq=40 if not dynamic else 29, nk=40 if not dynamic else 53, seed=3)
    close(compiled(q2, k2, v2), want(q2, k2, v2), torch.float32)


def test_torch_compile_runs_a_masked_call_in_the_kernel() -> None:
    q, k, v = qkv()
    mask = torch.randn(24, 24, device=DEVICE)
    compiled = torch.compile(lambda a, b, c, m: attention(a, b, c, attn_mask=m), fullgraph=True, backend="aot_eager")
    close(compiled(q, k, v, mask), attention_reference(q, k, v, attn_mask=mask), torch.float32)


def test_torch_compile_reports_and_falls_back_for_unsupported_inputs() -> None:
    q = torch.randn(1, 1, 16, 20, device=DEVICE)  # head dim 20: not a kernel size
    strict = torch.compile(lambda a, b, c: attention(a, b, c), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="unsupported head dim 20"):  # Dynamo wraps it, message kept
        strict(q, q, q)
    lenient = torch.compile(lambda a, b, c: attention(a, b, c, fallback=True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(lenient(q, q, q), F.scaled_dot_product_attention(q, q, q))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    g = torch.randn(1, 1, 16, 20, generator=gen).to(DEVICE).requires_grad_(True)
    weights = torch.randn(1, 1, 16, 20, generator=gen).to(DEVICE)
    (lenient(g, g, g) * weights).sum().backward()  # SDPA's backward, through q, k and v alike
    gd = g.detach().double().requires_grad_(True)
    (attention_reference(gd, gd, gd) * weights.double()).sum().backward()
    close(g.grad, gd.grad, torch.float32)
