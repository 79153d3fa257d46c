"""The benchmark harness in-process: the real kernel under the interpreter (CPU) or on CUDA."""
from __future__ import annotations

import math

import pytest
import torch
from triton.runtime.errors import OutOfResources

from flashtune.db.store import RunInfo, Store
from flashtune.db.types import Config, Key
from flashtune.kernel.errors import is_sticky_cuda_error, launch_failure, trial_error_text
from flashtune.tuner.bench import LocalBench, classify_compile_error, fill_batch_heads
from flashtune.tuner.loop import Tuner
from flashtune.tuner.ops.fwd import TOLERANCE, attention_flops
from flashtune.tuner.ops.inputs import relative_error
from flashtune.tuner.timing import median_ms

SMALL = [Config(16, 16, 2, 1), Config(32, 16, 2, 2)]


def test_interpreter_tunes_a_tiny_key_end_to_end(tmp_path, kernel_device):
    key = Key("sm_90", "fwd", 16, 16, "float16", True)
    bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 2))
    store = Store.open(f"sqlite:///{tmp_path / 'tiny.db'}")
    run = store.start_run(RunInfo("cpu-interpreter", "sm_90", 1, 232448, "", "", "", "", "v" * 12, "h", {}))
    tuner = Tuner(store, run, bench, kernel_version="v" * 12, gpu_name="cpu-interpreter",
                  space=lambda k: SMALL, default=lambda k: SMALL[0], batch_heads=lambda k: 2)
    [result] = tuner.run([key])
    trials = store.trials(key)
    assert sorted(str(t.config) for t in trials) == sorted(map(str, SMALL))
    assert all(t.outcome == "ok" and t.median_ms > 0 and t.compile_s is not None for t in trials)
    assert result.winner_stored and result.winner.config in SMALL
    # The reported speed-up is the stored default trial's time over the stored winner's, and the
    # winner is the default unless it beat the default by more than the pass's noise.
    by_config = {t.config: t for t in trials}
    default_ms, winner_ms = by_config[SMALL[0]].median_ms, by_config[result.winner.config].median_ms
    assert result.default_ms == default_ms and result.winner.median_ms == winner_ms
    assert result.speedup == pytest.approx(default_ms / winner_ms, rel=1e-12)
    if result.winner.config == SMALL[0]:
        assert result.speedup == 1.0
    else:
        assert winner_ms * (1 + result.noise) < default_ms
    [stored] = store.winners("sm_90")
    assert stored.config == result.winner.config and stored.median_ms == winner_ms
    # The same inputs with a reference that is off: the harness calls it a wrong result.
    inputs = bench._inputs_for(key, 2)
    inputs.reference = inputs.reference * 1.5
    [m] = list(bench.measure(key, 2, SMALL[:1], careful=False))
    assert m.outcome == "wrong_result" and "relative error" in m.error and m.median_ms is None
    store.close()


def test_relative_error_and_tolerances():
    ref = torch.ones(2, 3)
    assert relative_error(ref.half(), ref) == 0.0
    assert relative_error(torch.full((2, 3), math.nan), ref) == math.inf
    assert relative_error(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-3)
    assert TOLERANCE["float16"] < TOLERANCE["bfloat16"]


def test_error_classification():
    from triton.runtime.errors import PTXASError

    assert classify_compile_error(OutOfResources(300000, 232448, "shared memory")) == "out_of_resources"
    assert classify_compile_error(RuntimeError("CUDA error: an illegal memory access was encountered")) == "crashed"
    assert classify_compile_error(RuntimeError("Triton Error [CUDA]: unspecified launch failure")) == "crashed"
    assert classify_compile_error(ValueError("PassManager::run failed")) == "compile_error"
    # kernel.errors is the one classifier: the dispatcher falls back to the default config for the
    # compile failures and out-of-resources, and re-raises what no other config would fix.
    assert launch_failure(PTXASError("Internal Triton PTX codegen error")) == "compile_error"
    assert launch_failure(RuntimeError("PassManager::run failed")) == "compile_error"
    assert launch_failure(OutOfResources(300000, 232448, "shared memory")) == "out_of_resources"
    assert launch_failure(ValueError("q must be 4-D")) is None and launch_failure(KeyError("x")) is None
    assert is_sticky_cuda_error(RuntimeError("CUDA error: misaligned address"))
    text = trial_error_text(PTXASError("Internal Triton PTX codegen error\n`ptxas` stderr:\nInsufficient registers"))
    assert text.startswith("PTXASError: PTXAS error: Internal") and "Insufficient registers" in text


def test_batch_heads_fill_the_gpu_and_flops():
    assert fill_batch_heads(4096, 132) == 32  # 2**17 tokens
    assert fill_batch_heads(128, 132) == 1024
    assert fill_batch_heads(4096, 1000) == 125  # two waves of 256-row tiles over 1000 SMs
    full = Key("sm_90", "fwd", 1024, 128, "float16", False)
    assert attention_flops(full, 8) == 4 * 8 * 1024 * 1024 * 128
    assert attention_flops(Key("sm_90", "fwd", 1024, 128, "float16", True), 8) == attention_flops(full, 8) / 2


