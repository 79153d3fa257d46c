"""Packed (varlen) and paged keys: the workloads check candidates against per-document float64 references (a
result of the whole pack as one sequence fails them), `tune` stores winners of varlen, varlen_bwd and paged
kvcache keys through the real worker into a real SQLite file, SDPA never competes for them, and attention_varlen
and paged attention_kvcache calls take those winners (the interpreter)."""
from __future__ import annotations

import dataclasses
import json

import flashtune.tuner.gpu
import pytest
import torch
from click.testing import CliRunner
from flashtune.db.store import Store
from flashtune.db.types import Config, Key, bucket
from flashtune.kernel import attention_kvcache, attention_varlen, dispatch
from flashtune.kernel.dispatch import INTERPRETER_ARCH
from flashtune.kernel.kvcache import paged_kv
from flashtune.kernel.testing import attention_kvcache_reference
from flashtune.kernel.version import op_version
from flashtune.tuner.cli import main
from flashtune.tuner.gpu import planned_gpu
from flashtune.tuner.ops import op_spec
from flashtune.tuner.ops.varlen import document_lengths
from helpers.db import run_info

STAND_IN = dataclasses.replace(planned_gpu(INTERPRETER_ARCH), name="CPU stand-in (interpreter)", sm_count=1,
                               smem_limit=8192, present=True)


def _seed() -> int:
    return int(torch.randint(0, 2**20, (1,)))


def test_document_lengths_pack_the_tokens() -> None:
    for tokens, longest in ((64, 16), (100, 100), (4096, 512), (10, 64)):
        lengths = document_lengths(tokens, longest, torch.Generator().manual_seed(_seed()))
        assert sum(lengths) == tokens and lengths[0] == min(tokens, longest) and max(lengths) <= longest
        assert min(lengths) >= 1


@pytest.mark.parametrize("op", ["varlen", "varlen_bwd"])
def test_packed_workload_checks_documents_apart(kernel_device: str, op: str) -> None:
    """A packed candidate passes the per-document reference; the same inputs attended as one sequence (what a
    kernel crossing documents computes) fail it."""
    key = Key(INTERPRETER_ARCH, op, 16, 16, "float32", True, batch_heads=2, group=2, tokens=64, sinks=True)
    spec = op_spec(op)
    assert spec.sdpa_providers is False
    work = spec.workload(key, key.batch_heads, torch.device(kernel_device), _seed())
    config = spec.default(key, STAND_IN)
    out, _ = work.run(config)
    assert work.check(out) is None
    whole = dataclasses.replace(work.pack, docs=torch.tensor([[0], [64], [0], [64]], dtype=torch.int32,
                                                            device=kernel_device), batch=1, max_q=64, max_k=64)
    crossing = dataclasses.replace(work, pack=whole, shape=dataclasses.replace(work.shape, seq_q=64, seq_k=64))
    wrong, _ = crossing.run(config)
    assert "relative error" in work.check(wrong)


def test_bad_packed_keys_are_refused(kernel_device: str) -> None:
    spec = op_spec("varlen")
    for bad, message in (({"tokens": 0}, "total-token bucket"), ({"seq_len_kv": 32}, "self-attention"),
                         ({"alibi": True}, "takes no alibi")):
        fields = {"tokens": 64, **bad}
        key = Key(INTERPRETER_ARCH, "varlen", 16, 16, "float32", False, batch_heads=2, **fields)
        with pytest.raises(ValueError, match=message):
            spec.workload(key, 2, torch.device(kernel_device), 0)


