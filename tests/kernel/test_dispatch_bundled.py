"""The bundled layer of the dispatcher: winners shipped in the wheel, under the user's database and over the
defaults, for the GPU model they were measured on only. Real bundle files (exported from real SQLite files by
db.exchange) in a temporary FLASHTUNE_BUNDLED_DIR; the GPU model is given to `reload(gpus=...)`."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch
from flashtune.db import bundled, exchange
from flashtune.db.types import Config, Key
from flashtune.kernel import attention, dispatch
from flashtune.kernel.ops import smem_need
from flashtune.kernel.testing import attention_reference
from flashtune.kernel.version import OP_VERSIONS
from helpers import qkv, rel
from helpers.bundled import A100, H100_PCIE, H100_SXM, write_bundle
from helpers.dispatch import build_db, key

BUNDLED_CFG = Config(64, 64, 4, 3)
USER_CFG = Config(128, 32, 8, 2)


@pytest.fixture
def bundle_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_table: None) -> Path:
    where = tmp_path / "bundled"
    where.mkdir()
    monkeypatch.setenv(bundled.DIR_ENV_VAR, str(where))
    monkeypatch.delenv(bundled.ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.CONFIG_ENV_VAR, raising=False)
    return where


def empty_db(tmp_path: Path) -> str:
    return build_db(tmp_path / "user.db", [])


def load(url: str, *gpus: bundled.GpuModel, **kw: bool) -> dispatch.LoadInfo:
    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.DispatchWarning)
        return dispatch.reload(url, gpus=gpus, **kw)


def ask(n: int, **kw: object) -> dispatch.Choice:
    return dispatch.lookup("sm_90", n, 64, "float16", False, **kw)


def test_bundled_beats_the_default(bundle_dir: Path, tmp_path: Path) -> None:
    write_bundle(bundle_dir, [(key(1024), BUNDLED_CFG)])
    info = load(empty_db(tmp_path), H100_SXM)
    assert info.bundled == 1 and "1 bundled winner(s) from 1 file(s)" in info.bundled_message
    choice = ask(1024)
    assert (choice.config, choice.source, choice.layer) == (BUNDLED_CFG, dispatch.EXACT, dispatch.BUNDLED)
    assert "bundled" in choice.reason and "(bundled exact)" in str(choice)
    assert choice.winner is not None and choice.winner.gpu_name == H100_SXM.name and not choice.stale
    # The nearest rule reaches bundled keys as it reaches the user's.
    near = ask(2048)
    assert (near.config, near.source, near.layer) == (BUNDLED_CFG, dispatch.NEAREST, dispatch.BUNDLED)
    assert ask(1 << 16).source == dispatch.DEFAULT  # far from every key: the default


def test_user_database_beats_bundled(bundle_dir: Path, tmp_path: Path) -> None:
    write_bundle(bundle_dir, [(key(1024), BUNDLED_CFG), (key(256), BUNDLED_CFG)])
    url = build_db(tmp_path / "user.db", [(key(1024), USER_CFG, 0.04, OP_VERSIONS["fwd"]),
                                          (key(512), USER_CFG, 0.04, OP_VERSIONS["fwd"])])
    load(url, H100_SXM)
    exact = ask(1024)
    assert (exact.config, exact.source, exact.layer) == (USER_CFG, dispatch.EXACT, dispatch.DATABASE)
    # The user's nearest key (512) comes before a bundled exact one (256): user exact, user nearest, bundled.
    near = ask(256)
    assert (near.config, near.source, near.layer) == (USER_CFG, dispatch.NEAREST, dispatch.DATABASE)
    assert "bundled" not in near.reason


def test_off_switch(bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_bundle(bundle_dir, [(key(1024), BUNDLED_CFG)])
    monkeypatch.setenv(bundled.ENV_VAR, "0")
    info = load(empty_db(tmp_path), H100_SXM)
    assert info.bundled == 0 and "off" in info.bundled_message
    assert ask(1024).source == dispatch.DEFAULT


def test_another_model_of_the_arch_is_ignored_unless_opted_in(bundle_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    write_bundle(bundle_dir, [(key(1024), BUNDLED_CFG)], H100_SXM)
    url = empty_db(tmp_path)
    assert load(url, H100_PCIE).bundled == 0 and ask(1024).source == dispatch.DEFAULT
    # Same name, other SM count (a cut-down part, a MIG slice): another model too.
    assert load(url, bundled.GpuModel(H100_SXM.name, "sm_90", 66)).bundled == 0
    # Two models of one arch in one machine: the arch's table is shared, so model mode takes neither.
    assert load(url, H100_SXM, H100_PCIE).bundled == 0
    monkeypatch.setenv(bundled.ENV_VAR, "arch")
    assert load(url, H100_PCIE).bundled == 1
    choice = ask(1024)
    assert (choice.config, choice.layer) == (BUNDLED_CFG, dispatch.BUNDLED)
    assert load(url, A100).bundled == 0  # never another arch


def test_arch_mode_prefers_the_own_model(bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_bundle(bundle_dir, [(key(1024), BUNDLED_CFG)], H100_SXM)
    write_bundle(bundle_dir, [(key(1024), USER_CFG)], H100_PCIE)
    monkeypatch.setenv(bundled.ENV_VAR, "arch")
    url = empty_db(tmp_path)
    load(url, H100_PCIE)
    assert ask(1024).config == USER_CFG
    load(url, H100_SXM)
    assert ask(1024).config == BUNDLED_CFG


def test_stale_bundled_winner_is_skipped_and_explained(bundle_dir: Path, tmp_path: Path) -> None:
    path = write_bundle(bundle_dir, [(key(1024), BUNDLED_CFG)], kernel_version="0123456789ab")
    info = load(empty_db(tmp_path), H100_SXM)
    assert info.bundled == 0 and "1 skipped" in info.bundled_message and bundled.REGENERATE in info.bundled_message
    assert info.bundled_left_out == 1
    choice = ask(1024)
    assert choice.source == dispatch.DEFAULT and choice.layer is None
    assert "0123456789ab" in choice.reason and OP_VERSIONS["fwd"] in choice.reason and "not used" in choice.reason
    # The release check reports the same winner, naming the command that regenerates it.
    [line] = bundled.stale_winners([path], OP_VERSIONS)
    assert path.name in line and "0123456789ab" in line
    with pytest.raises(AssertionError, match="bash bench/make_bundle.sh"):
        assert_bundles_current([path])


def _runs_bundled_config(device: str, gpu: bundled.GpuModel, bundle_dir: Path, tmp_path: Path,
                         **kw: bool) -> None:
    """A bundled winner for `gpu`'s key of a small call is what explain() names and what the call runs;
    the output matches float64 attention."""
    n = 64
    write_bundle(bundle_dir, [(key(n, arch=gpu.arch, bh=2), BUNDLED_CFG)], gpu)
    build_db(tmp_path / "user.db", [])
    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.DispatchWarning)
        info = dispatch.reload(f"sqlite:///{tmp_path / 'user.db'}", **kw)
    assert info.bundled == 1, info
    q, k, v = qkv(1, 2, 2, n, n, 64, torch.float16, device, torch.Generator().manual_seed(7))
    choice = dispatch.explain(q, k, v)
    assert (choice.config, choice.source, choice.layer) == (BUNDLED_CFG, dispatch.EXACT, dispatch.BUNDLED)
    assert "bundled" in str(choice)
    assert dispatch.plan(q, k, v, False).kernel == BUNDLED_CFG
    out = attention(q, k, v)
    assert rel(out, attention_reference(q.double(), k.double(), v.double())) < 2e-3


def test_cpu_call_runs_the_bundled_config(bundle_dir: Path, tmp_path: Path) -> None:
    _runs_bundled_config("cpu", A100, bundle_dir, tmp_path, gpus=[A100], interpreter=True)


@pytest.mark.gpu
def test_the_visible_gpu_takes_its_own_models_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    """On a GPU: the dispatcher matches the real device (no stand-in), so its own model's bundle applies."""
    gpu = dispatch.visible_gpus()[0]
    _runs_bundled_config("cuda", gpu, bundle_dir, tmp_path)


