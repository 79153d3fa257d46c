"""Logit softcapping in the split-KV decode: c·tanh(s/c) on the scaled scores before the softmax.

Against the float64 reference with the same cap (`attention_kvcache_reference(..., softcap=c)`), on CPU under
the interpreter (fp32, fp16) or on CUDA (the `gpu` tests: fp16, bf16): explicit configs with the kernel's
outputs NaN-poisoned first, the planned path (one plan serving capped and uncapped calls), the transformers
entry point, a decode key won by an SDPA backend (which has no cap), and the argument check. Scores are
drawn at about ±5 so that a cap of 2 saturates: an uncapped kernel is far from the capped reference.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flashtune.db.types import Config, Key, bucket
from flashtune.kernel import attention_kvcache, dispatch
from flashtune.kernel.checks import check_kvcache_inputs
from flashtune.kernel.dispatch import kv_bucket
from flashtune.kernel.kvcache import run_planned
from flashtune.kernel.mods import NO_MODS, ScoreMods
from flashtune.kernel.mods import capped as capped_mods
from flashtune.kernel.ops.kvcache import SPLITS_KNOB, decode_partials, launch_decode, plan_decode
from flashtune.kernel.providers import provider_config
from flashtune.kernel.testing import attention_kvcache_reference
from helpers import dtypes, rel

HAS_CUDA = torch.cuda.is_available()
BOUNDS = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 2e-5}
SCORE_STD = 5.0  # the scaled scores' spread: a cap of 2 saturates most of them


def cfg(block_m: int, block_n: int, splits: int, warps: int = 2, stages: int = 1) -> Config:
    return Config(block_m, block_n, warps, stages, ((SPLITS_KNOB, splits),))


# (batch, heads_q, heads_kv, seq_q, n_max, head_dim, causal, lengths or None, config, softcap)
CASES = [
    (1, 2, 2, 1, 40, 16, False, None, cfg(16, 16, 1), 2.0),          # one split, no lengths
    (2, 4, 2, 1, 70, 24, False, [1, 70], cfg(16, 16, 3), 2.0),       # GQA, ragged, 3 splits, padded D
    (2, 4, 1, 3, 50, 32, True, [3, 50], cfg(16, 16, 3), 2.0),        # MQA, causal bottom-right, ragged
    (1, 4, 2, 4, 45, 16, True, None, cfg(16, 16, 2), 2.0),           # causal without lengths, 2 splits
    (2, 2, 2, 2, 33, 16, True, [33, 0], cfg(16, 32, 1), 2.0),        # an empty slot, one split
    (1, 2, 1, 1, 64, 16, False, [64], cfg(16, 16, 4), 30.0),         # a mild cap (tanh near linear)
]


def _ids(case) -> str:
    b, hq, hkv, nq, nmax, d, causal, lens, config, cap = case
    flags = ("c" if causal else "") + ("r" if lens else "")
    return f"b{b}h{hq}/{hkv}q{nq}n{nmax}d{d}{flags}-s{config.extra_dict[SPLITS_KNOB]}-cap{cap:g}"


def _inputs(case, dtype, device, seed):
    b, hq, hkv, nq, nmax, d, _, lens, _, _ = case
    gen = torch.Generator().manual_seed(seed)
    mk = lambda h, n: torch.randn(b, h, n, d, generator=gen, dtype=torch.float32)  # noqa: E731
    q = (mk(hq, nq) * SCORE_STD).to(device, dtype)  # scale·q·k then has a std of SCORE_STD
    seqlens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)
    return q, mk(hkv, nmax).to(device, dtype), mk(hkv, nmax).to(device, dtype), seqlens


def _check_explicit(case, dtype, device, seed, config=None):
    q, k, v, seqlens = _inputs(case, dtype, device, seed)
    causal, cap = case[6], case[9]
    config = config or case[8]
    shape = check_kvcache_inputs(q, k, v)
    plan = plan_decode(config, batch=shape.batch, heads_kv=shape.heads_kv, group=shape.group, seq_q=shape.seq_q,
                       seq_kv=shape.seq_k, head_dim=shape.head_dim, ragged=seqlens is not None)
    out = torch.full_like(q, float("nan"))
    partials = tuple(t.fill_(float("nan")) for t in decode_partials(shape, plan, q.device))
    o, _ = launch_decode(q, k, v, shape, cache_seqlens=seqlens, causal=causal, scale=1 / math.sqrt(case[5]),
                         config=config, out=out, partials=partials, mods=ScoreMods(softcap=cap))
    ref = attention_kvcache_reference(q, k, v, cache_seqlens=seqlens, causal=causal, softcap=cap)
    err = rel(o, ref)
    assert err < BOUNDS[dtype], f"{_ids(case)} {dtype} {config}: relative error {err:.2e}"
    if cap < 10:  # the cap matters here: the uncapped result is far from the capped one
        assert rel(attention_kvcache_reference(q, k, v, cache_seqlens=seqlens, causal=causal), ref) > 0.05
    # The public explicit-config path, which checks the cap, gives the same.
    again = attention_kvcache(q, k, v, cache_seqlens=seqlens, causal=causal, config=config, softcap=cap)
    assert rel(again, ref) < BOUNDS[dtype]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_explicit_configs_match_the_capped_reference(case, kernel_device):
    for i, dtype in enumerate(dtypes(kernel_device, fp32_on_gpu=False)):
        _check_explicit(case, dtype, kernel_device, seed=100 * CASES.index(case) + i)


@pytest.mark.parametrize("causal,lens", [(False, None), (True, [37, 5]), (False, [20, 37])])
def test_one_plan_serves_capped_and_uncapped_calls(causal, lens, kernel_device):
    """The planned path: the memoised plan of a signature runs capped and uncapped calls alike, each right."""
    dtype = torch.float16 if kernel_device == "cuda" else torch.float32
    case = (2, 4, 2, 2, 37, 16, causal, lens, None, 2.0)
    plans = set()
    for step, cap in enumerate((0.0, 2.0, 0.0, 7.5, 2.0)):
        q, k, v, seqlens = _inputs(case, dtype, kernel_device, seed=500 + step)
        got = attention_kvcache(q, k, v, cache_seqlens=seqlens, causal=causal, softcap=cap)
        ref = attention_kvcache_reference(q, k, v, cache_seqlens=seqlens, causal=causal, softcap=cap)
        assert rel(got, ref) < BOUNDS[dtype], (step, cap)
        plans.add(id(dispatch.kvcache_plan(q, k, v, causal, seqlens is not None)))
    assert len(plans) == 1


def test_run_planned_takes_the_modifiers_as_a_keyword_and_keeps_its_positional_call(kernel_device):
    """The transformers integration's positional call is unchanged; the modifiers are a keyword after it."""
    dtype = torch.float16 if kernel_device == "cuda" else torch.float32
    case = (1, 4, 2, 1, 29, 16, True, [29], None, 2.0)
    q, k, v, seqlens = _inputs(case, dtype, kernel_device, seed=77)
    with torch.no_grad():
        plain = run_planned(q, k, v, seqlens, True, 0.3, False)
        capped = run_planned(q, k, v, seqlens, True, 0.3, False, mods=capped_mods(2.0))
    assert rel(plain, attention_kvcache_reference(q, k, v, cache_seqlens=seqlens, causal=True, scale=0.3)) \
        < BOUNDS[dtype]
    assert rel(capped, attention_kvcache_reference(q, k, v, cache_seqlens=seqlens, causal=True, scale=0.3,
                                                   softcap=2.0)) < BOUNDS[dtype]


