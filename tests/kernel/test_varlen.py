"""attention_varlen (packed sequences) against float64 autograd through the reference attention applied per
document (each document sliced out, computed alone, the outputs concatenated).

Covered: empty documents, a one-token document, documents longer than a tile, Nq != Nk per document (causal
and windows then bottom-right, flash_attn's varlen rule), GQA, a padded head dim (24), window, softcap and
sinks (with their gradient), query documents without keys, the LSE, isolation between documents (bitwise),
the tile schedule, clamping of out-of-range cu_seqlens, NaN-poisoned outputs, torch.compile and bad inputs.
"""
from __future__ import annotations

import pytest
import torch
from flashtune.db.types import Config
from flashtune.kernel import attention_varlen
from flashtune.kernel.ops.bwd import _bwd
from flashtune.kernel.ops.varlen import (
    check_varlen_inputs,
    launch_varlen_bwd,
    launch_varlen_fwd,
    packing,
    schedule,
    slots,
)
from flashtune.kernel.testing import attention_reference, lse_reference
from flashtune.kernel.varlen import attention_varlen_fwd_op
from helpers import rel

FWD = Config(16, 16, 2, 1)  # small tiles: documents of 17 and 40 rows span several, with tails
BWD = _bwd(16, 16, 2, 1, 16, 16)
BOUNDS = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 2e-5}
FLOOR = 0.1


