"""Config.extra reaching the kernel (kernel.ops.fwd)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashtune.db.types import Config
from flashtune.kernel import version
from flashtune.kernel.jit.fwd import attn_fwd_kernel
from flashtune.kernel.ops.bwd import BWD_EXTRA_KEYS, bwd_knobs
from flashtune.kernel.ops.kvcache import SPLITS_KNOB
from flashtune.kernel.ops.fwd_tma import TMA_KNOBS
from flashtune.kernel.ops.fwd import FWD_KNOBS, Knob, LOADS, LOADS_KNOB, PLAIN_FWD, fwd_variant, resolve_variant
from helpers import rel

KERNEL_DIR = Path(version.__file__).resolve().parent
# What launch() passes itself: a knob setting one of these would collide with it.
LAUNCH_CONSTEXPRS = {"HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "CAUSAL", "STORE_LSE", "PRECISION"}


def test_a_config_without_knobs_is_the_plain_kernel() -> None:
    assert fwd_variant(Config(64, 32, 4, 2)) == PLAIN_FWD
    assert PLAIN_FWD.kernel is attn_fwd_kernel and dict(PLAIN_FWD.constexprs) == {}


def test_knobs_become_constexprs_and_anything_else_is_refused() -> None:
    knobs = {"loads": Knob("loads", ("ptr", "tma"), "LOADS"), "ws": Knob("ws", (False, True), "WS")}
    variant = resolve_variant(Config(64, 32, 4, 2, extra={"loads": "tma", "ws": True}), knobs, attn_fwd_kernel)
    assert variant.kernel is attn_fwd_kernel and dict(variant.constexprs) == {"LOADS": "tma", "WS": True}
    with pytest.raises(ValueError, match=r"does not know the knob 'splits' \(known knobs: loads, ws\)"):
        resolve_variant(Config(64, 32, 4, 2, extra={"splits": 2}), knobs, attn_fwd_kernel)
    with pytest.raises(ValueError, match=r"knob loads='cp\.async' is not one of 'ptr', 'tma'"):
        resolve_variant(Config(64, 32, 4, 2, extra={"loads": "cp.async"}), knobs, attn_fwd_kernel)
    with pytest.raises(ValueError, match="knob ws=1 is not one of False, True"):  # 1 == True, but not a bool
        resolve_variant(Config(64, 32, 4, 2, extra={"ws": 1}), knobs, attn_fwd_kernel)


def test_the_forward_kernel_refuses_every_knob_today() -> None:
    with pytest.raises(ValueError, match=r"m64-n32-w4-s2\+\{\"ws\":true\}: the kernel does not know the knob 'ws' "
                                         r"\(known knobs: none\)"):
        fwd_variant(Config(64, 32, 4, 2, extra={"ws": True}))


# --- every registered knob reaches the kernel it is for ---------------------------------------------
# Each op's knobs, a value other than its default, and how a launch shows it: the kernel Triton was
# asked to run, a constexpr, a launch option or the grid. The pointer forward kernel registers no knob
# of its own (FWD_KNOBS is empty; test_the_forward_kernel_refuses_every_knob_today); its knobs are
# `loads`, which picks the kernel file, and the TMA kernel's. Each table must name every knob its op
# registers, so a new knob fails here until a test sees it reach the kernel.

_FWD_KERNELS = {"attn_fwd_kernel": "ptr", "attn_fwd_tma_kernel": "tma"}


def _schedule(launch) -> str:
    # The TMA kernel's `reverse` argument is the heavy-first flag; PERSISTENT picks the strided grid.
    from flashtune.kernel.jit.fwd_tma import attn_fwd_tma_kernel

    reverse = launch.args[attn_fwd_tma_kernel.arg_names.index("reverse")]
    return "persistent" if launch.kwargs["PERSISTENT"] else "heavy_first" if reverse == 1 else "grid"


FWD_SEEN = {
    LOADS_KNOB: lambda launch: _FWD_KERNELS[launch.name],
    "ws": lambda launch: launch.kwargs["WS"],
    "schedule": _schedule,
}
# The Gluon variant's kernel cannot run under the interpreter: its knobs are checked to reach the kernel's
# constexprs in tests/kernel/test_fwd_gluon.py (test_knobs_reach_the_constexprs) and on the GPU there.
FWD_CASES = [{LOADS_KNOB: value} for value in LOADS if value != "gluon"] + [
    {LOADS_KNOB: "tma", name: value} for name, values in TMA_KNOBS.items() if name != LOADS_KNOB for value in values]


def test_the_tables_name_every_registered_knob() -> None:
    assert set(FWD_SEEN) == {LOADS_KNOB, *FWD_KNOBS, *TMA_KNOBS}
    assert set(BWD_SEEN) == set(BWD_EXTRA_KEYS)
    assert set(KVCACHE_SEEN) == {SPLITS_KNOB}




@pytest.mark.parametrize("extra", FWD_CASES, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_forward_knobs_reach_the_kernel(extra: dict, kernel_device: str, launches) -> None:
    from flashtune.kernel.checks import check_inputs
    from flashtune.kernel.ops.fwd import launch
    from flashtune.kernel.testing import attention_reference

    config = Config(16, 16, 2, 1, extra=extra)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    q, k, v = (torch.randn(1, 2, 37, 16, generator=gen).to(kernel_device) for _ in range(3))
    out, _, _ = launch(q, k, v, check_inputs(q, k, v), causal=True, scale=0.25, config=config,
                       out=torch.full_like(q, float("nan")))
    [launched] = launches
    for name, value in extra.items():
        assert FWD_SEEN[name](launched) == value, (name, value, launched.name, launched.kwargs)
    assert rel(out, attention_reference(q, k, v, causal=True, scale=0.25)) < 2e-5


BWD_BASE = Config(16, 16, 2, 1)  # dQ pass defaults: tiles 16 x 16, 2 warps, 1 stage; deterministic


def _dq_pass(launches):
    [dq] = [launch for launch in launches if launch.name == "attn_bwd_dq_kernel"]
    return dq


BWD_SEEN = {
    "block_m_dq": lambda launches: _dq_pass(launches).kwargs["BLOCK_M"],
    "block_n_dq": lambda launches: _dq_pass(launches).kwargs["BLOCK_N"],
    "num_warps_dq": lambda launches: _dq_pass(launches).kwargs["num_warps"],
    "num_stages_dq": lambda launches: _dq_pass(launches).kwargs["num_stages"],
    # False: dQ is added with atomics in the dK/dV kernel (the call below allows it), then converted.
    "deterministic": lambda launches: not [x for x in launches if x.name == "attn_bwd_dkdv_kernel"][0].kwargs[
        "ATOMIC_DQ"] and not any(x.name == "attn_bwd_dq_convert_kernel" for x in launches),
}
BWD_VALUES = {"block_m_dq": 32, "block_n_dq": 32, "num_warps_dq": 4, "num_stages_dq": 2, "deterministic": False}


@pytest.mark.parametrize("name", sorted(BWD_VALUES))
def test_backward_knobs_reach_the_kernels(name: str, kernel_device: str, launches) -> None:
    from flashtune.kernel.checks import check_bwd_inputs
    from flashtune.kernel.ops.bwd import launch_bwd
    from flashtune.kernel.ops.fwd import attention_fwd
    from flashtune.kernel.testing import attention_reference

    value = BWD_VALUES[name]
    base = bwd_knobs(BWD_BASE)
    assert getattr(base, name) != value  # the value is not the default: the launch must change
    config = Config(BWD_BASE.block_m, BWD_BASE.block_n, BWD_BASE.num_warps, BWD_BASE.num_stages, extra={name: value})
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    q, k, v, do = (torch.randn(1, 2, 37, 16, generator=gen).to(kernel_device) for _ in range(4))
    o, lse = attention_fwd(q, k, v, causal=True, scale=0.25, return_lse=True)
    poison = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    grads = launch_bwd(do, q, k, v, o, lse, check_bwd_inputs(do, q, k, v, o, lse), causal=True, scale=0.25,
                       config=config, deterministic=False, out=poison)[:3]
    assert BWD_SEEN[name]([x for x in launches if x.name.startswith("attn_bwd")]) == value
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    attention_reference(*ref, causal=True, scale=0.25).backward(do.double())
    for got, want in zip(grads, ref):
        assert rel(got, want.grad) < 2e-5


def _splits(launches) -> int:
    # Pass 1 runs num_m_blocks x splits x B x Hkv programs (here 1 x splits x 1 x 1); pass 2 combines
    # the splits' partial results and runs exactly when there are several.
    [split] = [x for x in launches if x.name == "decode_split_kernel"]
    combined = [x for x in launches if x.name == "decode_combine_kernel"]
    assert len(combined) == (split.grid[0] > 1) and split.kwargs["SPLIT"] is (split.grid[0] > 1)
    return split.grid[0]


KVCACHE_SEEN = {SPLITS_KNOB: _splits}


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_kvcache_knobs_reach_the_kernels(splits: int, kernel_device: str, launches) -> None:
    from flashtune.kernel.checks import check_kvcache_inputs
    from flashtune.kernel.ops.kvcache import launch_decode
    from flashtune.kernel.testing import attention_kvcache_reference

    config = Config(16, 16, 2, 1, extra={SPLITS_KNOB: splits})
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    q = torch.randn(1, 2, 1, 16, generator=gen).to(kernel_device)  # one KV head for 2 query heads
    k, v = (torch.randn(1, 1, 64, 16, generator=gen).to(kernel_device) for _ in range(2))  # 4 key tiles of 16
    out, _ = launch_decode(q, k, v, check_kvcache_inputs(q, k, v), cache_seqlens=None, causal=False, scale=0.25,
                           config=config, out=torch.full_like(q, float("nan")))
    assert KVCACHE_SEEN[SPLITS_KNOB](launches) == splits
    assert rel(out, attention_kvcache_reference(q, k, v, scale=0.25)) < 2e-5


def test_every_tma_candidate_of_the_tuner_resolves_to_the_tma_launch() -> None:
    # The knobs the tuner's Hopper space writes are all ones the dispatcher's check accepts.
    from flashtune.kernel.ops.fwd_tma import launch_tma, tma_candidates

    configs = tma_candidates("sm_90", 64, "float16", True, 227 * 1024)
    assert configs and {c.extra_dict["schedule"] for c in configs} == set(TMA_KNOBS["schedule"])
    assert all(fwd_variant(c).launch is launch_tma for c in configs)



# --- the loads knob selects the kernel file ----------------------------------------------------------

def test_loads_tma_routes_attention_fwd_to_the_tensor_descriptor_kernel(kernel_device: str) -> None:
    import torch

    from flashtune.kernel.ops.fwd import estimate_ptr_smem, estimate_smem
    from flashtune.kernel.ops.fwd_tma import launch_tma, tma_config
    from flashtune.kernel.ops.fwd import attention_fwd
    from flashtune.kernel.testing import attention_reference

    config = tma_config(32, 16, 4, 2, schedule="heavy_first")
    assert fwd_variant(config).launch is launch_tma
    assert estimate_smem(config, 64, "float16", "sm_90") != estimate_ptr_smem(config, 64, "float16", "sm_90")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    dtype, bound = (torch.float16, 2e-3) if kernel_device == "cuda" else (torch.float32, 2e-5)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=gen).to(kernel_device, dtype) for _ in range(3))
    out = attention_fwd(q, k, v, causal=True, config=config)
    ref = attention_reference(q, k, v, causal=True)
    assert float((out.double() - ref).norm() / ref.norm()) < bound
    with pytest.raises(ValueError, match="schedule"):
        fwd_variant(Config(32, 16, 4, 2, extra={"loads": "tma", "schedule": "spiral"}))
    with pytest.raises(ValueError, match="loads='cp.async' is not one of 'ptr', 'tma'"):
        fwd_variant(Config(32, 16, 4, 2, extra={"loads": "cp.async"}))
