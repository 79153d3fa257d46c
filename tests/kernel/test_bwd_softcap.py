"""The backward with logit softcapping against float64 autograd through the capped reference attention.

The forward's O and natural-log LSE of the capped scores come from the float64 reference (cast to the input
dtype and fp32), so these tests check the backward kernels alone.
"""
from __future__ import annotations

import math

import pytest
import torch

from flashtune.db.types import Config
from flashtune.kernel.checks import check_bwd_inputs
from flashtune.kernel.jit.common import softcap_factors
from flashtune.kernel.mods import ScoreMods
from flashtune.kernel.ops.bwd import attention_bwd, default_bwd_config, launch_bwd
from flashtune.kernel.testing import attention_reference, lse_reference

from helpers import rel

# Relative-norm error bounds of dQ, dK, dV against float64 autograd on the same (rounded) inputs, with
# scores of magnitude ~5 and caps down to 2 (tanh saturated for many scores). Over CASES x CONFIGS fp32
# with IEEE dots measures at most 1.3e-6 (15x margin) and fp16 at most 5.4e-4 (7x margin), as the uncapped
# backward (test_bwd.py, same bounds); bf16 has 3 fewer mantissa bits (8x the fp16 bound; GPU only).
BOUNDS = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 2e-5}

# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, softcap)
CASES = [
    (1, 2, 2, 7, 7, 32, True, 2.0),        # shorter than every tile
    (1, 2, 2, 37, 37, 64, False, 2.0),
    (1, 4, 2, 29, 29, 32, True, 2.0),      # GQA: dK/dV summed over 2 query heads
    (1, 4, 1, 23, 23, 16, False, 5.0),     # MQA
    (1, 2, 2, 13, 41, 80, True, 2.0),      # cross lengths, padded head dim
    (1, 4, 2, 41, 19, 48, False, 30.0),    # a cap well above the scores: close to uncapped
]

# Interpreter-sized configs: block_m <, = and > block_n, the dQ pass's own tiles, and the atomic variant.
CONFIGS = [
    (Config(16, 16, 2, 1), True),
    (Config(16, 32, 2, 1, {"deterministic": False}), False),   # atomic dQ
    (Config(32, 16, 4, 2, {"block_m_dq": 16, "block_n_dq": 32}), True),
    (Config(16, 32, 4, 1, {"deterministic": False, "block_m_dq": 32, "block_n_dq": 16}), False),  # atomic dQ
]

SCORE_SCALE = math.sqrt(5.0)  # q and k times this: scaled scores of standard deviation ~5


def _ids(case):
    return "b{}h{}/{}n{}x{}d{}{}-cap{:g}".format(*case[:6], "c" if case[6] else "", case[7])


def _inputs(case, dtype, device, seed):
    b, hq, hkv, nq, nk, d = case[:6]
    gen = torch.Generator().manual_seed(seed)

    def draw(h, n, gain=1.0):
        return (torch.randn(b, h, n, d, generator=gen) * gain).to(device, dtype)

    return draw(hq, nq, SCORE_SCALE), draw(hkv, nk, SCORE_SCALE), draw(hkv, nk), draw(hq, nq)


def _forward(q, k, v, causal, softcap, scale=None):
    """O (q's dtype) and the natural-log LSE (fp32) of the capped attention, from the float64 reference."""
    o = attention_reference(q, k, v, causal=causal, scale=scale, softcap=softcap).to(q.dtype)
    lse = lse_reference(q, k, causal=causal, scale=scale, softcap=softcap).float()
    return o, lse


def _reference_grads(q, k, v, do, causal, softcap, scale=None):
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    attention_reference(qd, kd, vd, causal=causal, scale=scale, softcap=softcap).backward(do.double())
    return qd.grad, kd.grad, vd.grad


