"""The backward with score modifiers (window, ALiBi, attn_mask, dropout, sinks, with softcap) against float64
autograd through the reference attention with the same modifiers.

The forward's O and natural-log LSE come from the float64 reference (O cast to the input dtype, LSE fp32), so
these tests check the backward kernels alone: both dQ paths (the deterministic dQ kernel and the dK/dV kernel's
atomic dQ), GQA (dK/dV summed over the group), Nq != Nk, a padded head dim, windows narrower than a tile and
spanning several, masks that hide whole rows, stride-0 broadcast masks and slopes, and tiles outside the window
that must never be read.
"""
from __future__ import annotations

import math

import pytest
import torch

from flashtune.db.types import Config
from flashtune.kernel.checks import AttnShape, check_bwd_inputs
from flashtune.kernel.mods import NO_MODS, ScoreMods, check_mods, dropout_keep_mask, sinks_grad
from flashtune.kernel.ops.bwd import attention_bwd, default_bwd_config, launch_bwd
from flashtune.kernel.testing import attention_reference, lse_reference

from helpers import rel

# Relative-norm error bounds of dQ, dK, dV against float64 autograd on the same (rounded) inputs: those of the
# plain and capped backward (test_bwd.py, test_bwd_softcap.py). The modifiers only add constants to the scores
# or hide them, and dropout scales kept probabilities by at most 1/(1 − p) < 2, so the bounds carry over.
BOUNDS = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 2e-5}
FLOOR = 0.1  # gradients whose RMS is below this are compared in absolute terms (see helpers.rel)

# Interpreter-sized configs: the deterministic dQ kernel (block_m < block_n for dK/dV, its own dQ tiles) and
# the dK/dV kernel's atomic dQ.
DQ_KERNEL = (Config(16, 16, 2, 1, {"block_m_dq": 16, "block_n_dq": 32}), True)
DQ_KERNEL_WIDE = (Config(32, 16, 4, 2, {"block_m_dq": 32, "block_n_dq": 16}), True)
DQ_KERNEL_16 = (Config(16, 16, 2, 1), True)  # 16 x 16 dQ tiles: a wide window has whole tiles inside
ATOMIC_DQ = (Config(16, 32, 2, 1, {"deterministic": False}), False)


def _draw(shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator, gain: float = 1.0):
    return (torch.randn(*shape, generator=gen) * gain).to(device, dtype)


def _inputs(b, hq, hkv, nq, nk, d, dtype, device, gen):
    # q, k with gain 1.5: scores of standard deviation ~2.2, a peaked softmax that the modifiers change much.
    return (_draw((b, hq, nq, d), dtype, device, gen, 1.5), _draw((b, hkv, nk, d), dtype, device, gen, 1.5),
            _draw((b, hkv, nk, d), dtype, device, gen), _draw((b, hq, nq, d), dtype, device, gen))


def _reference_kwargs(mods: ScoreMods, user: dict, keep: torch.Tensor | None) -> dict:
    """The reference's arguments for the user's modifier arguments (the tensors as the user gave them)."""
    ref = {name: user[name] for name in ("softcap", "window_size", "sinks", "alibi_slopes", "attn_mask")
           if user.get(name) is not None}
    if keep is not None:
        ref.update(dropout_keep=keep, dropout_p=mods.dropout_p)
    return ref


def _reference_grads(q, k, v, do, causal, ref, extra=()):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, *extra)]
    kwargs = dict(ref)
    if extra:
        kwargs["sinks"] = leaves[3]
    attention_reference(*leaves[:3], causal=causal, **kwargs).backward(do.double())
    return [x.grad for x in leaves]


