"""Paged KV caches in attention_kvcache (block_table; the split-KV decode kernel's PAGED variant).

The paged caches are built from random contiguous ones: every sequence's pages go to a random permutation of
the cache's pages, the cache has spare pages no table names, and those, the slots past a sequence's length in
its last page and the table entries past its pages are poison (NaN pages, out-of-range page numbers), so a
read of anything a sequence does not own shows in its output. Checked against the float64 reference per
sequence (`attention_reference` with the diagonal at len − Nq, bottom-right) on the clean contiguous caches.
CPU tests run under the interpreter (fp32, fp16); the `gpu` tests run on CUDA (fp16, bf16, longer caches).
"""
from __future__ import annotations

import math

import pytest
import torch
from flashtune.db.types import Config
from flashtune.kernel.checks import check_paged_inputs
from flashtune.kernel.kvcache import append_paged_kv, attention_kvcache
from flashtune.kernel.mods import NO_MODS, check_mods
from flashtune.kernel.ops.kvcache import (
    SPLITS_KNOB,
    decode_partials,
    launch_decode,
    plan_decode,
)
from flashtune.kernel.testing import attention_reference
from helpers import rel

BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SPREAD = 2.0
SPARE_PAGES = 3  # pages no table names, all NaN


def cfg(block_m: int, block_n: int, splits: int) -> Config:
    return Config(block_m, block_n, 2, 1, ((SPLITS_KNOB, splits),))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))