def cu(lengths: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def packed(lq: list[int], lk: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, device: str):
    q = torch.randn(sum(lq), hq, d).to(device, dtype)
    k = torch.randn(sum(lk), hkv, d).to(device, dtype)
    v = torch.randn(sum(lk), hkv, d).to(device, dtype)
    return q, k, v


def reference(q, k, v, lq, lk, causal, *, lse=False, **mods):
    """Per document: attention_reference (or lse_reference) with diag = len_k − len_q, concatenated; float64."""
    outs, a, b = [], 0, 0
    hq, d = q.shape[1], q.shape[2]
    for x, y in zip(lq, lk):
        qq = q[a:a + x].transpose(0, 1)[None]
        kk, vv = k[b:b + y].transpose(0, 1)[None], v[b:b + y].transpose(0, 1)[None]
        a, b = a + x, b + y
        if x == 0:
            continue
        if y == 0:  # no keys: zeros, and an LSE of the sink alone (or −inf)
            if lse:
                s = mods.get("sinks")
                outs.append(torch.full((hq, x), float("-inf"), dtype=torch.float64, device=q.device) if s is None
                            else s.double()[:, None].expand(hq, x))
            else:
                outs.append(torch.zeros(x, hq, d, dtype=torch.float64, device=q.device))
            continue
        if lse:
            outs.append(lse_reference(qq, kk, causal=causal, diag=y - x, **mods)[0])
        else:
            outs.append(attention_reference(qq, kk, vv, causal=causal, diag=y - x, **mods)[0].transpose(0, 1))
    return torch.cat(outs, dim=1 if lse else 0)


# (lengths of q, lengths of k, Hq, Hkv, D, dtype, causal, modifiers)
CASES = [
    pytest.param([1, 0, 17, 40], [1, 0, 17, 40], 2, 1, 16, torch.float32, False, {}, id="self-gqa-fp32"),
    pytest.param([17, 1, 0, 30], [23, 9, 4, 12], 2, 2, 24, torch.float16, True, {}, id="cross-causal-fp16"),
    pytest.param([20, 0, 33], [20, 5, 33], 2, 1, 16, torch.float16, True, {"window_size": (6, 0)},
                 id="window-causal-fp16"),
    pytest.param([9, 40], [30, 19], 2, 1, 24, torch.float32, False, {"window_size": (4, 7), "softcap": 1.5},
                 id="window-softcap-fp32"),
    pytest.param([18, 3, 0, 25], [18, 0, 7, 25], 2, 1, 16, torch.float32, True, {"sinks": True}, id="sinks-fp32"),
]


def _check_against_reference(q, k, v, lq, lk, causal, mods, dtype, **configs):
    """attention_varlen's output and gradients (q, k, v and the sinks if given) against float64 autograd of the
    per-document reference; returns (the leaves, the reference output, the bound) for further checks."""
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if "sinks" in mods:
        mods["sinks"] = mods["sinks"].requires_grad_()
        leaves.append(mods["sinks"])
    out = attention_varlen(q, k, v, cu(lq, q.device), cu(lk, q.device), max(lq), max(lk), causal=causal,
                           **configs, **mods)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_mods = dict(mods, **({"sinks": ref_leaves[3]} if "sinks" in mods else {}))
    ref = reference(*ref_leaves[:3], lq, lk, causal, **ref_mods)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    bound = BOUNDS[dtype]
    assert rel(out, ref) < bound
    for name, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        assert rel(g, r, floor=FLOOR) < bound * (10 if name == "dsinks" else 1), name
    return leaves, ref.detach(), bound


@pytest.mark.parametrize("lq, lk, hq, hkv, d, dtype, causal, mods", CASES)
def test_forward_and_backward_match_per_document_reference(kernel_device, lq, lk, hq, hkv, d, dtype, causal, mods):
    q, k, v = packed(lq, lk, hq, hkv, d, dtype, kernel_device)
    mods = dict(mods)
    if mods.pop("sinks", False):
        mods["sinks"] = (torch.randn(hq) + 1.0).to(kernel_device)
    leaves, ref, bound = _check_against_reference(q, k, v, lq, lk, causal, mods, dtype, config=FWD, bwd_config=BWD)
    # The case must exercise what it names: its modifiers and the per-document alignment change the result.
    # Without modifiers: the document boundaries (one unsplit sequence gives another result).
    if causal or mods:
        plain = reference(*[t.detach().double() for t in leaves[:3]], lq, lk, False)
    else:
        plain = reference(*[t.detach().double() for t in leaves[:3]], [sum(lq)], [sum(lk)], False)
    assert rel(plain, ref) > 100 * bound
    if causal and lq != lk:
        top_left = torch.cat([attention_reference(q[a:a + x].detach().transpose(0, 1)[None],
                                                  k[b:b + y].detach().transpose(0, 1)[None],
                                                  v[b:b + y].detach().transpose(0, 1)[None], causal=True)[0]
                              .transpose(0, 1) for x, y, a, b in _spans(lq, lk) if x and y])
        covered = torch.cat([ref[a:a + x] for x, y, a, b in _spans(lq, lk) if x and y])
        assert rel(top_left, covered.detach()) > 100 * bound


def _spans(lq, lk):
    a = b = 0
    for x, y in zip(lq, lk):
        yield x, y, a, b
        a, b = a + x, b + y


def test_lse_and_rows_without_keys(kernel_device):
    """The op's LSE (Hq, total_q) per document, −inf (no sinks) where a row sees nothing; poisoned outputs are
    all written."""
    lq, lk = [5, 12, 0, 20], [0, 12, 3, 8]  # no keys for document 0; len_q > len_k causal rows in document 3
    q, k, v = packed(lq, lk, 2, 1, 16, torch.float32, kernel_device)
    o, lse = attention_varlen_fwd_op(q, k, v, cu(lq, kernel_device), cu(lk, kernel_device), 20, 12, True,
                                     0.25, 0.0, -1, -1, None, [16, 16, 2, 1], [16, 16, 2, 1] * 2)
    ref_lse = reference(q, k, v, lq, lk, True, lse=True, scale=0.25)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and torch.isinf(lse).sum() == 2 * (5 + 12)
    finite = torch.isfinite(ref_lse)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 1e-5
    assert rel(o, reference(q, k, v, lq, lk, True, scale=0.25)) < 2e-5
    assert torch.equal(o[:5], torch.zeros_like(o[:5]))

    shape = check_varlen_inputs(q, k, v, cu(lq, kernel_device), cu(lk, kernel_device), 20, 12)
    pack = packing(cu(lq, kernel_device), cu(lk, kernel_device), q.shape[0], k.shape[0], 20, 12)
    out = torch.full_like(q, float("nan"))
    launch_varlen_fwd(q, k, v, pack, shape, causal=False, scale=0.25, config=FWD, out=out, return_lse=False)
    assert rel(out, reference(q, k, v, lq, lk, False, scale=0.25)) < 2e-5  # rel: every element written

    # The backward into poisoned buffers: every row written, zeros for keys no query sees (document 2) and
    # queries that see no key.
    do = torch.randn_like(o)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    launch_varlen_bwd(do, q, k, v, o, lse, pack, shape, causal=True, scale=0.25, config=BWD, out=grads)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference(*leaves, lq, lk, True, scale=0.25), leaves, do.double())
    for g, r in zip(grads, ref_grads):
        assert rel(g, r, floor=FLOOR) < 2e-5
    assert torch.equal(grads[1][12:15], torch.zeros_like(grads[1][12:15]))


def test_a_document_sees_only_itself(kernel_device):
    lq, lk = [17, 9, 23], [17, 30, 23]
    q, k, v = packed(lq, lk, 2, 2, 16, torch.float16, kernel_device)
    cq, ck = cu(lq, kernel_device), cu(lk, kernel_device)
    before = attention_varlen(q, k, v, cq, ck, 23, 30, config=FWD)
    k2, v2 = k.clone(), v.clone()
    k2[17:47] = torch.randn_like(k2[17:47]) * 3  # document 1's keys and values only
    v2[17:47] = torch.randn_like(v2[17:47])
    after = attention_varlen(q, k2, v2, cq, ck, 23, 30, config=FWD)
    assert torch.equal(before[:17], after[:17]) and torch.equal(before[26:], after[26:])
    assert (before[17:26] - after[17:26]).abs().max() > 0.1