def _run(q, k, v, do, causal, config, deterministic, forward=None, **user):
    """launch_bwd with the checked modifiers of `user` (check_mods's arguments) into NaN-poisoned buffers, from
    the reference forward (of `forward`'s q, k, v if given); returns (grads, mods, reference kwargs, lse,
    delta)."""
    b, hq, nq, d = q.shape
    shape = AttnShape(b, hq, k.shape[1], nq, k.shape[2], d, str(q.dtype).removeprefix("torch."))
    mods = check_mods(shape, q.device, **user)
    keep = (dropout_keep_mask(mods.seed, mods.dropout_p, b, hq, nq, k.shape[2], q.device) if mods.dropout_p
            else None)
    ref = _reference_kwargs(mods, user, keep)
    lse_kwargs = {name: value for name, value in ref.items() if not name.startswith("dropout")}
    fq, fk, fv = forward or (q, k, v)
    o = attention_reference(fq, fk, fv, causal=causal, **ref).to(q.dtype)
    lse = lse_reference(fq, fk, causal=causal, **lse_kwargs).float()
    assert check_bwd_inputs(do, q, k, v, o, lse) == shape
    out = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    grads = launch_bwd(do, q, k, v, o, lse, shape, causal=causal, scale=1.0 / math.sqrt(d), config=config,
                       deterministic=deterministic, out=out, mods=mods)[:3]
    assert all(g is buf for g, buf in zip(grads, out))
    delta = (do.double() * o.double()).sum(-1)
    return grads, mods, ref, lse, delta


def _check(grads, refs, dtype, what):
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
        assert g.dtype == dtype and g.shape == r.shape
        err = rel(g, r, floor=FLOOR)
        assert err < BOUNDS[dtype], f"{what} {dtype}: {name} relative error {err:.2e}"


def _changes(refs, plain, dtype, what):
    # The modifier moves the exact gradients far beyond the bound: a backward that ignored it would fail.
    worst = max(rel(p, r, floor=FLOOR) for p, r in zip(plain, refs))
    assert worst > 10 * BOUNDS[dtype], f"{what}: the modifier changes the gradients by only {worst:.1e}"


def _case(sizes, causal, dtype, cfg, device, seed, check_change=True, **user):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = _inputs(*sizes, dtype, device, gen)
    user = {name: (value(gen).to(device) if callable(value) else value) for name, value in user.items()}
    config, deterministic = cfg
    grads, mods, ref, lse, delta = _run(q, k, v, do, causal, config, deterministic, **user)
    what = f"{sizes} causal={causal} {config} {sorted(user)}"
    refs = _reference_grads(q, k, v, do, causal, ref)
    _check(grads, refs, dtype, what)
    if check_change:
        _changes(refs, _reference_grads(q, k, v, do, causal, {}), dtype, what)
    return q, k, v, do, grads, mods, ref, lse, delta


def _seed(name: str) -> int:
    # A fresh draw per run (the tests must not pass by one lucky draw), reported on failure.
    seed = int(torch.randint(0, 2**31, (1,)).item())
    print(f"{name}: seed {seed}")
    return seed


def _slopes(shape):
    return lambda gen: (torch.rand(*shape, generator=gen) * 0.7 + 0.1)


# --- window ---------------------------------------------------------------------------------------------------

# (sizes (b, hq, hkv, nq, nk, d), causal, window, dtype, config)
WINDOW_CASES = [
    ((1, 4, 2, 40, 40, 24), False, (5, 3), torch.float32, DQ_KERNEL),        # narrower than a tile, GQA, D 24
    ((1, 2, 2, 48, 48, 32), True, (20, -1), torch.float16, ATOMIC_DQ),       # causal sliding window, spans tiles
    ((1, 2, 1, 24, 56, 32), False, (3, 9), torch.float16, DQ_KERNEL_WIDE),   # Nq < Nk, MQA
    ((1, 2, 2, 56, 21, 24), False, (-1, 4), torch.float32, ATOMIC_DQ),      # Nq > Nk: rows that see no key
    ((1, 2, 2, 40, 40, 32), True, (0, 0), torch.float32, DQ_KERNEL),         # only the diagonal
    ((1, 2, 2, 64, 64, 32), False, (40, 6), torch.float16, DQ_KERNEL_16),   # whole tiles inside, lopsided
]


@pytest.mark.parametrize("sizes, causal, window, dtype, cfg", WINDOW_CASES,
                         ids=[f"{c[2]}{'-causal' if c[1] else ''}-{c[0][3]}x{c[0][4]}" for c in WINDOW_CASES])
