"""Tuning training as a forward+backward pair (op "train"): its parts are tuned first and its kernel pairs come
from their trials, SDPA's backends compete with their own backward, the workload checks O and the three
gradients, and a recorded training call is tuned by `tune --recorded --op train` through the real worker and
then runs the winning pair (the interpreter, a real SQLite file, the real PostgreSQL server)."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from click.testing import CliRunner

import flashtune.tuner.gpu
from flashtune.db.arch import smem_limit
from flashtune.db.store import RunInfo, Store
from flashtune.db.types import Config, Key
from flashtune.kernel import attention, dispatch, record
from flashtune.kernel.dispatch import INTERPRETER_ARCH
from flashtune.kernel.mods import NO_MODS
from flashtune.kernel.ops.train import pair_config, split_pair
from flashtune.kernel.providers import provider_of
from flashtune.kernel.testing import attention_reference
from flashtune.tuner.cli import main
from flashtune.tuner.gpu import planned_gpu
from flashtune.tuner.measure import FunctionBench
from flashtune.tuner.ops import op_spec, with_parts
from flashtune.tuner.ops.train import PAIR_TOP, TrainInputs, compose_pairs
from flashtune.tuner.session import TuningSession

GPU = planned_gpu("sm_90")
KEY = Key("sm_90", "train", 1024, 64, "float16", True, batch_heads=32, group=2)


def _run(store: Store) -> int:
    return store.start_run(RunInfo(GPU.name, "sm_90", 132, smem_limit("sm_90"), "1", "12.4", "3.6", "2.11",
                                   "b" * 12, "host", {}))


def test_a_composed_key_comes_after_its_parts_in_any_order() -> None:
    other = dataclasses.replace(KEY, op="fwd", seq_len=512, seq_len_kv=512)
    fwd, bwd = (dataclasses.replace(KEY, op=op) for op in ("fwd", "bwd"))
    assert with_parts([other, KEY]) == [other, fwd, bwd, KEY]
    assert with_parts([KEY, fwd]) == [fwd, bwd, KEY]  # a part listed later moves before its pair
    assert with_parts([bwd, KEY, KEY]) == [bwd, fwd, KEY]


def test_pairs_are_the_parts_fastest_configs_crossed_and_the_default() -> None:
    fwds = [Config(128, 64, 8, 3), Config(64, 64, 4, 3), Config(128, 32, 8, 2), Config(64, 32, 4, 2)]
    bwds = [Config(32, 128, 8, 2, {"deterministic": False}), Config(16, 64, 4, 2), Config(32, 64, 4, 3),
            Config(64, 128, 8, 2)]
    pairs = compose_pairs(KEY, GPU, {"fwd": fwds, "bwd": bwds})
    default = op_spec("train").default(KEY, GPU)
    assert pairs[0] == default
    assert set(pairs[1:]) == {pair_config(f, b) for f in fwds[:PAIR_TOP] for b in bwds[:PAIR_TOP]} - {default}
    # Nothing tuned yet: the default pair alone.
    assert compose_pairs(KEY, GPU, {}) == [default]


@pytest.mark.parametrize("sdpa_wins", [False, True])
def test_session_tunes_the_parts_then_the_pair(db_url: str, sdpa_wins: bool) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,))))
    costs: dict[tuple[str, Config], float] = {}

    def part_cost(op: str, config: Config) -> float:
        return costs.setdefault((op, config), 1.0 + rng.random())

    def cost(key: Key, config: Config, careful: bool) -> float:
        provider = provider_of(config)
        if key.op == "train":
            if provider != "kernel":
                return 0.5 if sdpa_wins and provider == "sdpa_flash" else 10.0
            forward, backward = split_pair(config)
            return part_cost("fwd", forward) + part_cost("bwd", backward)
        if provider != "kernel":
            return 10.0  # SDPA loses the forward alone: the pair decision is what lets it win training
        return part_cost(key.op, config)

    with Store.open(db_url) as store:
        session = TuningSession(GPU, store, _run(store), FunctionBench(cost))
        results = session.tune([KEY])
        assert [r.key.op for r in results] == ["bwd", "fwd", "train"]  # tuning order: the pair last
        bwd, fwd, train = results
        assert fwd.provider == "kernel" and train.complete and train.winner_stored
        best = {op: sorted((c for (o, c) in costs if o == op), key=lambda c: costs[(op, c)])
                for op in ("fwd", "bwd")}
        timed = {t.config for t in store.trials(KEY)}
        kernel_pairs = {c for c in timed if provider_of(c) == "kernel"}
        assert kernel_pairs == set(compose_pairs(KEY, GPU, best))
        assert {provider_of(c) for c in timed} == {"kernel", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient"}
        [winner] = store.winners("sm_90", op="train")
        fastest_pair = pair_config(best["fwd"][0], best["bwd"][0])
        if sdpa_wins:
            assert provider_of(winner.config) == "sdpa_flash" and winner.kernel_config == fastest_pair
        else:
            assert winner.config == fastest_pair


def test_the_step_workload_checks_the_output_and_every_gradient(kernel_device: str) -> None:
    key = Key(INTERPRETER_ARCH, "train", 20, 16, "float32", True, batch_heads=4, group=2)
    inputs = TrainInputs.build(key, 4, torch.device(kernel_device), seed=int(torch.randint(0, 2**20, (1,))))
    pair = op_spec("train").default(key, planned_gpu(INTERPRETER_ARCH))
    (o, dq, dk, dv), _ = inputs.run(pair, out=tuple(t.fill_(float("nan")) for t in inputs.buffers()))
    assert inputs.check((o, dq, dk, dv)) is None
    # Independently: float64 autograd of kernel.testing with the GQA heads repeated.
    ref = [t.detach().double().requires_grad_(True) for t in (inputs.q, inputs.k, inputs.v)]
    out = attention_reference(ref[0], *(t.repeat_interleave(2, dim=1) for t in ref[1:]), causal=True)
    out.backward(inputs.do.double())
    for got, want in zip((o, dq, dk, dv), (out.detach(), *(t.grad for t in ref))):
        assert float((got.double() - want).norm() / want.norm()) < 1e-5
    assert " in O > " in inputs.check((o * 1.1, dq, dk, dv))
    assert " in dV > " in inputs.check((o, dq, dk, dv * 1.1))
    if kernel_device == "cpu":  # torch's CPU build runs the flash backend, with its own backward
        (so, *grads), compiled = inputs.run(Config(16, 16, 1, 1, {"provider": "sdpa_flash"}))
        assert compiled is None and inputs.check((so, *grads)) is None


def test_a_recorded_training_call_is_tuned_as_a_pair_and_then_runs_it(tmp_path, monkeypatch, kernel_device):
    if kernel_device != "cpu":
        pytest.skip("records the interpreter's key, which the sm_80 stand-in then tunes")
    stand_in = dataclasses.replace(planned_gpu("sm_80"), name="CPU stand-in (interpreter)", sm_count=1,
                                   smem_limit=8192, present=True)  # 8 KB: the parts' defaults alone fit
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: stand_in)
    url = f"sqlite:///{tmp_path / 'train.db'}"
    monkeypatch.setattr(record, "ENABLED", True)
    monkeypatch.setattr(record, "_counts", {})
    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    attention(q, k, v).sum().backward()
    train = Key(INTERPRETER_ARCH, "train", 16, 16, "float32", False, batch_heads=2)
    assert record.pending() == {train: 1}
    assert record.flush(url) == 1
    result = CliRunner().invoke(main, ["tune", "--recorded", "--op", "train", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    keys = json.loads(result.stdout)["keys"]
    assert [k["op"] for k in keys] == ["fwd", "bwd", "train"] and all(k["complete"] for k in keys)
    with Store.open(url, create=False) as store:
        [winner] = store.winners("sm_80", op="train")
        outcomes = {provider_of(t.config): t.outcome for t in store.trials(train)}
    # The flash backend runs on the CPU and competes; cuDNN and efficient refuse the CPU.
    assert outcomes["sdpa_flash"] == "ok" and outcomes["sdpa_cudnn"] != "ok"
    # The app, reloaded on that database, trains with what won.
    saved = dispatch.table.current
    try:
        dispatch.reload(url, archs=["sm_80"], interpreter=True)
        plan = dispatch.train_plan(q, k, v, False)
        assert plan.choice.source == "exact" and plan.choice.config == winner.config
        q.grad = k.grad = v.grad = None
        out = attention(q, k, v)
        out.backward(torch.ones_like(out))
        ref = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        attention_reference(*ref).sum().backward()
        assert all(float((t.grad.double() - r.grad).norm() / r.grad.norm()) < 1e-5 for t, r in zip((q, k, v), ref))
    finally:
        dispatch.table.current = saved


def test_a_fleet_job_with_a_training_key_finishes(db_url: str) -> None:
    """A train key's unit is tuned with its parts first; the parts are their own units' keys, so a worker
    holding the train unit marks only that unit's key, and one worker finishes the whole job."""
    from flashtune.db.jobs import JobQueue, Worker
    from flashtune.tuner.fleet.units import claim_units
    from flashtune.tuner.fleet.worker import work

    keys = with_parts([KEY])
    with Store.open(db_url) as store:
        session = TuningSession(GPU, store, _run(store), FunctionBench(lambda k, c, careful: 1.0))
        queue = JobQueue(store)
        job, _ = queue.create("pairs", "sm_90", "kv", claim_units(list(reversed(keys))), lease_s=60, args={},
                              host="test")
        result = work(queue, job, Worker("node", 1, 0, GPU.name), lambda unit, stop: session.tune(unit))
        assert result.status == "done" and sorted(r.key.op for r in result.results) == ["bwd", "fwd", "train"]
        assert queue.get("pairs").status == "done"
        assert [w.key.op for w in store.winners("sm_90", op="train")] == ["train"]


