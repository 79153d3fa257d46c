"""Tuning keys with attention features (window, softcap, sinks, ALiBi, mask, dropout): each workload runs the
kernels with modifiers of the key's kind and checks them against the float64 reference of the same modifiers
(a reference without one is off by far more than the tolerance, so a candidate that ignored it fails); SDPA
competes only where one attn_mask computes the call (`kernel.mods.sdpa_mask`, checked against the reference);
`tune` with the feature options, and a session over feature keys of every op, store ok winners of those keys
(the interpreter, a real SQLite file)."""
from __future__ import annotations

import dataclasses
import json
import math

import flashtune.tuner.gpu
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from flashtune.db.store import Store
from flashtune.db.types import Key, window_bucket
from flashtune.kernel.checks import check_inputs
from flashtune.kernel.dispatch import INTERPRETER_ARCH
from flashtune.kernel.mods import (
    NO_MODS,
    NO_WINDOW,
    ScoreMods,
    check_mods,
    dropout_keep_mask,
    sdpa_mask,
)
from flashtune.kernel.providers import provider_of
from flashtune.kernel.testing import attention_reference
from flashtune.tuner.bench import LocalBench
from flashtune.tuner.cli import main
from flashtune.tuner.gpu import planned_gpu, run_info
from flashtune.tuner.ops import op_spec
from flashtune.tuner.ops.mods import alibi_slopes, nominal_window
from flashtune.tuner.ops.reference import modified_attention, modified_gradients
from flashtune.tuner.session import TuningSession, key_providers

GPU = planned_gpu("sm_90")
# A GPU of a known arch whose small shared memory keeps each tiny key's space to a few configs.
STAND_IN = dataclasses.replace(planned_gpu(INTERPRETER_ARCH), name="CPU stand-in (interpreter)", sm_count=1,
                               smem_limit=8192, present=True)
ALL_SDPA = {"sdpa_cudnn", "sdpa_flash", "sdpa_efficient"}
MASKED_SDPA = {"sdpa_cudnn", "sdpa_efficient"}


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**20, (1,)))


def _without(mods: ScoreMods, feature: str) -> ScoreMods:
    """`mods` less one feature's modifier."""
    off = {"window": {"window": NO_WINDOW}, "softcap": {"softcap": 0.0}, "sinks": {"sinks": None},
           "alibi": {"alibi": None}, "mask": {"mask": None}, "dropout": {"dropout_p": 0.0, "seed": 0}}[feature]
    return dataclasses.replace(mods, **off)


def test_nominal_window_gives_the_key_bucket_back() -> None:
    """The sides a window key is timed with have the key's bucket, for every key a call can have; a bucket no
    call on that many keys can have is a ValueError."""
    for seq_k in (1, 2, 5, 16, 24, 100):
        reachable = {window_bucket(left, right, seq_k) for left in range(seq_k + 2) for right in range(seq_k + 2)}
        for causal in (False, True):
            for window in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                if window in reachable:
                    left, right = nominal_window(window, causal, seq_k)
                    assert window_bucket(left, right, seq_k) == window
                    if window <= seq_k:
                        assert left + 1 + right == window and (right == 0 or not causal)
                else:
                    with pytest.raises(ValueError, match="covers every key"):
                        nominal_window(window, causal, seq_k)


