"""Lookup rules, reload, explain and the FLASHTUNE_CONFIG override, against real SQLite databases."""
from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import torch

from flashtune.kernel.ops.fwd import estimate_smem
from flashtune.db.types import Config
from flashtune.kernel import dispatch
from flashtune.kernel.ops.fwd import default_config
from flashtune.kernel.version import op_version
from helpers.dispatch import build_db, key

FWD_VERSION = op_version("fwd")

C128, C512, C2048 = Config(32, 32, 4, 1), Config(64, 32, 4, 2), Config(128, 64, 8, 3)
CROSS = Config(64, 64, 4, 3)
OLD = "0123456789ab"  # a kernel version that is not the current one
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs under the interpreter (conftest)


@pytest.fixture
def tuned(tmp_path: Path, restore_table: None) -> str:
    url = build_db(tmp_path / "t.db", [
        (key(128), C128, 0.01, FWD_VERSION),
        (key(512), C512, 0.05, FWD_VERSION),
        (key(2048), C2048, 0.5, FWD_VERSION),
        (key(128, nk=4096), CROSS, 0.2, FWD_VERSION),
        (key(1024, d=128, causal=True), Config(128, 32, 8, 2), 0.3, OLD),  # stale, fits
        (key(1024, d=128, dtype="bfloat16"), Config(256, 128, 8, 4), 0.3, OLD),  # stale, too big
        (key(256, arch="sm_80"), Config(16, 16, 2, 1), 0.01, FWD_VERSION),
    ])
    assert dispatch.reload(url, archs=["sm_90", "sm_80"]).winners == 7
    return url


def look(n: int, nk: int | None = None, **kw: object) -> dispatch.Choice:
    args = {"head_dim": 64, "dtype": "float16", "causal": False, "batch_heads": 1, **kw}
    return dispatch.lookup("sm_90", n, seq_len_kv=nk, **args)  # type: ignore[arg-type]


def test_exact_key_wins(tuned: str) -> None:
    for n, config in ((128, C128), (512, C512), (2048, C2048)):
        choice = look(n)
        assert (choice.config, choice.source) == (config, "exact")
        assert choice.winner is not None and choice.winner.key == key(n) and not choice.stale
    assert look(128, 4096).config == CROSS


@pytest.mark.parametrize("n, expected", [
    (64, C128),        # below the grid: the smallest
    (200, C128),       # log2(200/128)=0.64 < log2(512/200)=1.36
    (256, C512),       # exact tie in log space (1 and 1): the larger N
    (384, C512),
    (1024, C2048),     # tie again (1 and 1): the larger N
    (1000, C512),      # log2(1000/512)=0.97 < log2(2048/1000)=1.03
    (4096, C2048),     # twice the largest tuned N: still within the limit (distance 1 + 1)
])
def test_nearest_square_length_in_log_space(tuned: str, n: int, expected: Config) -> None:
    choice = look(n)
    assert (choice.config, choice.source) == (expected, "nearest")
    assert "nearest tuned key" in choice.reason


def test_no_extrapolation_past_the_limit(tuned: str) -> None:
    # Far above the tuned lengths (2048 is the largest): the default, not the largest key's config.
    for n in (100_000, 8192):
        choice = look(n)
        assert choice.source == "default" and "within 2 in log2" in choice.reason
        assert choice.config == default_config("sm_90", 64, "float16", 227 * 1024)


def test_nearest_uses_both_lengths(tuned: str) -> None:
    # (128, 2048): distance to (128, 4096) is 1, to (2048, 2048) is 4, to (128, 128) is 4.
    assert look(128, 2048).config == CROSS
    # (2048, 128): (128,128) costs 4 + 0 = 4, (2048,2048) costs 0 + 4 = 4: both past the limit.
    assert look(2048, 128).source == "default"


def test_other_groups_do_not_leak(tuned: str) -> None:
    # Same N, but another head dim / dtype / causal / arch has nothing tuned: the default.
    for choice, d, dtype in ((look(512, head_dim=128), 128, "float16"),
                             (look(512, dtype="bfloat16"), 64, "bfloat16"),
                             (look(512, causal=True), 64, "float16")):
        assert choice.source == "default"
        assert choice.config == default_config("sm_90", d, dtype, 227 * 1024)
    assert dispatch.lookup("sm_80", 512, 64, "float16", False).config == Config(16, 16, 2, 1)
    assert dispatch.lookup("sm_86", 512, 64, "float16", False).source == "default"


def test_stale_winner_that_fits_is_used_and_flagged(tuned: str) -> None:
    choice = look(1024, head_dim=128, causal=True)
    assert choice.source == "exact" and choice.stale and choice.config == Config(128, 32, 8, 2)
    assert OLD in choice.reason and FWD_VERSION in choice.reason


