"""The config space and its pruning rules."""
from __future__ import annotations

from flashtune.db.arch import smem_limit
from flashtune.kernel.ops.fwd import estimate_smem
from flashtune.db.types import Config
from flashtune.tuner.ops.fwd import candidates, cost_reason, legal_reason, plan
from flashtune.tuner.ops.space import BLOCK_SIZES, NUM_STAGES, NUM_WARPS, full_space, seeded_order


def test_full_space_is_the_cross_product_with_extra_knobs():
    base = full_space()
    assert len(base) == len(BLOCK_SIZES) ** 2 * len(NUM_WARPS) * len(NUM_STAGES) == 600
    assert len(set(base)) == 600
    with_knob = full_space({"tma": (False, True)})
    assert len(with_knob) == 1200
    assert Config(128, 64, 8, 3, (("tma", True),)) in with_knob


def test_every_kept_config_fits_and_smaller_gpus_keep_fewer():
    for d in (64, 128):
        for dtype in ("float16", "bfloat16", "float32"):
            small = candidates(d, dtype, smem_limit("sm_86"))
            big = candidates(d, dtype, smem_limit("sm_90"))
            assert all(estimate_smem(c, d, dtype) <= 99 * 1024 for c in small)
            assert set(small) <= set(big) and len(big) > len(small)


def test_tuner_space_is_tens_not_hundreds_on_the_h200():
    for d in (64, 128):
        for dtype in ("float16", "bfloat16"):
            n = len(candidates(d, dtype, smem_limit("sm_90")))
            assert 20 <= n <= 110, (d, dtype, n)


def test_rules_give_reasons():
    limit = smem_limit("sm_86")
    assert "smem" in legal_reason(Config(256, 256, 8, 6), 128, "float16", limit)
    assert "16 rows x 8 warps" in legal_reason(Config(64, 64, 8, 2), 64, "float16", limit)
    assert "per thread" in legal_reason(Config(128, 128, 2, 2), 128, "float16", smem_limit("sm_90"))
    assert legal_reason(Config(128, 64, 4, 2), 64, "float16", limit) is None
    assert "no software pipeline" in cost_reason(Config(128, 64, 4, 1), 64, "float16")
    assert "score values" in cost_reason(Config(64, 16, 4, 2), 64, "float16")
    assert "stages" in cost_reason(Config(128, 128, 8, 4), 128, "float16")
    entries = plan(128, "float16", limit)
    assert len(entries) == 600 and sum(e.kept for e in entries) == len(candidates(128, "float16", limit))
    assert not plan(64, "float16", limit, cost_rules=False, configs=[Config(128, 64, 4, 1)])[0].dropped_by


def test_seeded_order_puts_seeds_first_then_neighbours():
    configs = candidates(64, "float16", smem_limit("sm_90"))
    seed = Config(128, 64, 4, 3)
    assert seed in configs
    ordered = seeded_order(configs, [seed, Config(256, 256, 16, 6)])  # an absent seed is ignored
    assert ordered[0] == seed and sorted(map(str, ordered)) == sorted(map(str, configs))
    nearest = ordered[1]
    assert sum([nearest.block_m != seed.block_m, nearest.block_n != seed.block_n,
                nearest.num_warps != seed.num_warps, nearest.num_stages != seed.num_stages]) == 1
    assert seeded_order(configs, []) == configs