def test_unreadable_bundle_warns_and_never_raises(bundle_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (bundle_dir / bundled.file_name(H100_SXM.name)).write_text('{"format": "flashtune-winners", "winners": [{}]}')
    with pytest.warns(dispatch.DispatchWarning, match="ignoring a bundled file.*winners\\[0\\]"):
        info = dispatch.reload(empty_db(tmp_path), gpus=[H100_SXM])
    assert info.bundled == 0 and "1 unreadable" in info.bundled_message
    (bundle_dir / bundled.file_name(H100_SXM.name)).unlink()
    monkeypatch.setenv(bundled.ENV_VAR, "sometimes")
    with pytest.warns(dispatch.DispatchWarning, match="FLASHTUNE_BUNDLED='sometimes'"):
        dispatch.reload(empty_db(tmp_path), gpus=[H100_SXM])


def test_every_key_field_round_trips(bundle_dir: Path) -> None:
    keys = [Key("sm_90", "fwd", 512, 128, "bfloat16", True, seq_len_kv=1024, batch_heads=8, group=4, window=256,
                softcap=True, sinks=True, alibi=True, dropout=True, mask="bool"),
            Key("sm_90", "kvcache", 1, 128, "float16", True, seq_len_kv=4096, batch_heads=32, group=8)]
    path = write_bundle(bundle_dir, [(k, BUNDLED_CFG) for k in keys])
    quick = bundled.read_bundle(path)
    strict = bundled.read_bundle(path, strict=True, smem=smem_need)
    assert [w.key for w in quick] == [w.key for w in strict] and {w.key for w in quick} == set(keys)
    assert quick == strict  # the quick read the dispatcher does builds exactly what `flashtune import` builds
    assert bundled.FORMAT == exchange.FORMAT


def test_file_names() -> None:
    assert bundled.file_name("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3.json"
    assert bundled.file_name("NVIDIA H100 PCIe") == "h100-pcie.json"
    assert bundled.file_name("NVIDIA H200") == "h200.json"
    assert bundled.file_name("h100-pcie") == "h100-pcie.json"  # a file's stem names itself
    with pytest.raises(ValueError, match="non-empty"):
        bundled.file_name(" ")


def test_loading_500_bundled_winners_is_fast(bundle_dir: Path, tmp_path: Path) -> None:
    entries = [(Key("sm_90", op, n, d, dt, c, batch_heads=bh), BUNDLED_CFG) for op in ("fwd", "bwd")
               for n in (256, 512, 1024, 2048, 4096, 8192) for d in (64, 128) for dt in ("float16", "bfloat16")
               for c in (False, True) for bh in (1, 4, 16, 64, 256, 1024)][:500]
    path = write_bundle(bundle_dir, entries)
    url = empty_db(tmp_path)
    start = time.perf_counter()
    info = load(url, H100_SXM)
    took = time.perf_counter() - start
    assert info.bundled == 500, info
    # The budget on import is 50 ms on the CI machine; this bound only catches a read gone quadratic or a
    # slow validator creeping in (the figure is measured in docs/bundled.md).
    assert took < 2.0, f"{path.stat().st_size} bytes took {took:.3f} s"


def assert_bundles_current(paths: list[Path]) -> None:
    """Each file validates as `flashtune import` validates one, and no winner is stale."""
    for path in paths:
        bundled.read_bundle(path, strict=True, smem=smem_need)
    stale = bundled.stale_winners(paths, OP_VERSIONS)
    assert not stale, (f"{len(stale)} bundled winner(s) tuned with another kernel version than the installed "
                       f"op's; regenerate the bundles on their GPUs ({bundled.REGENERATE}): " + "; ".join(stale[:5]))


def test_shipped_bundles_are_current() -> None:
    """The release check: every file shipped in db/bundled/ is current with the installed kernels. With no
    file shipped it has nothing to check; test_stale_bundled_winner_is_skipped_and_explained shows it fails."""
    assert_bundles_current(bundled.bundle_files(bundled.PACKAGE_DIR))