def test_window(sizes, causal, window, dtype, cfg, kernel_device):
    _case(sizes, causal, dtype, cfg, kernel_device, _seed("window"), window_size=window)


def test_window_with_softcap(kernel_device):
    _case((1, 2, 2, 40, 40, 32), False, torch.float32, DQ_KERNEL, kernel_device, _seed("softcap"),
          window_size=(6, 6), softcap=2.0)


@pytest.mark.parametrize("window, cfg", [(None, DQ_KERNEL_WIDE), ((10, 2), ATOMIC_DQ)], ids=["alone", "window"])
def test_sinks(window, cfg, kernel_device):
    # The lse given includes the sinks: the kernels need nothing more; their gradient is sinks_grad's.
    sinks = (torch.randn(4) * 1.5).to(kernel_device)
    dtype = torch.float16 if window else torch.float32
    q, k, v, do, _, mods, ref, lse, delta = _case(
        (1, 4, 2, 33, 33, 32), True, dtype, cfg, kernel_device, _seed("sinks"), sinks=sinks, window_size=window)
    refs = _reference_grads(q, k, v, do, True, ref, extra=(sinks,))
    got = sinks_grad(mods.sinks, lse, delta.float())
    assert rel(got, refs[3]) < 50 * BOUNDS[dtype], (got, refs[3])
    assert refs[3].abs().max() > 0.05  # the sinks carry weight, so a wrong gradient shows


def test_window_tiles_outside_are_never_read(kernel_device):
    # NaN in keys no query's window reaches and in queries that see no key: the kernels never visit their
    # tiles, so nothing reaches the gradients (a visit would multiply the NaN by a zero probability: NaN).
    # From row 64 on they fill whole tiles of every config here (tiles of 16 and 32).
    gen = torch.Generator().manual_seed(_seed("skip"))
    for sizes, window in (((1, 2, 2, 32, 96, 32), (8, 4)), ((1, 2, 2, 96, 32, 32), (4, 8))):
        nq, nk = sizes[3], sizes[4]
        keys = nk > nq
        # Keys past Nq − 1 + right and queries past Nk − 1 + left are outside every window.
        assert (nq - 1 + window[1] if keys else nk - 1 + window[0]) < 64
        for cfg in (DQ_KERNEL, ATOMIC_DQ):
            clean = _inputs(*sizes, torch.float32, kernel_device, gen)
            refs = _reference_grads(*clean, False, {"window_size": window})
            q, k, v, do = (x.clone() for x in clean)
            for x in ((k, v) if keys else (q, do)):
                x[:, :, 64:] = float("nan")
            grads, *_ = _run(q, k, v, do, False, *cfg, forward=clean[:3], window_size=window)
            _check(grads, refs, torch.float32, f"NaN outside {sizes} {window} {cfg}")
            for g in (grads[1:] if keys else grads[:1]):
                assert g[:, :, 64:].abs().max() == 0


# --- ALiBi ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slopes, causal, dtype, cfg", [
    ((4,), True, torch.float32, DQ_KERNEL),          # (Hq,): a stride-0 batch
    ((2, 4), False, torch.float16, ATOMIC_DQ),      # (B, Hq)
], ids=["Hq-causal", "B-Hq"])
def test_alibi(slopes, causal, dtype, cfg, kernel_device):
    _case((2, 4, 2, 29, 37, 24), causal, dtype, cfg, kernel_device, _seed("alibi"), alibi_slopes=_slopes(slopes))


# --- attn_mask ------------------------------------------------------------------------------------------------

def _bool_mask(shape, hidden_rows=()):
    def make(gen):
        mask = torch.rand(*shape, generator=gen) > 0.4
        for row in hidden_rows:
            mask[..., row, :] = False
        return mask
    return make


@pytest.mark.parametrize("mask_shape, causal, dtype, cfg", [
    ((2, 1, 37, 45), False, torch.float32, DQ_KERNEL),   # broadcast over heads, rows wholly hidden
    ((2, 1, 37, 45), True, torch.float16, ATOMIC_DQ),
], ids=["dq-kernel", "atomic"])
def test_bool_mask_with_hidden_rows(mask_shape, causal, dtype, cfg, kernel_device):
    hidden = (0, 5, 6, 36)
    grads = _case((2, 4, 2, 37, 45, 32), causal, dtype, cfg, kernel_device, _seed("mask"),
                  attn_mask=_bool_mask(mask_shape, hidden))[4]
    for row in hidden:  # a row that sees nothing: exact zeros (rel above checked that all are finite)
        assert grads[0][:, :, row].abs().max() == 0


