"""The split-KV decode kernel and attention_kvcache against the float64 reference with explicit masks.

On CPU under the interpreter (tiny shapes, fp32 and fp16) or on CUDA (the `gpu` test: fp16 and bf16).
"""
from __future__ import annotations

import math

import pytest
import torch

from flashtune.db.types import Config
from flashtune.kernel.ops.kvcache import (MAX_SPLIT_KEYS, MIN_SPLIT_TILES, SPLITS_KNOB, default_decode_config,
                                          estimate_decode_smem, plan_decode)
from flashtune.kernel.kvcache import attention_kvcache
from flashtune.kernel.checks import check_cache_seqlens, check_kvcache_inputs
from flashtune.kernel.ops.kvcache import decode_partials, launch_decode
from flashtune.kernel.testing import attention_reference
from flashtune.kernel.testing import attention_kvcache_reference, kvcache_mask
from helpers import dtypes, rel

# ‖o − ref‖ / ‖ref‖ against fp64 (see tests/kernel/test_kernel.py for the reasoning); the combine adds
# one fp32 rescaling per split, far below these.
BOUNDS = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 2e-5}


def cfg(block_m: int, block_n: int, splits: int, warps: int = 2, stages: int = 1) -> Config:
    return Config(block_m, block_n, warps, stages, ((SPLITS_KNOB, splits),))


# (batch, heads_q, heads_kv, seq_q, n_max, head_dim, causal, lengths or None, config)
CASES = [
    (1, 1, 1, 1, 1, 8, False, None, cfg(16, 16, 1)),                 # the smallest call
    (2, 4, 2, 1, 70, 24, False, [1, 70], cfg(16, 16, 2)),            # GQA, ragged with 1 and Nmax
    (2, 4, 1, 3, 50, 48, True, [3, 50], cfg(16, 16, 3)),             # MQA, causal, len == Nq, 3 ∤ 4 tiles
    (3, 2, 2, 5, 40, 72, True, [5, 17, 40], cfg(16, 32, 2)),         # MHA, causal, padded head dim
    (1, 2, 1, 16, 33, 200, True, [33], cfg(16, 32, 1)),              # Nq=16, 2 row blocks, D=200
    (2, 8, 2, 2, 64, 16, True, [64, 20], cfg(16, 16, 4)),            # G·Nq = 8 rows; 4 splits
    (2, 4, 2, 8, 45, 32, False, [0, 45], cfg(16, 16, 3)),            # an empty slot; 2 row blocks
    (1, 3, 3, 2, 90, 16, False, None, cfg(32, 16, 5)),               # no lengths; 5 ∤ 6 tiles
    (1, 2, 2, 4, 21, 40, True, None, cfg(16, 16, 2)),                # causal without lengths
    (1, 1, 1, 16, 40, 16, True, [40], cfg(16, 16, 3)),               # a split wholly past row 0's limit
    (2, 2, 1, 7, 30, 56, True, [7, 29], cfg(64, 16, 2)),             # M tile larger than the rows
]


def _ids(case) -> str:
    b, hq, hkv, nq, nmax, d, causal, lens, config = case
    flags = ("c" if causal else "") + ("r" if lens else "")
    return f"b{b}h{hq}/{hkv}q{nq}n{nmax}d{d}{flags}-s{config.extra_dict[SPLITS_KNOB]}"


def _inputs(case, dtype, device, seed):
    b, hq, hkv, nq, nmax, d, causal, lens, _ = case
    gen = torch.Generator().manual_seed(seed)
    mk = lambda h, n: torch.randn(b, h, n, d, generator=gen, dtype=torch.float32).to(device, dtype)  # noqa: E731
    seqlens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)
    return mk(hq, nq), mk(hkv, nmax), mk(hkv, nmax), seqlens






