"""The benchmark hold-out (bench/holdout.py) stays outside the main tuning grid and spans what it claims;
bench/models.py's size overrides and quantiles."""
from __future__ import annotations

import pytest
from flashtune.db.types import Key, bucket
from flashtune.tuner.options import grid_keys
from helpers.bench_scripts import bench_script


def _keys(shape, arch: str = "sm_90") -> list[Key]:
    """The keys a hold-out shape records: its forward, a training call's backward too, a decode's kvcache key."""
    group = shape.heads_q // shape.heads_kv
    bh = bucket(shape.batch * shape.heads_q)
    ops = {"fwd": ("fwd",), "train": ("fwd", "bwd"), "decode": ("kvcache",)}[shape.kind]
    return [Key(arch, op, shape.seq_len, shape.head_dim, shape.dtype, shape.causal, seq_len_kv=shape.seq_len_kv,
                batch_heads=bh, group=group) for op in ops]


def test_no_holdout_shape_is_a_key_of_the_main_grid() -> None:
    holdout = bench_script("holdout")
    grid = set(grid_keys("sm_90", [128 << i for i in range(6)], [64, 128], ["float16", "bfloat16"], [False, True],
                         [16, 64, 256], [1], ops=("fwd", "bwd", "kvcache")))
    on_grid = [s for s in holdout.SHAPES if set(_keys(s)) & grid]
    assert on_grid == []


def test_the_holdout_spans_head_dims_groups_batches_and_kinds() -> None:
    shapes = bench_script("holdout").SHAPES
    assert 20 <= len(shapes) <= 30
    assert {s.kind for s in shapes} == {"fwd", "train", "decode"}
    assert {40, 64, 80, 96, 128, 256} <= {s.head_dim for s in shapes}
    assert {1, 8} <= {s.heads_q // s.heads_kv for s in shapes}
    assert min(s.batch for s in shapes) == 1 and max(s.batch for s in shapes) == 128
    decode = [s for s in shapes if s.kind == "decode"]
    assert {s.lengths for s in decode} == {False, True} and all(s.seq_len == 1 for s in decode)


def test_model_sizes_take_overrides_and_name_a_bad_one() -> None:
    models = bench_script("models")
    sizes = models.apply_sets(models.MODELS, ["gqa.layers=8", "bert.batch=64"], smoke=False)
    assert sizes["gqa"].layers == 8 and sizes["bert"].batch == 64
    assert sizes["mqa"] == models.MODELS["mqa"].gpu
    for bad in ("gqa.nope=3", "llama.layers=2", "gqa.layers=x", "gqa.layers"):
        with pytest.raises(ValueError, match="MODEL.FIELD=INT"):
            models.apply_sets(models.MODELS, [bad], smoke=False)


def test_quantile_interpolates_between_order_statistics() -> None:
    quantile = bench_script("models").quantile
    values = [4.0, 1.0, 3.0, 2.0]
    assert quantile(values, 0.0) == 1.0 and quantile(values, 1.0) == 4.0
    assert quantile(values, 0.5) == pytest.approx(2.5)
    assert quantile(values, 0.25) == pytest.approx(1.75)