def test_alibi_slopes_are_the_standard_ones() -> None:
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(12) == [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert len(alibi_slopes(16)) == 16 and alibi_slopes(16)[-1] == 2.0 ** -8


def test_sdpa_is_a_candidate_only_where_one_mask_computes_the_call() -> None:
    base = Key("sm_90", "fwd", 1024, 64, "float16", True, batch_heads=32)

    def providers(key: Key) -> set[str]:
        return {provider_of(c) for c in key_providers(key)}

    for op in ("fwd", "train"):
        key = dataclasses.replace(base, op=op)
        assert providers(key) == ALL_SDPA
        for features in ({"softcap": True}, {"sinks": True}, {"dropout": True}, {"window": 256, "sinks": True},
                         {"mask": "bool", "dropout": True}, {"alibi": True, "softcap": True}):
            assert providers(dataclasses.replace(key, **features)) == set(), features
        for features in ({"window": 256}, {"alibi": True}, {"mask": "bool"}, {"mask": "float"},
                         {"window": 256, "alibi": True, "mask": "float"}):
            assert providers(dataclasses.replace(key, **features)) == MASKED_SDPA, features
        assert key_providers(dataclasses.replace(key, window=256), kernel_only=True) == []
    assert providers(dataclasses.replace(base, op="bwd", window=256)) == set()
    decode = Key("sm_90", "kvcache", 1, 64, "float16", True, seq_len_kv=4096, batch_heads=32)
    assert providers(decode) == ALL_SDPA
    assert providers(dataclasses.replace(decode, window=256)) == providers(dataclasses.replace(decode, alibi=True)) \
        == set()  # a window or ALiBi follows each sequence's own length: no one SDPA mask
    # The tensor-descriptor kernel takes no modifiers: feature keys get the pointer kernel's configs alone.
    assert any("loads" in c.extra_dict for c in op_spec("fwd").space(base, GPU))
    assert not any("loads" in c.extra_dict for c in op_spec("fwd").space(dataclasses.replace(base, window=256), GPU))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_mask_computes_the_modifiers_as_the_reference(causal: bool) -> None:
    """SDPA (math, CPU, float64) given sdpa_mask's attn_mask equals the float64 reference with the modifiers,
    whose result the modifiers change by far more than the difference; rows that see nothing give zeros."""
    b, h, n, nk, d = 2, 4, 24, 40, 16
    q, k, v = (torch.randn(b, h, length, d, dtype=torch.float64) for length in (n, nk, nk))
    shape = check_inputs(q.float(), k.float(), v.float())
    padded = torch.arange(nk).view(1, 1, 1, -1) < torch.randint(nk // 2, nk + 1, (b, 1, 1, 1))
    hidden_rows = padded & (torch.rand(b, 1, n, 1) > 0.1)  # about a tenth of the rows see no key
    cases = [{"window_size": (5, 2)}, {"window_size": (7, -1)}, {"alibi_slopes": torch.rand(h)},
             {"alibi_slopes": torch.rand(b, h)}, {"attn_mask": hidden_rows},
             {"attn_mask": torch.randn(1, h, n, nk, dtype=torch.float64)},
             {"window_size": (6, 0), "alibi_slopes": torch.rand(h), "attn_mask": torch.randn(b, 1, n, nk)},
             {"window_size": (3, 3), "alibi_slopes": torch.rand(h), "attn_mask": hidden_rows}]
    plain = attention_reference(q, k, v, causal=causal)
    for case in cases:
        mods = check_mods(shape, q.device, **case)
        mask = sdpa_mask(mods, shape, causal, q.device, q.dtype)
        assert mask is not None and mask.dim() == 4
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        want = attention_reference(q, k, v, causal=causal, **case)
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() < 1e-6, case  # the bias is built in fp32
        assert (plain - want).abs().max() > 0.1, case
    assert sdpa_mask(NO_MODS, shape, causal, q.device, q.dtype) is None
    for case in ({"softcap": 5.0}, {"sinks": torch.randn(h)}, {"dropout_p": 0.1}):
        with pytest.raises(ValueError, match="SDPA does not compute"):
            sdpa_mask(check_mods(shape, q.device, window_size=(4, 4), **case), shape, causal, q.device, q.dtype)


def test_chunked_reference_is_the_whole_one(kernel_device: str) -> None:
    """The tuner's chunked reference (row blocks, K/V heads, the dropout planes of each chunk) equals the whole
    float64 reference with the kernels' full dropout mask, forward and gradients, GQA and a bottom-right diagonal
    included."""
    device = torch.device(kernel_device)
    b, hq, hkv, n, nk, d = 2, 4, 2, 20, 28, 16
    q, do = (torch.randn(b, hq, n, d, device=device) for _ in range(2))
    k, v = (torch.randn(b, hkv, nk, d, device=device) for _ in range(2))
    shape = check_inputs(q, k, v)
    mods = check_mods(shape, device, softcap=2.0, window_size=(9, 4), sinks=torch.randn(hq, device=device),
                      alibi_slopes=torch.rand(hq, device=device), attn_mask=torch.randn(b, 1, n, nk, device=device),
                      dropout_p=0.2)
    keep = dropout_keep_mask(mods.seed, 0.2, b, hq, n, nk, device)
    assert 0.6 < keep.float().mean() < 0.95
    for causal, diag in ((False, 0), (True, nk - n)):
        args = {"causal": causal, "scale": d ** -0.5, "softcap": 2.0, "window_size": (9, 4), "sinks": mods.sinks,
                "alibi_slopes": mods.alibi, "attn_mask": mods.mask, "dropout_keep": keep, "dropout_p": 0.2,
                "diag": diag}
        want = attention_reference(q, k, v, **args)
        got = modified_attention(q, k, v, causal=causal, scale=d ** -0.5, mods=mods, diag=diag, max_bytes=25000)
        assert got.dtype == torch.float32 and (got - want).abs().max() < 1e-5
        assert (attention_reference(q, k, v, **{**args, "dropout_keep": None, "dropout_p": 0.0}) - want).abs().max() > 0.1
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    out = attention_reference(*leaves, causal=True, scale=d ** -0.5, softcap=2.0, window_size=(9, 4),
                              sinks=mods.sinks, alibi_slopes=mods.alibi, attn_mask=mods.mask, dropout_keep=keep,
                              dropout_p=0.2)
    want = torch.autograd.grad(out, leaves, do.double())
    got = modified_gradients(q, k, v, do, causal=True, scale=d ** -0.5, mods=mods, max_bytes=50000)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5 * max(1.0, float(w.abs().max()))


# (op, features) of the workload checks: every feature on the forward, a pair, the backward, the training step
# and the decode kernel.
WORKLOADS = [("fwd", {"window": 8}), ("fwd", {"softcap": True}), ("fwd", {"sinks": True}), ("fwd", {"alibi": True}),
             ("fwd", {"mask": "bool"}), ("fwd", {"mask": "float"}), ("fwd", {"dropout": True}),
             ("fwd", {"window": 8, "sinks": True}), ("bwd", {"window": 8, "alibi": True, "dropout": True}),
             ("bwd", {"sinks": True, "mask": "bool"}), ("kvcache", {"window": 8, "sinks": True, "alibi": True})]


@pytest.mark.parametrize("op, features", WORKLOADS)
def test_a_feature_workload_checks_the_modifiers(kernel_device: str, op: str, features: dict) -> None:
    """The workload's modifiers are those of the key's features; the default config's output passes the check;
    against a reference without any one of the modifiers it fails (each modifier matters at its nominal value)."""
    causal = op != "fwd" or "mask" not in features
    n = 4 if op == "kvcache" else 24
    key = Key(INTERPRETER_ARCH, op, n, 16, "float32", causal, seq_len_kv=24, batch_heads=4, group=2, **features)
    spec = op_spec(op)
    inputs = spec.workload(key, 4, torch.device(kernel_device), _fresh_seed())
    assert inputs.mods.features(24) == key.features_on()
    out, _ = inputs.run(spec.default(key, STAND_IN), out=inputs.buffers())
    assert inputs.check(out) is None
    for feature in features:
        full = inputs.mods
        inputs.mods = _without(full, feature)
        try:
            other = inputs.compute_reference()
        finally:
            inputs.mods = full
        problem = inputs.problem(out, other, spec.inputs.tolerance[key.dtype])
        assert problem is not None and "against the float64 reference" in problem, feature


def test_a_reference_without_the_modifier_fails_every_candidate(kernel_device: str) -> None:
    """Through the bench: a workload whose reference lacks its key's modifiers (here, its sinks and window) makes
    every kernel config a wrong_result; with the modifiers, the same configs are ok."""
    key = Key(INTERPRETER_ARCH, "fwd", 24, 16, "float32", True, batch_heads=2, window=8, sinks=True)
    spec = op_spec("fwd")

    def unmodified_reference(*args, **kwargs):
        inputs = spec.workload(*args, **kwargs)
        full, inputs.mods = inputs.mods, NO_MODS
        inputs.reference = inputs.compute_reference()
        inputs.mods = full
        return inputs

    configs = list(dict.fromkeys([spec.default(key, STAND_IN), *spec.space(key, STAND_IN)[:1]]))
    wrong = LocalBench(kernel_device, quick=(0, 1), careful=(0, 1), seed=_fresh_seed(), workload=unmodified_reference)
    assert [m.outcome for m in wrong.measure(key, 2, configs, careful=False)] == ["wrong_result"] * len(configs)
    right = LocalBench(kernel_device, quick=(0, 1), careful=(0, 1), seed=_fresh_seed())
    assert [m.outcome for m in right.measure(key, 2, configs, careful=False)] == ["ok"] * len(configs)


def test_a_session_stores_ok_winners_of_feature_keys(kernel_device: str, tmp_path) -> None:
    """Tuning feature keys of every op (the training pair's parts first) stores an ok kernel winner per key, with
    the key's features; an SDPA backend that the mask key admits and that refuses these inputs is a trial saying
    so, never the winner."""
    if kernel_device != "cpu":
        pytest.skip("the interpreter's tiny keys")
    keys = [Key(INTERPRETER_ARCH, "fwd", 16, 16, "float32", False, batch_heads=1, **features)
            for features in ({"window": 8}, {"sinks": True}, {"alibi": True}, {"mask": "bool"}, {"mask": "float"},
                             {"dropout": True}, {"window": 8, "sinks": True})]
    keys += [Key(INTERPRETER_ARCH, "train", 16, 16, "float32", True, batch_heads=1, window=8, dropout=True),
             Key(INTERPRETER_ARCH, "kvcache", 1, 16, "float32", True, seq_len_kv=16, batch_heads=1, alibi=True)]
    with Store.open(f"sqlite:///{tmp_path / 'features.db'}") as store:
        run = store.start_run(run_info(STAND_IN, {}))
        bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 1), seed=_fresh_seed())
        results = TuningSession(STAND_IN, store, run, bench).tune(keys)
        winners = {w.key: w for w in store.winners(INTERPRETER_ARCH)}
        trials = store.trials()
    assert {r.key for r in results} >= set(keys)
    for key in keys:
        winner = winners[key]
        assert winner.key.features == key.features and provider_of(winner.config) == "kernel"
        mine = [t for t in trials if t.key == key]
        assert all(t.outcome == "ok" for t in mine if provider_of(t.config) == "kernel"), key
        sdpa = {provider_of(t.config) for t in mine} - {"kernel"}
        assert sdpa == (MASKED_SDPA if key.features_on().keys() <= {"window", "mask", "alibi"} and key.op != "kvcache"
                        else set()), key
    assert {t.key.op for t in trials} >= {"fwd", "bwd", "train", "kvcache"}