def _run(q, k, v, do, causal, softcap, config, deterministic=True):
    """launch_bwd into NaN-poisoned buffers (every element must be written)."""
    o, lse = _forward(q, k, v, causal, softcap)
    shape = check_bwd_inputs(do, q, k, v, o, lse)
    out = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    dq, dk, dv, _ = launch_bwd(do, q, k, v, o, lse, shape, causal=causal, scale=1.0 / math.sqrt(q.shape[-1]),
                               config=config, deterministic=deterministic, out=out, mods=ScoreMods(softcap=softcap))
    return dq, dk, dv


def _check(case, dtype, config, deterministic, device, seed):
    q, k, v, do = _inputs(case, dtype, device, seed)
    causal, softcap = case[6], case[7]
    grads = _run(q, k, v, do, causal, softcap, config, deterministic)
    refs = _reference_grads(q, k, v, do, causal, softcap)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, refs):
        assert g.dtype == dtype and g.shape == ref.shape
        err = rel(g, ref, floor=0.1)
        assert err < BOUNDS[dtype], f"{_ids(case)} {dtype} {config}: {name} relative error {err:.2e}"


def test_inputs_saturate_the_cap():
    # The cases must exercise tanh's flat tails, where the cap's derivative 1 − tanh² is far from 1.
    q, k, _, _ = _inputs(CASES[0], torch.float32, "cpu", seed=0)
    scores = (q @ k.transpose(-1, -2)).abs() / math.sqrt(q.shape[-1])
    assert (scores > 5.0).float().mean() > 0.2


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_fp64_autograd(case, dtype, kernel_device):
    i = CASES.index(case) + (dtype == torch.float16)
    config, deterministic = CONFIGS[i % len(CONFIGS)]
    _check(case, dtype, config, deterministic, kernel_device, seed=100 * CASES.index(case) + i)


@pytest.mark.parametrize("config, deterministic", CONFIGS[:2], ids=["dq-pass", "atomic-dq"])
def test_both_dq_variants_pass_the_cap(config, deterministic, kernel_device, launches):
    # The flag reaches every kernel that recomputes P, with the factors softcap_factors gives.
    case = (1, 4, 2, 19, 19, 32, True, 2.0)
    _check(case, torch.float16, config, deterministic, kernel_device, seed=7)
    scale = 1.0 / math.sqrt(32)
    recompute = [launch for launch in launches if launch.name in ("attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")]
    assert [launch.name for launch in recompute] == (
        ["attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"] if deterministic else ["attn_bwd_dkdv_kernel"])
    for launch in recompute:
        assert launch.kwargs["SOFTCAP"] is True
        assert launch.args[-2:] == softcap_factors(scale, 2.0)


def test_checked_entry_point_takes_softcap(kernel_device):
    case = (1, 4, 2, 21, 21, 64, True, 3.0)
    q, k, v, do = _inputs(case, torch.float32, kernel_device, seed=11)
    o, lse = _forward(q, k, v, True, 3.0, scale=0.3)
    grads = attention_bwd(do, q, k, v, o, lse, causal=True, scale=0.3, softcap=3.0)
    for g, ref in zip(grads, _reference_grads(q, k, v, do, True, 3.0, scale=0.3)):
        assert rel(g, ref, floor=0.1) < BOUNDS[torch.float32]


def test_the_cap_changes_the_gradients(kernel_device):
    # Capped and uncapped gradients differ far beyond the bounds: the tests above would see a backward that
    # ignored the cap (or only its derivative).
    case = CASES[2]
    q, k, v, do = _inputs(case, torch.float32, kernel_device, seed=12)
    for capped, plain in zip(_reference_grads(q, k, v, do, True, 2.0), _reference_grads(q, k, v, do, True, 0.0)):
        assert rel(plain, capped, floor=0.1) > 0.1