def test_bool_key_padding_mask_broadcast(kernel_device):
    # (1, 1, 1, Nk): strides 0 on batch, heads and rows; a key hidden from every row gets dK = dV = 0.
    def make(gen):
        mask = torch.rand(1, 1, 1, 40, generator=gen) > 0.3
        mask[..., 0] = True  # with causal, query 0 sees key 0 only
        mask[..., 17] = False
        return mask
    grads = _case((2, 2, 2, 27, 40, 32), True, torch.float16, DQ_KERNEL_WIDE, kernel_device, _seed("padding"),
                  attn_mask=make)[4]
    assert grads[1][:, :, 17].abs().max() == 0 and grads[2][:, :, 17].abs().max() == 0


@pytest.mark.parametrize("dtype, cfg", [(torch.float32, DQ_KERNEL), (torch.float16, ATOMIC_DQ)], ids=str)
def test_float_mask(dtype, cfg, kernel_device):
    def make(gen):  # (Hq, Nq, Nk): a stride-0 batch; some −inf entries, a whole row among them
        mask = torch.randn(4, 30, 35, generator=gen) * 2
        mask[torch.rand(4, 30, 35, generator=gen) > 0.8] = float("-inf")
        mask[1, 3] = float("-inf")
        return mask.to(dtype)
    _case((2, 4, 1, 30, 35, 24), False, dtype, cfg, kernel_device, _seed("float mask"), attn_mask=make)


# --- dropout --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, causal, p, dtype, cfg", [
    ((1, 4, 2, 35, 35, 32), False, 0.3, torch.float32, DQ_KERNEL),
    ((2, 2, 1, 21, 43, 24), True, 0.15, torch.float16, ATOMIC_DQ),
    ((1, 2, 2, 43, 21, 32), False, 0.5, torch.float16, DQ_KERNEL_WIDE),
], ids=["gqa", "causal-atomic", "nq-gt-nk"])
def test_dropout(sizes, causal, p, dtype, cfg, kernel_device):
    _case(sizes, causal, dtype, cfg, kernel_device, _seed("dropout"), dropout_p=p)


def test_dropout_with_window_and_alibi(kernel_device):
    _case((1, 2, 2, 40, 40, 32), True, torch.float32, ATOMIC_DQ, kernel_device, _seed("all"), dropout_p=0.2,
          window_size=(12, -1), alibi_slopes=_slopes((2,)), attn_mask=_bool_mask((40, 40)), softcap=3.0)


# --- entry points ---------------------------------------------------------------------------------------------

def test_checked_entry_point_takes_the_modifiers(kernel_device):
    gen = torch.Generator().manual_seed(_seed("entry"))
    q, k, v, do = _inputs(1, 2, 2, 26, 26, 32, torch.float32, kernel_device, gen)
    user = {"window_size": (4, 7), "alibi_slopes": _slopes((2,))(gen), "attn_mask": torch.randn(26, 26, generator=gen)}
    o = attention_reference(q, k, v, causal=False, scale=0.3, **user).float()
    lse = lse_reference(q, k, causal=False, scale=0.3, **user).float()
    grads = attention_bwd(do, q, k, v, o, lse, causal=False, scale=0.3, **user)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    attention_reference(*leaves, causal=False, scale=0.3, **user).backward(do.double())
    _check(grads, [x.grad for x in leaves], torch.float32, "attention_bwd")
    with pytest.raises(ValueError, match="window_size left"):
        attention_bwd(do, q, k, v, o, lse, causal=False, scale=0.3, window_size=(-2, 3))