def test_median_counts_every_repetition():
    calls = []
    ms = median_ms(lambda: calls.append(1), warmup=2, reps=5, flush=None)
    assert len(calls) == 7 and ms >= 0
    with pytest.raises(ValueError, match="reps"):
        median_ms(lambda: None, warmup=0, reps=0, flush=None)


def test_ptxas_failure_is_a_compile_error_trial(kernel_device):
    # ptxas only runs on a CUDA machine (seen there: "Insufficient registers" for a 256-row tile), so
    # the toolchain's exception is raised in its place for one config here.
    from triton.runtime.errors import PTXASError

    key = Key("sm_90", "fwd", 16, 16, "float16", False)
    bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 2))
    inputs = bench._inputs_for(key, 2)
    real_run = inputs.run

    def run(config, out=None):
        if config == SMALL[1]:
            raise PTXASError("ptxas fatal : (C7602) Insufficient registers (128) to compile instruction")
        return real_run(config, out)

    inputs.run = run
    outcomes = {m.config: m for m in bench.measure(key, 2, SMALL, careful=False)}
    assert outcomes[SMALL[0]].outcome == "ok"
    assert outcomes[SMALL[1]].outcome == "compile_error"
    assert "Insufficient registers" in outcomes[SMALL[1]].error


def test_careful_timing_interleaves_the_candidates():
    from flashtune.tuner.timing import median_ms_each

    order: list[str] = []
    fns = [lambda: order.append("a"), lambda: order.append("b"), lambda: order.append("c")]
    times = median_ms_each(fns, warmup=1, reps=3, flush=None)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert order[:3] == ["a", "b", "c"]  # warm-ups
    assert order[3:] == ["a", "b", "c"] * 3  # repetitions round-robin, so clock drift hits all alike


def test_gqa_key_validates_and_times_a_kernel_config_at_its_bucket(kernel_device):
    from flashtune.tuner.ops.fwd import KeyInputs
    from flashtune.tuner.ops.inputs import split_heads

    key = Key("sm_90", "fwd", 16, 16, "float16", True, batch_heads=8, group=2)
    inputs = KeyInputs.build(key, 8, kernel_device)
    assert inputs.q.shape[:2] == (1, 8) and inputs.k.shape[:2] == (1, 4) == inputs.v.shape[:2]  # real GQA
    bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 2))
    [m] = list(bench.measure(key, 8, SMALL[:1], careful=False))
    assert m.outcome == "ok" and m.median_ms > 0
    # The careful pass times its first config twice, interleaved: the noise of that pass.
    first, second = bench.measure(key, 8, SMALL, careful=True)
    assert first.outcome == second.outcome == "ok" and first.noise is not None and second.noise is None
    # B·Hq split: Hq a multiple of the group, 16 when the bucket allows (one compile for all buckets).
    assert split_heads(256, 1) == (16, 16) and split_heads(256, 4) == (16, 16) and split_heads(4, 1) == (1, 4)
    assert split_heads(64, 3) == (7, 9) and split_heads(2, 8) == (1, 8)


