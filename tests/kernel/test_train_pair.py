"""Training calls decided as a forward+backward pair: the pair config's text form and checks, and, on CPU
tensors through the dispatcher's own code path, which configs (or which SDPA backend) a training call runs
for a stored "train" winner, against the forward and backward tables it overrides.

Winners are written to a real SQLite file and loaded with `reload(..., interpreter=True)` (the `tuned_table`
fixture); which Triton kernels ran with which tiles is observed where Triton launches them (`launches`);
results and gradients are checked against float64 autograd.
"""
from __future__ import annotations

import pytest
import torch

from flashtune.db.arch import ARCH_SMEM
from flashtune.db.types import Config, Key, bucket
from flashtune.kernel import attention, dispatch, record
from flashtune.kernel.ops import OPS, smem_need
from flashtune.kernel.ops.bwd import default_bwd_config, estimate_bwd_smem
from flashtune.kernel.ops.fwd import default_config, estimate_smem
from flashtune.kernel.ops.train import default_train_config, pair_config, split_pair, train_knobs
from flashtune.kernel.providers import provider_config
from flashtune.kernel.testing import attention_reference
from helpers import rel

ARCH = dispatch.INTERPRETER_ARCH
B, HQ, HKV, N, D = 1, 4, 2, 24, 16
BOUND = 2e-5  # fp32 relative Frobenius error against float64
# Forward and backward configs that are nobody's default, so their tiles tell them apart in the launches.
PAIR_FWD = Config(16, 32, 2, 1)
PAIR_BWD = Config(16, 32, 2, 1, {"block_m_dq": 32, "block_n_dq": 16})
TABLE_FWD = Config(32, 16, 2, 1)
TABLE_BWD = Config(32, 64, 2, 1, {"block_m_dq": 64, "block_n_dq": 32})


def _key(op: str) -> Key:
    return Key(ARCH, op, N, D, "float32", True, seq_len_kv=N, batch_heads=bucket(B * HQ), group=HQ // HKV)


def _qkv(grad: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    return tuple(torch.randn(B, h, N, D, generator=gen).requires_grad_(grad) for h in (HQ, HKV, HKV))


def _train_and_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    out = attention(q, k, v, is_causal=True, enable_gqa=True)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,)))))
    out.backward(grad_out)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*ref_inputs, causal=True)
    ref.backward(grad_out.double())
    assert rel(out.detach(), ref.detach(), floor=0.1) < BOUND
    for got, want in zip((q.grad, k.grad, v.grad), ref_inputs):
        assert got is not None and rel(got, want.grad, floor=0.1) < BOUND


def _tiles(launches, name: str) -> list[tuple[int, int, int, int]]:
    return [(x.kwargs["BLOCK_M"], x.kwargs["BLOCK_N"], x.kwargs["num_warps"], x.kwargs["num_stages"])
            for x in launches if x.name == name]


def _sizes(config: Config) -> tuple[int, int, int, int]:
    return config.block_m, config.block_n, config.num_warps, config.num_stages


# --- the pair as a config ------------------------------------------------------------------------------

def test_a_pair_round_trips_through_its_text_and_splits_back() -> None:
    fwd = Config(64, 32, 4, 3, {"loads": "tma", "ws": True})
    bwd = Config(32, 128, 8, 2, {"deterministic": False})
    pair = pair_config(fwd, bwd)
    assert Config.parse(str(pair)) == pair and Config.from_dict(pair.to_dict()) == pair
    assert split_pair(pair) == (fwd, bwd) and train_knobs(pair) == (fwd, bwd)
    assert _sizes(pair) == _sizes(fwd)


def test_a_pair_s_shared_memory_is_the_larger_pass_s() -> None:
    for fwd, bwd in [(Config(128, 128, 8, 3), Config(16, 64, 4, 2)), (Config(16, 16, 2, 2), Config(64, 128, 8, 3))]:
        want = max(estimate_smem(fwd, 128, "float16", "sm_90"), estimate_bwd_smem(bwd, 128, "float16", "sm_90"))
        assert smem_need("train", pair_config(fwd, bwd), 128, "float16", "sm_90") == want
    assert smem_need("train", provider_config("sdpa_cudnn"), 128, "float16", "sm_90") == 0