def test_stored_config_that_does_not_fit_falls_back_to_default(tuned: str) -> None:
    big = Config(256, 128, 8, 4)
    assert estimate_smem(big, 128, "bfloat16", "sm_90") > 227 * 1024  # the premise of the test
    choice = look(1024, head_dim=128, dtype="bfloat16")
    assert choice.source == "default" and "KB of shared memory" in choice.reason
    assert choice.config == default_config("sm_90", 128, "bfloat16", 227 * 1024)
    # A smaller device limit rejects a config that fits the arch table's figure.
    need = estimate_smem(C2048, 64, "float16", "sm_90")
    assert look(2048).source == "exact"
    assert dispatch.lookup("sm_90", 2048, 64, "float16", False, smem_limit=need - 1).source == "default"


def test_nothing_loaded_means_defaults(restore_table: None) -> None:
    dispatch.table.current = dispatch.table.build_table([], None, dispatch.info())
    choice = look(1024)
    assert choice.source == "default" and choice.winner is None
    assert choice.config == default_config("sm_90", 64, "float16", 227 * 1024)


def test_reload_rereads_the_database(tmp_path: Path, tuned: str) -> None:
    assert look(4096).config == C2048
    build_db(Path(tuned.removeprefix("sqlite:///")), [(key(4096), Config(128, 128, 8, 2), 0.9, FWD_VERSION)])
    assert look(4096).config == C2048  # memory only until reload
    info = dispatch.reload(tuned, archs=["sm_90"])
    assert info.winners == 7 and look(4096).config == Config(128, 128, 8, 2)


def test_env_override_forces_one_config(tuned: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.CONFIG_ENV_VAR, " m64-n32-w4-s2 ")
    info = dispatch.reload(tuned, archs=["sm_90"])
    assert info.override == Config(64, 32, 4, 2)
    for choice in (look(128), look(777), look(1024, head_dim=128, dtype="bfloat16")):
        assert (choice.config, choice.source) == (Config(64, 32, 4, 2), "override")
    q = torch.randn(1, 1, 16, 16, device=DEVICE)
    assert dispatch.explain(q, q, q).source == "override"  # CPU tensors too