def test_sdpa_provider_configs_run_on_the_cpu_or_are_refused_trials(kernel_device):
    from flashtune.kernel.providers import provider_config

    if kernel_device != "cpu":
        pytest.skip("checks torch SDPA's CPU backends")
    key = Key("sm_90", "fwd", 16, 16, "float16", False, batch_heads=4, group=2)
    bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 2))
    configs = [provider_config(p) for p in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")]
    got = {m.config.extra_dict["provider"]: m for m in bench.measure(key, 4, configs, careful=True)}
    # torch's CPU build has a flash implementation (GQA through enable_gqa), validated like any config;
    # cuDNN and efficient refuse on the CPU: compile_error trials naming the backend.
    assert got["sdpa_flash"].outcome == "ok" and got["sdpa_flash"].median_ms > 0
    for name in ("sdpa_cudnn", "sdpa_efficient"):
        assert got[name].outcome == "compile_error" and got[name].median_ms is None
        assert f"torch SDPA {name}" in got[name].error or f"torch refused the {name} backend" in got[name].error


def _cost_model_tuner(tmp_path, cost, default):
    from flashtune.tuner.measure import FunctionBench

    store = Store.open(f"sqlite:///{tmp_path / 'model.db'}")
    run = store.start_run(RunInfo("model", "sm_90", 1, 232448, "", "", "", "", "m" * 12, "h", {}))
    tuner = Tuner(store, run, FunctionBench(cost), kernel_version="m" * 12, gpu_name="model",
                  space=lambda k: MODEL_SPACE, default=lambda k: default, batch_heads=lambda k: 4)
    return store, tuner


MODEL_SPACE = [Config(m, n, w, 2) for m in (32, 64, 128) for n in (32, 64) for w in (2, 4, 8)]
MODEL_KEY = Key("sm_90", "fwd", 1024, 64, "float16", True, batch_heads=4)


def _model_ms(config: Config) -> float:
    """A deterministic cost: a bowl around m64-n64-w4 (1.0 ms there), each step away costing more."""
    steps = (abs(math.log2(config.block_m / 64)) + abs(math.log2(config.block_n / 64))
             + abs(math.log2(config.num_warps / 4)))
    return 1.0 + 0.2 * steps + 0.01 * math.log2(config.block_m)


def test_with_a_cost_model_the_winner_is_its_fastest_config_and_the_speedup_its_ratio(tmp_path):
    default = Config(128, 32, 8, 2)
    store, tuner = _cost_model_tuner(tmp_path, lambda key, config, careful: _model_ms(config), default)
    [result] = tuner.run([MODEL_KEY])
    fastest = min(MODEL_SPACE, key=_model_ms)
    assert fastest == Config(64, 64, 4, 2) and fastest != default
    assert result.winner_stored and result.winner.config == fastest
    assert result.speedup == pytest.approx(_model_ms(default) / _model_ms(fastest), rel=1e-12)
    assert result.speedup == pytest.approx(1.67 / 1.06, rel=1e-12)  # the bowl's numbers, worked out by hand
    [stored] = store.winners("sm_90")
    assert stored.config == fastest and stored.median_ms == pytest.approx(_model_ms(fastest))
    store.close()


def test_with_a_cost_model_a_win_within_the_noise_floor_keeps_the_default(tmp_path):
    # The model's fastest config is 0.5 % faster than the default: less than the 1 % noise floor.
    default = Config(64, 64, 4, 2)
    near = Config(64, 64, 8, 2)

    def cost(key, config, careful):
        return {default: 1.0, near: 0.995}.get(config, _model_ms(config) + 0.5)

    store, tuner = _cost_model_tuner(tmp_path, cost, default)
    [result] = tuner.run([MODEL_KEY])
    assert min(MODEL_SPACE, key=lambda c: cost(MODEL_KEY, c, True)) == near  # the premise
    assert result.winner.config == default and result.speedup == 1.0
    [stored] = store.winners("sm_90")
    assert stored.config == default
    store.close()


def test_a_config_right_on_the_first_input_only_is_a_wrong_result_and_never_wins(tmp_path, kernel_device):
    """The careful pass validates every candidate again on a second input (the next seed) before it is
    timed. A config whose launches hand back the output of its first launch without computing (a stale
    result: right on the input it was computed for, and much faster than any real kernel) must end
    `wrong_result` there, and never be the winner."""
    from flashtune.tuner.ops import spec_of

    key = Key("sm_90", "fwd", 24, 16, "float32", False, batch_heads=2)
    stale = SMALL[1]
    kept: dict[str, tuple] = {}

    def workload(k, batch_heads, device, seed, **sizing):
        real = spec_of(k).workload(k, batch_heads, device, seed, **sizing)
        launch = real.run

        def run(config, out=None):
            if config != stale:
                return launch(config, out)
            if "result" not in kept:
                o, compiled = launch(config, out)
                kept["result"] = (o.clone(), compiled)
            return kept["result"]

        real.run = run
        return real

    bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 2), seed=5, workload=workload)
    quick = {m.config: m for m in bench.measure(key, 2, SMALL, careful=False)}
    assert all(m.outcome == "ok" for m in quick.values())  # the first input cannot tell it apart ...
    assert quick[stale].median_ms < quick[SMALL[0]].median_ms  # ... and it is the fastest there
    careful = {m.config: m for m in bench.measure(key, 2, SMALL, careful=True)}
    assert careful[SMALL[0]].outcome == "ok"
    assert careful[stale].outcome == "wrong_result" and careful[stale].median_ms is None
    assert careful[stale].error.startswith("second input (seed 6): relative error")

    # The whole loop: stored as a wrong result, and the real config wins.
    kept.clear()
    store = Store.open(f"sqlite:///{tmp_path / 'stale.db'}")
    run = store.start_run(RunInfo("cpu-interpreter", "sm_90", 1, 232448, "", "", "", "", "v" * 12, "h", {}))
    bench = LocalBench(kernel_device, quick=(0, 1), careful=(0, 2), seed=5, workload=workload)
    tuner = Tuner(store, run, bench, kernel_version="v" * 12, gpu_name="cpu-interpreter",
                  space=lambda k: SMALL, default=lambda k: SMALL[0], batch_heads=lambda k: 2)
    [result] = tuner.run([key])
    outcomes = {t.config: t.outcome for t in store.trials(key)}
    assert outcomes == {SMALL[0]: "ok", stale: "wrong_result"}
    assert result.winner.config == SMALL[0] and [w.config for w in store.winners("sm_90")] == [SMALL[0]]
    store.close()