def _check(case, dtype, device, seed, config=None):
    q, k, v, seqlens = _inputs(case, dtype, device, seed)
    causal, config = case[6], config or case[8]
    shape = check_kvcache_inputs(q, k, v)
    plan = plan_decode(config, batch=shape.batch, heads_kv=shape.heads_kv, group=shape.group, seq_q=shape.seq_q,
                       seq_kv=shape.seq_k, head_dim=shape.head_dim)
    # Poison everything the kernel writes or reads back: an unwritten output element, or a combine
    # that reads a slot its split never wrote, shows up as NaN.
    out = torch.full_like(q, float("nan"))
    partials = tuple(t.fill_(float("nan")) for t in decode_partials(shape, plan, q.device))
    o, kernels = launch_decode(q, k, v, shape, cache_seqlens=seqlens, causal=causal, scale=1 / math.sqrt(case[5]),
                               config=config, out=out, partials=partials)
    assert o is out and len(kernels) == (2 if plan.split else 1)
    assert torch.isfinite(o).all(), f"{_ids(case)} {dtype}: unwritten (NaN-poisoned) or non-finite output"
    ref = attention_kvcache_reference(q, k, v, cache_seqlens=seqlens, causal=causal)
    err = rel(o, ref)
    assert err < BOUNDS[dtype], f"{_ids(case)} {dtype} {config}: relative error {err:.2e}"
    if seqlens is not None:  # rows of empty slots are exactly zero
        empty = (seqlens == 0).nonzero().flatten()
        assert (o[empty] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_fp64_reference(case, kernel_device):
    for i, dtype in enumerate(dtypes(kernel_device, fp32_on_gpu=False)):
        _check(case, dtype, kernel_device, seed=1000 * CASES.index(case) + i)


@pytest.mark.gpu
@pytest.mark.parametrize("warps,stages", [(4, 2), (4, 3), (8, 3)])
def test_gpu_grid_fp16_bf16(warps, stages):
    """The CPU grid on CUDA in fp16 and bf16, with real warp and pipeline counts."""
    for n, case in enumerate(CASES):
        config = case[8]
        config = Config(config.block_m, config.block_n, warps, stages, config.extra)
        for i, dtype in enumerate((torch.float16, torch.bfloat16)):
            _check(case, dtype, "cuda", seed=7000 + 10 * n + i, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_gpu_long_ragged_default_config(softcap):
    """A decode-sized GQA batch with lengths from 1 to Nmax through the public API and its default config;
    with a cap, queries scaled so that most scores reach it."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    b, hq, hkv, d, nmax = 6, 32, 8, 128, 8192
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen) * (5.0 if softcap else 1.0)
    k, v = (torch.randn(b, hkv, nmax, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    lens = torch.tensor([1, 100, 1000, 4097, 8000, nmax], dtype=torch.int32, device="cuda")
    for causal in (False, True):
        o = attention_kvcache(q, k, v, cache_seqlens=lens, causal=causal, softcap=softcap)
        ref = attention_kvcache_reference(q, k, v, cache_seqlens=lens, causal=causal, dtype=torch.float32,
                                          softcap=softcap)
        assert rel(o, ref.double()) < BOUNDS[torch.bfloat16]


def test_public_api_strided_layouts(kernel_device):
    """flash_attn's (B, N, H, D) cache layout, a (B, Nq, H, D) query, strided lengths: no copies needed."""
    gen = torch.Generator().manual_seed(21)
    b, hq, hkv, nq, nmax, d = 2, 4, 2, 3, 37, 40
    dev, dt = kernel_device, torch.float16
    q = torch.randn(b, nq, hq, d, generator=gen).to(dev, dt).transpose(1, 2)
    k = torch.randn(b, nmax, hkv, d, generator=gen).to(dev, dt).transpose(1, 2)
    v = torch.randn(b, nmax, hkv, 2 * d, generator=gen).to(dev, dt)[..., d:].transpose(1, 2)
    lens = torch.tensor([30, 0, 37, 0], dtype=torch.int32, device=dev)[::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or lens.is_contiguous())
    for splits in (1, 2):
        o = attention_kvcache(q, k, v, cache_seqlens=lens, causal=True, scale=0.3, config=cfg(16, 16, splits))
        assert o.shape == q.shape and o.dtype == dt and o.stride() == q.stride()
        ref = attention_kvcache_reference(q, k, v, cache_seqlens=lens, causal=True, scale=0.3)
        assert rel(o, ref) < BOUNDS[dt]
    # An output with its own odd strides through the unchecked launch.
    big = torch.full((b, hq, nq, 3 * d), float("nan"), device=dev, dtype=dt)
    out = big[..., d:2 * d]
    shape = check_kvcache_inputs(q, k, v)
    launch_decode(q, k, v, shape, cache_seqlens=lens, causal=False, scale=d ** -0.5, config=cfg(16, 16, 3), out=out)
    assert rel(out, attention_kvcache_reference(q, k, v, cache_seqlens=lens)) < BOUNDS[dt]
    assert big[..., :d].isnan().all() and big[..., 2 * d:].isnan().all()  # nothing written outside the view


def test_default_config_runs_and_all_empty(kernel_device):
    gen = torch.Generator().manual_seed(31)
    q = torch.randn(2, 4, 1, 64, generator=gen).to(kernel_device)
    k, v = (torch.randn(2, 2, 48, 64, generator=gen).to(kernel_device) for _ in range(2))
    o = attention_kvcache(q, k, v)
    assert rel(o, attention_kvcache_reference(q, k, v)) < BOUNDS[torch.float32]
    zeros = torch.zeros(2, dtype=torch.int32, device=kernel_device)
    for causal in (False, True):  # 0 is an empty slot, allowed with causal too
        for splits in (1, 2):
            o = attention_kvcache(q, k, v, cache_seqlens=zeros, causal=causal, config=cfg(16, 16, splits))
            assert (o == 0).all()


def test_reference_agrees_with_the_plain_reference():
    """Where the two definitions meet: full lengths, and causal with Nq == Nmax (both alignments agree)."""
    gen = torch.Generator().manual_seed(41)
    q = torch.randn(2, 6, 9, 16, generator=gen)
    k, v = torch.randn(2, 3, 9, 16, generator=gen), torch.randn(2, 3, 9, 16, generator=gen)
    for causal in (False, True):
        ref = attention_reference(q, k, v, causal=causal)
        assert torch.allclose(attention_kvcache_reference(q, k, v, causal=causal), ref, atol=1e-12)
    # A length masks exactly the keys past it: the same as slicing the cache.
    lens = torch.tensor([4, 9], dtype=torch.int32)
    out = attention_kvcache_reference(q[:, :, :3], k, v, cache_seqlens=lens, causal=True)
    for b, n in enumerate(lens.tolist()):
        qb, kb, vb = q[b:b + 1, :, :3], k[b:b + 1, :, :n], v[b:b + 1, :, :n]
        # Bottom-right causal for Nq queries against n keys is top-left causal on the keys padded in front.
        pad = n - 3
        full = attention_reference(torch.cat([torch.zeros(1, 6, pad, 16, dtype=q.dtype), qb], 2), kb, vb, causal=True)
        assert torch.allclose(out[b:b + 1], full[:, :, pad:], atol=1e-12)
    mask = kvcache_mask(torch.tensor([3]), 2, 5, causal=True)[0, 0]
    assert mask.tolist() == [[True, True, False, False, False], [True, True, True, False, False]]


# --- the split rule -------------------------------------------------------------------------

def test_default_config_split_rule():
    # The H200 decode cases (B, Hq=32, Hkv=8, Nq, Nmax, D=128, bf16) and the split counts that
    # won them in bench/results/h200/decode_bench.csv (the old rule gave 9 for B=8 Nk=4k: 1.15 TB/s).
    def splits(b: int, nq: int, nmax: int) -> int:
        c = default_decode_config(nq, nmax, 128, "bf16", batch_heads=32 * b, group=4, sm_count=132, arch="sm_90")
        return c.extra_dict[SPLITS_KNOB]

    assert splits(8, 1, 32768) == 32768 // MAX_SPLIT_KEYS == 16  # long: splits of MAX_SPLIT_KEYS keys
    assert splits(8, 1, 16384) == 8
    assert splits(8, 1, 4096) == 4  # 64 KV heads: 256 programs, about 2 per SM, not 9 splits
    assert splits(64, 1, 2048) == 1  # 512 KV heads fill the GPU: no split
    assert splits(64, 8, 2048) == 1  # 32 packed rows, 512 KV heads
    assert splits(8, 4, 32768) == 16
    assert default_decode_config(1, 16, 64, "fp16", batch_heads=1, group=1).extra_dict[SPLITS_KNOB] == 1
    assert default_decode_config(16, 4096, 128, "fp16", batch_heads=64, group=8).block_m == 64
    # No split shorter than MIN_SPLIT_TILES tiles, however few the heads.
    one = default_decode_config(1, 1024, 128, "bf16", batch_heads=4, group=4, sm_count=132, arch="sm_90")
    assert one.extra_dict[SPLITS_KNOB] == 1024 // (MIN_SPLIT_TILES * one.block_n)


def test_ragged_batch_launches_as_many_live_programs_as_the_uniform_one():
    # B=8 (Hq=32, Hkv=8): ragged lengths 1..32k in a 32k cache against the uniform batch of the same
    # total. Both get the same split size, so they run the same number of live programs (within one
    # partial split per sequence), as the H200 ragged/uniform timing (1.00-1.03) needs.
    gen = torch.Generator().manual_seed(3)
    checked = 0
    for b, nmax in ((8, 32768), (32, 32768), (8, 65536)):
        lens = torch.randint(1, nmax + 1, (b,), generator=gen)
        lens[0], lens[-1] = 1, nmax
        total = int(lens.sum())
        uniform_len = total // b
        if uniform_len < 8192:  # the occupancy term decides below this (see default_num_splits)
            continue
        live = {}
        for name, n, lengths in (("ragged", nmax, lens), ("uniform", uniform_len, torch.full((b,), uniform_len))):
            c = default_decode_config(1, n, 128, "bf16", batch_heads=32 * b, group=4, sm_count=132, arch="sm_90")
            p = plan_decode(c, batch=b, heads_kv=8, group=4, seq_q=1, seq_kv=n, head_dim=128)
            live[name] = (p.split_size, int(((lengths + p.split_size - 1) // p.split_size).sum()) * 8)
        (rs, rp), (us, up) = live["ragged"], live["uniform"]
        # MAX_SPLIT_KEYS keys, the uniform one rounded to equal splits of whole tiles.
        assert rs == MAX_SPLIT_KEYS and 0.85 * MAX_SPLIT_KEYS <= us <= MAX_SPLIT_KEYS, live
        assert abs(rp - up) <= 8 * b, live  # at most one partial split per sequence and KV head
        checked += 1
    assert checked == 3


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_86", "sm_90", None])
@pytest.mark.parametrize("d", [8, 72, 128, 256])
def test_default_config_fits_every_arch(arch, d):
    from flashtune.db.arch import ARCH_SMEM

    for dtype in ("fp16", "fp32"):
        c = default_decode_config(4, 1000, d, dtype, batch_heads=64, group=4, arch=arch)
        assert estimate_decode_smem(c, d, dtype, arch) <= ARCH_SMEM[arch or "sm_75"]


def test_plan_rounds_splits_to_tiles():
    p = plan_decode(cfg(16, 64, 3), batch=1, heads_kv=1, group=1, seq_q=1, seq_kv=100, head_dim=64)
    assert (p.split_size, p.num_splits, p.split) == (64, 2, True)
    p = plan_decode(cfg(16, 16, 64), batch=1, heads_kv=1, group=4, seq_q=8, seq_kv=40, head_dim=8)
    assert (p.split_size, p.num_splits, p.num_m_blocks, p.block_d) == (16, 3, 2, 16)


# --- bad input ------------------------------------------------------------------------------

# Where the kernel runs: CUDA where present, else the CPU under the interpreter. The bad inputs below
# are built on the CPU and moved there, so that each test reaches the check it names (on a CUDA
# machine a CPU tensor would be refused first for its device).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _good(device: str = DEVICE):
    q = torch.randn(2, 4, 1, 16, device=device)
    k, v = torch.randn(2, 2, 8, 16, device=device), torch.randn(2, 2, 8, 16, device=device)
    return q, k, v


def _on_device(value):
    if isinstance(value, torch.Tensor) and value.device.type == "cpu":
        return value.to(DEVICE)
    return value  # not a tensor, or on another device on purpose (meta)


def _call(**overrides):
    q, k, v = _good()
    overrides = {n: _on_device(x) for n, x in overrides.items()}
    args = dict(q=q, k_cache=k, v_cache=v)
    args.update({n: overrides.pop(n) for n in ("q", "k_cache", "v_cache") if n in overrides})
    return attention_kvcache(args["q"], args["k_cache"], args["v_cache"], **overrides)


_i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731

BAD = [
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(k_cache=torch.randn(2, 2, 8)), ValueError, "k_cache must be 4-D"),
    (dict(q=torch.randn(2, 4, 1, 16, dtype=torch.float64)), TypeError, "dtype torch.float64"),
    (dict(q=torch.randn(2, 4, 1, 16).half()), TypeError, "share one dtype"),
    (dict(q=torch.randn(2, 4, 1, 16).bfloat16(), k_cache=torch.randn(2, 2, 8, 16).bfloat16(),
          v_cache=torch.randn(2, 2, 8, 16).bfloat16()), TypeError, "are bfloat16 on the CPU"),
    (dict(q=torch.randn(2, 4, 1, 20), k_cache=torch.randn(2, 2, 8, 20), v_cache=torch.randn(2, 2, 8, 20)),
     ValueError, "unsupported head dim 20: .* a multiple of 8 from 8 to 256"),
    (dict(q=torch.randn(2, 4, 1, 264), k_cache=torch.randn(2, 2, 8, 264), v_cache=torch.randn(2, 2, 8, 264)),
     ValueError, "unsupported head dim 264"),
    (dict(q=torch.randn(2, 3, 1, 16)), ValueError, "multiple of key/value heads"),
    (dict(v_cache=torch.randn(2, 2, 9, 16)), ValueError, "same shape"),
    (dict(q=torch.randn(3, 4, 1, 16)), ValueError, "batch size differs"),
    (dict(q=torch.randn(2, 4, 0, 16)), ValueError, "q is empty"),
    (dict(cache_seqlens=[8, 8]), TypeError, "cache_seqlens must be None or an int32 torch.Tensor"),
    (dict(cache_seqlens=torch.tensor([8, 8])), TypeError, "cache_seqlens has dtype torch.int64"),
    (dict(cache_seqlens=_i32(8)), ValueError, r"cache_seqlens must have shape \(2,\)"),
    (dict(cache_seqlens=_i32(8, 8).view(1, 2)), ValueError, r"cache_seqlens must have shape \(2,\)"),
    (dict(cache_seqlens=torch.zeros(2, dtype=torch.int32, device="meta")), ValueError, "must be on q's device"),
    (dict(cache_seqlens=_i32(8, 9), check_lengths=True), ValueError,
     r"cache_seqlens\[1\] = 9 is out of range.*0 to .*Nmax=8"),
    (dict(cache_seqlens=_i32(-1, 8), check_lengths=True), ValueError, r"cache_seqlens\[0\] = -1 is out of range"),
    (dict(q=torch.randn(2, 4, 3, 16), cache_seqlens=_i32(8, 2), causal=True, check_lengths=True), ValueError,
     r"cache_seqlens\[1\] = 2 is shorter than the 3 queries"),
    (dict(q=torch.randn(2, 4, 9, 16), causal=True), ValueError, "Nq=9 > Nmax=8"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    (dict(config="m16-n16-w2-s1"), TypeError, "config must be a flashtune.db.types.Config"),
    (dict(config=Config(16, 16, 2, 1, {"tma": True})), ValueError, "does not know the knob 'tma'"),
    (dict(config=Config(16, 16, 2, 1, {SPLITS_KNOB: 0})), ValueError, "num_splits must be a positive int"),
]


@pytest.mark.parametrize("overrides,error,match", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input_is_a_clear_error(overrides, error, match):
    if "on the CPU" in match and DEVICE != "cpu":
        pytest.skip("bf16 on the CPU is refused under the interpreter only")
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_grad_inputs_are_refused_under_grad_mode():
    q, k, v = _good()
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="no backward"):
        attention_kvcache(q, k, v)
    with torch.no_grad():
        attention_kvcache(q, k, v, config=cfg(16, 16, 1))


def test_lengths_valid_edge_values_pass():
    q, k, v = _good()
    shape = check_kvcache_inputs(q, k, v)
    assert check_cache_seqlens(None, shape, q.device, True) is None
    lens = _i32(0, 8).to(DEVICE)
    assert check_cache_seqlens(lens, shape, q.device, True) is lens
    # Skipping the value check (as under CUDA-graph capture) accepts anything of the right type.
    assert check_cache_seqlens(_i32(-5, 99).to(DEVICE), shape, q.device, False, check_values=False) is not None


def test_unchecked_lengths_are_clamped_in_kernel(kernel_device):
    """Lengths the API would refuse still never read outside the cache: the kernel clamps to [0, Nmax]."""
    gen = torch.Generator().manual_seed(51)
    q = torch.randn(2, 2, 1, 16, generator=gen).to(kernel_device)
    k, v = (torch.randn(2, 1, 24, 16, generator=gen).to(kernel_device) for _ in range(2))
    shape = check_kvcache_inputs(q, k, v)
    lens = torch.tensor([-5, 1000], dtype=torch.int32, device=kernel_device)
    for splits in (1, 2):
        o, _ = launch_decode(q, k, v, shape, cache_seqlens=lens, causal=False, scale=0.25, config=cfg(16, 16, splits))
        assert (o[0] == 0).all()
        assert rel(o[1:], attention_kvcache_reference(q[1:], k[1:], v[1:], scale=0.25)) < BOUNDS[torch.float32]
    # Causal with a length shorter than Nq (refused by the API): the rows that see no key are zeros,
    # never NaN, and the others are right.
    q3 = torch.randn(2, 2, 3, 16, generator=gen).to(kernel_device)
    short = torch.tensor([1, 2], dtype=torch.int32, device=kernel_device)
    for splits in (1, 2):
        o, _ = launch_decode(q3, k, v, check_kvcache_inputs(q3, k, v), cache_seqlens=short, causal=True,
                             scale=0.25, config=cfg(16, 16, splits))
        ref = attention_kvcache_reference(q3, k, v, cache_seqlens=short, causal=True, scale=0.25)
        assert torch.isfinite(o).all() and (o[0, :, :2] == 0).all() and (o[1, :, :1] == 0).all()
        assert rel(o, ref) < BOUNDS[torch.float32]


def test_ragged_calls_cap_the_split_length():
    """With cache_seqlens a tuned config's few long splits are cut to the default's long-cache length;
    without lengths the config's own split count stands."""
    c = cfg(16, 128, 2)  # what won B=8 Nk=32k on the H200 (2 splits of 16k keys)
    full = plan_decode(c, batch=8, heads_kv=8, group=4, seq_q=1, seq_kv=32768, head_dim=128)
    ragged = plan_decode(c, batch=8, heads_kv=8, group=4, seq_q=1, seq_kv=32768, head_dim=128, ragged=True)
    assert (full.num_splits, full.split_size) == (2, 16384)
    assert (ragged.num_splits, ragged.split_size) == (32768 // MAX_SPLIT_KEYS, MAX_SPLIT_KEYS)
    many = cfg(16, 128, 64)  # more splits than the cap asks for are kept
    assert plan_decode(many, batch=8, heads_kv=8, group=4, seq_q=1, seq_kv=32768, head_dim=128,
                       ragged=True).num_splits == 64


def test_check_lengths_is_opt_in_and_only_checks_values(kernel_device):
    """By default no value is read back: an out-of-range length is clamped to Nmax by the kernel (the
    result is the full cache's), while type, dtype, shape and device are still checked;
    check_lengths=True reads the values and names the bad one."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen).to(kernel_device) for n in (1, 40, 40))
    bad = torch.tensor([40, 1000], dtype=torch.int32, device=kernel_device)
    for config in (None, cfg(16, 16, 2)):
        with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 1000 is out of range"):
            attention_kvcache(q, k, v, cache_seqlens=bad, check_lengths=True, config=config)
        out = attention_kvcache(q, k, v, cache_seqlens=bad, config=config)
        ref = attention_kvcache_reference(q, k, v, cache_seqlens=None)
        assert rel(out, ref) < BOUNDS[torch.float32]
        with pytest.raises(TypeError, match="int32"):
            attention_kvcache(q, k, v, cache_seqlens=bad.long(), config=config)
    with pytest.raises(TypeError, match="check_lengths must be a bool"):
        attention_kvcache(q, k, v, cache_seqlens=bad, check_lengths="no")
