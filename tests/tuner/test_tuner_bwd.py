"""Tuning the backward (op "bwd"): its space, its workload's check against fp32 autograd, the loop on
a real database (SQLite and PostgreSQL), and `tune --op bwd` / `--recorded` through the real spawned
worker on the CPU (the interpreter), as tests/tuner/test_tuner_cli.py does for the forward."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner

import flashtune.tuner.gpu
from flashtune.db.arch import smem_limit
from flashtune.db.store import RunInfo, Store
from flashtune.db.types import Config, Key
from flashtune.kernel.ops.bwd import default_bwd_config, estimate_bwd_smem
from flashtune.kernel.dispatch import INTERPRETER_ARCH
from flashtune.kernel.testing import attention_flops, attention_reference
from flashtune.tuner.bench import LocalBench, tflops
from flashtune.tuner.cli import main
from flashtune.tuner.gpu import planned_gpu
from flashtune.tuner.measure import FunctionBench
from flashtune.tuner.ops import op_spec
from flashtune.tuner.ops.bwd import (TOLERANCE, BwdInputs, bwd_candidates, fp32_gradients, full_bwd_space,
                                     gradient_errors)
from flashtune.tuner.session import TuningSession

# A stand-in GPU whose 16 KB keep four configs of the D=16 fp32 backward space (plus the default):
# a tune of one bwd key is five trials, under ten seconds in the interpreter.
STAND_IN = dataclasses.replace(planned_gpu("sm_80"), name="CPU stand-in (interpreter)", sm_count=1,
                               smem_limit=16384, present=True)
TINY = ["--seq", "16", "--head-dim", "16", "--dtype", "fp32", "--no-causal", "--batch-heads", "1"]


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """The GPU detection answers for STAND_IN; everything else (worker, harness, store) is real."""
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: STAND_IN)
    return STAND_IN


def float64_gradients(inputs: BwdInputs, scale: float | None = None) -> tuple[torch.Tensor, ...]:
    """dQ, dK, dV of the inputs by float64 autograd of kernel.testing (independent of SDPA)."""
    q, k, v = (x.detach().double().requires_grad_(True) for x in (inputs.q, inputs.k, inputs.v))
    attention_reference(q, k, v, causal=inputs.key.causal, scale=scale).backward(inputs.do.double())
    return q.grad, k.grad, v.grad


def test_space_fits_the_gpu_and_stays_moderate():
    for d, dtype in ((64, "float16"), (128, "float16"), (128, "bfloat16"), (64, "float32")):
        configs = bwd_candidates(d, dtype, smem_limit("sm_90"), "sm_90")
        assert 20 <= len(configs) <= 60, (d, dtype, len(configs))
        assert all(estimate_bwd_smem(c, d, dtype, "sm_90") <= smem_limit("sm_90") for c in configs)
        # Both ways of forming dQ compete: the separate pass and the atomics.
        assert {c.extra_dict.get("deterministic", True) for c in configs} == {True, False}
    # Less shared memory keeps a subset; every kept config fits it.
    small = bwd_candidates(128, "float16", smem_limit("sm_86"), "sm_86")
    assert set(small) < set(bwd_candidates(128, "float16", smem_limit("sm_90"), "sm_90"))
    assert all(estimate_bwd_smem(c, 128, "float16", "sm_86") <= smem_limit("sm_86") for c in small)
    assert len(full_bwd_space()) == 60


def test_spec_rate_default_and_no_sdpa_providers():
    spec, gpu = op_spec("bwd"), planned_gpu("sm_90")
    key = Key("sm_90", "bwd", 4096, 128, "float16", True, batch_heads=32)
    assert spec.flops(key, 32) == 2.5 * attention_flops(32, 4096, 4096, 128, True)
    assert tflops(key, 32, 2.0) == pytest.approx(2.5 * tflops(dataclasses.replace(key, op="fwd"), 32, 2.0))
    assert spec.default(key, gpu) == default_bwd_config("sm_90", 128, "float16", gpu.smem_limit)
    assert not spec.sdpa_providers and op_spec("fwd").sdpa_providers


@pytest.mark.parametrize("causal, group", [(True, 2), (False, 1)])
def test_workload_validates_correct_configs_and_flags_other_gradients(kernel_device, causal, group):
    if kernel_device != "cpu":
        pytest.skip("the CPU variant of the GPU suite's checks")
    key = Key(INTERPRETER_ARCH, "bwd", 24, 16, "float16", causal, seq_len_kv=24, batch_heads=4, group=group)
    bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 1), seed=int(torch.randint(0, 2**20, (1,))))
    inputs = bench._inputs_for(key, 4)
    assert inputs.q.shape[:2] == (1, 4) and inputs.k.shape[1] == 4 // group  # real GQA inputs
    # The fp32 reference agrees with float64 autograd of the independent reference.
    assert max(gradient_errors(inputs.reference, float64_gradients(inputs))) < 1e-5
    space = [c for c in bwd_candidates(16, "float16", smem_limit("sm_80"), "sm_80")]
    configs = [default_bwd_config("sm_80", 16, "float16"), space[0], next(c for c in space if c.extra_dict.get(
        "deterministic") is False)]
    for m in bench.measure(key, 4, configs, careful=False):
        assert m.outcome == "ok" and m.median_ms > 0, m
    # The gradients of another function (a 10 % larger softmax scale) as the reference: every
    # config's real gradients are a wrong result against it.
    inputs.reference = fp32_gradients(inputs.q, inputs.k, inputs.v, inputs.do, causal, inputs.scale * 1.1)
    for m in bench.measure(key, 4, configs, careful=False):
        assert m.outcome == "wrong_result" and m.median_ms is None
        assert "against fp32 autograd" in m.error and " > 0.01 " in m.error


def test_check_names_the_worst_gradient_on_perturbed_real_gradients(kernel_device):
    key = Key(INTERPRETER_ARCH, "bwd", 17, 32, "float32", True, batch_heads=2)
    inputs = BwdInputs.build(key, 2, torch.device(kernel_device), seed=int(torch.randint(0, 2**20, (1,))))
    grads, _ = inputs.run(default_bwd_config(INTERPRETER_ARCH, 32, "float32"))
    assert inputs.check(grads) is None
    errors = gradient_errors(grads, float64_gradients(inputs))
    assert max(errors) < 1e-5  # fp32 IEEE against float64: far inside TOLERANCE["float32"]
    dq, dk, dv = grads
    off = inputs.check((dq, dk * (1 + 3 * TOLERANCE["float32"]), dv))
    assert off is not None and " in dK > 0.001 " in off
    poisoned = dv.clone()
    poisoned[0, 0, -1, 0] = math.nan  # one element the kernel did not write
    assert "relative error inf in dV" in inputs.check((dq, dk, poisoned))
    # One key: dQ and dK are exactly zero; rounding noise is measured against the floor, not zero.
    one = BwdInputs.build(dataclasses.replace(key, seq_len=1, seq_len_kv=1, causal=False), 2,
                          torch.device(kernel_device))
    got, _ = one.run(default_bwd_config(INTERPRETER_ARCH, 32, "float32"))
    assert float(one.reference[0].abs().max()) == 0.0 and one.check(got) is None


def _run(store: Store) -> int:
    return store.start_run(RunInfo("test gpu", "sm_90", 132, smem_limit("sm_90"), "1", "12.4", "3.6", "2.11",
                                   "b" * 12, "host", {}))


def test_session_tunes_bwd_keys_into_the_database(db_url):
    """The loop on bwd keys through the session's op dispatch, with a cost model, on SQLite and PostgreSQL:
    the bwd space and default, no SDPA candidates, the 2.5x FLOP rate, trials and winner stored as bwd."""
    gpu = planned_gpu("sm_90")
    best = Config(32, 128, 8, 3, {"block_m_dq": 128, "block_n_dq": 64})
    key = Key("sm_90", "bwd", 2048, 64, "float16", False, batch_heads=16)

    def cost(k: Key, c: Config, careful: bool) -> float:
        assert k.op == "bwd" and "provider" not in c.extra_dict
        return 1.0 if c == best else 2.0 if c == op_spec("bwd").default(k, gpu) else 3.0

    with Store.open(db_url) as store:
        session = TuningSession(gpu, store, _run(store), FunctionBench(cost))
        assert session.providers(key) == [] and session.providers(dataclasses.replace(key, op="fwd"))
        assert best in session.space(key) and all("provider" not in c.extra_dict for c in session.space(key))
        [result] = session.tune([key])
        assert result.winner.config == best and result.speedup == pytest.approx(2.0)
        assert result.winner.tflops == pytest.approx(2.5 * attention_flops(16, 2048, 2048, 64, False) / 1e-3 / 1e12)
        [winner] = store.winners("sm_90", op="bwd")
        assert winner.key == key and winner.config == best
        assert store.winners("sm_90", op="fwd") == []
        assert {t.key.op for t in store.trials(key)} == {"bwd"}


def test_tune_op_bwd_through_the_real_worker(stand_in_gpu, tmp_path):
    url = f"sqlite:///{tmp_path / 'bwd.db'}"
    result = CliRunner().invoke(main, ["tune", "--op", "bwd", *TINY, "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    [key] = summary["keys"]
    assert key["key"] == "sm_80/bwd/N=16/D=16/float32/full/BH=1" and key["op"] == "bwd"
    assert key["complete"] and key["winner_stored"] and key["provider"] == "kernel"
    default = default_bwd_config("sm_80", 16, "float32", STAND_IN.smem_limit)
    assert key["default"] == str(default)
    # The four configs that fit 16 KB and the default; all right in the interpreter; no SDPA backend.
    assert key["new_trials"] == 5 and key["outcomes"] == {"ok": 5}
    with Store.open(url, create=False) as store:
        [winner] = store.winners("sm_80")
        trials = store.trials()
    assert winner.key.op == "bwd" and str(winner.config) == key["winner"]
    assert len(trials) == 5 and {t.key.op for t in trials} == {"bwd"}
    assert {str(t.config) for t in trials} == {*map(str, bwd_candidates(16, "float32", 16384, "sm_80")), str(default)}
    # --op fwd,bwd plans both; an op name that is not one is one line.
    plan = CliRunner().invoke(main, ["tune", "--op", "fwd,bwd", "--dry-run", "--arch", "sm_90", "--seq", "1024",
                                     "--head-dim", "64", "--dtype", "fp16", "--json"])
    groups = json.loads(plan.stdout)["groups"]
    assert [(g["op"], g["sdpa_providers"]) for g in groups] == [("fwd", True), ("bwd", False)]
    assert json.loads(plan.stdout)["keys"] == 2 * 2 * 3  # two ops x causal both ways x three buckets
    bad = CliRunner().invoke(main, ["tune", "--op", "fwd,back", "--dry-run", "--arch", "sm_90"])
    assert bad.exit_code == 2 and bad.output.startswith("Error: --op: unknown op 'back'")


def test_show_export_and_import_carry_every_op(tmp_path):
    src, dst, file = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}", tmp_path / "w.json"
    configs = {"fwd": Config(128, 64, 8, 3), "bwd": Config(32, 128, 8, 3, {"block_m_dq": 128, "block_n_dq": 64}),
               "kvcache": Config(16, 64, 4, 2)}
    with Store.open(src) as store:
        run = _run(store)
        for op, config in configs.items():
            store.offer_winner(store.record_trial(run, Key("sm_90", op, 1024, 64, "float16", True, batch_heads=32),
                                                  config, "ok", median_ms=0.1))
    shown = CliRunner().invoke(main, ["show", "--db", src, "--op", "bwd"])
    assert shown.exit_code == 0 and str(configs["bwd"]) in shown.output and str(configs["fwd"]) not in shown.output
    assert CliRunner().invoke(main, ["export", "--db", src, "-o", str(file)]).exit_code == 0
    assert CliRunner().invoke(main, ["import", "--db", dst, str(file)]).exit_code == 0
    with Store.open(dst) as store:
        assert {w.key.op: w.config for w in store.winners("sm_90")} == configs
