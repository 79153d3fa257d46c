"""The tuning loop on workload keys (B·Hq bucket and GQA group), driven by cost models against a real database (SQLite,
and PostgreSQL when FLASHTUNE_TEST_PG_URL is set): each key timed at its own B·Hq bucket and GQA
group, the default always timed and kept unless beaten by more than the noise, SDPA providers as
candidates, --kernel-only, and sibling buckets sharing the first pass's ranking."""
from __future__ import annotations

import dataclasses
import math

import pytest

from flashtune.db.arch import smem_limit
from flashtune.db.store import RunInfo, Store
from flashtune.db.types import Config, Key
from flashtune.kernel.ops.fwd import default_config
from flashtune.kernel.providers import provider_config, provider_of
from flashtune.tuner.gpu import planned_gpu
from flashtune.tuner.loop import Tuner, TuneSettings
from flashtune.tuner.measure import FunctionBench
from flashtune.tuner.ops.fwd import attention_flops, candidates
from flashtune.tuner.session import TuningSession

ARCH = "sm_90"
LIMIT = smem_limit(ARCH)
KV = "w" * 12
GPU = "test gpu"
DEFAULT = default_config(ARCH, 64, "float16", LIMIT)  # m128-n64-w8-s3
CUDNN, FLASH = provider_config("sdpa_cudnn"), provider_config("sdpa_flash")
# The best kernel tile depends on the workload: small buckets want short query tiles (more programs
# for the SMs), GQA wants wide K/V tiles.
BEST = {(16, 1): Config(64, 64, 4, 3), (256, 1): Config(128, 64, 8, 3), (16, 2): Config(64, 128, 4, 3),
        (256, 2): Config(128, 128, 8, 3)}


def bowl(config: Config, best: Config) -> float:
    return (abs(math.log2(config.block_m / best.block_m)) + abs(math.log2(config.block_n / best.block_n))
            + abs(math.log2(config.num_warps / best.num_warps)) + 0.3 * abs(config.num_stages - best.num_stages))


def workload_cost(key: Key, config: Config, careful: bool):
    """ms grows with the bucket; the bowl's centre depends on (bucket, group); providers refuse."""
    if provider_of(config) != "kernel":
        return "compile_error"
    return key.batch_heads / 16 * (1 + 0.25 * bowl(config, BEST[key.batch_heads, key.group]))


@pytest.fixture
def store(db_url):
    s = Store.open(db_url)
    yield s
    s.close()


def start(store: Store) -> int:
    return store.start_run(RunInfo(GPU, ARCH, 132, LIMIT, "1", "12.4", "3.6", "2.11", KV, "host", {}))


def space(key: Key) -> list[Config]:
    return candidates(key.head_dim, key.dtype, LIMIT, arch=ARCH)


def tuner(store: Store, bench, *, providers=(), settings=TuneSettings(), default=lambda k: DEFAULT) -> Tuner:
    return Tuner(store, start(store), bench, kernel_version=KV, gpu_name=GPU, space=space, default=default,
                 batch_heads=lambda k: k.batch_heads, providers=lambda k: list(providers), settings=settings)


def key(bh: int, group: int = 1, n: int = 1024) -> Key:
    return Key(ARCH, "fwd", n, 64, "float16", True, batch_heads=bh, group=group)


def test_each_bucket_and_group_is_timed_at_its_own_workload(store):
    keys = [key(bh, g) for bh in (16, 256) for g in (1, 2)]
    bench = FunctionBench(workload_cost)
    # Separate groups: no sibling narrowing between (16, g) and (256, g) would hide a wrong bucket.
    results = tuner(store, bench, settings=TuneSettings(sibling_top=200)).run(keys)
    assert {r.key for r in results} == set(keys)
    for r in results:
        k = r.key
        assert r.batch_heads == k.batch_heads and r.winner.config == BEST[k.batch_heads, k.group]
        assert r.kernel_config == r.winner.config and r.provider == "kernel"
        # TFLOP/s are counted at the key's own B·Hq.
        assert r.winner.tflops == pytest.approx(attention_flops(k, k.batch_heads) / (r.winner.median_ms * 1e-3) / 1e12)
    winners = {w.key: w for w in store.winners(ARCH)}
    assert set(winners) == set(keys)  # four keys, four rows: bucket and group are part of the key
    assert {(w.key.batch_heads, w.key.group): w.config for w in winners.values()} == BEST
    assert all(w.kernel_config == w.config for w in winners.values())


def test_session_times_a_key_at_its_bucket_and_an_unbucketed_key_at_the_fill_size(store):
    gpu = planned_gpu(ARCH)
    session = TuningSession(gpu, store, start(store), FunctionBench(workload_cost), kernel_only=True)
    assert session.batch_heads(key(64)) == 64
    assert session.batch_heads(Key(ARCH, "fwd", 4096, 64, "float16", True)) == 32  # 2**17 tokens
    assert session.providers(key(64)) == []
    assert CUDNN in TuningSession(gpu, store, 0, FunctionBench(workload_cost)).providers(key(64))


def test_default_is_kept_when_nothing_beats_it_by_more_than_the_noise(store):
    near = Config(64, 64, 4, 3)  # 0.5 % faster than the default: within the 1 % floor
    bench = FunctionBench(lambda k, c, careful: 0.995 if c == near else 1.0 if c == DEFAULT else 2.0)
    [r] = tuner(store, bench, providers=[CUDNN]).run([key(64)])
    assert (key(64), DEFAULT, True) in bench.calls  # timed in the careful pass beside the survivors
    assert r.noise == pytest.approx(0.01) and r.winner.config == DEFAULT and r.kernel_config == DEFAULT
    [w] = store.winners(ARCH)
    assert w.config == DEFAULT and w.kernel_config == DEFAULT  # "tuned, and the default is best"