def test_no_modifiers_compile_the_plain_kernels(kernel_device, launches):
    # An empty ScoreMods and NO_MODS launch the same kernels (every flag off) and give bitwise equal gradients.
    gen = torch.Generator().manual_seed(_seed("plain"))
    q, k, v, do = _inputs(1, 2, 1, 19, 19, 32, torch.float32, kernel_device, gen)
    o = attention_reference(q, k, v, causal=True).float()
    lse = lse_reference(q, k, causal=True).float()
    shape = check_bwd_inputs(do, q, k, v, o, lse)
    runs = [launch_bwd(do, q, k, v, o, lse, shape, causal=True, scale=0.2, config=DQ_KERNEL[0], mods=mods)[:3]
            for mods in (NO_MODS, ScoreMods(), check_mods(shape, q.device))]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    for launch in launches:
        assert not any(launch.kwargs.get(flag) for flag in ("WINDOW", "ALIBI", "MASK", "DROPOUT", "SOFTCAP"))


def test_smem_model_bounds_the_masked_kernels():
    # metadata.shared of the kernels with an fp16 float attn_mask (MASK=2, with every other modifier on), compiled
    # offline by Triton 3.9 (fp16): the mask adds at most one staged tile, and the estimate with mask_bytes
    # stays above the compiled figure.
    from flashtune.kernel.ops.bwd import estimate_dkdv_smem, estimate_dq_smem

    measured = [  # (kernel, arch, D, block_m, block_n, warps, stages, bytes without mask, bytes with it)
        ("dkdv", "sm_90", 128, 32, 128, 8, 3, 82432, 90624), ("dkdv", "sm_90", 128, 32, 64, 8, 2, 49408, 53504),
        ("dq", "sm_90", 128, 128, 64, 8, 2, 98304, 114688), ("dq", "sm_90", 128, 64, 32, 8, 2, 49152, 53248),
        ("dq", "sm_80", 64, 128, 64, 8, 2, 49152, 57344), ("dq", "sm_80", 64, 128, 32, 8, 2, 40960, 45056),
    ]
    for kind, arch, d, bm, bn, w, s, plain, masked in measured:
        if kind == "dkdv":
            est = [estimate_dkdv_smem(bm, bn, w, s, d, "float16", arch, mask_bytes=m) for m in (0, 2)]
        else:
            est = [estimate_dq_smem(bm, bn, w, s, d, "float16", arch, mask_bytes=m) for m in (0, 2)]
        assert est[1] - est[0] >= masked - plain and est[1] >= masked, (kind, arch, d, bm, bn, est, masked)


# --- GPU: fp16 and bf16 at moderate sizes ---------------------------------------------------------------------

GPU_CASES = [
    ((2, 8, 2, 1000, 1000, 64), True, {"window_size": (128, -1)}),
    ((1, 8, 8, 777, 1531, 128), False, {"window_size": (64, 200), "softcap": 30.0}),
    ((2, 8, 4, 640, 640, 64), True, {"alibi_slopes": _slopes((8,)), "sinks": lambda g: torch.randn(8, generator=g)}),
    ((2, 4, 4, 512, 700, 96), False, {"attn_mask": _bool_mask((2, 1, 512, 700), hidden_rows=(3, 400))}),
    ((2, 4, 2, 600, 600, 64), True, {"attn_mask": lambda g: torch.randn(1, 4, 600, 600, generator=g)}),
    ((2, 8, 2, 513, 513, 128), False, {"dropout_p": 0.1, "window_size": (100, 100)}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"{c[0][3]}x{c[0][4]}d{c[0][5]}-{sorted(c[2])}" for c in GPU_CASES])
def test_gpu(case, dtype):
    from flashtune.kernel.device import device_arch

    sizes, causal, user = case
    default = default_bwd_config(device_arch(0), sizes[5], str(dtype).removeprefix("torch."))
    atomic = Config(default.block_m, default.block_n, default.num_warps, default.num_stages,
                    {**default.extra_dict, "deterministic": False})
    for cfg in ((default, True), (atomic, False)):
        # (the interpreter's tests show each modifier matters; bf16's bound is too wide to show it here)
        _case(sizes, causal, dtype, cfg, "cuda", 1000 + GPU_CASES.index(case), check_change=dtype == torch.float16,
              **user)