@pytest.mark.parametrize("bad", [-1.0, -0.5, float("nan"), float("inf"), float("-inf"), "2", True, None, 10**400],
                         ids=lambda x: "1e400" if x == 10**400 else repr(x))
@pytest.mark.parametrize("explicit", [False, True])
def test_a_bad_cap_is_a_clear_error(bad, explicit):
    q, k, v, _ = _inputs((1, 2, 1, 1, 8, 16, False, None, None, 0.0), torch.float32, "cpu", seed=3)
    config = cfg(16, 16, 1) if explicit else None
    with pytest.raises(ValueError, match="softcap"):
        attention_kvcache(q, k, v, softcap=bad, config=config)


def test_int_and_zero_caps_are_accepted(kernel_device):
    dtype = torch.float16 if kernel_device == "cuda" else torch.float32
    q, k, v, _ = _inputs((1, 2, 1, 1, 20, 16, False, None, None, 0.0), dtype, kernel_device, seed=4)
    for cap in (0, 0.0, 2, np.float32(2.5)):
        got = attention_kvcache(q, k, v, softcap=cap)
        assert rel(got, attention_kvcache_reference(q, k, v, softcap=float(cap))) < BOUNDS[dtype]


# --- a decode key won by an SDPA backend: SDPA has no cap ------------------------------------------

