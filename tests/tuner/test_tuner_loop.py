"""The tuning loop, driven by a deterministic cost model against a real SQLite database."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from flashtune.db.arch import smem_limit
from flashtune.db.store import RunInfo, Store
from flashtune.db.types import Config, Key
from flashtune.kernel.ops.fwd import default_config
from flashtune.tuner.loop import Tuner, TuneSettings, tuning_order
from flashtune.tuner.measure import FunctionBench, Measurement
from flashtune.tuner.ops.fwd import attention_flops, candidates

ARCH = "sm_90"
LIMIT = smem_limit(ARCH)
BEST = Config(128, 64, 4, 3)
BROKEN = Config(64, 32, 2, 2)  # fastest of all in the model, but its output is wrong
KV = "k" * 12
GPU = "test gpu"


def model_ms(key: Key, config: Config) -> float:
    """A bowl around BEST in log2 space; the scale grows with N so different keys differ."""
    d = (abs(math.log2(config.block_m / BEST.block_m)) + abs(math.log2(config.block_n / BEST.block_n))
         + abs(math.log2(config.num_warps / BEST.num_warps)) + 0.3 * abs(config.num_stages - BEST.num_stages))
    return key.seq_len / 1000 * (1 + 0.25 * d)


def cost(key: Key, config: Config, careful: bool):
    if config == BROKEN:
        return Measurement(config, "wrong_result", compile_s=0.1, error="relative error 0.4 > 0.02")
    if config.block_n == 128 and config.num_stages == 3:
        return "out_of_resources"
    ms = model_ms(key, config)
    # The first pass is noisy: one near-best config looks better than BEST until timed carefully.
    if not careful and config == Config(128, 64, 4, 2):
        ms = model_ms(key, BEST) * 0.97
    return ms


def space(key: Key) -> list[Config]:
    return candidates(key.head_dim, key.dtype, LIMIT)


def default(key: Key) -> Config:
    return default_config(key.arch, key.head_dim, key.dtype, LIMIT)


@pytest.fixture
def store(tmp_path):
    s = Store.open(f"sqlite:///{tmp_path / 'tune.db'}")
    yield s
    s.close()


def start(store: Store) -> int:
    return store.start_run(RunInfo(GPU, ARCH, 132, LIMIT, "1", "12.4", "3.6", "2.11", KV, "host", {}))


def make_tuner(store, bench, **kw) -> Tuner:
    return Tuner(store, start(store), bench, kernel_version=KV, gpu_name=GPU, space=space, default=default,
                 batch_heads=lambda k: 8, **kw)


KEYS = [Key(ARCH, "fwd", n, 64, "float16", c) for c in (False, True) for n in (512, 128, 256)]


def test_winner_trials_and_database(store):
    bench = FunctionBench(cost)
    tuner = make_tuner(store, bench, settings=TuneSettings(prune_ratio=1.3, careful_top=4))
    results = tuner.run(KEYS)
    assert tuner.stop_reason is None
    assert [r.key for r in results] == tuning_order(KEYS)
    for r in results:
        assert r.complete and r.winner is not None and r.winner.config == BEST
        assert r.winner.median_ms == pytest.approx(model_ms(r.key, BEST))
        assert r.winner.tflops == pytest.approx(attention_flops(r.key, 8) / (r.winner.median_ms * 1e-3) / 1e12)
        assert r.speedup == pytest.approx(model_ms(r.key, default(r.key)) / model_ms(r.key, BEST))
        trials = store.trials(r.key)
        # Every candidate (and the default) stored exactly once, with the outcome the bench reported.
        expected = set(space(r.key)) | {default(r.key)}
        assert Counter(t.config for t in trials) == Counter(expected)
        by_config = {t.config: t for t in trials}
        assert by_config[BROKEN].outcome == "wrong_result" and by_config[BROKEN].median_ms is None
        assert all(t.outcome == "out_of_resources" for c, t in by_config.items()
                   if c.block_n == 128 and c.num_stages == 3)
    winners = {w.key: w for w in store.winners(ARCH)}
    assert set(winners) == set(KEYS)
    assert all(w.config == BEST and w.kernel_version == KV and w.gpu_name == GPU for w in winners.values())


def test_first_pass_prunes_and_only_survivors_are_timed_carefully(store):
    bench = FunctionBench(cost)
    make_tuner(store, bench, settings=TuneSettings(prune_ratio=1.3, careful_top=4)).run(KEYS[:1])
    key = KEYS[0]
    careful = [c for k, c, is_careful in bench.calls if is_careful]
    first = [c for k, c, is_careful in bench.calls if not is_careful]
    assert len(first) == len(set(space(key)) | {default(key)})
    # The noisy near-best is re-timed carefully and loses; BEST is in the careful set.
    assert BEST in careful and Config(128, 64, 4, 2) in careful
    assert len(careful) <= 4 + 1  # the fastest four plus the default when it survived
    assert all(model_ms(key, c) <= 1.3 * model_ms(key, BEST) or c == default(key) for c in careful)
    stored = {t.config: t for t in store.trials(key)}
    assert stored[Config(128, 64, 4, 2)].median_ms == pytest.approx(model_ms(key, Config(128, 64, 4, 2)))


def test_neighbouring_n_seeds_the_next_key(store):
    bench = FunctionBench(cost)
    make_tuner(store, bench).run([KEYS[1], KEYS[2]])  # N=128 then N=256 of one group
    second = [c for k, c, careful in bench.calls if k == KEYS[2] and not careful]
    assert second[0] == BEST  # the N=128 winner is timed first for N=256
    assert second[1] == default(KEYS[2])


def test_interrupt_then_resume_skips_stored_trials(store):
    calls = {"n": 0}

    def stop_after_40() -> bool:
        return calls["n"] >= 40

    def counting(key, config, careful):
        calls["n"] += 1
        return cost(key, config, careful)

    first = make_tuner(store, FunctionBench(counting), should_stop=stop_after_40)
    partial = first.run(KEYS)
    assert first.stop_reason == "interrupted"
    stored_before = len(store.trials())
    assert 0 < stored_before <= 40
    assert all(not r.winner_stored for r in partial if not r.complete)

    again = FunctionBench(cost)
    results = make_tuner(store, again).run(KEYS)
    measured = {(k, c) for k, c, careful in again.calls if not careful}
    # Nothing stored by the first run was measured again, and the end state is as if uninterrupted.
    assert not measured & {(t.key, t.config) for t in store.trials() if t.run_id == 1}
    for r in results:
        assert r.complete and r.winner.config == BEST
        assert Counter(t.config for t in store.trials(r.key)) == Counter(set(space(r.key)) | {default(r.key)})
    assert sum(r.skipped for r in results) == stored_before

    third = FunctionBench(cost)
    rerun = make_tuner(store, third).run(KEYS)
    assert third.calls == [] and all(r.winner.config == BEST and r.new_trials == 0 for r in rerun)


def test_budget_stops_after_the_trial_in_flight(store):
    now = {"t": 0.0}

    def ticking(key, config, careful):
        now["t"] += 1.0  # each trial "takes" a second
        return cost(key, config, careful)

    tuner = make_tuner(store, FunctionBench(ticking), settings=TuneSettings(budget_s=10),
                       clock=lambda: now["t"])
    results = tuner.run(KEYS)
    assert tuner.stop_reason == "budget"
    assert now["t"] == 10 and len(results) == 1 and not results[0].complete
    # Stored: failures and configs the first pass ruled out; survivors wait for the careful pass.
    stored = store.trials()
    assert 0 < len(stored) < 10 and not store.winners(ARCH)


def test_settings_reject_nonsense():
    with pytest.raises(ValueError, match="budget"):
        TuneSettings(budget_s=0)
    with pytest.raises(ValueError, match="prune_ratio"):
        TuneSettings(prune_ratio=1.0)


def test_winner_comes_only_from_the_careful_pass(store):
    # Z is a survivor that is never timed carefully (careful_top=2) and whose lucky first-pass time
    # is below every careful time: it must not win on that first-pass number.
    x, y, z = Config(128, 64, 4, 3), Config(128, 64, 4, 2), Config(64, 64, 4, 3)
    times = {x: (1.0, 3.0), y: (1.1, 2.0), z: (1.2, 1.5)}  # (first pass, careful)
    key = Key(ARCH, "fwd", 1024, 64, "float16", False)

    def model(k, config, careful):
        first, slow = times[config]
        return slow if careful else first

    tuner = Tuner(store, start(store), FunctionBench(model), kernel_version=KV, gpu_name=GPU,
                  space=lambda k: list(times), default=lambda k: x, batch_heads=lambda k: 8,
                  settings=TuneSettings(prune_ratio=1.5, careful_top=2))
    [result] = tuner.run([key])
    assert result.winner.config == y and result.winner.median_ms == 2.0
    [winner] = store.winners(ARCH)
    assert winner.config == y
    # Run again: nothing new is measured, and the stored winner is reported, not a first-pass time.
    bench = FunctionBench(model)
    [again] = Tuner(store, start(store), bench, kernel_version=KV, gpu_name=GPU, space=lambda k: list(times),
                    default=lambda k: x, batch_heads=lambda k: 8,
                    settings=TuneSettings(prune_ratio=1.5, careful_top=2)).run([key])
    assert bench.calls == [] and again.complete and again.winner.config == y


def test_default_is_timed_carefully_even_when_the_first_pass_would_drop_it(store):
    fast, slow_default = Config(128, 64, 4, 3), Config(64, 32, 4, 2)
    times = {fast: (1.0, 1.0), slow_default: (2.0, 2.5)}  # default: 2x in the first pass, 2.5x careful
    keys = [Key(ARCH, "fwd", n, 64, "float16", False) for n in (1024, 2048)]
    bench = FunctionBench(lambda k, c, careful: times[c][1 if careful else 0] * k.seq_len / 1024)
    tuner = Tuner(store, start(store), bench, kernel_version=KV, gpu_name=GPU, space=lambda k: list(times),
                  default=lambda k: slow_default, batch_heads=lambda k: 8, settings=TuneSettings(prune_ratio=1.3))
    results = tuner.run(keys)
    for r in results:  # the second key is seeded with the first one's winner, which prunes the default
        assert (r.key, slow_default, True) in bench.calls
        assert r.speedup == pytest.approx(2.5)


def test_a_finished_key_is_not_retimed_when_another_gpu_holds_its_winner(store):
    key = Key(ARCH, "fwd", 1024, 64, "float16", False)
    configs = [Config(128, 64, 4, 3), Config(64, 64, 4, 3)]
    other_run = store.start_run(RunInfo("faster gpu", ARCH, 132, LIMIT, "1", "12.4", "3.6", "2.11", KV, "h2", {}))
    other = Tuner(store, other_run, FunctionBench(lambda k, c, careful: 0.5), kernel_version=KV,
                  gpu_name="faster gpu", space=lambda k: configs, default=lambda k: configs[0],
                  batch_heads=lambda k: 8)
    other.run([key])
    for attempt in range(2):
        bench = FunctionBench(lambda k, c, careful: 1.0)
        [result] = Tuner(store, start(store), bench, kernel_version=KV, gpu_name=GPU, space=lambda k: configs,
                         default=lambda k: configs[0], batch_heads=lambda k: 8).run([key])
        assert (len(bench.calls) > 0) == (attempt == 0)  # measured once, then recognised as done
        assert result.complete and not result.winner_stored
        # First this run's own best (not stored: slower); then the stored winner it found.
        assert result.winner.gpu_name == (GPU if attempt == 0 else "faster gpu")
    [winner] = store.winners(ARCH)
    assert winner.gpu_name == "faster gpu" and winner.median_ms == 0.5
