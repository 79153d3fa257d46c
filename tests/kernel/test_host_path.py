"""The host path: attention() relaunches the plan's compiled kernel directly (kernel.fastlaunch).

On the CPU the interpreter never takes the fast path (the plan keeps no launcher) and results are
unchanged; on a GPU the relaunch must give the JIT launch's output bitwise, fall back to the JIT for
pointers of another 16-byte alignment, for the kernel's pre-run hooks, and work under CUDA-graph capture.
"""
from __future__ import annotations

import pytest
import torch

from helpers.cuda_graphs import replay_matches_eager

from flashtune.kernel import attention, dispatch, fastlaunch
from flashtune.kernel.jit.fwd import attn_fwd_kernel
from flashtune.kernel.ops.fwd import launch
from flashtune.kernel.testing import attention_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _qkv(n: int = 70, d: int = 64, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(2, 3, n, d, device=DEVICE, dtype=dtype) for _ in range(3))


@pytest.mark.skipif(HAS_CUDA, reason="interpreter behaviour")
def test_interpreter_never_takes_the_fast_path() -> None:
    q, k, v = _qkv()
    with torch.no_grad():
        for _ in range(2):
            out = attention(q, k, v, is_causal=True)
            ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
            assert float((out.double() - ref).norm() / ref.norm()) < 2e-5
    assert fastlaunch.disabled()
    assert dispatch.plan(q, k, v, True).launchers == {}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relaunch_equals_the_jit_launch_bitwise(dtype: torch.dtype) -> None:
    q, k, v = _qkv(333, 128, dtype)
    plan = dispatch.plan(q, k, v, True)
    with torch.no_grad():
        attention(q, k, v, is_causal=True)  # the JIT launch: fills the plan's launcher
        assert plan.launchers.get(False), "the plan kept no launcher"
        runs = []
        attn_fwd_kernel.add_pre_run_hook(lambda *a, **kw: runs.append(1))
        try:
            want = launch(q, k, v, plan.shape, causal=True, scale=plan.default_scale, config=plan.kernel)[0]
        finally:
            attn_fwd_kernel.pre_run_hooks.clear()
        q2, k2, v2 = (t.clone() for t in (q, k, v))
        got = attention(q2, k2, v2, is_causal=True, scale=0.08)  # fresh pointers, another scale
        again = attention(q, k, v, is_causal=True)
    assert runs == [1]
    assert torch.equal(again, want)
    ref = launch(q2, k2, v2, plan.shape, causal=True, scale=0.08, config=plan.kernel)[0]
    assert torch.equal(got, ref)


@pytest.mark.gpu
def test_misaligned_pointers_and_pre_run_hooks_take_the_jit() -> None:
    base = torch.randn(2 * 3 * 64 * 64 + 4, device="cuda", dtype=torch.float16)
    q = base[4:].view(2, 3, 64, 64)  # 8 bytes past an aligned address: another specialisation
    k, v = (torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    aligned = q.clone()
    assert q.data_ptr() % 16 == 8
    with torch.no_grad():
        attention(aligned, k, v)  # specialised for aligned pointers, launcher kept
        plan = dispatch.plan(q, k, v, False)
        assert plan.launchers.get(False)
        got = attention(q, k, v)
        runs = []
        attn_fwd_kernel.add_pre_run_hook(lambda *a, **kw: runs.append(1))
        try:
            hooked = attention(aligned, k, v)
        finally:
            attn_fwd_kernel.pre_run_hooks.clear()
    ref = attention_reference(q.double(), k.double(), v.double(), causal=False)
    assert float((got.double() - ref).norm() / ref.norm()) < 2e-3
    assert runs == [1] and torch.equal(hooked, attention(aligned, k, v))


@pytest.mark.gpu
def test_cuda_graph_capture_replays_the_relaunch() -> None:
    q, k, v = _qkv(256, 64, torch.float16)
    assert replay_matches_eager(lambda: attention(q, k, v, is_causal=True), (q, k, v))
