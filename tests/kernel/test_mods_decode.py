"""Score modifiers in the split-KV decode (kernel.ops.kvcache.launch_decode and the plan's DecodeLaunch with a
ScoreMods): sliding window, sinks, ALiBi and softcap, bottom-right aligned like the cache's causal mask.

Against the float64 reference per sequence, `attention_reference(..., diag=len - Nq)` over the sequence's
`len` cached keys, with ragged cache_seqlens and configs of one split and of several. On CPU under the
interpreter (fp32, fp16) or on CUDA (the `gpu` tests: fp16, bf16, long caches). The output and the split
partials are NaN-poisoned first, so a split pass 2 merges without pass 1 having written it fails; keys in
tiles outside every query's window hold NaN, so loading them fails too.
"""
from __future__ import annotations

import math

import pytest
import torch
from flashtune.db.types import Config
from flashtune.kernel.checks import check_kvcache_inputs
from flashtune.kernel.mods import NO_MODS, ScoreMods, check_mods
from flashtune.kernel.ops.kvcache import (
    SPLITS_KNOB,
    DecodeLaunch,
    decode_partials,
    launch_decode,
    plan_decode,
)
from flashtune.kernel.testing import attention_reference
from helpers import rel
from helpers.mods import mods_kwargs

BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SPREAD = 2.0


def cfg(block_m: int, block_n: int, splits: int, warps: int = 2, stages: int = 1) -> Config:
    return Config(block_m, block_n, warps, stages, ((SPLITS_KNOB, splits),))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))


def _inputs(b, hq, hkv, nq, nmax, d, lens, dtype, device, gen):
    def draw(h: int, n: int) -> torch.Tensor:
        return (torch.randn(b, h, n, d, generator=gen) * SPREAD).to(device, dtype)
    seqlens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)
    return draw(hq, nq), draw(hkv, nmax), draw(hkv, nmax), seqlens


def reference(q, k, v, seqlens, causal: bool, kw: dict, *, clean=None) -> torch.Tensor:
    """Per sequence: attention over its `len` keys with the diagonal at len - Nq (bottom-right)."""
    k, v = clean if clean is not None else (k, v)
    nq, nmax = q.shape[2], k.shape[2]
    outs = []
    for b in range(q.shape[0]):
        n = nmax if seqlens is None else int(seqlens[b])
        per = dict(kw)
        if "alibi_slopes" in per and per["alibi_slopes"].dim() == 2:
            per["alibi_slopes"] = per["alibi_slopes"][b:b + 1]
        if n == 0:
            outs.append(torch.zeros_like(q[b:b + 1], dtype=torch.float64))
            continue
        outs.append(attention_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=causal,
                                        diag=n - nq, **per))
    return torch.cat(outs)


def _launch(q, k, v, seqlens, causal: bool, config: Config, mods: ScoreMods) -> torch.Tensor:
    shape = check_kvcache_inputs(q, k, v)
    plan = plan_decode(config, batch=shape.batch, heads_kv=shape.heads_kv, group=shape.group, seq_q=shape.seq_q,
                       seq_kv=shape.seq_k, head_dim=shape.head_dim, ragged=seqlens is not None)
    out = torch.full_like(q, float("nan"))
    partials = tuple(t.fill_(float("nan")) for t in decode_partials(shape, plan, q.device))
    o, _ = launch_decode(q, k, v, shape, cache_seqlens=seqlens, causal=causal, scale=1 / math.sqrt(q.shape[-1]),
                         config=config, out=out, partials=partials, mods=mods)
    assert o is out
    return o


# (B, Hq, Hkv, Nq, Nmax, D, causal, lengths or None, config, modifiers, dtype on CPU)
CASES = [
    (2, 4, 2, 3, 70, 24, True, [70, 33], cfg(16, 16, 3), "window20,0", torch.float32),   # GQA, ragged
    (1, 2, 2, 1, 80, 16, False, None, cfg(16, 16, 5), "window8,8", torch.float16),       # most splits skipped
    (2, 4, 1, 4, 50, 16, False, [50, 2], cfg(16, 16, 3), "window5,-1", torch.float32),   # rows before the window
    (2, 4, 2, 2, 70, 24, True, [70, 40], cfg(16, 16, 3), "sinks", torch.float16),        # sink merged in pass 2
    (2, 2, 2, 1, 40, 16, False, [40, 0], cfg(16, 16, 1), "sinks", torch.float32),        # in pass 1; empty slot
    (2, 4, 2, 3, 64, 16, True, [64, 30], cfg(16, 16, 2), "alibiB", torch.float16),
    (1, 2, 1, 2, 45, 24, False, None, cfg(16, 16, 1), "alibi", torch.float32),
    (2, 4, 2, 2, 70, 16, True, [70, 50], cfg(16, 16, 3), "cap2+window30,-1+sinks", torch.float32),
    (2, 2, 2, 3, 60, 16, True, [60, 17], cfg(16, 32, 2), "window24,0+alibi", torch.float16),
]


def _ids(case) -> str:
    b, hq, hkv, nq, nmax, d, causal, lens, config, kind, _ = case
    flags = ("c" if causal else "") + ("r" if lens else "")
    return f"b{b}h{hq}-{hkv}q{nq}n{nmax}d{d}{flags}-s{config.extra_dict[SPLITS_KNOB]}-{kind}"


