"""Score modifiers in the forward pointer kernel (kernel.ops.fwd.launch with a ScoreMods, and the public
`attention_fwd`): sliding window, sinks, ALiBi, bool and float attn_mask, dropout, and pairs with softcap,
against the float64 reference with the same modifiers (kernel.testing), LSE included.

On CPU under the interpreter (fp32, fp16, tiny shapes, 16-row tiles so a sequence spans several tiles) or on
CUDA (the `gpu` tests: fp16, bf16, moderate shapes). Outputs are NaN-poisoned before the kernel writes them;
every case also checks that its modifier changes the reference by far more than the tolerance. Tiles the
kernel must never load (outside every query's window, or hidden by the bool mask from a whole query block)
hold NaN in K and V: loading them would poison the output (0 · NaN = NaN in P·V).
"""
from __future__ import annotations

import math

import pytest
import torch
from flashtune.db.types import Config
from flashtune.kernel.checks import check_inputs
from flashtune.kernel.device import device_arch
from flashtune.kernel.mods import ScoreMods, check_mods, draw_seed, dropout_keep_mask
from flashtune.kernel.ops.fwd import attention_fwd, launch, launch_cached
from flashtune.kernel.ops.fwd_tma import tma_config, tma_supported
from flashtune.kernel.testing import attention_reference, lse_reference
from helpers import rel
from helpers.mods import mods_kwargs

BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
LSE_BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CFG = Config(16, 16, 2, 1)
SPREAD = 2.0  # inputs' spread: scores well away from uniform, so every modifier shows


def _gen(device: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**31, (1,))))


def _qkv(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, dtype: torch.dtype, device: str,
         gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    def draw(h: int, n: int) -> torch.Tensor:
        return (torch.randn(b, h, n, d, generator=gen) * SPREAD).to(device, dtype)
    return draw(hq, nq), draw(hkv, nk), draw(hkv, nk)


def _launch(q, k, v, causal: bool, config: Config, mods: ScoreMods) -> tuple[torch.Tensor, torch.Tensor]:
    shape = check_inputs(q, k, v)
    out = torch.full_like(q, float("nan"))
    o, lse, _ = launch(q, k, v, shape, causal=causal, scale=1 / math.sqrt(q.shape[-1]), config=config,
                       return_lse=True, out=out, mods=mods)
    assert o is out
    return o, lse


def _check_lse(lse: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    hidden = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse), hidden), "rows that see no key must have lse = -inf (and only they)"
    assert not torch.isnan(lse).any()
    err = float((lse.double() - ref)[~hidden].abs().max()) if (~hidden).any() else 0.0
    assert err < LSE_BOUND[dtype] * max(1.0, float(ref[~hidden].abs().max())), f"lse error {err:.2e}"


# (B, Hq, Hkv, Nq, Nk, D, causal, modifiers, config, dtype on CPU)
CASES = [
    (1, 4, 2, 40, 40, 24, False, "window3,2", CFG, torch.float32),               # narrower than a tile, GQA
    (1, 2, 2, 33, 50, 16, True, "window20,7", Config(16, 32, 2, 1), torch.float16),  # spans tiles, Nq != Nk;
    (1, 2, 2, 40, 50, 16, False, "window20,17", CFG, torch.float32),            # causal caps right at 0
    (1, 2, 1, 40, 20, 16, False, "window2,2", Config(32, 16, 2, 1), torch.float32),  # rows past the keys: 0, -inf
    (2, 2, 2, 24, 40, 24, False, "sinks", CFG, torch.float16),
    (1, 4, 2, 40, 40, 16, True, "alibi", Config(16, 32, 2, 1), torch.float32),
    (2, 2, 1, 24, 40, 16, False, "alibiB", CFG, torch.float16),
    (2, 2, 2, 40, 33, 24, False, "bool", CFG, torch.float32),                   # wholly hidden rows give 0
    (2, 2, 1, 33, 40, 16, True, "bool2d", CFG, torch.float16),
    (2, 2, 2, 20, 40, 16, False, "keypad", CFG, torch.float32),
    (2, 2, 2, 33, 40, 16, False, "float", CFG, torch.float16),
    (1, 2, 2, 40, 40, 16, True, "cap2+window20,-1", CFG, torch.float32),        # the pairs
    (1, 2, 1, 40, 48, 24, False, "window10,5+sinks", CFG, torch.float16),
    (1, 2, 2, 40, 40, 16, True, "window12,-1+sinks+alibi", Config(32, 16, 2, 1), torch.float32),
]