@pytest.mark.parametrize("config, words", [
    (Config(64, 64, 4, 2), "lacks bwd_block_m"),
    (Config(64, 64, 4, 2, {"bwd_block_m": 32, "bwd_block_n": 64, "bwd_num_warps": 4, "bwd_num_stages": True}),
     "must be integers"),
    (pair_config(Config(64, 64, 4, 2), Config(32, 64, 4, 2, {"bogus": 1})), "bogus"),
    (pair_config(Config(64, 64, 4, 2, {"loads": "nope"}), Config(32, 64, 4, 2)), "loads"),
])
def test_a_bad_pair_is_named(config: Config, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        OPS["train"].knobs(config)


def test_the_default_pair_is_the_two_defaults() -> None:
    pair = default_train_config("sm_90", 128, "bfloat16", ARCH_SMEM["sm_90"])
    assert split_pair(pair) == (default_config("sm_90", 128, "bfloat16", ARCH_SMEM["sm_90"]),
                                default_bwd_config("sm_90", 128, "bfloat16", ARCH_SMEM["sm_90"]))


# --- what a training call runs --------------------------------------------------------------------------

pytestmark_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="routes CPU tensors under the interpreter")


@pytestmark_cpu
def test_a_pair_winner_runs_its_forward_and_backward_over_the_op_tables(tuned_table, launches) -> None:
    tuned_table([(_key("train"), pair_config(PAIR_FWD, PAIR_BWD), None), (_key("fwd"), TABLE_FWD, None),
                 (_key("bwd"), TABLE_BWD, None)])
    q, k, v = _qkv(grad=True)
    _train_and_check(q, k, v)
    assert _tiles(launches, "attn_fwd_kernel") == [_sizes(PAIR_FWD)]
    assert [x.kwargs["STORE_LSE"] for x in launches if x.name == "attn_fwd_kernel"] == [True]
    assert _tiles(launches, "attn_bwd_dkdv_kernel") == [_sizes(PAIR_BWD)]
    [dq] = [x for x in launches if x.name == "attn_bwd_dq_kernel"]
    assert (dq.kwargs["BLOCK_M"], dq.kwargs["BLOCK_N"]) == (32, 16)  # the pair's block_m_dq, block_n_dq
    # An inference call of the same shape keeps the forward table's winner.
    launches.clear()
    with torch.no_grad():
        attention(*(t.detach() for t in (q, k, v)), is_causal=True, enable_gqa=True)
    assert _tiles(launches, "attn_fwd_kernel") == [_sizes(TABLE_FWD)]


@pytestmark_cpu
def test_without_a_pair_the_forward_and_backward_tables_apply(tuned_table, launches) -> None:
    tuned_table([(_key("fwd"), TABLE_FWD, None), (_key("bwd"), TABLE_BWD, None)])
    q, k, v = _qkv(grad=True)
    assert dispatch.train_plan(q, k, v, True).bwd is None
    _train_and_check(q, k, v)
    assert _tiles(launches, "attn_fwd_kernel") == [_sizes(TABLE_FWD)]
    assert _tiles(launches, "attn_bwd_dkdv_kernel") == [_sizes(TABLE_BWD)]


@pytestmark_cpu
def test_a_backend_pair_winner_trains_through_torch_sdpa(tuned_table, launches) -> None:
    # The forward table's winner is a kernel config: the pair, decided as training, overrides it.
    tuned_table([(_key("train"), provider_config("sdpa_flash"), pair_config(PAIR_FWD, PAIR_BWD)),
                 (_key("fwd"), TABLE_FWD, None)])
    q, k, v = _qkv(grad=True)
    _train_and_check(q, k, v)
    assert launches == []  # forward and backward are torch's


@pytestmark_cpu
def test_a_refusing_backend_pair_trains_through_the_kernel_pair_beside_it(tuned_table, launches) -> None:
    tuned_table([(_key("train"), provider_config("sdpa_cudnn"), pair_config(PAIR_FWD, PAIR_BWD))])
    q, k, v = _qkv(grad=True)
    _train_and_check(q, k, v)  # torch's CPU build refuses cuDNN: the kernel pair stored beside the win runs
    assert _tiles(launches, "attn_fwd_kernel") == [_sizes(PAIR_FWD)]
    assert _tiles(launches, "attn_bwd_dkdv_kernel") == [_sizes(PAIR_BWD)]
    assert dispatch.train_plan(q, k, v, True).sdpa is None  # later calls go straight to the kernel


@pytestmark_cpu
def test_a_training_call_records_its_training_key_only(tuned_table, monkeypatch) -> None:
    tuned_table([(_key("fwd"), TABLE_FWD, None)])
    monkeypatch.setattr(record, "ENABLED", True)
    monkeypatch.setattr(record, "_counts", {})
    q, k, v = _qkv(grad=True)
    for _ in range(3):
        attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    with torch.no_grad():
        attention(q, k, v, is_causal=True, enable_gqa=True)
    assert record.pending() == {_key("train"): 3, _key("fwd"): 1}