def test_schedule_lists_only_real_tiles(kernel_device):
    lengths = torch.tensor([0, 1, 16, 17, 0, 40, 0], dtype=torch.int32, device=kernel_device)
    n = slots(int(lengths.sum()), 7, 40, 16)
    sched = schedule(lengths, 16, n).cpu()
    real = sched[0] < 7
    expected = [(d, t) for d, ln in enumerate(lengths.tolist()) for t in range(-(-ln // 16))]
    assert [tuple(x) for x in sched[:, real].T.tolist()] == expected
    assert n >= len(expected) and bool((sched[0, ~real] == 7).all())


def test_out_of_range_offsets_are_clamped(kernel_device):
    """Offsets past the end and decreasing ones are clamped on the device: nothing outside the tensors is read,
    and the documents that remain are computed as clamped."""
    q, k, v = packed([24], [24], 1, 1, 16, torch.float32, kernel_device)
    bad = torch.tensor([0, 10, 7, 1000], dtype=torch.int32, device=kernel_device)  # -> [0, 10], [10, 10], [10, 24]
    out = attention_varlen(q, k, v, bad, bad, 24, 24, causal=True, config=FWD)
    assert rel(out, reference(q, k, v, [10, 0, 14], [10, 0, 14], True)) < 2e-5


def test_torch_compile_traces_forward_and_backward(kernel_device):
    lq, lk = [7, 0, 20], [7, 4, 20]
    q, k, v = packed(lq, lk, 2, 1, 16, torch.float32, kernel_device)
    q.requires_grad_()
    cq, ck = cu(lq, kernel_device), cu(lk, kernel_device)

    def step(q, k, v):
        return attention_varlen(q, k, v, cq, ck, 20, 20, causal=True, config=FWD, bwd_config=BWD).sum()

    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v)
    (dq,) = torch.autograd.grad(loss, [q])
    qd = q.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(reference(qd, k, v, lq, lk, True).sum(), [qd])
    assert rel(dq, ref, floor=FLOOR) < 2e-5


def test_bad_inputs_raise_clear_errors(kernel_device):
    lq = [3, 5]
    q, k, v = packed(lq, lq, 4, 2, 16, torch.float32, kernel_device)
    c = cu(lq, kernel_device)
    cases = [
        ({"cu_seqlens_q": c.long()}, TypeError, "int32"),
        ({"cu_seqlens_k": c[:2]}, ValueError, "batch \\+ 1"),
        ({"cu_seqlens_q": c[:0]}, ValueError, "1-D"),
        ({"cu_seqlens_q": c.view(3, 1)}, ValueError, "1-D"),
        ({"max_seqlen_q": 5.0}, TypeError, "max_seqlen_q"),
        ({"max_seqlen_k": -1}, ValueError, "max_seqlen_k"),
        ({"q": q[None]}, ValueError, "3-D"),
        ({"k": k.half(), "v": v.half()}, TypeError, "dtype"),
        ({"q": torch.randn(8, 3, 16, device=kernel_device)}, ValueError, "multiple"),
        ({"window_size": (2,)}, TypeError, "window_size"),
        ({"sinks": torch.zeros(3, device=kernel_device)}, ValueError, "sinks"),
        ({"causal": 1}, TypeError, "causal"),
    ]
    base = {"q": q, "k": k, "v": v, "cu_seqlens_q": c, "cu_seqlens_k": c, "max_seqlen_q": 5, "max_seqlen_k": 5}
    for change, error, text in cases:
        args = dict(base, **change)
        with pytest.raises(error, match=text):
            attention_varlen(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q"),
                             args.pop("cu_seqlens_k"), args.pop("max_seqlen_q"), args.pop("max_seqlen_k"), **args)
    elsewhere = "meta" if kernel_device == "cpu" else "cpu"
    with pytest.raises(ValueError, match=f"cu_seqlens_q is on {elsewhere}"):
        attention_varlen(q, k, v, c.to(elsewhere), c, 5, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal, mods", [(False, {}), (True, {}), (True, {"window_size": (100, 0), "softcap": 20.0}),
                                          (False, {"sinks": True})])
def test_gpu_against_reference(dtype, causal, mods):
    lq = [1, 0, 700, 129, 2048, 64, 513]
    lk = [5, 17, 700, 300, 2048, 0, 400]
    q, k, v = packed(lq, lk, 8, 2, 128, dtype, "cuda")
    mods = dict(mods)
    if mods.pop("sinks", False):
        mods["sinks"] = torch.randn(8, device="cuda")
    _check_against_reference(q, k, v, lq, lk, causal, mods, dtype)