def _ids(case) -> str:
    b, hq, hkv, nq, nk, d, causal, kind, config, _ = case
    return f"b{b}h{hq}-{hkv}n{nq}x{nk}d{d}{'c' if causal else ''}-{kind}-m{config.block_m}n{config.block_n}"


def _check_case(case, dtype: torch.dtype, device: str) -> None:
    b, hq, hkv, nq, nk, d, causal, kind, config, _ = case
    gen = _gen(device)
    q, k, v = _qkv(b, hq, hkv, nq, nk, d, dtype, device, gen)
    kw = mods_kwargs(kind, b, hq, nq, nk, device, gen)
    mods = check_mods(check_inputs(q, k, v), q.device, **kw)
    o, lse = _launch(q, k, v, causal, config, mods)
    ref = attention_reference(q, k, v, causal=causal, **kw)
    err = rel(o, ref, floor=0.05)
    assert err < BOUND[dtype], f"{_ids(case)} {dtype}: relative error {err:.2e}"
    _check_lse(lse, lse_reference(q, k, causal=causal, **kw), dtype)
    plain = {key: value for key, value in kw.items() if key == "softcap"}
    assert rel(attention_reference(q, k, v, causal=causal, **plain), ref, floor=0.05) > 0.02, "modifier has no effect"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_modifiers_match_float64(case) -> None:
    if torch.cuda.is_available():
        pytest.skip("the gpu tests below cover CUDA")
    _check_case(case, case[-1], "cpu")


def test_window_never_loads_tiles_outside_it(kernel_device: str) -> None:
    """Keys past every query's window (here: the 16 queries see keys 0..21 of 80) lie in tiles the kernel must
    skip: NaN there would reach the output through P·V if they were loaded."""
    gen = _gen(kernel_device)
    q, k, v = _qkv(1, 2, 2, 16, 80, 16, torch.float32, kernel_device, gen)
    clean_k, clean_v = k.clone(), v.clone()
    k[:, :, 32:] = float("nan")
    v[:, :, 32:] = float("nan")
    mods = check_mods(check_inputs(q, k, v), q.device, window_size=(4, 6))
    o, lse = _launch(q, k, v, False, CFG, mods)
    assert rel(o, attention_reference(q, clean_k, clean_v, window_size=(4, 6)), floor=0.05) < BOUND[torch.float32]
    _check_lse(lse, lse_reference(q, clean_k, window_size=(4, 6)), torch.float32)


def test_bool_mask_skips_tiles_it_hides(kernel_device: str) -> None:
    """A key tile the bool mask hides from a whole query block is never loaded: NaN there stays out."""
    gen = _gen(kernel_device)
    q, k, v = _qkv(2, 2, 2, 16, 48, 16, torch.float16, kernel_device, gen)  # one 16-row query block
    mask = torch.rand(16, 48, generator=gen) > 0.5
    mask[:, 16:32] = False  # the block never sees key tile 1
    mask[:, 0] = True
    mask = mask.to(kernel_device)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[:, :, 16:32] = float("nan")
    bad_v[:, :, 16:32] = float("nan")
    mods = check_mods(check_inputs(q, k, v), q.device, attn_mask=mask)
    o, lse = _launch(q, bad_k, bad_v, False, CFG, mods)
    assert rel(o, attention_reference(q, k, v, attn_mask=mask), floor=0.05) < BOUND[torch.float16]
    _check_lse(lse, lse_reference(q, k, attn_mask=mask), torch.float16)