def _check_case(case, dtype: torch.dtype, device: str) -> None:
    b, hq, hkv, nq, nmax, d, causal, lens, config, kind, _ = case
    gen = _gen()
    q, k, v, seqlens = _inputs(b, hq, hkv, nq, nmax, d, lens, dtype, device, gen)
    kw = mods_kwargs(kind, b, hq, 1, 1, device, gen)
    mods = check_mods(check_kvcache_inputs(q, k, v), q.device, **kw)
    o = _launch(q, k, v, seqlens, causal, config, mods)
    ref = reference(q, k, v, seqlens, causal, kw)
    err = rel(o, ref, floor=0.05)
    assert err < BOUND[dtype], f"{_ids(case)} {dtype}: relative error {err:.2e}"
    plain = {key: value for key, value in kw.items() if key == "softcap"}
    assert rel(reference(q, k, v, seqlens, causal, plain), ref, floor=0.05) > 0.02, "modifier has no effect"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_modifiers_match_float64(case) -> None:
    if torch.cuda.is_available():
        pytest.skip("the gpu tests below cover CUDA")
    _check_case(case, case[-1], "cpu")


def test_window_never_reads_keys_outside_it(kernel_device: str) -> None:
    """With a window of 6 keys at the end of an 80-key cache, the tiles and splits before it are never loaded
    (NaN planted there stays out) and pass 2 merges only the splits pass 1 wrote (the partials start NaN)."""
    gen = _gen()
    q, k, v, seqlens = _inputs(2, 4, 2, 1, 80, 16, [80, 70], torch.float32, kernel_device, gen)
    clean = k.clone(), v.clone()
    k[0, :, :56] = float("nan")  # sequence 0 sees keys 73..79: tiles from 64, maybe 48
    v[0, :, :56] = float("nan")
    k[1, :, :40] = float("nan")  # sequence 1 sees keys 63..69
    v[1, :, :40] = float("nan")
    kw = {"window_size": (6, 0), "sinks": (torch.randn(4, generator=gen) + 4.0).to(kernel_device)}
    mods = check_mods(check_kvcache_inputs(q, k, v), q.device, **kw)
    for splits in (1, 5):
        o = _launch(q, k, v, seqlens, True, cfg(16, 16, splits), mods)
        assert rel(o, reference(q, k, v, seqlens, True, kw, clean=clean), floor=0.05) < BOUND[torch.float32]


def test_the_plan_launch_takes_modifiers(kernel_device: str) -> None:
    """DecodeLaunch (attention_kvcache's per-plan launch) gives launch_decode's output with modifiers, and
    still serves plain calls after them."""
    dtype = torch.float16
    gen = _gen()
    q, k, v, seqlens = _inputs(2, 4, 2, 2, 64, 16, [64, 37], dtype, kernel_device, gen)
    shape = check_kvcache_inputs(q, k, v)
    config = cfg(16, 16, 3)
    run = DecodeLaunch(shape, config, causal=True, ragged=True)
    kw = mods_kwargs("window12,0+sinks+alibiB", 2, 4, 1, 1, kernel_device, gen)
    mods = check_mods(shape, q.device, **kw)
    got = run(q, k, v, 64, seqlens, 0.25, mods)
    want = launch_decode(q, k, v, shape, cache_seqlens=seqlens, causal=True, scale=0.25, config=config, mods=mods)[0]
    assert torch.equal(got, want)
    plain = run(q, k, v, 64, seqlens, 0.25, NO_MODS)
    want_plain = launch_decode(q, k, v, shape, cache_seqlens=seqlens, causal=True, scale=0.25, config=config)[0]
    assert torch.equal(plain, want_plain) and rel(plain, got.double()) > 0.02


def test_mask_and_dropout_are_refused(kernel_device: str) -> None:
    q, k, v, _ = _inputs(1, 2, 2, 1, 16, 16, None, torch.float32, kernel_device, _gen())
    shape = check_kvcache_inputs(q, k, v)
    for mods in (ScoreMods(dropout_p=0.1, seed=3), ScoreMods(mask=torch.ones(1, 2, 1, 16, dtype=torch.bool))):
        with pytest.raises(ValueError, match="no attn_mask and no dropout"):
            launch_decode(q, k, v, shape, cache_seqlens=None, causal=False, scale=0.25, config=cfg(16, 16, 1),
                          mods=mods)


# --- CUDA: fp16 and bf16, long caches -----------------------------------------------------------------------

GPU_CASES = [
    (4, 32, 8, 1, 8192, 128, True, [8192, 5000, 77, 4096], cfg(16, 64, 8, 4, 2), "window1024,0"),
    (2, 16, 4, 4, 4096, 128, True, None, cfg(64, 64, 4, 4, 2), "window256,0+sinks"),
    (4, 16, 16, 1, 3000, 64, False, [3000, 10, 2999, 1500], cfg(16, 64, 6, 4, 2), "alibiB+cap30"),
    (2, 8, 2, 2, 2048, 128, True, [2048, 1000], cfg(16, 64, 1, 4, 2), "sinks+alibi+window100,0"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: _ids((*c, None)))
def test_modifiers_match_float64_gpu(case) -> None:
    for dtype in (torch.float16, torch.bfloat16):
        _check_case((*case, dtype), dtype, "cuda")