def test_softcap_keys_are_tuned_capped_without_sdpa_or_tma(kernel_device: str, tmp_path, monkeypatch) -> None:
    """A softcap key's workload runs and checks the capped kernels (a candidate that ignored the cap fails),
    its space has no TMA configs and no SDPA backend competes; `tune --softcap` tunes such keys through the
    real worker into the capped key's winner."""
    from flashtune.tuner.ops.fwd import KeyInputs
    from flashtune.tuner.session import key_providers

    capped = Key("sm_90", "fwd", 1024, 64, "float16", True, batch_heads=32, softcap=True)
    assert key_providers(capped) == [] and key_providers(dataclasses.replace(capped, softcap=False))
    assert not any("loads" in c.extra_dict for c in op_spec("fwd").space(capped, GPU))
    assert any("loads" in c.extra_dict for c in op_spec("fwd").space(dataclasses.replace(capped, softcap=False), GPU))
    assert key_providers(dataclasses.replace(capped, op="train")) == []
    key = Key(INTERPRETER_ARCH, "fwd", 24, 16, "float32", False, batch_heads=2, softcap=True)
    inputs = KeyInputs.build(key, 2, torch.device(kernel_device), seed=int(torch.randint(0, 2**20, (1,))))
    config = op_spec("fwd").default(key, planned_gpu(INTERPRETER_ARCH))
    out, _ = inputs.run(config)
    assert inputs.check(out) is None
    uncapped, _ = KeyInputs.run(dataclasses.replace(inputs, mods=NO_MODS), config)
    assert "relative error" in inputs.check(uncapped)  # the cap is active at the nominal value
    if kernel_device != "cpu":
        return
    stand_in = dataclasses.replace(planned_gpu("sm_80"), name="CPU stand-in (interpreter)", sm_count=1,
                                   smem_limit=16384, present=True)
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: stand_in)
    url = f"sqlite:///{tmp_path / 'capped.db'}"
    result = CliRunner().invoke(main, ["tune", "--softcap", "--seq", "16", "--head-dim", "16", "--dtype", "fp32",
                                       "--no-causal", "--batch-heads", "1", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    [tuned] = json.loads(result.stdout)["keys"]
    assert tuned["complete"] and tuned["winner_stored"] and "/softcap" in tuned["key"]
    with Store.open(url, create=False) as store:
        [winner] = store.winners("sm_80")
        trials = store.trials()
    assert winner.key.softcap and all(t.key.softcap and provider_of(t.config) == "kernel" for t in trials)
    assert {t.outcome for t in trials} == {"ok"}