def test_dropout_matches_the_reference_with_its_keep_mask(kernel_device: str) -> None:
    """Dropout keeps what dropout_keep_mask(seed, ...) draws, scales by 1/(1 - p), and leaves the LSE alone."""
    for dtype, causal, p in ((torch.float32, False, 0.3), (torch.float16, True, 0.5)):
        if kernel_device == "cuda" and dtype == torch.float32:
            dtype = torch.bfloat16
        gen = _gen(kernel_device)
        b, hq, hkv, nq, nk, d = 2, 2, 1, 33, 40, 24
        q, k, v = _qkv(b, hq, hkv, nq, nk, d, dtype, kernel_device, gen)
        seed = draw_seed()
        mods = ScoreMods(dropout_p=p, seed=seed)
        o, lse = _launch(q, k, v, causal, CFG, mods)
        keep = dropout_keep_mask(seed, p, b, hq, nq, nk, kernel_device)
        ref = attention_reference(q, k, v, causal=causal, dropout_keep=keep, dropout_p=p)
        assert rel(o, ref, floor=0.05) < BOUND[dtype] * 2
        assert rel(attention_reference(q, k, v, causal=causal), ref) > 0.1  # dropout matters here
        _check_lse(lse, lse_reference(q, k, causal=causal), dtype)
        # another seed, another mask
        again, _ = _launch(q, k, v, causal, CFG, ScoreMods(dropout_p=p, seed=seed + 1))
        assert rel(again, ref, floor=0.05) > 0.05


def test_attention_fwd_takes_the_modifiers(kernel_device: str) -> None:
    dtype = torch.float16 if kernel_device == "cuda" else torch.float32
    gen = _gen(kernel_device)
    q, k, v = _qkv(1, 4, 2, 24, 40, 16, dtype, kernel_device, gen)
    kw = mods_kwargs("window6,3+sinks+alibiB", 1, 4, 24, 40, kernel_device, gen)
    mask = (torch.rand(24, 40, generator=gen) > 0.3).to(kernel_device)
    o, lse = attention_fwd(q, k, v, causal=True, config=CFG, return_lse=True, attn_mask=mask, **kw)
    ref = attention_reference(q, k, v, causal=True, attn_mask=mask, **kw)
    assert rel(o, ref, floor=0.05) < BOUND[dtype]
    _check_lse(lse, lse_reference(q, k, causal=True, attn_mask=mask, **kw), dtype)
    # launch_cached takes a call with modifiers through launch(), whatever its cache holds
    got = launch_cached(q, k, v, check_inputs(q, k, v), causal=True, scale=0.25, config=CFG, return_lse=False,
                        cache={}, mods=check_mods(check_inputs(q, k, v), q.device, attn_mask=mask, **kw))[0]
    assert torch.equal(got, o)


def test_bad_modifiers_are_named(kernel_device: str) -> None:
    q, k, v = _qkv(1, 2, 2, 16, 16, 16, torch.float32, kernel_device, _gen(kernel_device))
    with pytest.raises(ValueError, match="sinks"):
        attention_fwd(q, k, v, sinks=torch.zeros(3, device=kernel_device))
    with pytest.raises(TypeError, match="window_size"):
        attention_fwd(q, k, v, window_size=4)
    with pytest.raises(ValueError, match="attn_mask"):
        attention_fwd(q, k, v, attn_mask=torch.ones(5, 16, dtype=torch.bool, device=kernel_device))
    with pytest.raises(ValueError, match="TMA forward kernel has no attn_mask"):
        attention_fwd(q, k, v, config=tma_config(16, 16, 4, 2), attn_mask=torch.ones(16, 16, dtype=torch.bool,
                                                                                     device=kernel_device))