def test_tune_with_feature_options(kernel_device: str, tmp_path, monkeypatch) -> None:
    """`tune --window 8 --sinks` tunes the window-and-sinks key through the real worker into its winner;
    `--dry-run` shows the features; bad feature options are one line each."""
    dry = CliRunner().invoke(main, ["tune", "--dry-run", "--arch", "sm_90", "--head-dim", "64", "--dtype", "fp16",
                                    "--seq", "1024", "--window", "256", "--mask", "float", "--json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["features"] == {"window": 256, "mask": "float"} and plan["keys"] == 6
    assert {json.loads(p.split("+", 1)[1])["provider"] for p in plan["providers"]} == MASKED_SDPA
    assert all(not g["variants"] for g in plan["groups"])
    text = CliRunner().invoke(main, ["tune", "--dry-run", "--arch", "sm_90", "--head-dim", "64", "--dtype", "fp16",
                                     "--seq", "1024", "--sinks", "--alibi"])
    assert text.exit_code == 0 and "keys with sinks, alibi; SDPA providers: none" in text.output
    for args, message in ((["--window", "12"], "not a window bucket"), (["--decode", "--dropout"], "take no dropout"),
                          (["--window", "4096", "--seq", "128"], "covers every key"),
                          (["--recorded", "--sinks"], "each with its own features")):
        bad = CliRunner().invoke(main, ["tune", "--dry-run", "--arch", "sm_90", *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    if kernel_device != "cpu":
        return
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: STAND_IN)
    url = f"sqlite:///{tmp_path / 'windowed.db'}"
    result = CliRunner().invoke(main, ["tune", "--window", "8", "--sinks", "--seq", "16", "--head-dim", "16",
                                       "--dtype", "fp32", "--causal", "--batch-heads", "1", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    [tuned] = json.loads(result.stdout)["keys"]
    assert tuned["complete"] and tuned["winner_stored"] and tuned["key"].endswith("/W=8/sinks")
    assert tuned["window"] == 8 and tuned["sinks"] is True
    with Store.open(url, create=False) as store:
        [winner] = store.winners(INTERPRETER_ARCH)
        trials = store.trials()
    assert winner.key.window == 8 and winner.key.sinks and not math.isnan(winner.median_ms)
    assert {t.outcome for t in trials} == {"ok"} and all(provider_of(t.config) == "kernel" for t in trials)
