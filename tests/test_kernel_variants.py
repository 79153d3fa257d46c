"""Config.extra reaching the kernel (kernel.variants) and the kernel version (kernel.version)."""
from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest

from flashtune.db.types import Config
from flashtune.kernel import version
from flashtune.kernel.fwd import _fwd_tiles, attn_fwd_kernel
from flashtune.kernel.variants import FWD_KNOBS, PLAIN_FWD, Knob, fwd_variant, resolve_variant

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


@pytest.mark.parametrize("name, knob", sorted(FWD_KNOBS.items()) or [pytest.param(None, None, marks=pytest.mark.skip(
    reason="the forward kernel has no knobs yet"))])
def test_registered_knobs_set_a_constexpr_of_their_kernel(name: str, knob: Knob) -> None:
    constexprs = {p for p, ann in inspect.get_annotations(attn_fwd_kernel.fn).items() if "constexpr" in str(ann)}
    assert knob.name == name and knob.constexpr in constexprs and knob.constexpr not in LAUNCH_CONSTEXPRS
    for value in knob.values:
        assert fwd_variant(Config(64, 32, 4, 2, extra={name: value})).constexprs == {knob.constexpr: value}


# --- the kernel version ----------------------------------------------------------------------------

def test_version_covers_every_file_that_defines_a_jit_function() -> None:
    defining = {p for p in KERNEL_DIR.rglob("*.py")
                if any(line.strip().startswith("@triton.jit") for line in p.read_text().splitlines())}
    assert set(version.jit_sources()) == defining
    for fn in (attn_fwd_kernel, _fwd_tiles):
        assert Path(inspect.getsourcefile(fn.fn)).resolve() in defining
    assert KERNEL_DIR / "launch.py" not in defining  # launch code changes do not retire tuning results
    assert version.KERNEL_VERSION == version.source_hash() and len(version.KERNEL_VERSION) == 12


def test_version_changes_with_any_jit_file_and_only_with_them(tmp_path: Path) -> None:
    for name in ("fwd.py", "launch.py"):
        shutil.copy(KERNEL_DIR / name, tmp_path / name)
    base = version.source_hash(tmp_path)
    (tmp_path / "launch.py").write_text((tmp_path / "launch.py").read_text() + "\n# a comment\n")
    assert version.source_hash(tmp_path) == base
    (tmp_path / "fwd.py").write_text((tmp_path / "fwd.py").read_text() + "\n# a comment\n")
    changed = version.source_hash(tmp_path)
    assert changed != base
    sub = tmp_path / "variants_dir"
    sub.mkdir()
    (sub / "decode_new.py").write_text("import triton\n\n\n@triton.jit\ndef k(X):\n    pass\n")
    assert version.source_hash(tmp_path) != changed
    assert [p.name for p in version.jit_sources(tmp_path)] == ["fwd.py", "decode_new.py"]


# --- the loads knob selects the kernel file ----------------------------------------------------------

def test_loads_tma_routes_attention_fwd_to_the_tensor_descriptor_kernel() -> None:
    import torch

    from flashtune.db.smem import estimate_ptr_smem, estimate_smem
    from flashtune.kernel.fwd_tma import launch_tma, tma_config
    from flashtune.kernel.launch import attention_fwd
    from flashtune.kernel.reference import attention_reference

    config = tma_config(32, 16, 4, 2, schedule="heavy_first")
    assert fwd_variant(config).launch is launch_tma
    assert estimate_smem(config, 64, "float16", "sm_90") != estimate_ptr_smem(config, 64, "float16", "sm_90")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    q, k, v = (torch.randn(1, 2, 37, 16, generator=gen) for _ in range(3))
    out = attention_fwd(q, k, v, causal=True, config=config)
    ref = attention_reference(q, k, v, causal=True)
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-5
    with pytest.raises(ValueError, match="schedule"):
        fwd_variant(Config(32, 16, 4, 2, extra={"loads": "tma", "schedule": "spiral"}))
    with pytest.raises(ValueError, match="loads='cp.async' is not one of 'ptr', 'tma'"):
        fwd_variant(Config(32, 16, 4, 2, extra={"loads": "cp.async"}))