def test_malformed_override_warns_once_and_is_ignored(tuned: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.CONFIG_ENV_VAR, "m100-n32-w4-s2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = dispatch.reload(tuned, archs=["sm_90"])
    messages = [str(w.message) for w in caught if issubclass(w.category, dispatch.DispatchWarning)]
    assert len(messages) == 1 and "m100-n32-w4-s2" in messages[0] and "power of two" in messages[0]
    assert info.override is None and look(128).source == "exact"


def test_explain_own_device_and_another_arch(tuned: str) -> None:
    q = torch.randn(1, 1, 512, 64, dtype=torch.float16, device=DEVICE)  # B·Hq = 1, group 1: the tuned key's
    k = torch.randn(1, 1, 512, 64, dtype=torch.float16, device=DEVICE)
    own = dispatch.explain(q, k, k)
    if DEVICE == "cpu":  # CPU tensors never consult the table: the interpreter's nominal-arch default
        assert own.source == "default" and own.arch == dispatch.INTERPRETER_ARCH
        assert own.config == default_config(dispatch.INTERPRETER_ARCH, 64, "float16")
    planned = dispatch.explain(q, k, k, arch="sm90")
    assert (planned.config, planned.source, planned.arch) == (C512, "exact", "sm_90")
    assert str(planned).startswith(f"{C512} (exact): stored winner")
    assert dispatch.explain(q[:, :, :300], k, k, is_causal=True, arch="sm_90").source == "default"


def test_explain_rejects_bad_inputs(tuned: str) -> None:
    q = torch.randn(1, 1, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="unknown arch 'sm_7'"):
        dispatch.explain(q, q, q, arch="sm_7")
    with pytest.raises(ValueError, match="head dim"):
        odd = torch.randn(1, 1, 16, 20, device=DEVICE)
        dispatch.explain(odd, odd, odd)
    with pytest.raises(TypeError, match="dtype"):
        dispatch.explain(q.double(), q.double(), q.double())


def test_plan_memoises_per_signature(tuned: str) -> None:
    q = torch.randn(1, 2, 16, 16, device=DEVICE)
    first = dispatch.plan(q, q, q, True)
    assert dispatch.plan(q.clone(), q.clone(), q.clone(), True) is first  # same signature, one entry
    other = dispatch.plan(q, q, q, False)
    assert other is not first and other.shape == first.shape and other.default_scale == 0.25
    t = q.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, other strides
    assert dispatch.plan(t, t, t, True) is not first


_AUDIT: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _AUDIT is not None and (event in ("open", "sqlite3.connect", "socket.connect")
                               or event.startswith("sqlite3.")):
        _AUDIT.append(f"{event} {args[:1]}")


def test_steady_state_calls_touch_no_file_or_database(tuned: str) -> None:
    global _AUDIT
    from flashtune.kernel import attention

    q = torch.randn(1, 2, 24, 16, device=DEVICE)
    attention(q, q, q, is_causal=True)  # warm: plan and (on a GPU) compile
    sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only while armed
    _AUDIT = []
    try:
        for _ in range(3):
            attention(q, q, q, is_causal=True)
        dispatch.explain(q, q, q, arch="sm_90")
        seen = list(_AUDIT)
        dispatch.reload(tuned, archs=["sm_90"])  # the hook does see a database read
        reload_seen = list(_AUDIT)
    finally:
        _AUDIT = None
    assert seen == []
    assert any(tuned.removeprefix("sqlite:///") in event for event in reload_seen), reload_seen


@pytest.mark.parametrize("text, problem", [
    ('m64-n32-w4-s2+{"a":' + "[" * 100_000 + "]" * 100_000 + "}", "longer than 1000 characters"),
    ('m64-n32-w4-s2+{"a":' + "[" * 300 + "]" * 300 + "}", "301 brackets"),
    ('m64-n32-w4-s2+{"a":' + "[" * 8 + "1" + "]" * 8 + "}", "values must be bool, int, float or str"),
    ('m64-n32-w4-s2+{"tma":true}', "does not know the knob 'tma' (known knobs: none)"),
    ("m64-n32-w4-s2\x1b[2J", "malformed config"),
], ids=["huge", "deep", "nested-value", "unknown-knob", "escape"])
def test_override_the_kernel_cannot_run_warns_and_is_ignored(tuned: str, monkeypatch: pytest.MonkeyPatch,
                                                             text: str, problem: str) -> None:
    # Read at import, which must never fail: bounded before parsing, anything the parser raises caught.
    monkeypatch.setenv(dispatch.CONFIG_ENV_VAR, text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = dispatch.reload(tuned, archs=["sm_90"])
    [message] = [str(w.message) for w in caught if issubclass(w.category, dispatch.DispatchWarning)]
    assert f"ignoring {dispatch.CONFIG_ENV_VAR}=" in message and problem in message
    assert len(message) < 600 and "\x1b" not in message
    assert info.override is None and look(128).source == "exact"


def test_stored_config_with_unknown_knobs_falls_back(tmp_path: Path, restore_table: None) -> None:
    # A winner tuned by a newer flashtune with a kernel variant this kernel does not have.
    url = build_db(tmp_path / "knobs.db", [(key(512), Config(64, 32, 4, 2, extra={"loads": "tma", "rings": 3}),
                                            0.05, FWD_VERSION)])
    dispatch.reload(url, archs=["sm_90"])
    choice = look(512)
    assert choice.source == "default" and choice.config == default_config("sm_90", 64, "float16", 227 * 1024)
    assert "unknown knob(s) for the TMA forward kernel: rings" in choice.reason


def test_damaged_stored_time_does_not_break_lookup(tuned: str, restore_table: None) -> None:
    # A hand-edited row the store did not catch: the reason shows it instead of formatting it.
    good = look(512).winner
    assert good is not None
    bad = dataclasses.replace(good, median_ms="fast", gpu_name="GPU\x1b[31m")
    dispatch.table.current = dispatch.table.build_table([bad], None, dispatch.info())
    choice = look(512)
    assert (choice.config, choice.source) == (C512, "exact")
    assert "an unreadable time 'fast'" in choice.reason and "\x1b" not in choice.reason
    q = torch.randn(1, 1, 512, 64, dtype=torch.float16)
    assert dispatch.explain(q, q, q, arch="sm_90").reason == choice.reason


def test_lookup_and_explain_causal_must_be_a_bool(tuned: str) -> None:
    q = torch.randn(1, 1, 16, 16, device=DEVICE)
    for bad in ("False", 1, None):
        with pytest.raises(TypeError, match="causal must be a bool"):
            dispatch.lookup("sm_90", 128, 64, "float16", bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="is_causal must be a bool"):
            dispatch.explain(q, q, q, is_causal=bad, arch="sm_90")  # type: ignore[arg-type]


def test_explain_for_an_arch_needs_no_runnable_device(tuned: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from flashtune.kernel import device

    # As on a CPU machine without TRITON_INTERPRET (test_api runs that for real in a subprocess).
    monkeypatch.setattr(device, "INTERPRET", False)
    q = torch.randn(2, 4, 512, 64, dtype=torch.bfloat16)
    assert look(512).config == C512
    with pytest.raises(ValueError, match="q, k, v are on cpu"):
        dispatch.explain(q, q, q)
    planned = dispatch.explain(q, q, q, arch="sm_90")
    assert planned.arch == "sm_90" and planned.key is not None and planned.key.dtype == "bfloat16"
    assert planned.source == "default"  # nothing tuned for bf16 in the fixture
    assert planned.config == default_config("sm_90", 64, "bfloat16", 227 * 1024)


# --- workload keys: the bucket and the GQA group ------------------------------------------------

@pytest.fixture
def workload(tmp_path: Path, restore_table: None) -> str:
    a, b, c, g, old = Config(64, 64, 4, 2), Config(128, 64, 8, 3), Config(64, 32, 4, 2), Config(128, 32, 8, 2), \
        Config(32, 32, 4, 1)
    url = build_db(tmp_path / "w.db", [
        (key(1024, bh=16), a, 0.1, FWD_VERSION),
        (key(1024, bh=256), b, 0.9, FWD_VERSION),
        (key(1024, bh=256, group=4), g, 0.9, FWD_VERSION),
        (key(1024, bh=0, d=128), old, 0.9, FWD_VERSION),  # a schema-1 winner: no bucket
    ])
    dispatch.reload(url, archs=["sm_90"])
    return url


def test_exact_bucket_and_group(workload: str) -> None:
    assert look(1024, batch_heads=16).config == Config(64, 64, 4, 2)
    assert look(1024, batch_heads=200).config == Config(128, 64, 8, 3)  # bucket(200) = 256
    choice = look(1024, batch_heads=256, group=4)
    assert choice.source == "exact" and choice.config == Config(128, 32, 8, 2)
    assert choice.key is not None and (choice.key.batch_heads, choice.key.group) == (256, 4)


def test_nearest_bucket_and_group_class(workload: str) -> None:
    assert look(1024, batch_heads=32).config == Config(64, 64, 4, 2)   # 1 from 16, 3 from 256
    assert look(1024, batch_heads=128).config == Config(128, 64, 8, 3)  # 1 from 256, 3 from 16
    # GQA calls look among GQA winners only (group class), another group at a small cost.
    assert look(1024, batch_heads=256, group=8).config == Config(128, 32, 8, 2)
    assert look(1024, batch_heads=16, group=2).source == "default"  # 4 buckets away: past the limit
    # A schema-1 winner (no bucket) costs 1 for the unknown bucket, and still serves its neighbours.
    choice = look(1024, batch_heads=64, head_dim=128)
    assert choice.source == "nearest" and choice.config == Config(32, 32, 4, 1)
    assert look(4096, batch_heads=64, head_dim=128).source == "default"  # 2 + 1: past the limit


def test_call_key_carries_bucket_and_group() -> None:
    q = torch.randn(3, 8, 16, 16, device=DEVICE)
    kv = torch.randn(3, 2, 16, 16, device=DEVICE)
    choice = dispatch.explain(q, kv, kv, False)
    assert choice.key is not None and (choice.key.batch_heads, choice.key.group) == (32, 4)  # bucket(24) = 32


# --- SDPA backends as winners ----------------------------------------------------------------------

def test_sdpa_winner_routes_to_the_backend_and_kernel_only_gives_the_fallback(tmp_path: Path,
                                                                             restore_table: None) -> None:
    from flashtune.db.store import Store
    from flashtune.kernel.providers import provider_config
    from helpers.db import run_info

    url = f"sqlite:///{tmp_path / 'sdpa.db'}"
    fallback = Config(128, 64, 8, 3)
    with Store.open(url) as store:
        run = store.start_run(run_info(arch="sm_90", kernel_version=FWD_VERSION))
        trial = store.record_trial(run, key(4096, d=128, causal=True), provider_config("sdpa_cudnn"), "ok",
                                   median_ms=1.0)
        store.offer_winner(trial, kernel_config=fallback)
        bare = store.record_trial(run, key(1024, d=128, causal=True), provider_config("sdpa_flash"), "ok",
                                  median_ms=1.0)
        store.offer_winner(bare)  # no kernel config stored beside it
    dispatch.reload(url, archs=["sm_90"])
    choice = look(4096, head_dim=128, causal=True)
    assert (choice.provider, choice.source, choice.kernel_config) == ("sdpa_cudnn", "exact", fallback)
    assert "sdpa_cudnn" in choice.reason
    kernel = look(4096, head_dim=128, causal=True, kernel_only=True)
    assert (kernel.provider, kernel.config) == ("kernel", fallback)
    assert look(1024, head_dim=128, causal=True, kernel_only=True).config == default_config(
        "sm_90", 128, "float16", 227 * 1024)
    # A CPU call never routes to a backend: the interpreter runs the kernel.
    q = torch.randn(1, 16, 4096 // 256, 128, device=DEVICE)
    assert dispatch.plan(q, q, q, True).sdpa is None
