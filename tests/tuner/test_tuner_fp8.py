"""fp8 keys through the vocabulary, the database, the exchange file and the forward's tuner op."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flashtune.db import exchange
from flashtune.db.exchange import import_file
from flashtune.db.store import Store
from flashtune.db.types import DTYPE_BYTES, Config, Key, normalize_dtype
from flashtune.kernel.ops.fwd import estimate_smem
from flashtune.tuner.ops.fwd import KeyInputs, legal_reason, sdpa_same
from flashtune.tuner.ops.sdpa import sdpa_computes

from helpers.db import run_info

FP8 = "float8_e4m3fn"


def _key(causal: bool = False, op: str = "fwd", **features) -> Key:
    return Key("sm_90", op, 64, 64, "fp8", causal, batch_heads=4, group=2, **features)


def test_fp8_names_parse_and_round_trip():
    assert {normalize_dtype(x) for x in ("fp8", "e4m3", "torch.float8_e4m3fn", "FP8")} == {FP8}
    assert DTYPE_BYTES[FP8] == 1
    key = _key(True)
    assert str(key) == "sm_90/fwd/N=64/D=64/float8_e4m3fn/causal/BH=4/G=2" and Key.parse(str(key)) == key


def test_the_shared_memory_model_counts_one_byte_elements():
    config = Config(128, 64, 8, 3)
    assert estimate_smem(config, 128, "bfloat16", "sm_90") == 2 * estimate_smem(config, 128, "fp8", "sm_90")


def test_fp8_winners_go_through_the_store_and_the_exchange_file(tmp_path: Path):
    with Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store:
        run = store.start_run(run_info())
        store.offer_winner(store.record_trial(run, _key(True), Config(128, 64, 8, 3), "ok", median_ms=1.5))
        store.finish_run(run)
        winners = store.winners()
        assert [w.key.dtype for w in winners] == [FP8]
        path = tmp_path / "winners.json"
        path.write_text(exchange.dump_document(exchange.export_winners(store, dtype="fp8")))
    with Store.open(f"sqlite:///{tmp_path / 'b.db'}") as target:
        assert len(import_file(target, path).added) == 1
        assert [(w.key, w.config) for w in target.winners()] == [(w.key, w.config) for w in winners]


def test_sdpa_never_competes_and_small_key_tiles_are_illegal():
    assert not sdpa_same(_key()) and not sdpa_computes(_key())
    assert "block_n 16 < 32" in legal_reason(Config(64, 16, 4, 2), 64, FP8, 227 * 1024, "sm_90")
    assert legal_reason(Config(128, 64, 8, 3), 128, FP8, 227 * 1024, "sm_90") is None


def test_only_plain_forward_keys_take_fp8():
    from flashtune.tuner.ops.bwd import BwdInputs

    with pytest.raises(ValueError, match="fp8 keys are plain forward keys"):
        BwdInputs.check_key(_key(op="bwd"))
    with pytest.raises(ValueError, match="fp8 keys are plain forward keys"):
        KeyInputs.check_key(_key(softcap=True))


@pytest.mark.parametrize("causal", [False, True])
def test_fp8_workload_is_quantised_and_checked_against_the_dequantised_reference(causal):
    inputs = KeyInputs.build(_key(causal), 4, torch.device("cpu"))
    assert inputs.q.dtype == inputs.k.dtype == inputs.v.dtype == torch.float8_e4m3fn
    for descale in inputs.descales:  # one power of two per tensor, fitting N(0, 1) draws into e4m3
        assert descale.shape == (1,) and math.log2(descale.item()).is_integer()
    assert inputs.q.float().abs().max() <= 448
    out = inputs.buffers()
    assert out.dtype == torch.bfloat16
    out.fill_(math.nan)
    result, _ = inputs.run(Config(32, 32, 4, 1), out)
    assert result is out and torch.isfinite(out).all()
    assert inputs.check(out) is None
    # A wrong output (a v descale off by 1.5) is caught.
    assert "relative error" in inputs.check(out.float() * 1.5)
    # The reference is of the dequantised inputs: recomputed here in float64.
    q, k, v = (x.double() * d.double() for x, d in zip((inputs.q, inputs.k, inputs.v), inputs.descales))
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8.0
    if causal:
        scores = scores.masked_fill(torch.ones(64, 64, dtype=torch.bool).triu(1), -math.inf)
    ref = scores.softmax(-1) @ v.repeat_interleave(2, 1)
    assert torch.allclose(inputs.reference.double(), ref, atol=1e-5)


def test_the_grid_has_fp8_forward_keys_only():
    from flashtune.tuner.options import TuneError, grid_keys

    keys = grid_keys("sm_90", [1024], [128], ["float16", FP8], [True], [64], [1], ("fwd", "bwd"))
    assert sorted((k.op, k.dtype) for k in keys) == sorted([("bwd", "float16"), ("fwd", FP8), ("fwd", "float16")])
    with pytest.raises(TuneError, match="fp8 keys are plain forward keys"):
        grid_keys("sm_90", [1024], [128], [FP8], [True], [64], [1], ("bwd",))
    with pytest.raises(TuneError, match="fp8 keys are plain forward keys"):
        grid_keys("sm_90", [1024], [128], [FP8], [True], [64], [1], ("fwd",), features={"softcap": True})