# The TMA variant: softcap, window, sinks and ALiBi (no mask, no dropout); every schedule, ws on and off.
TMA_CASES = [
    (1, 4, 2, 40, 40, 24, True, "window12,3", tma_config(16, 16, 4, 2), torch.float32),
    (1, 2, 2, 40, 20, 16, False, "window2,2", tma_config(16, 16, 8, 2, ws=True), torch.float16),
    (2, 2, 1, 33, 40, 16, True, "sinks+alibiB", tma_config(16, 16, 4, 2, schedule="persistent"), torch.float32),
    (1, 2, 2, 40, 48, 24, False, "cap2+window10,5+sinks", tma_config(16, 32, 4, 2, schedule="heavy_first"),
     torch.float16),
    (1, 4, 4, 40, 40, 16, True, "alibi+cap3", tma_config(16, 16, 2, 2, ws=True), torch.float32),
]


@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: _ids(c) + "-" + c[8].extra_dict["schedule"]
                         + ("-ws" if c[8].extra_dict["ws"] else ""))
def test_tma_variant_modifiers_match_float64(case) -> None:
    if torch.cuda.is_available():
        pytest.skip("the gpu tests below cover CUDA")
    _check_case(case, case[-1], "cpu")


# --- CUDA: fp16 and bf16 at moderate shapes ----------------------------------------------------------------

GPU_CASES = [
    (2, 8, 2, 1024, 1024, 128, True, "window256,0", Config(128, 64, 8, 3)),
    (2, 8, 8, 1000, 1100, 64, False, "window100,100", Config(64, 64, 4, 2)),
    (2, 8, 2, 512, 512, 128, True, "sinks+alibi", Config(128, 64, 8, 3)),
    (2, 8, 8, 512, 700, 64, False, "alibiB+cap20", Config(64, 64, 4, 2)),
    (2, 4, 4, 512, 512, 64, False, "bool", Config(64, 64, 4, 2)),
    (2, 4, 2, 500, 512, 128, True, "keypad", Config(128, 64, 8, 3)),
    (2, 4, 4, 512, 512, 64, False, "float", Config(64, 64, 4, 2)),
    (1, 8, 8, 1024, 1024, 96, True, "cap30+window128,-1+sinks", Config(128, 64, 8, 3)),
    (2, 8, 2, 1024, 1024, 128, True, "window256,0+sinks", tma_config(128, 64, 8, 2)),
    (2, 8, 2, 1024, 1024, 128, True, "window256,0+alibi", tma_config(128, 64, 4, 2)),
    (2, 8, 8, 1000, 1000, 64, False, "cap20+window100,100", tma_config(128, 64, 8, 2, schedule="persistent")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: _ids((*c, None)))
def test_modifiers_match_float64_gpu(case) -> None:
    if case[-1].extra_dict.get("loads") == "tma":
        reason = tma_supported(device_arch(torch.device("cuda")), case[5], extra=case[-1].extra_dict)
        if reason:
            pytest.skip(reason)
    for dtype in (torch.float16, torch.bfloat16):
        _check_case((*case, dtype), dtype, "cuda")


def test_the_warp_specialised_tma_kernel_refuses_modifiers(kernel_device: str) -> None:
    """Triton 3.6 miscompiles the warp-specialised kernel with a window and ALiBi (wrong results on an H100):
    such a config is refused before anything launches, and the plain call still runs it."""
    q, k, v = _qkv(1, 2, 2, 64, 64, 64, torch.float16 if kernel_device == "cuda" else torch.float32,
                   kernel_device, _gen(kernel_device))
    shape = check_inputs(q, k, v)
    mods = check_mods(shape, q.device, window_size=(16, 0))
    with pytest.raises(ValueError, match="warp-specialised TMA forward kernel"):
        launch(q, k, v, shape, causal=True, scale=0.125, config=tma_config(64, 64, 4, 2, ws=True), mods=mods)
