"""Head dims: every multiple of 8 up to 256 (flash_attn's rule), forward and backward, pointer and TMA
kernels and the KV-cache path, against float64 references; everything else refused by name.

On CPU under the interpreter (tiny shapes, fp32 and fp16) or on CUDA (fp16 and bf16). The new head
dims run through a power-of-two tile of at least 16 columns (kernel.ops.common.padded_head_dim); every output
buffer is NaN-poisoned first, so a column the kernel fails to write shows up.
"""
from __future__ import annotations

import math

import pytest
import torch

from flashtune.db.arch import ARCH_SMEM
from flashtune.kernel.ops.fwd import estimate_ptr_smem, estimate_smem
from flashtune.kernel.ops.fwd_tma import estimate_tma_smem
from flashtune.kernel.ops.common import padded_head_dim
from flashtune.db.types import HEAD_DIMS, Config, Key
from flashtune.kernel import attention, attention_kvcache
from flashtune.kernel.ops.bwd import attention_bwd, launch_bwd
from flashtune.kernel.checks import check_bwd_inputs
from flashtune.kernel.ops.bwd import default_bwd_config, estimate_bwd_smem
from flashtune.kernel.ops.fwd import default_config
from flashtune.kernel.ops.fwd_tma import launch_tma, tma_candidates, tma_config, tma_supported
from flashtune.kernel.ops.fwd import attention_fwd, launch
from flashtune.kernel.checks import check_inputs
from flashtune.kernel.testing import attention_reference
from flashtune.tuner.ranges import parse_head_dims
from helpers import dtypes, qkv, rel

NEW_DIMS = (8, 24, 48, 72, 200)
REFUSED = (7, 12, 264)
ACCEPTED_TEXT = "multiple of 8 from 8 to 256"
FWD_BOUNDS = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 2e-5}
BWD_BOUNDS = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 2e-5}  # as tests/kernel/test_bwd.py






def _qkv(d: int, dtype: torch.dtype, device: str, seed: int, *, b=1, hq=2, hkv=1, nq=19, nk=23):
    return qkv(b, hq, hkv, nq, nk, d, dtype, device, torch.Generator().manual_seed(seed))


def test_one_list_of_head_dims():
    assert HEAD_DIMS == tuple(range(8, 257, 8))
    assert [padded_head_dim(d) for d in NEW_DIMS] == [16, 32, 64, 128, 256]
    for d in NEW_DIMS:
        assert Key("sm_90", "fwd", 128, d, "float16", False).head_dim == d
    assert parse_head_dims("8,24,48,72,200") == list(NEW_DIMS)


