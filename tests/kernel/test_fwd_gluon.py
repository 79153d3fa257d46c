"""The Gluon forward variant (kernel/ops/fwd_gluon.py): its knob and tile contract, refusals, shared-memory model
and tuner configs on CPU; its numerics against the fp64 reference on an sm_90 GPU (Gluon kernels do not run
under the interpreter). The CPU side also compiles one config for sm_90 offline and checks the PTX holds wgmma.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flashtune.db.types import Config
from flashtune.kernel.checks import check_inputs
from flashtune.kernel.ops.fwd import estimate_smem, fwd_variant
from flashtune.kernel.ops.fwd_gluon import (
    GLUON_AVAILABLE,
    GLUON_KNOBS,
    estimate_gluon_smem,
    gluon_candidates,
    gluon_config,
    gluon_constexprs,
    gluon_knobs,
    gluon_supported,
    launch_gluon,
)
from flashtune.kernel.testing import attention_reference, lse_reference
from flashtune.kernel.version import OP_KERNELS, closure
from helpers import qkv, rel

BOUNDS = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
H100_SMEM = 227 * 1024

needs_gluon = pytest.mark.skipif(not GLUON_AVAILABLE, reason="this Triton cannot build the Gluon kernel")


def test_knob_contract():
    assert gluon_knobs({}) == (False, False, "grid", 1)
    assert gluon_knobs({"loads": "gluon", "ws": True, "overlap": True, "schedule": "heavy_first", "consumers": 2}) == (
        True, True, "heavy_first", 2)
    with pytest.raises(ValueError, match="consumers=2 needs ws=true"):
        gluon_knobs({"consumers": 2})
    for bad in (3, True, "2"):
        with pytest.raises(ValueError, match="consumers="):
            gluon_knobs({"consumers": bad, "ws": True})
    with pytest.raises(ValueError, match="overlap=0"):
        gluon_knobs({"overlap": 0})
    with pytest.raises(ValueError, match="ws=1"):
        gluon_knobs({"ws": 1})
    for bad, words in (({"schedule": "wave"}, "schedule"), ({"loads": "tma"}, "loads"),
                       ({"swizzle": 2}, "unknown knob")):
        with pytest.raises(ValueError, match=words):
            gluon_knobs(bad)
    assert set(GLUON_KNOBS) == {"loads", "ws", "overlap", "schedule", "consumers"}


@needs_gluon
def test_knobs_reach_the_constexprs():
    # Every knob of GLUON_KNOBS but `loads` (which picks this kernel: test_fwd_variant_routes_loads_gluon).
    seen = {"ws": "WS", "overlap": "OVERLAP", "schedule": ("REVERSE", "PERSISTENT"), "consumers": "CONSUMERS"}
    assert set(seen) == set(GLUON_KNOBS) - {"loads"}
    plain = gluon_constexprs(gluon_config(128, 64, 8, 3), 128, causal=True, return_lse=False, scale=0.1)
    assert (plain["WS"], plain["OVERLAP"], plain["REVERSE"], plain["PERSISTENT"]) == (False, False, False, False)
    assert (plain["BLOCK_M"], plain["BLOCK_N"], plain["STAGES"], plain["num_warps"]) == (128, 64, 3, 8)
    for knob, value, constexpr, expected in (("ws", True, "WS", True), ("overlap", True, "OVERLAP", True),
                                             ("schedule", "heavy_first", "REVERSE", True)):
        config = gluon_config(128, 64, 8, 3, **{knob: value})
        assert gluon_constexprs(config, 128, causal=True, return_lse=False, scale=0.1)[constexpr] == expected
    assert gluon_constexprs(gluon_config(64, 64, 4, 2), 64, causal=False, return_lse=True, scale=-0.1)[
        "NEG_SCALE"]
    # two consumer partitions of 4 warps each: the launch's num_warps is one partition's
    cx = gluon_constexprs(gluon_config(128, 64, 8, 3, ws=True, consumers=2), 128, causal=True, return_lse=False,
                          scale=0.1)
    assert (cx["CONSUMERS"], cx["num_warps"], plain["CONSUMERS"]) == (2, 4, 1)
    # persistent: the strided grid, causally the costliest query blocks first
    persistent = gluon_config(128, 64, 8, 3, schedule="persistent")
    for causal in (False, True):
        cx = gluon_constexprs(persistent, 128, causal=causal, return_lse=False, scale=0.1)
        assert (cx["PERSISTENT"], cx["REVERSE"]) == (True, causal)


def test_config_tiles_are_checked():
    config = gluon_config(128, 128, 8, 2, ws=True, overlap=True, schedule="heavy_first")
    assert str(config) == 'm128-n128-w8-s2+{"loads":"gluon","overlap":true,"schedule":"heavy_first","ws":true}'
    assert Config.parse(str(config)) == config
    two = gluon_config(128, 64, 8, 3, ws=True, consumers=2)
    assert two.extra_dict["consumers"] == 2 and "consumers" not in gluon_config(128, 64, 8, 3).extra_dict
    with pytest.raises(ValueError, match="two consumer partitions"):
        gluon_config(64, 64, 4, 2, ws=True, consumers=2)
    for args, words in (((128, 128, 4, 2), "num_warps=4"), ((32, 64, 2, 2), "block_m=32"),
                        ((128, 32, 8, 2), "block_n=32"), ((64, 64, 4, 1), "num_stages=1")):
        with pytest.raises(ValueError, match=words):
            gluon_config(*args)


@needs_gluon
def test_fwd_variant_routes_loads_gluon():
    variant = fwd_variant(gluon_config(64, 64, 4, 3))
    assert variant.launch is launch_gluon
    with pytest.raises(ValueError, match="num_warps"):
        fwd_variant(Config(128, 128, 4, 2, (("loads", "gluon"),)))
    with pytest.raises(ValueError, match="unknown knob"):
        fwd_variant(Config(128, 128, 8, 2, (("loads", "gluon"), ("num_splits", 2))))


COMPILED_SMEM = [((128, 128, 8, 2), 64, 82236), ((128, 64, 8, 3), 64, 65900), ((64, 128, 4, 2), 64, 74044),
                 ((128, 128, 8, 3), 64, 115052), ((128, 128, 8, 2), 128, 164156), ((128, 64, 8, 3), 128, 131436),
                 ((64, 128, 4, 2), 128, 147772), ((128, 128, 8, 3), 128, 229740)]


def test_smem_estimate_matches_compiled_figures():
    # metadata.shared of sm_90 compiles with ws on (bench/gluon_compile_check.py, Triton 3.6): (tile, D, bytes).
    for tile, head_dim, shared in COMPILED_SMEM:
        config = gluon_config(*tile, ws=True)
        need = estimate_gluon_smem(config, head_dim, "float16", "sm_90")
        assert shared <= need <= shared + 512, (tile, head_dim)
        assert estimate_smem(config, head_dim, "float16", "sm_90") == need
    for tile, head_dim, shared in (((128, 128, 8, 2), 128, 164296), ((128, 64, 8, 3), 128, 131576)):
        need = estimate_gluon_smem(gluon_config(*tile, ws=True, consumers=2), head_dim, "float16", "sm_90")
        assert shared <= need <= shared + 512, ("consumers=2", tile, head_dim)


def test_candidates_only_on_sm90_for_its_head_dims_and_dtypes():
    assert gluon_candidates("sm_80", 128, "float16", True, H100_SMEM) == []
    assert gluon_candidates("sm_90", 96, "float16", True, H100_SMEM) == []
    assert gluon_candidates("sm_90", 128, "float32", True, H100_SMEM) == []
    configs = gluon_candidates("sm_90", 128, "float16", True, H100_SMEM)
    if not GLUON_AVAILABLE:
        assert configs == []
        return
    assert configs and all(c.extra_dict["loads"] == "gluon" for c in configs)
    assert {(c.extra_dict["ws"], c.extra_dict["overlap"]) for c in configs} == {
        (False, False), (False, True), (True, False), (True, True)}
    two = [c for c in configs if c.extra_dict.get("consumers") == 2]
    assert two and all(c.extra_dict["ws"] and c.block_m == 128 for c in two)
    assert all(estimate_gluon_smem(c, 128, "float16", "sm_90") <= H100_SMEM for c in configs)
    full = gluon_candidates("sm_90", 64, "bfloat16", False, H100_SMEM)
    assert {c.extra_dict["schedule"] for c in full} == {"grid", "persistent"}  # heavy_first: equal blocks


def test_supported_names_the_reason():
    if not GLUON_AVAILABLE:
        assert "Gluon" in gluon_supported("sm_90", 64, "float16")
        return
    assert "sm_90" in gluon_supported("sm_80", 128, "float16")
    assert "head dim 256" in gluon_supported("sm_90", 256, "float16")
    assert "float32" in gluon_supported("sm_90", 128, "float32")
    assert gluon_supported("sm_90", 64, "bfloat16") is None


def test_fwd_version_hashes_the_gluon_kernel():
    reached = closure(OP_KERNELS["fwd"])
    assert "jit/fwd_gluon:attn_fwd_gluon_kernel" in reached
    assert "jit/fwd_gluon:_gl_consumer" in reached and "jit/fwd_gluon:_gl_producer" in reached


@needs_gluon
def test_launch_refuses_cpu_tensors_before_running():
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(1, 2, 2, 32, 32, 64, torch.float16, "cpu", gen)
    with pytest.raises(ValueError, match="CUDA device"):
        launch_gluon(q, k, v, check_inputs(q, k, v), causal=True, scale=0.125, config=gluon_config(64, 64, 4, 2))


@needs_gluon
def test_compiles_to_wgmma_for_sm90_without_a_gpu():
    # In a child process: this one runs under the interpreter (conftest), where Gluon compiles nothing.
    script = Path(__file__).resolve().parents[2] / "bench" / "gluon_compile_check.py"
    code = (f"import importlib.util as u; s = u.spec_from_file_location('cc', {str(script)!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); "
            "c = m.compile_one(m._load_kernel(), 'fp16', 64, 128, 64, 2, ws=True, causal=True, overlap=True, "
            "persistent=True, consumers=2); "
            "p = c.asm['ptx']; print('wgmma.mma_async' in p, 'cp.async.bulk.tensor' in p)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["True", "True"], run.stdout


# --- on the GPU --------------------------------------------------------------------------------------------

# Two tiles per (dtype, ws, overlap), each tile meeting every combination across the parameters.
GPU_TILES = {False: [(128, 128, 8, 2), (64, 64, 4, 3)], True: [(128, 64, 8, 3), (64, 128, 4, 2)]}
# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal): lengths no tile divides, GQA, cross attention.
# Sizes are not specialised on: these cases share three binaries per config (D=64 causal, D=128 both ways).
GPU_CASES = [(2, 4, 2, 300, 300, 64, True), (1, 4, 4, 257, 257, 128, False), (1, 2, 1, 511, 511, 128, True),
             (1, 2, 2, 100, 333, 64, True), (1, 2, 2, 333, 100, 128, True), (2, 2, 2, 256, 256, 128, False)]


def _gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from flashtune.kernel.device import device_arch
    return gluon_supported(device_arch(0), 128, "float16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ws", [False, True], ids=["ws0", "ws1"])
@pytest.mark.parametrize("overlap", [False, True], ids=["ov0", "ov1"])
def test_gpu_matches_fp64_reference(dtype, ws, overlap):
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(4242 + ws + 2 * overlap)
    bad = []
    for i, case in enumerate(GPU_CASES):
        q, k, v = qkv(*case[:6], dtype, "cuda", gen)
        causal = case[-1]
        scale = 1.0 / math.sqrt(case[5])
        ref = attention_reference(q, k, v, causal=causal, scale=scale)
        ref_lse = lse_reference(q, k, causal=causal, scale=scale)
        for j, tile in enumerate(GPU_TILES[ws != overlap]):
            # The schedules rotate over the cases and tiles.
            schedule = ("grid", "heavy_first", "persistent")[(i + j + ws) % 3] if causal else ("grid", "persistent")[
                (i + j) % 2]
            config = gluon_config(*tile, ws=ws, overlap=overlap, schedule=schedule)
            if estimate_gluon_smem(config, case[5], str(dtype).removeprefix("torch.")) > H100_SMEM:
                continue
            problem = _problem(q, k, v, config, causal, scale, ref, ref_lse, dtype)
            if problem:
                bad.append(f"{problem} {case}")
    assert not bad, "\n".join(bad)


def _problem(q, k, v, config, causal, scale, ref, ref_lse, dtype) -> str | None:
    """Why `config`'s output (written into a NaN-filled buffer) or its LSE (when `ref_lse` is given) is off the
    float64 reference, or None."""
    o, lse, _ = launch_gluon(q, k, v, check_inputs(q, k, v), causal=causal, scale=scale, config=config,
                             return_lse=ref_lse is not None, out=torch.full_like(q, float("nan")))
    err = rel(o, ref) if torch.isfinite(o).all() else math.inf
    lse_err = 0.0 if ref_lse is None else (lse.double() - ref_lse).abs().max().item()
    if err < BOUNDS[dtype] and lse_err < 1e-2:
        return None
    return f"{config}: relative error {err:.3g}, LSE error {lse_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_persistent_strides_over_many_units(dtype):
    # 2·16·640 rows: 160 units of 128 rows, 320 of 64, more than any H100/H200 has SMs, so programs take
    # several units each and the K/V ring and Q barrier carry on from one to the next.
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(77)
    bad = []
    for d, causal in ((128, True), (64, False)):
        q, k, v = qkv(2, 16, 8, 640, 640, d, dtype, "cuda", gen)
        ref = attention_reference(q, k, v, causal=causal, scale=d ** -0.5)
        for tile, ws, overlap, consumers in (((128, 128, 8, 2), True, True, 1), ((128, 64, 8, 3), False, True, 1),
                                             ((64, 128, 4, 2), True, False, 1), ((128, 128, 8, 2), False, False, 1),
                                             ((128, 128, 8, 2), True, True, 2), ((128, 64, 8, 3), True, False, 2)):
            config = gluon_config(*tile, ws=ws, overlap=overlap, schedule="persistent", consumers=consumers)
            problem = _problem(q, k, v, config, causal, d ** -0.5, ref, None, dtype)
            if problem:
                bad.append(f"{problem} D={d} causal={causal}")
    assert not bad, "\n".join(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("overlap", [False, True], ids=["ov0", "ov1"])
def test_gpu_two_consumer_partitions(dtype, overlap):
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(31 + overlap)
    bad = []
    for i, case in enumerate(GPU_CASES):
        q, k, v = qkv(*case[:6], dtype, "cuda", gen)
        causal = case[-1]
        scale = 1.0 / math.sqrt(case[5])
        ref = attention_reference(q, k, v, causal=causal, scale=scale)
        ref_lse = lse_reference(q, k, causal=causal, scale=scale)
        for j, tile in enumerate([(128, 128, 8, 2), (128, 64, 8, 3)]):
            schedule = ("grid", "heavy_first", "persistent")[(i + j) % 3] if causal else "grid"
            config = gluon_config(*tile, ws=True, overlap=overlap, schedule=schedule, consumers=2)
            problem = _problem(q, k, v, config, causal, scale, ref, ref_lse, dtype)
            if problem:
                bad.append(f"{problem} {case}")
    assert not bad, "\n".join(bad)


@pytest.mark.gpu
def test_gpu_refuses_modifiers_and_layouts_cleanly():
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    from flashtune.kernel.mods import check_mods

    gen = torch.Generator().manual_seed(9)
    q, k, v = qkv(1, 2, 2, 64, 64, 64, torch.float16, "cuda", gen)
    shape = check_inputs(q, k, v)
    config = gluon_config(64, 64, 4, 2)
    mods = check_mods(shape, q.device, softcap=30.0)
    with pytest.raises(ValueError, match="score modifiers"):
        launch_gluon(q, k, v, shape, causal=False, scale=0.125, config=config, mods=mods)
    q96, k96, v96 = qkv(1, 2, 2, 64, 64, 96, torch.float16, "cuda", gen)
    with pytest.raises(ValueError, match="head dim 96"):
        launch_gluon(q96, k96, v96, check_inputs(q96, k96, v96), causal=False, scale=0.1, config=config)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # head dim not contiguous
    with pytest.raises(ValueError, match="contiguous head dim"):
        launch_gluon(qt, k, v, check_inputs(qt, k, v), causal=False, scale=0.125, config=config)