ARCH = dispatch.INTERPRETER_ARCH
B, HQ, HKV, NK, D = 2, 4, 2, 40, 16
FALLBACK = Config(16, 16, 2, 1, {"num_splits": 2})  # the kernel config stored beside the backend's win


@pytest.mark.skipif(HAS_CUDA, reason="routes CPU tensors under the interpreter")
def test_a_capped_call_is_its_own_key_and_never_runs_an_uncapped_sdpa_winner(tuned_table, launches):
    key = Key(ARCH, "kvcache", 1, D, "float32", True, seq_len_kv=kv_bucket(NK), batch_heads=bucket(B * HQ),
              group=HQ // HKV)
    tuned_table([(key, provider_config("sdpa_flash"), FALLBACK)])
    q, k, v, _ = _inputs((B, HQ, HKV, 1, NK, D, True, None, None, 2.0), torch.float32, "cpu", seed=9)
    plan = dispatch.kvcache_plan(q, k, v, True, False, (("softcap", True),))
    assert plan.choice.key.softcap and plan.choice.source == "default" and plan.sdpa is None
    out = attention_kvcache(q, k, v, causal=True, softcap=2.0)
    split = [x for x in launches if x.name == "decode_split_kernel"]
    assert [(x.kwargs["BLOCK_N"], x.kwargs["SOFTCAP"]) for x in split] == [(plan.choice.config.block_n, True)]
    assert rel(out, attention_kvcache_reference(q, k, v, causal=True, softcap=2.0)) < 2e-5
    launches.clear()
    out = attention_kvcache(q, k, v, causal=True)  # uncapped: the backend's win again
    assert launches == []
    assert rel(out, attention_kvcache_reference(q, k, v, causal=True), floor=0.1) < 2e-5


def test_an_uncapped_call_compiles_the_uncapped_variant(launches, kernel_device):
    """softcap=0.0 launches SOFTCAP=False (today's kernel, bitwise: tests/kernel/test_output_hashes.py)."""
    dtype = torch.float16 if kernel_device == "cuda" else torch.float32
    q, k, v, _ = _inputs((1, 2, 1, 1, 20, 16, False, None, None, 0.0), dtype, kernel_device, seed=5)
    attention_kvcache(q, k, v, config=cfg(16, 16, 2))
    attention_kvcache(q, k, v, config=cfg(16, 16, 2), softcap=3.0)
    assert [x.kwargs["SOFTCAP"] for x in launches if x.name == "decode_split_kernel"] == [False, True]


# --- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("warps,stages", [(4, 2), (4, 3)])
def test_gpu_grid_fp16_bf16(warps, stages):
    """The CPU cases on CUDA in fp16 and bf16, with real warp and pipeline counts."""
    for n, case in enumerate(CASES):
        config = Config(case[8].block_m, case[8].block_n, warps, stages, case[8].extra)
        for i, dtype in enumerate((torch.float16, torch.bfloat16)):
            _check_explicit(case, dtype, "cuda", seed=7000 + 10 * n + i, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_relaunched_steps_alternating_caps_equal_the_jit_launch_bitwise(dtype):
    """The direct relaunch keeps a capped and an uncapped launcher per plan and picks by the call's cap."""
    torch.manual_seed(2)
    b, hq, hkv, d, n = 1, 32, 8, 128, 1020
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=dtype) for _ in range(2))
    with torch.no_grad():
        for step in range(24):
            cap = (0.0, 2.0, 50.0)[step % 3]
            q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype) * SCORE_STD
            lens = torch.tensor([n - step % 5], dtype=torch.int32, device="cuda") if step % 2 else None
            got = attention_kvcache(q, k, v, cache_seqlens=lens, causal=True, softcap=cap)
            plan = dispatch.kvcache_plan(q, k, v, True, lens is not None)
            want = launch_decode(q, k, v, check_kvcache_inputs(q, k, v), cache_seqlens=lens, causal=True,
                                 scale=plan.default_scale, config=plan.choice.config,
                                 mods=ScoreMods(softcap=cap) if cap else NO_MODS)[0]
            assert torch.equal(got, want), (step, cap)
            ref = attention_kvcache_reference(q, k, v, cache_seqlens=lens, causal=True, dtype=torch.float32,
                                              softcap=cap)
            assert rel(got, ref.double()) < BOUNDS[dtype]
        caps = {key[1] for key in plan.launch.launchers}
    assert caps == {False, True}