@pytest.mark.parametrize("d", NEW_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_pointer_and_tma_match_fp64(d, causal, kernel_device):
    for i, dtype in enumerate(dtypes(kernel_device, fp32_on_gpu=False)):
        q, k, v = _qkv(d, dtype, kernel_device, seed=100 * d + 10 * causal + i)
        ref = attention_reference(q, k, v, causal=causal)
        shape = check_inputs(q, k, v)
        runs = [("ptr", launch, Config(16, 16, 2, 1)), ("ptr", launch, Config(32, 16, 4, 2))]
        if tma_supported(None if kernel_device == "cpu" else "sm_90", d, q, k, v) is None and (
                kernel_device == "cpu" or torch.cuda.get_device_capability()[0] >= 9):
            runs.append(("tma", launch_tma, tma_config(16, 16, 2, 1)))
        for name, run, config in runs:
            out = torch.full_like(q, float("nan"))
            o, _, _ = run(q, k, v, shape, causal=causal, scale=1 / math.sqrt(d), config=config, out=out)
            assert o is out and torch.isfinite(o).all(), f"{name} D={d} {dtype}: unwritten output"
            err = rel(o, ref)
            assert err < FWD_BOUNDS[dtype], f"{name} {config} D={d} {dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("d", NEW_DIMS)
def test_backward_matches_fp64_autograd(d, kernel_device):
    for i, dtype in enumerate(dtypes(kernel_device, fp32_on_gpu=False)):
        q, k, v = _qkv(d, dtype, kernel_device, seed=7 * d + i, hq=4, hkv=2, nq=13, nk=17)
        do = torch.randn_like(q)
        causal = bool(i % 2)
        qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
        attention_reference(qd, kd, vd, causal=causal).backward(do.double())
        o, lse = attention_fwd(q, k, v, causal=causal, return_lse=True)
        shape = check_bwd_inputs(do, q, k, v, o, lse)
        out = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
        grads = launch_bwd(do, q, k, v, o, lse, shape, causal=causal, scale=1 / math.sqrt(d),
                           config=Config(16, 16, 2, 1), out=out)[:3]
        for name, g, ref in zip(("dq", "dk", "dv"), grads, (qd.grad, kd.grad, vd.grad)):
            assert torch.isfinite(g).all(), f"D={d} {dtype}: {name} has unwritten (NaN) elements"
            err = rel(g, ref)
            assert err < BWD_BOUNDS[dtype], f"D={d} {dtype}: {name} relative error {err:.2e}"


@pytest.mark.parametrize("d", [8, 72])
def test_attention_trains_through_the_new_head_dims(d, kernel_device):
    """attention() with autograd, the dispatcher's default configs for fwd and bwd."""
    dtype = torch.float32 if kernel_device == "cpu" else torch.float16
    q, k, v = (t.requires_grad_() for t in _qkv(d, dtype, kernel_device, seed=d, nq=11, nk=11, hkv=2))
    attention(q, k, v, is_causal=True).sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    attention_reference(qd, kd, vd, causal=True).sum().backward()
    for g, ref in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert rel(g, ref) < BWD_BOUNDS[dtype]


@pytest.mark.parametrize("d", REFUSED)
def test_other_head_dims_are_refused_naming_the_rule(d, kernel_device):
    q, k, v = _qkv(d, torch.float32, kernel_device, seed=d, nq=3, nk=3)
    for call in (lambda: attention(q, k, v), lambda: attention_fwd(q, k, v),
                 lambda: attention_kvcache(q, k, v),
                 lambda: attention_bwd(q, q, k, v, q, q[..., 0].float(), causal=False, scale=None)):
        with pytest.raises(ValueError, match=f"unsupported head dim {d}: .*{ACCEPTED_TEXT}"):
            call()
    with pytest.raises(ValueError, match=ACCEPTED_TEXT):
        Key("sm_90", "fwd", 128, d, "float16", False)
    with pytest.raises(ValueError, match=f"unsupported head dim.*{ACCEPTED_TEXT}"):
        parse_head_dims(f"64,{d}")
    assert ACCEPTED_TEXT in tma_supported("sm_90", d)


def test_smem_estimates_use_the_padded_tile():
    # D=8 runs in a 16-column tile, D=200 in 256: the estimate is the padded head dim's.
    config = Config(64, 32, 4, 2)
    for d in NEW_DIMS:
        p = padded_head_dim(d)
        for arch in ("sm_80", "sm_90", None):
            assert estimate_ptr_smem(config, d, "float16", arch) == estimate_ptr_smem(config, p, "float16", arch)
            assert estimate_bwd_smem(config, d, "float16", arch) == estimate_bwd_smem(config, p, "float16", arch)
        tma = tma_config(64, 32, 4, 2)
        assert estimate_tma_smem(tma, d, "float16", "sm_90") == estimate_tma_smem(tma, p, "float16", "sm_90")


@pytest.mark.parametrize("arch", sorted(ARCH_SMEM))
def test_defaults_fit_every_arch_at_every_head_dim(arch):
    for d in HEAD_DIMS:
        for dtype in ("float16", "bfloat16"):
            assert estimate_smem(default_config(arch, d, dtype), d, dtype, arch) <= ARCH_SMEM[arch]
            assert estimate_bwd_smem(default_bwd_config(arch, d, dtype), d, dtype, arch) <= ARCH_SMEM[arch]


def test_tma_candidates_for_every_head_dim_on_hopper_only():
    for d in HEAD_DIMS:
        assert tma_supported("sm_90", d) is None
        configs = tma_candidates("sm_90", d, "float16", True, ARCH_SMEM["sm_90"])
        assert configs and all(estimate_tma_smem(c, d, "float16", "sm_90") <= ARCH_SMEM["sm_90"] for c in configs)
        assert tma_candidates("sm_86", d, "float16", True, ARCH_SMEM["sm_86"]) == []