def test_measured_noise_raises_the_bar(store):
    # The default's two interleaved careful timings differ by 10 %: a 5 % faster config does not win.
    faster = Config(64, 64, 4, 3)
    seen = {"default": 0}

    def noisy(k, c, careful):
        if c == DEFAULT:
            seen["default"] += 1
            return 1.1 if careful and seen["default"] % 2 == 1 else 1.0  # calls: first pass, careful, again
        return 0.95 if c == faster else 3.0

    [r] = tuner(store, FunctionBench(noisy)).run([key(64)])
    assert r.noise == pytest.approx(0.1) and r.winner.config == DEFAULT and r.default_ms == 1.0


def test_a_candidate_that_beats_the_default_by_more_than_the_noise_wins(store):
    faster = Config(64, 64, 4, 3)
    bench = FunctionBench(lambda k, c, careful: 0.95 if c == faster else 1.0 if c == DEFAULT else 2.0)
    [r] = tuner(store, bench).run([key(64)])
    assert r.winner.config == faster and r.speedup == pytest.approx(1 / 0.95)
    [w] = store.winners(ARCH)
    assert w.config == faster and w.kernel_config == faster


def test_sdpa_provider_wins_with_the_kernel_config_fallback(store):
    faster = Config(64, 64, 4, 3)

    def cost(k, c, careful):
        if c == CUDNN:
            return 0.5
        if c == FLASH:
            return "compile_error"  # torch refused the backend
        return 0.9 if c == faster else 1.0 if c == DEFAULT else 2.0

    bench = FunctionBench(cost)
    [r] = tuner(store, bench, providers=[CUDNN, FLASH]).run([key(64)])
    # Providers skip the first pass and are timed carefully, in the same pass as the kernel survivors.
    assert (key(64), CUDNN, False) not in bench.calls
    careful = [c for _, c, is_careful in bench.calls if is_careful]
    assert careful[0] == DEFAULT and {CUDNN, FLASH, faster} <= set(careful)
    assert r.provider == "sdpa_cudnn" and r.kernel_config == faster
    [w] = store.winners(ARCH)
    assert w.config == CUDNN and w.kernel_config == faster
    refused = {t.config: t for t in store.trials(key(64))}[FLASH]
    assert refused.outcome == "compile_error" and refused.median_ms is None


def test_kernel_only_session_has_no_provider_trials(store):
    session = TuningSession(planned_gpu(ARCH), store, start(store), FunctionBench(lambda k, c, careful: 1.0),
                            kernel_only=True)
    session.tune([key(16)], space=lambda k: space(k)[:6], default=lambda k: DEFAULT)
    trials = store.trials(key(16))
    assert trials and all(provider_of(t.config) == "kernel" for t in trials)
    with_providers = TuningSession(planned_gpu(ARCH), store, start(store), FunctionBench(lambda k, c, careful: 1.0))
    with_providers.tune([key(32)], space=lambda k: space(k)[:6], default=lambda k: DEFAULT)
    assert {provider_of(t.config) for t in store.trials(key(32))} >= {"kernel", "sdpa_cudnn"}


def test_sibling_buckets_time_only_the_first_bucket_s_top_configs(store):
    keys = [key(bh) for bh in (16, 64, 256)]
    centre = BEST[16, 1]

    def cost(k, c, careful):  # one bowl for every bucket, but its centre is slow above bucket 16
        if provider_of(c) != "kernel":
            return 0.5 * k.batch_heads / 16 if careful else pytest.fail("a provider in the first pass")
        return k.batch_heads / 16 * (1 + 0.25 * bowl(c, centre) + (0.2 if c == centre and k.batch_heads > 16 else 0))

    bench = FunctionBench(cost)
    first, *siblings = tuner(store, bench, providers=[CUDNN], settings=TuneSettings(sibling_top=8)).run(keys)
    assert not first.narrowed and all(r.narrowed for r in siblings)
    full = {c for k, c, careful in bench.calls if k == keys[0] and not careful}
    assert len(full) == len(set(space(keys[0])) | {DEFAULT})
    ranked = sorted((t for t in store.trials(keys[0]) if t.outcome == "ok" and provider_of(t.config) == "kernel"),
                    key=lambda t: t.median_ms)
    top = {t.config for t in ranked[:8]}
    for r in siblings:
        timed = {c for k, c, careful in bench.calls if k == r.key}
        assert timed <= top | {DEFAULT, CUDNN} and {CUDNN, DEFAULT} <= timed
        assert r.complete and r.provider == "sdpa_cudnn"
        assert r.kernel_config in top and r.kernel_config != centre  # its own best kernel config
    assert len(bench.calls) < 2 * len(full)


def test_sibling_ranking_survives_a_rerun(store):
    keys = [key(bh) for bh in (16, 64)]
    tuner(store, FunctionBench(lambda k, c, careful: k.batch_heads * (1 + bowl(c, BEST[16, 1])))).run(keys)
    again = FunctionBench(lambda k, c, careful: 1.0)
    rerun = tuner(store, again).run(keys)
    assert again.calls == [] and all(r.complete for r in rerun)


def test_recorded_order_is_kept(store):
    keys = [key(256), key(16), dataclasses.replace(key(16), seq_len=512)]
    bench = FunctionBench(lambda k, c, careful: 1.0)
    results = tuner(store, bench).run(keys, keep_order=True)
    assert [r.key for r in results] == keys
