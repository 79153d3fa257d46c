"""Decode keys tuned like the rest: the "kvcache" op's space, `tune --decode` through the real worker,
the dispatcher's kvcache rules (exact, nearest, default) and recording, on CPU under the interpreter.

The GPU detection is answered by a stand-in (the only thing stubbed, as in tests/tuner/test_tuner_cli.py);
the spawned benchmark worker, the harness, the store and the kernels are the real ones.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner

import flashtune.tuner.gpu

from helpers.dispatch import build_db

from flashtune.db.store import Store
from flashtune.db.types import Config, Key
from flashtune.kernel import attention_kvcache, dispatch, record
from flashtune.kernel.ops.kvcache import SPLITS_KNOB, default_decode_config, plan_decode
from flashtune.kernel.testing import attention_kvcache_reference
from flashtune.kernel.version import op_version
from flashtune.tuner.cli import main
from flashtune.tuner.gpu import planned_gpu
from flashtune.tuner.ops.kvcache import KVCacheInputs, kvcache_bytes, kvcache_flops, kvcache_space, visible_pairs
from flashtune.kernel.providers import provider_config, provider_of
from flashtune.tuner.ops import op_spec
from helpers import rel

# 16 KB of shared memory leaves the decode space of the tiny key below at three configs (1, 2 and 4
# splits of n64-w4-s2): a tune is a few interpreter trials.
STAND_IN = dataclasses.replace(planned_gpu("sm_80"), name="CPU stand-in (interpreter)", sm_count=1,
                               smem_limit=16384, present=True)
TINY = ["--decode", "--q-len", "2", "--kv-len", "256", "--head-dim", "16", "--dtype", "fp32", "--causal",
        "--batch-heads", "2", "--group", "2"]
TINY_KEY = Key("sm_80", "kvcache", 2, 16, "float32", True, seq_len_kv=256, batch_heads=2, group=2)
H200 = dataclasses.replace(planned_gpu("sm_90"), sm_count=132)


@pytest.fixture
def stand_in_gpu(monkeypatch):
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: STAND_IN)
    return STAND_IN




def test_space_is_splits_tiles_and_pipelines_around_the_default():
    key = Key("sm_90", "kvcache", 1, 128, "bfloat16", False, seq_len_kv=32768, batch_heads=256, group=4)
    space = kvcache_space(key, H200)
    default = op_spec("kvcache").default(key, H200)
    assert space[0] == default == default_decode_config(1, 32768, 128, "bf16", batch_heads=256, group=4,
                                                        sm_count=132, arch="sm_90")
    assert 20 <= len(space) <= 60 and len(set(space)) == len(space)
    splits = {c.extra_dict[SPLITS_KNOB] for c in space}
    assert {1, 2, 16, 64} <= splits and {c.block_n for c in space} == {64, 128}
    # More packed rows than one 16-row tile (G·Nq = 32): the half tile is tried too.
    rows32 = Key("sm_90", "kvcache", 8, 128, "bfloat16", False, seq_len_kv=2048, batch_heads=2048, group=4)
    assert {c.block_m for c in kvcache_space(rows32, H200)} == {16, 32}
    # Every config fits the GPU, and its split count is the one the launch really runs.
    small = dataclasses.replace(H200, smem_limit=64 * 1024)
    for c in kvcache_space(key, small):
        assert op_spec("kvcache").smem(c, 128, "bfloat16", "sm_90") <= 64 * 1024
        plan = plan_decode(c, batch=16, heads_kv=4, group=4, seq_q=1, seq_kv=32768, head_dim=128)
        assert plan.num_splits == c.extra_dict[SPLITS_KNOB]
    # SDPA competes only where it computes the key's call (no lengths, top-left causal): one query, or not causal.
    assert op_spec("kvcache").sdpa_competes(key) == (key.seq_len == 1 or not key.causal)


def test_flops_and_bytes_count_the_visible_pairs_and_the_cache():
    assert visible_pairs(1, 100, True) == 100 and visible_pairs(4, 10, True) == 7 + 8 + 9 + 10
    key = Key("sm_90", "kvcache", 4, 64, "float16", True, seq_len_kv=10, batch_heads=8, group=2)
    assert kvcache_flops(key, 8) == 4 * 8 * 64 * 34
    # B·Hq = 8 with G = 2: the inputs are B=1, Hq=8, Hkv=4; K+V of 10 tokens, Q and O of 4 queries.
    assert kvcache_bytes(key, 8) == 2 * 4 * 10 * 64 * 2 + 2 * 8 * 4 * 64 * 2


def test_workload_checks_against_the_reference_and_catches_a_wrong_output(kernel_device):
    inputs = KVCacheInputs.build(TINY_KEY, 2, torch.device(kernel_device), seed=5)
    assert inputs.k.shape == (1, 1, 256, 16) and inputs.q.shape == (1, 2, 2, 16)  # real GQA
    for config in kvcache_space(TINY_KEY, STAND_IN):
        out, _ = inputs.run(config, out=torch.full_like(inputs.q, float("nan")))
        assert inputs.check(out) is None
    wrong = out.clone()
    wrong[0, 1, 1] += 0.3  # one row off
    assert "relative error" in inputs.check(wrong)
    with pytest.raises(ValueError, match="at least as many cached keys as queries"):
        KVCacheInputs.build(dataclasses.replace(TINY_KEY, seq_len=300), 2, torch.device(kernel_device))


def test_tune_decode_through_the_real_worker_stores_trials_and_a_winner(stand_in_gpu, tmp_path):
    url = f"sqlite:///{tmp_path / 'decode.db'}"
    result = CliRunner().invoke(main, ["tune", *TINY, "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    [key] = json.loads(result.stdout)["keys"]
    assert key["key"] == str(TINY_KEY) and key["complete"] and key["winner_stored"]
    assert key["provider"] == "kernel" and key["outcomes"] == {"ok": 3} and key["tbps"] > 0
    with Store.open(url, create=False) as store:
        [winner] = store.winners("sm_80")
        trials = store.trials()
    assert winner.key == TINY_KEY and str(winner.config) == key["winner"]
    assert {str(t.config) for t in trials} == {str(c) for c in kvcache_space(TINY_KEY, STAND_IN)}
    assert all(t.key == TINY_KEY and t.tflops > 0 for t in trials)  # the FLOP rate, as for every op
    table = CliRunner().invoke(main, ["tune", *TINY, "--db", url])
    assert table.exit_code == 0 and "TB/s" in table.stdout  # printed for decode keys


def test_sdpa_backends_compete_for_one_query_decode_keys(stand_in_gpu, tmp_path, kernel_device):
    if kernel_device != "cpu":
        pytest.skip("the CPU build of torch runs the flash backend and refuses the others")
    one = dataclasses.replace(TINY_KEY, seq_len=1)
    inputs = KVCacheInputs.build(one, 2, torch.device(kernel_device), seed=int(torch.randint(0, 2**20, (1,))))
    out, compiled = inputs.run(provider_config("sdpa_flash"))
    assert compiled is None and inputs.check(out) is None
    url = f"sqlite:///{tmp_path / 'one.db'}"
    args = [a if a != "2" or i != TINY.index("--q-len") + 1 else "1" for i, a in enumerate(TINY)]
    result = CliRunner().invoke(main, ["tune", *args, "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    with Store.open(url, create=False) as store:
        outcomes = {provider_of(t.config): t.outcome for t in store.trials(one)}
    assert outcomes["sdpa_flash"] == "ok" and outcomes["sdpa_cudnn"] != "ok" and outcomes["kernel"] == "ok"


def test_tune_op_kvcache_is_the_same_as_decode_and_kv_len_needs_it(stand_in_gpu, tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    plan = CliRunner().invoke(main, ["tune", "--op", "fwd", "--decode", "--kv-len", "1024..4096", "--seq", "512",
                                     "--head-dim", "64", "--dtype", "fp16", "--no-causal", "--batch-heads", "64",
                                     "--dry-run", "--arch", "sm_90", "--json"])
    assert plan.exit_code == 0, plan.output
    data = json.loads(plan.stdout)
    assert data["keys"] == 1 + 3 and [g["op"] for g in data["groups"]] == ["fwd", "kvcache"]
    result = CliRunner().invoke(main, ["tune", "--kv-len", "1024", "--db", url])
    assert result.exit_code == 2 and "--kv-len and --q-len shape decode keys" in result.output


def _cache(d: int = 16, b: int = 2, hq: int = 4, hkv: int = 2, nq: int = 2, nmax: int = 96, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen)
    k, v = (torch.randn(b, hkv, nmax, d, generator=gen) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_dispatcher_uses_the_stored_kvcache_winner_exact_and_nearest(tmp_path, request, backend, kernel_device):
    url = f"sqlite:///{tmp_path / 'w.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    tuned = Config(16, 32, 4, 2, ((SPLITS_KNOB, 3),))
    key = Key("sm_90", "kvcache", 2, 16, "float32", True, seq_len_kv=96, batch_heads=8, group=2)
    build_db(url, [(key, tuned, 0.1, op_version("kvcache"))])  # a real store, the winner written through db.store
    try:
        dispatch.reload(url, archs=["sm_90"])
        q, k, v = _cache()
        exact = dispatch.explain(q, k, v, True, arch="sm_90", op="kvcache")
        assert (exact.source, exact.config, exact.key) == ("exact", tuned, key)
        near = dispatch.lookup("sm_90", 2, 16, "fp32", True, seq_len_kv=160, batch_heads=16, group=2, op="kvcache")
        assert (near.source, near.config) == ("nearest", tuned)
        far = dispatch.lookup("sm_90", 2, 16, "fp32", True, seq_len_kv=4096, batch_heads=8, group=2, op="kvcache")
        assert far.source == "default" and far.config == default_decode_config(
            2, 4096, 16, "fp32", batch_heads=8, group=2, arch="sm_90")
        # Not the forward's table: the same sizes as a forward key have no winner.
        assert dispatch.explain(q, k[:, :, :2], v[:, :, :2], True, arch="sm_90").source == "default"
        # The stored config runs and still matches the float64 reference (ragged, causal, GQA).
        q, k, v = (t.to(kernel_device) for t in (q, k, v))
        lens = torch.tensor([2, 96], dtype=torch.int32, device=kernel_device)
        out = attention_kvcache(q, k, v, cache_seqlens=lens, causal=True, config=exact.config)
        ref = attention_kvcache_reference(q, k, v, cache_seqlens=lens, causal=True)
        assert rel(out, ref) < 2e-5
    finally:
        dispatch.reload()


def test_config_none_goes_through_the_memoised_dispatcher(kernel_device):
    q, k, v = (t.to(kernel_device) for t in _cache(d=24, seed=3))
    lens = torch.tensor([50, 96], dtype=torch.int32, device=kernel_device)
    first = dispatch.kvcache_plan(q, k, v, True, True)
    assert dispatch.kvcache_plan(q.clone(), k.clone(), v.clone(), True, True) is first  # one dict lookup
    assert dispatch.kvcache_plan(q, k, v, False, True) is not first
    # The plan is resolved for Nmax's power-of-two bucket (96 -> 128): dispatch.kv_bucket.
    assert first.choice.op == "kvcache" and first.choice.key.seq_len_kv == 128 and first.choice.key.group == 2
    out = attention_kvcache(q, k, v, cache_seqlens=lens, causal=True)
    assert rel(out, attention_kvcache_reference(q, k, v, cache_seqlens=lens, causal=True)) < 2e-5
    with pytest.raises(ValueError, match="unsupported head dim 12"):
        attention_kvcache(q[..., :12], k[..., :12], v[..., :12])


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_recorded_kvcache_keys_are_tuned_by_tune_recorded(stand_in_gpu, tmp_path, monkeypatch, request, backend):
    url = f"sqlite:///{tmp_path / 'rec.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    monkeypatch.setattr(record, "ENABLED", True)
    record.flush(url)  # nothing pending from other tests
    q, k, v = _cache(d=16, b=1, hq=2, hkv=1, nq=2, nmax=256)
    for _ in range(3):
        attention_kvcache(q, k, v, causal=True)
    pending = record.pending()
    interp_key = dataclasses.replace(TINY_KEY, arch=dispatch.INTERPRETER_ARCH)
    assert pending.get(interp_key) == 3
    assert record.flush(url) >= 1
    with Store.open(url, create=False) as store:
        assert {r.key: r.calls for r in store.recorded()}[interp_key] == 3
    result = CliRunner().invoke(main, ["tune", "--recorded", "--op", "kvcache", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    assert [k["key"] for k in json.loads(result.stdout)["keys"]] == [str(TINY_KEY)]
    with Store.open(url, create=False) as store:
        assert [w.key for w in store.winners("sm_80")] == [TINY_KEY]
    assert math.isfinite(json.loads(result.stdout)["keys"][0]["median_ms"])