def test_tune_packed_and_paged_keys_then_calls_take_their_winners(kernel_device: str, tmp_path, monkeypatch,
                                                                    restore_table) -> None:
    if kernel_device != "cpu":
        pytest.skip("the interpreter stand-in GPU")
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: STAND_IN)
    url = f"sqlite:///{tmp_path / 'packed.db'}"
    packed = CliRunner().invoke(main, ["tune", "--op", "varlen,varlen_bwd", "--seq", "16", "--tokens", "48",
                                       "--head-dim", "16", "--dtype", "fp32", "--causal", "--batch-heads", "2",
                                       "--window", "8", "--db", url, "--json"])
    assert packed.exit_code == 0, packed.output
    tuned = json.loads(packed.stdout)["keys"]
    assert {t["key"] for t in tuned} == {f"sm_80/{op}/N=16/D=16/float32/causal/BH=2/W=8/T=64"
                                         for op in ("varlen", "varlen_bwd")}
    assert all(t["complete"] and t["winner_stored"] for t in tuned)
    paged = CliRunner().invoke(main, ["tune", "--decode", "--kv-len", "64", "--page-size", "16", "--head-dim", "16",
                                      "--dtype", "fp32", "--no-causal", "--batch-heads", "2", "--db", url, "--json"])
    assert paged.exit_code == 0, paged.output
    [decode] = json.loads(paged.stdout)["keys"]
    assert decode["key"].endswith("/P=16") and decode["complete"] and decode["winner_stored"]
    with Store.open(url, create=False) as store:
        winners = {w.key: w for w in store.winners(INTERPRETER_ARCH)}
        assert all(t.config.extra == () or "provider" not in dict(t.config.extra) for t in store.trials())
    assert {k.op for k in winners} == {"varlen", "varlen_bwd", "kvcache"}
    # Calls take those winners: write distinct ones, so the launches show which config ran.
    fwd_key, bwd_key = (next(k for k in winners if k.op == op) for op in ("varlen", "varlen_bwd"))
    kv_key = next(k for k in winners if k.op == "kvcache")
    with Store.open(url) as store:
        for key, config in ((fwd_key, Config(16, 32, 2, 1)), (bwd_key, Config(16, 16, 2, 1)),
                            (kv_key, Config(16, 16, 2, 1, (("num_splits", 2),)))):
            run = store.start_run(run_info(arch=INTERPRETER_ARCH, kernel_version=op_version(key.op)))
            trial = store.record_trial(run, key, config, "ok", median_ms=1e-6)
            assert store.offer_winner(trial, replace=True)
    dispatch.reload(url, archs=[INTERPRETER_ARCH], interpreter=True)
    lengths = [16, 9, 16, 7]  # 48 tokens: the key's bucket (64) and longest document (16)
    cu = torch.tensor([0, 16, 25, 41, 48], dtype=torch.int32)
    q = torch.randn(48, 2, 16, requires_grad=True)
    k, v = (torch.randn(48, 2, 16, requires_grad=True) for _ in range(2))
    plan = dispatch.varlen_plan(q, _varlen_shape(q, k, v, cu), 48, True, (("window", 8),))
    assert (plan.fwd.source, plan.fwd.config) == ("exact", Config(16, 32, 2, 1))
    assert (plan.bwd.source, plan.bwd.config) == ("exact", Config(16, 16, 2, 1))
    out = attention_varlen(q, k, v, cu, cu, 16, 16, causal=True, window_size=(7, 0))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and sum(lengths) == out.shape[0]
    qd = torch.randn(2, 1, 1, 16)  # B·Hq 2, no GQA: the tuned key's
    kc, vc = torch.randn(2, 1, 64, 16), torch.randn(2, 1, 64, 16)
    lens = torch.tensor([64, 40], dtype=torch.int32)
    kp, vp, table = paged_kv(kc, vc, 16, lens, generator=torch.Generator().manual_seed(_seed()))
    got = attention_kvcache(qd, kp, vp, cache_seqlens=lens, block_table=table)
    want = attention_kvcache_reference(qd, kc, vc, cache_seqlens=lens, dtype=torch.float64)
    assert torch.allclose(got.double(), want, atol=1e-4)
    choice = dispatch.explain(qd, kc, vc, op="kvcache", page_size=16)
    assert choice.source == "exact" and choice.config.extra == (("num_splits", 2),)


def _varlen_shape(q, k, v, cu):
    from flashtune.kernel.ops.varlen import check_varlen_inputs

    return check_varlen_inputs(q, k, v, cu, cu, 16, 16)


def test_grid_keys_of_packed_and_paged_ops() -> None:
    from flashtune.tuner.options import TuneError, grid_keys

    keys = grid_keys("sm_90", [1024, 8192], [128], ["bfloat16"], [True], [16], [1], ["varlen"],
                     tokens=[16384, 5000])
    assert {(k.seq_len, k.tokens) for k in keys} == {(1024, 16384), (1024, bucket(5000)), (8192, 16384)}
    paged = grid_keys("sm_90", [32768], [128], ["bfloat16"], [True], [64], [8], ["kvcache"], page_sizes=[16, 256])
    assert {k.page_size for k in paged} == {16, 256}
    with pytest.raises(TuneError, match="take no alibi"):
        grid_keys("sm_90", [1024], [128], ["bfloat16"], [True], [16], [1], ["varlen"], features={"alibi": True})