def test_softcap_zero_is_the_uncapped_backward(kernel_device, launches):
    # 0.0 (and 0) is off: the SOFTCAP=False kernels, bitwise the call without the argument.
    # (tests/kernel/test_output_hashes.py checks those against the fingerprints taken before softcap existed.)
    case = (1, 2, 1, 17, 17, 32, True, 0.0)
    q, k, v, do = _inputs(case, torch.float32, kernel_device, seed=13)
    o, lse = _forward(q, k, v, True, 0.0, scale=0.2)
    shape = check_bwd_inputs(do, q, k, v, o, lse)
    kwargs = dict(causal=True, scale=0.2, config=Config(16, 16, 2, 1))
    base = launch_bwd(do, q, k, v, o, lse, shape, **kwargs)[:3]
    for off in (0.0, 0):
        assert all(torch.equal(a, b) for a, b in zip(base, launch_bwd(do, q, k, v, o, lse, shape, **kwargs,
                                                                      mods=ScoreMods(softcap=off))[:3]))
    assert {launch.kwargs["SOFTCAP"] for launch in launches if "SOFTCAP" in launch.kwargs} == {False}
    for g, ref in zip(base, _reference_grads(q, k, v, do, True, 0.0, scale=0.2)):
        assert rel(g, ref, floor=0.1) < BOUNDS[torch.float32]


@pytest.mark.parametrize("softcap", [-1.0, float("nan"), float("inf"), -0.5, "2", True, None, [2.0]],
                         ids=repr)
@pytest.mark.parametrize("entry", ["launch_bwd", "attention_bwd"])
def test_bad_softcap_is_named(entry, softcap, kernel_device, launches):
    q, k, v, do = _inputs((1, 2, 2, 8, 8, 32, False, 0.0), torch.float16, kernel_device, seed=14)
    o, lse = _forward(q, k, v, False, 0.0)
    with pytest.raises(ValueError, match="softcap must be 0 .off. or a finite number > 0"):
        if entry == "launch_bwd":
            launch_bwd(do, q, k, v, o, lse, check_bwd_inputs(do, q, k, v, o, lse), causal=False, scale=0.1,
                       config=Config(16, 16, 2, 1), mods=ScoreMods(softcap=softcap))
        else:
            attention_bwd(do, q, k, v, o, lse, causal=False, scale=None, softcap=softcap)
    assert launches == []


# --- GPU: fp16 and bf16 at real sizes ------------------------------------------------------------------

GPU_CASES = [
    (2, 8, 8, 1000, 1000, 64, True, 2.0),
    (2, 8, 2, 1024, 1024, 128, False, 50.0),   # Gemma 2's attention cap
    (1, 8, 1, 777, 777, 128, True, 5.0),       # MQA, ragged edge
    (1, 4, 4, 513, 1531, 96, True, 2.0),       # cross
    (1, 4, 4, 600, 600, 256, True, 2.0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=_ids)
def test_gpu_grid(case, dtype):
    from flashtune.kernel.device import device_arch

    default = default_bwd_config(device_arch(0), case[5], str(dtype).removeprefix("torch."))
    atomic = Config(default.block_m, default.block_n, default.num_warps, default.num_stages,
                    {**default.extra_dict, "deterministic": False})
    q, k, v, do = _inputs(case, dtype, "cuda", seed=GPU_CASES.index(case))
    causal, softcap = case[6], case[7]
    o, lse = _forward(q, k, v, causal, softcap)
    refs = _reference_grads(q, k, v, do, causal, softcap)
    for config, deterministic in ((None, True), (atomic, False)):
        runs = [attention_bwd(do, q, k, v, o, lse, causal=causal, scale=None, config=config,
                              deterministic=deterministic, softcap=softcap) for _ in range(2)]
        for name, g, ref in zip(("dq", "dk", "dv"), runs[0], refs):
            err = rel(g, ref, floor=0.1)
            assert err < BOUNDS[dtype], f"{_ids(case)} {dtype} {config}: {name} relative error {err:.2e}"
        if deterministic:
            assert all(torch.equal(a, b) for a, b in zip(*runs)), "deterministic=True must be bitwise reproducible"
