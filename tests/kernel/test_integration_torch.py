"""route_sdpa(): SDPA calls whose key the database says the kernel won run flashtune; the rest stay with torch.

A real SQLite database holds three sm_90 keys: one the kernel won, one SDPA's flash backend won, and
one the nearest rule reaches; calls are planned for sm_90 (`arch=`) and run on the CPU (the Triton
interpreter). Whether the kernel ran is observed through Triton's pre-run hook on the forward kernel.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from flashtune.db.types import Config
from flashtune.kernel import dispatch
from flashtune.kernel.jit.fwd import attn_fwd_kernel
from flashtune.kernel.integrations import torch as ft_torch
from flashtune.kernel.testing import attention_reference
from flashtune.kernel.providers import provider_config
from flashtune.kernel.version import OP_VERSIONS
from helpers.dispatch import build_db, key
from helpers import rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def tuned(tmp_path: Path, restore_table: None) -> Iterator[None]:
    """sm_90, fp32, D=16, B·H=2: N=64 causal won by the kernel, N=32 causal won by SDPA flash."""
    url = build_db(tmp_path / "tuned.db", [
        (key(64, d=16, dtype="float32", causal=True, bh=2), Config(32, 32, 4, 2), 0.01, OP_VERSIONS["fwd"]),
        (key(32, d=16, dtype="float32", causal=True, bh=2), provider_config("sdpa_flash"), 0.005, OP_VERSIONS["fwd"]),
    ])
    dispatch.reload(url, archs=["sm_90"])
    ft_torch.reset_route_counts()
    yield


@pytest.fixture
def kernel_runs() -> Iterator[list[int]]:
    """How many times the forward kernel is launched (Triton's pre-run hook)."""
    calls: list[int] = []

    def hook(*args: object, **kwargs: object) -> None:
        calls.append(1)

    attn_fwd_kernel.add_pre_run_hook(hook)
    yield calls
    attn_fwd_kernel.pre_run_hooks.remove(hook)


def _qkv(n: int, d: int = 16) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(1, 2, n, d, device=DEVICE) for _ in range(3))




def test_a_key_the_kernel_won_runs_flashtune(tuned: None, kernel_runs: list[int]) -> None:
    q, k, v = _qkv(64)
    with ft_torch.route_sdpa(arch="sm_90"):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        near = F.scaled_dot_product_attention(*_qkv(80), is_causal=True)  # nearest rule: N=80 -> the N=64 key
    assert len(kernel_runs) == 2 and ft_torch.route_counts() == {"kernel": 2}
    assert rel(out, attention_reference(q.double(), k.double(), v.double(), causal=True)) < 2e-5
    assert near.shape == (1, 2, 80, 16)


def test_every_other_call_stays_with_torch(tuned: None, kernel_runs: list[int]) -> None:
    q, k, v = _qkv(64)
    mask = torch.rand(64, 64, device=DEVICE) > 0.3
    with ft_torch.route_sdpa(arch="sm_90"):
        won_by_sdpa = F.scaled_dot_product_attention(*_qkv(32), is_causal=True)
        untuned = F.scaled_dot_product_attention(*_qkv(64, d=32), is_causal=True)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        non_causal = F.scaled_dot_product_attention(q, k, v)  # a key with nothing tuned (causal=False)
    assert kernel_runs == []
    counts = ft_torch.route_counts()
    assert counts == {"sdpa_flash won this key": 1, "not tuned (default)": 2, "attn_mask": 1}
    assert torch.equal(masked, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(non_causal, F.scaled_dot_product_attention(q, k, v))
    assert won_by_sdpa.shape == (1, 2, 32, 16) and untuned.shape == (1, 2, 64, 32)


def test_routing_ends_with_the_block_and_enable_disable(tuned: None, kernel_runs: list[int]) -> None:
    q, k, v = _qkv(64)
    with ft_torch.route_sdpa(arch="sm_90"):
        pass
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert kernel_runs == [] and ft_torch.route_counts() == {}
    ft_torch.enable(arch="sm_90")
    try:
        with pytest.raises(RuntimeError, match="already enabled"):
            ft_torch.enable()
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    finally:
        ft_torch.disable()
    ft_torch.disable()  # a no-op now
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert len(kernel_runs) == 1 and ft_torch.route_counts() == {"kernel": 1}


def test_cpu_tensors_without_an_arch_are_not_planned(tuned: None, kernel_runs: list[int]) -> None:
    if DEVICE != "cpu":
        pytest.skip("CPU behaviour")
    with ft_torch.route_sdpa():
        F.scaled_dot_product_attention(*_qkv(64), is_causal=True)
    assert kernel_runs == [] and list(ft_torch.route_counts()) == [
        "not planned (CPU tensors: pass arch= to plan for a GPU)"]