def paged(k: torch.Tensor, v: torch.Tensor, lens: list[int], page_size: int, gen: torch.Generator,
          pad: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, block_table) holding contiguous (B, Hkv, Nmax, D) caches in shuffled pages.

    Sequence b owns cdiv(lens[b], page_size) pages; the table's entries past them are `pad` (out of range
    by default), slots past the length and unowned pages are NaN."""
    b, hkv, nmax, d = k.shape
    max_pages = nmax // page_size
    owned = [-(-n // page_size) for n in lens]
    num_pages = sum(owned) + SPARE_PAGES
    order = torch.randperm(num_pages, generator=gen).tolist()
    table = torch.full((b, max_pages), pad, dtype=torch.int32)
    kc = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=k.dtype)
    vc = kc.clone()
    for i in range(b):
        for j in range(owned[i]):
            page = order.pop()
            table[i, j] = page
            n = min(page_size, lens[i] - j * page_size)
            kc[page, :n] = k[i, :, j * page_size:j * page_size + n].transpose(0, 1)
            vc[page, :n] = v[i, :, j * page_size:j * page_size + n].transpose(0, 1)
    return kc.to(k.device), vc.to(k.device), table.to(k.device)


def inputs(b, hq, hkv, nq, max_pages, page_size, d, lens, dtype, device, gen):
    def draw(h: int, n: int) -> torch.Tensor:
        return (torch.randn(b, h, n, d, generator=gen) * SPREAD).to(device, dtype)
    q, k, v = draw(hq, nq), draw(hkv, max_pages * page_size), draw(hkv, max_pages * page_size)
    kc, vc, table = paged(k, v, lens, page_size, gen)
    return q, k, v, kc, vc, table, torch.tensor(lens, dtype=torch.int32, device=device)


def reference(q, k, v, lens, causal: bool, **kw) -> torch.Tensor:
    """Per sequence: attention over its `len` keys with the diagonal at len − Nq (bottom-right)."""
    nq = q.shape[2]
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        if n == 0:
            outs.append(torch.zeros_like(q[b:b + 1], dtype=torch.float64))
            continue
        outs.append(attention_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=causal,
                                        diag=n - nq, **kw))
    return torch.cat(outs)


def launch(q, kc, vc, table, lens, causal: bool, config: Config, **mod_kw) -> torch.Tensor:
    """launch_decode on NaN-poisoned output and partials."""
    shape, _, _ = check_paged_inputs(q, kc, vc, table)
    mods = check_mods(shape, q.device, **mod_kw) if mod_kw else NO_MODS
    plan = plan_decode(config, batch=shape.batch, heads_kv=shape.heads_kv, group=shape.group, seq_q=shape.seq_q,
                       seq_kv=shape.seq_k, head_dim=shape.head_dim, ragged=True)
    out = torch.full_like(q, float("nan"))
    partials = tuple(t.fill_(float("nan")) for t in decode_partials(shape, plan, q.device))
    o, _ = launch_decode(q, kc, vc, shape, cache_seqlens=lens, causal=causal, scale=1 / math.sqrt(q.shape[-1]),
                         config=config, out=out, partials=partials, mods=mods, block_table=table)
    assert o is out
    return o


# (B, Hq, Hkv, Nq, max_pages, page_size, D, causal, lengths, config, dtype)
CASES = [
    # GQA, one query, ragged with an empty sequence and a length inside a page; tiles of 16 in pages of 16
    (3, 4, 2, 1, 4, 16, 32, False, [0, 37, 64], cfg(16, 16, 3), torch.float32),
    # tiles of 32 spanning two pages of 16 (each column finds its own page)
    (2, 2, 1, 1, 4, 16, 16, False, [50, 17], cfg(16, 32, 2), torch.float16),
    # chunked prefill / speculation: 3 causal queries, pages of 32, several splits
    (2, 4, 2, 3, 2, 32, 32, True, [45, 3], cfg(16, 16, 4), torch.float32),
    (3, 2, 2, 3, 2, 32, 16, True, [0, 64, 33], cfg(16, 16, 1), torch.float16),
]


@pytest.mark.parametrize("b,hq,hkv,nq,max_pages,page_size,d,causal,lens,config,dtype", CASES)
def test_paged_matches_reference(b, hq, hkv, nq, max_pages, page_size, d, causal, lens, config, dtype):
    gen = _gen()
    q, k, v, kc, vc, table, seqlens = inputs(b, hq, hkv, nq, max_pages, page_size, d, lens, dtype, "cpu", gen)
    out = launch(q, kc, vc, table, seqlens, causal, config)
    ref = reference(q, k, v, seqlens, causal)
    assert rel(out, ref) < BOUND[dtype]
    assert torch.isfinite(out).all()


def test_paged_window_and_sinks():
    """Window and sinks with pages: both change the result (by far more than the bound) and match."""
    gen = _gen()
    q, k, v, kc, vc, table, seqlens = inputs(2, 4, 2, 3, 4, 16, 32, [61, 40], torch.float32, "cpu", gen)
    sinks = torch.randn(4, generator=gen) * SPREAD
    kw = {"window_size": (9, 0), "sinks": sinks}
    out = launch(q, kc, vc, table, seqlens, True, cfg(16, 16, 4), **kw)
    ref = reference(q, k, v, seqlens, True, **kw)
    assert rel(out, ref) < BOUND[torch.float32]
    assert rel(reference(q, k, v, seqlens, True), ref) > 100 * BOUND[torch.float32]


def test_public_api_paths_agree():
    """attention_kvcache with a block table: the planned path (config=None, check_lengths) and an explicit
    config give the reference; softcap travels too."""
    gen = _gen()
    q, k, v, kc, vc, table, seqlens = inputs(2, 4, 1, 1, 3, 16, 32, [48, 20], torch.float16, "cpu", gen)
    ref = reference(q, k, v, seqlens, False)
    planned = attention_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table, check_lengths=True)
    assert rel(planned, ref) < BOUND[torch.float16]
    explicit = attention_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table, config=cfg(16, 16, 2))
    assert rel(explicit, ref) < BOUND[torch.float16]
    capped = attention_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table, softcap=2.0)
    ref_cap = reference(q, k, v, seqlens, False, softcap=2.0)
    assert rel(capped, ref_cap) < BOUND[torch.float16]
    assert rel(ref, ref_cap) > 100 * BOUND[torch.float16]


def test_owned_pages_reach_the_output():
    """The poison is live: NaN in a page a sequence owns spoils that sequence's output (NaN on a GPU; under the
    interpreter the NaN score drops out of the softmax, a wrong result all the same) and no other's, so the
    NaN pages and slots the other tests leave unowned would show if they were read."""
    gen = _gen()
    q, k, v, kc, vc, table, seqlens = inputs(2, 2, 2, 1, 2, 16, 16, [30, 32], torch.float32, "cpu", gen)
    kc[int(table[0, 1]), 3] = float("nan")  # key 19 of sequence 0
    out = launch(q, kc, vc, table, seqlens, False, cfg(16, 16, 2))
    ref = reference(q, k, v, seqlens, False)
    spoiled = out[:1].double() - ref[:1]
    assert torch.isnan(spoiled).any() or spoiled.norm() > 100 * BOUND[torch.float32] * ref[:1].norm()
    assert rel(out[1:], ref[1:]) < BOUND[torch.float32]


def test_out_of_range_pages_and_lengths_are_clamped():
    """A page number outside [0, num_pages) reads the nearest page; a length past max_pages·page_size reads the
    whole table; check_lengths=True names the first bad entry a sequence uses instead."""
    gen = _gen()
    q, k, v, kc, vc, table, seqlens = inputs(2, 2, 1, 1, 2, 16, 16, [32, 32], torch.float32, "cpu", gen)
    # finite spare pages: a clamped entry may land on one, and the reference below reads what it holds
    spare = torch.isnan(kc)
    kc[spare] = torch.randn(int(spare.sum()), generator=gen)
    vc[spare] = torch.randn(int(spare.sum()), generator=gen)
    bad = table.clone()
    bad[1, 1] = kc.shape[0] + 5  # clamped to the last page
    bad[0, 0] = -7  # clamped to page 0
    long = torch.tensor([32, 1000], dtype=torch.int32)
    out = attention_kvcache(q, kc, vc, cache_seqlens=long, block_table=bad, config=cfg(16, 16, 2))
    clamped = bad.clamp(0, kc.shape[0] - 1).long()
    # The contiguous caches the clamped table describes (NaN where a clamped entry lands on a spare page).
    k_eff = kc[clamped].flatten(1, 2).permute(0, 2, 1, 3)
    v_eff = vc[clamped].flatten(1, 2).permute(0, 2, 1, 3)
    assert rel(out, reference(q, k_eff, v_eff, seqlens, False)) < BOUND[torch.float32]
    assert rel(out, reference(q, k, v, seqlens, False)) > 100 * BOUND[torch.float32]  # the clamp mattered
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -7"):
        attention_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bad, check_lengths=True)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 1000"):
        attention_kvcache(q, kc, vc, cache_seqlens=long, block_table=table, check_lengths=True)
    # Entries past a sequence's pages are not checked (nor read): length 16 uses block_table[b, 0] only.
    short = torch.tensor([16, 16], dtype=torch.int32)
    fine = table.clone()
    fine[:, 1] = -1
    attention_kvcache(q, kc, vc, cache_seqlens=short, block_table=fine, check_lengths=True)


def test_bad_block_tables():
    gen = _gen()
    q, _, _, kc, vc, table, seqlens = inputs(2, 2, 1, 1, 2, 16, 16, [20, 32], torch.float32, "cpu", gen)

    def call(**kw):
        args = {"cache_seqlens": seqlens, "block_table": table, "k_cache": kc, "v_cache": vc} | kw
        return attention_kvcache(q, **args)

    with pytest.raises(TypeError, match="block_table has dtype torch.int64"):
        call(block_table=table.long())
    with pytest.raises(TypeError, match="block_table must be None or an int32"):
        call(block_table=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="block_table is on meta"):
        call(block_table=torch.empty(2, 2, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="block_table must be 2-D"):
        call(block_table=table[0])
    with pytest.raises(ValueError, match="block_table has 1 rows"):
        call(block_table=table[:1])
    with pytest.raises(ValueError, match="power of two from 16, got 8"):
        call(k_cache=kc[:, :8], v_cache=vc[:, :8])
    with pytest.raises(ValueError, match="power of two from 16, got 24"):
        call(k_cache=torch.cat([kc, kc[:, :8]], 1), v_cache=torch.cat([vc, vc[:, :8]], 1))
    with pytest.raises(ValueError, match="k_cache and v_cache must have the same shape"):
        call(v_cache=vc[:-1])
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        call(k_cache=kc[0], v_cache=vc[0])
    with pytest.raises(ValueError, match="cache_seqlens is required with a block_table"):
        call(cache_seqlens=None)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        call(k_cache=kc.expand(-1, -1, 3, -1), v_cache=vc.expand(-1, -1, 3, -1))


def test_append_then_attend():
    """append_paged_kv writes new tokens where the kernel reads them: a decode step after appending two tokens
    equals the reference on the grown contiguous caches."""
    gen = _gen()
    lens = [14, 29]
    q, k, v, kc, vc, table, seqlens = inputs(2, 2, 2, 2, 2, 16, 16, lens, torch.float32, "cpu", gen)
    # sequence 0 grows into its second page: give it a spare one (sequence 1 fills its own second page)
    table[0, 1] = min(set(range(kc.shape[0])) - set(table[table >= 0].tolist()))
    k_new = torch.randn(2, 2, 3, 16, generator=gen) * SPREAD
    v_new = torch.randn(2, 2, 3, 16, generator=gen) * SPREAD
    append_paged_kv(kc, vc, table, seqlens, k_new, v_new)
    grown = seqlens + 3
    for b, n in enumerate(lens):
        k[b, :, n:n + 3], v[b, :, n:n + 3] = k_new[b], v_new[b]
    out = attention_kvcache(q, kc, vc, cache_seqlens=grown, block_table=table, causal=True, config=cfg(16, 16, 2))
    assert rel(out, reference(q, k, v, grown, True)) < BOUND[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_paged_gpu(dtype, page_size):
    """On CUDA: the planned path on longer ragged caches (splits walking many pages), GQA, Nq = 1 and 4."""
    gen = _gen()
    max_pages = 4096 // page_size
    lens = [4096, 1, 0, 2500, 777, 4000]
    for nq, causal in ((1, False), (4, True)):
        run = [n if n == 0 or n >= nq else nq for n in lens]
        q, k, v, kc, vc, table, seqlens = inputs(6, 8, 2, nq, max_pages, page_size, 128, run, dtype, "cuda", gen)
        out = attention_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table, causal=causal)
        assert rel(out, reference(q, k, v, seqlens, causal)) < BOUND[dtype]
        sinks = torch.randn(8, generator=gen).cuda()
        kw = {"window_size": (300, 0), "sinks": sinks}
        out = attention_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table, causal=True, **kw)
        assert rel(out, reference(q, k, v, seqlens, True, **kw)) < BOUND[dtype]
