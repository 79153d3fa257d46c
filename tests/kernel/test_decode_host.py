"""The decode host path: kvcache plans memoised with the cache length bucketed, and the decode passes
relaunched directly (kernel.kvcache.DecodeLaunch through kernel.fastlaunch).

On the CPU (Triton interpreter, fp32, tiny shapes) a growing cache, whose length and strides change
every call, must give the float64 reference's result at every step, across bucket boundaries; the
plan is one object per bucket (observable through `dispatch.kvcache_plan` and `explain`); a call whose
layout differs inside a bucket is still validated. Every step draws a fresh query, so an output buffer
left over from an earlier step (a pass that did not write) cannot match the reference. GPU-marked
tests: the relaunch is bitwise the JIT launch, a change of Triton's specialisation (a stride's
divisibility, alignment, Nk = 1, one split or several) takes the JIT and keeps a launcher per variant,
and CUDA-graph capture replays it.
"""
from __future__ import annotations

import math
import mmap
from pathlib import Path

import pytest
import torch

from helpers.cuda_graphs import replay_matches_eager

from flashtune.db.types import Config, Key
from flashtune.kernel import attention_kvcache, dispatch, fastlaunch, record
from flashtune.kernel.ops.kvcache import SPLITS_KNOB, plan_decode
from flashtune.kernel.jit.decode import decode_split_kernel
from flashtune.kernel.dispatch import kv_bucket
from flashtune.kernel.ops.kvcache import DecodeLaunch, combine_block_s, launch_decode, split_geometry
from flashtune.kernel.checks import check_kvcache_inputs
from flashtune.kernel.ops import kvcache as kvcache_ops
from flashtune.kernel.testing import attention_kvcache_reference
from helpers import rel

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.float16 if HAS_CUDA else torch.float32




def _query(b: int, hq: int, nq: int, d: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    # Laid out as transformers makes it: (B, Nq, Hq, D) projected, viewed as (B, Hq, Nq, D).
    return torch.randn(b, nq, hq, d, device=DEVICE, dtype=dtype).transpose(1, 2)


def _grow(cache: torch.Tensor) -> torch.Tensor:
    # What transformers' dynamic cache does every token: a new contiguous tensor one key longer.
    b, h, _, d = cache.shape
    return torch.cat([cache, torch.randn(b, h, 1, d, device=cache.device, dtype=cache.dtype)], dim=2)


# --- the rules, against independent references -------------------------------------------------

def test_kv_bucket_is_the_nearest_power_of_two_in_log2() -> None:
    for n in range(1, 5000):
        # Halfway (2^(k+1/2)) is never an integer, so float rounding of log2 is exact enough here.
        assert kv_bucket(n) == 2 ** math.floor(math.log2(n) + 0.5), n
    assert (kv_bucket(1448), kv_bucket(1449), kv_bucket(2896), kv_bucket(2897)) == (1024, 2048, 2048, 4096)
    with pytest.raises(ValueError):
        kv_bucket(0)


def test_int_spec_partitions_ints_as_tritons_jit_does() -> None:
    native = getattr(pytest.importorskip("triton._C.libtriton"), "native_specialize_impl", None)
    if native is None:
        pytest.skip("this Triton has no native specialize_impl to compare with")
    from triton.backends.compiler import BaseBackend

    try:
        native(BaseBackend, 16, False, True, True)
    except TypeError as error:  # another Triton's calling convention
        pytest.skip(f"cannot call this Triton's native_specialize_impl: {error}")

    values = [0, 1, 2, 3, 15, 16, 17, 31, 32, 48, 1 << 20, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40 + 8,
              2**63 - 16, 2**63 - 1, 2**63, 2**64 - 16, -1, -16, -17, -(2**31), -(2**31) - 1, -(2**31) - 16]
    values += list(range(0, 200, 7))
    classes: dict[int, tuple[str, object]] = {}
    for value in values:
        triton_class = tuple(native(BaseBackend, value, False, True, True))
        # Equal int_spec <=> the same (type, specialisation) in Triton: one compiled variant.
        assert classes.setdefault(fastlaunch.int_spec(value), triton_class) == triton_class, value
        assert fastlaunch.specialization([value, 16], ()) == (fastlaunch.int_spec(value), 16)  # its inlined form
    assert len(set(classes.values())) == len(classes)


def test_combine_block_s_is_the_next_power_of_two_rule() -> None:
    import triton

    for n in range(1, 3000):
        assert combine_block_s(n) == min(16, max(2, triton.next_power_of_2(n))), n


@pytest.mark.parametrize("ragged_rows", [0, 1, 4, 40])
def test_split_geometry_is_plan_decodes_rule(ragged_rows: int) -> None:
    for block_n in (16, 32, 64):
        for requested in (1, 2, 3, 7, 16):
            config = Config(16, block_n, 4, 1, ((SPLITS_KNOB, requested),))
            for seq_kv in (*range(1, 300, 7), 2047, 2048, 2049, 40_000, 100_003):
                group = max(1, ragged_rows)
                plan = plan_decode(config, batch=1, heads_kv=1, group=group, seq_q=1, seq_kv=seq_kv, head_dim=64,
                                   ragged=bool(ragged_rows))
                assert split_geometry(seq_kv, block_n, requested, ragged_rows) == (plan.split_size, plan.num_splits)


# --- a growing cache through the dispatcher ------------------------------------------------------

@pytest.mark.parametrize("nq, ragged", [(1, False), (2, True)])
def test_growing_cache_is_right_every_step_and_plans_once_per_bucket(nq: int, ragged: bool) -> None:
    torch.manual_seed(nq)
    b, hq, hkv, d = 2, 4, 2, 16
    k, v = (torch.randn(b, hkv, 3, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    plans: dict[int, dispatch.KVCachePlan] = {}
    with torch.no_grad():
        for seq_kv in range(3, 41):
            q = _query(b, hq, nq, d)
            lens = torch.tensor([seq_kv, max(nq, seq_kv - 2)], dtype=torch.int32, device=DEVICE) if ragged else None
            out = attention_kvcache(q, k, v, cache_seqlens=lens, causal=True)
            ref = attention_kvcache_reference(q.double(), k.double(), v.double(), cache_seqlens=lens, causal=True)
            assert rel(out, ref) < (2e-5 if not HAS_CUDA else 2e-3), seq_kv
            plan = dispatch.kvcache_plan(q, k, v, True, ragged)
            assert plans.setdefault(kv_bucket(seq_kv), plan) is plan, seq_kv  # one plan per bucket, reused
            assert plan.shape.seq_k == kv_bucket(seq_kv)
            k, v = _grow(k), _grow(v)
    assert sorted(plans) == [4, 8, 16, 32]
    assert len({id(p) for p in plans.values()}) == 4
    # explain() tells the same: the rules were applied to the bucket's key.
    choice = dispatch.explain(q, k, v, True, op="kvcache")
    assert choice.key.seq_len_kv == kv_bucket(k.shape[2]) == 32 and choice.config == plans[32].choice.config


def test_decode_launch_of_a_split_config_follows_the_exact_length() -> None:
    """One DecodeLaunch (what a plan runs) over a growing cache: with num_splits=3 the split size
    follows each Nk (2 to 3 live splits, pass 2 merging them), ragged lengths included."""
    torch.manual_seed(5)
    b, hq, hkv, d, nq = 2, 4, 2, 24, 2
    k, v = (torch.randn(b, hkv, 20, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    q = _query(b, hq, nq, d)
    shape = check_kvcache_inputs(q, k, v)
    config = Config(16, 16, 4, 1, ((SPLITS_KNOB, 3),))
    for ragged in (False, True):
        run = DecodeLaunch(shape, config, causal=True, ragged=ragged)
        kk, vv = k, v
        for seq_kv in range(20, 60, 3):
            q = _query(b, hq, nq, d)
            lens = torch.tensor([seq_kv, seq_kv // 2], dtype=torch.int32, device=DEVICE) if ragged else None
            out = run(q, kk, vv, seq_kv, lens, 0.3)
            ref = attention_kvcache_reference(q.double(), kk.double(), vv.double(), cache_seqlens=lens, causal=True,
                                              scale=0.3)
            assert rel(out, ref) < (2e-5 if not HAS_CUDA else 2e-3), (ragged, seq_kv)
            for _ in range(3):
                kk, vv = _grow(kk), _grow(vv)
    assert split_geometry(59, 16, 3) == (32, 2) and split_geometry(20, 16, 3) == (16, 2)


def test_another_layout_in_the_same_bucket_runs_on_its_own_strides() -> None:
    torch.manual_seed(7)
    b, hq, hkv, d = 1, 4, 2, 16
    q = _query(b, hq, 1, d)
    k, v = (torch.randn(b, hkv, 20, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    with torch.no_grad():
        first = attention_kvcache(q, k, v)
        plan = dispatch.kvcache_plan(q, k, v, False, False)
        # (B, Nk, Hkv, D) memory seen as (B, Hkv, Nk, D), 18 keys: the same bucket (16), other strides.
        kt, vt = (torch.randn(b, 18, hkv, d, device=DEVICE, dtype=DTYPE).transpose(1, 2) for _ in range(2))
        assert dispatch.kvcache_plan(q, kt, vt, False, False) is plan
        out = attention_kvcache(q, kt, vt)
    assert rel(first, attention_kvcache_reference(q.double(), k.double(), v.double())) < 2e-3
    assert rel(out, attention_kvcache_reference(q.double(), kt.double(), vt.double())) < 2e-3


def test_bad_input_in_the_same_bucket_is_still_a_clear_error() -> None:
    b, hq, hkv, d = 1, 4, 2, 16
    q = _query(b, hq, 4, d)
    k, v = (torch.randn(b, hkv, 6, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    with torch.no_grad():
        attention_kvcache(q, k, v, causal=True)  # Nk = 6: bucket 8, planned and memoised
        plan = dispatch.kvcache_plan(q, k, v, True, False)
        # v one key longer than k (both in bucket 8): the memo hit is not taken on trust.
        with pytest.raises(ValueError, match="k_cache and v_cache must have the same shape"):
            attention_kvcache(q, k, _grow(v), causal=True)
        # Causal needs Nk >= Nq: 3 keys (bucket 4) for 4 queries; Nk = 5 (also bucket 4) is fine.
        attention_kvcache(q, k[:, :, :5], v[:, :, :5], causal=True)
        with pytest.raises(ValueError, match="Nq=4 > Nmax=3"):
            attention_kvcache(q, k[:, :, :3], v[:, :, :3], causal=True)
        # Checked lengths are checked against the call's own Nmax, not the bucket's 8.
        with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 7 is out of range.*Nmax=6"):
            attention_kvcache(q, k, v, cache_seqlens=torch.tensor([7], dtype=torch.int32, device=DEVICE),
                              causal=True, check_lengths=True)
        # Another layout of the same sizes, dtype and device: a sparse cache is refused, not launched.
        with pytest.raises(TypeError, match="k_cache has layout torch.sparse_coo"):
            attention_kvcache(q, k.to_sparse(), v, causal=True)
    assert dispatch.kvcache_plan(q, k, v, True, False) is plan  # the errors left the plan as it was


def test_a_head_span_past_32_bits_in_the_same_bucket_is_refused(tmp_path: Path) -> None:
    """A cache whose head slice spans more than 2**31 elements (a huge row stride) with the sizes of a
    memoised call: the span grows with Nk and the strides, so it is checked on every hit. The
    memory is a sparse file mapped copy-on-write: nothing is read or allocated."""
    if HAS_CUDA:
        pytest.skip("the sparse mapping is a CPU tensor (the interpreter's device)")
    elements = 2**31 + 64
    path = tmp_path / "sparse.bin"
    with path.open("wb") as f:
        f.truncate(elements * 2)
    try:
        big = torch.from_file(str(path), shared=False, size=elements, dtype=torch.float16)
    except (RuntimeError, OSError, mmap.error) as error:  # pragma: no cover - a filesystem without sparse files
        pytest.skip(f"cannot map a sparse file: {error}")
    q = torch.randn(1, 2, 1, 16, dtype=torch.float16)
    k = torch.randn(1, 1, 3, 16, dtype=torch.float16)
    with torch.no_grad():
        attention_kvcache(q, k, k)  # Nk = 3 (bucket 4) memoised
        wide = big.as_strided((1, 1, 3, 16), (0, 0, 2**30, 1))  # rows 2**30 apart: a 2**31-element span
        with pytest.raises(ValueError, match="k_cache spans more than 2\\*\\*31 elements"):
            attention_kvcache(q, wide, k)


def test_recording_counts_the_key_of_each_calls_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A call counts the key its plan was resolved for, Nmax's bucket, not its own Nmax."""
    monkeypatch.setattr(record, "ENABLED", True)
    b, hq, hkv, d = 1, 2, 1, 16
    q = _query(b, hq, 1, d)
    k, v = (torch.randn(b, hkv, 5, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    before = record.pending()
    try:
        with torch.no_grad():
            for _ in range(3):  # 5, 6, 7 keys: buckets 4, 8, 8
                attention_kvcache(q, k, v)
                k, v = _grow(k), _grow(v)
        after = record.pending()
    finally:
        record.flush(f"sqlite:///{tmp_path / 'recorded.db'}")  # leave nothing pending for other tests
    arch = dispatch.INTERPRETER_ARCH if not HAS_CUDA else dispatch.explain(q, k, v, op="kvcache").arch
    dtype = "float32" if not HAS_CUDA else "float16"
    counted = {key: n - before.get(key, 0) for key, n in after.items() if n != before.get(key, 0)}
    key = lambda n: Key(arch, "kvcache", 1, d, dtype, False, seq_len_kv=n, batch_heads=2, group=2)  # noqa: E731
    assert counted == {key(4): 1, key(8): 2}


def _spied_passes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the launches of each decode pass that DecodeLaunch makes (through the real kernels)."""
    counts = {"split": 0, "combine": 0}

    class Counted:
        def __init__(self, name: str, jit: object) -> None:
            self.name, self.jit = name, jit

        def __getitem__(self, grid: object) -> object:
            counts[self.name] += 1
            return self.jit[grid]

    monkeypatch.setattr(kvcache_ops, "decode_split_kernel", Counted("split", kvcache_ops.decode_split_kernel))
    monkeypatch.setattr(kvcache_ops, "decode_combine_kernel", Counted("combine", kvcache_ops.decode_combine_kernel))
    return counts


@pytest.mark.parametrize("ragged", [False, True])
def test_one_split_launches_pass_one_alone_and_two_splits_both(monkeypatch: pytest.MonkeyPatch,
                                                               ragged: bool) -> None:
    """A plan of one split runs only pass 1, which writes O; two splits run pass 1 then the combine;
    both equal the float64 reference (fresh random inputs every call, so a stale output cannot)."""
    torch.manual_seed(5)
    b, hq, hkv, d, nmax = 2, 4, 2, 16, 40
    counts = _spied_passes(monkeypatch)
    for splits, launches in ((1, {"split": 1, "combine": 0}), (2, {"split": 1, "combine": 1})):
        config = Config(16, 16, 2, 1, ((SPLITS_KNOB, splits),))
        q = _query(b, hq, 1, d)
        k, v = (torch.randn(b, hkv, nmax, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
        lens = torch.tensor([nmax, 17], dtype=torch.int32, device=DEVICE) if ragged else None
        shape = check_kvcache_inputs(q, k, v)
        run = DecodeLaunch(shape, config, causal=True, ragged=ragged)
        counts.update(split=0, combine=0)
        with torch.no_grad():
            out = run(q, k, v, nmax, lens, 0.25)
        assert counts == launches, splits
        want = attention_kvcache_reference(q, k, v, cache_seqlens=lens, causal=True, scale=0.25)
        assert rel(out, want) < (2e-5 if not HAS_CUDA else 2e-3), splits


def _poisoned_cache(b: int, h: int, n: int, d: int, margin: int) -> torch.Tensor:
    """Random (B, H, n, D) values sliced out of a NaN-filled (B, H, n + margin, D) buffer: a read past
    row n, or before row 0 of a later head, meets NaN."""
    buf = torch.full((b, h, n + margin, d), float("nan"), device=DEVICE, dtype=DTYPE)
    cache = buf[:, :, :n]
    cache.copy_(torch.randn(b, h, n, d, device=DEVICE, dtype=DTYPE))
    return cache


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_lengths_outside_the_cache_are_clamped_without_reading_past_it(causal: bool, splits: int | None) -> None:
    """By default the lengths are not read on the host: the kernel clamps each into [0, Nmax], so a
    negative length gives zero rows and one past Nmax the whole cache, equal to the float64 reference
    on the clamped lengths, and nothing beyond the caches (NaN there) is read. check_lengths=True
    names the first bad length instead."""
    torch.manual_seed(7)
    b, hq, hkv, d, nmax, nq = 4, 4, 2, 16, 24, 2
    q = _query(b, hq, nq, d)
    k, v = (_poisoned_cache(b, hkv, nmax, d, margin=160) for _ in range(2))
    lens = torch.tensor([-3, nmax + 7, 150, 9], dtype=torch.int32, device=DEVICE)
    clamped = lens.clamp(0, nmax)
    config = None if splits is None else Config(16, 16, 2, 1, ((SPLITS_KNOB, splits),))
    with torch.no_grad():
        out = attention_kvcache(q, k, v, cache_seqlens=lens, causal=causal, config=config)
        with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = -3 is out of range"):
            attention_kvcache(q, k, v, cache_seqlens=lens, causal=causal, config=config, check_lengths=True)
    want = attention_kvcache_reference(q, k, v, cache_seqlens=clamped, causal=causal)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    assert rel(out, want) < (2e-5 if not HAS_CUDA else 2e-3)


def test_the_transformers_wrapper_decodes_a_growing_cache() -> None:
    pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from flashtune.kernel.integrations import transformers as ft

    class Layer(torch.nn.Module):  # what the attention function reads of a transformers attention layer
        is_causal = True
        num_key_value_groups = 2

    torch.manual_seed(11)
    layer, (b, hq, hkv, d) = Layer(), (1, 4, 2, 16)
    k, v = (torch.randn(b, hkv, 9, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    ft.reset_counts()
    plans = set()
    with torch.no_grad():
        for _ in range(12):  # 9..20 keys: buckets 8 and 16
            q = _query(b, hq, 1, d)
            out, _ = ft.tuned_attention_forward(layer, q, k, v, None, scaling=0.25)
            want, _ = sdpa_attention_forward(layer, q, k, v, None, scaling=0.25)
            assert out.shape == want.shape == (b, 1, hq, d)
            assert rel(out, want.double()) < (2e-5 if not HAS_CUDA else 2e-3)
            plans.add(id(dispatch.kvcache_plan(q, k, v, True, False)))
            k, v = _grow(k), _grow(v)
    assert ft.kernel_counts() == {"kvcache": 12} and ft.fallback_counts() == {}
    assert len(plans) == 2


# --- GPU: the direct relaunch of the decode passes ------------------------------------------------

def _jit_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dispatch.KVCachePlan,
                   lens: torch.Tensor | None, causal: bool) -> torch.Tensor:
    shape = check_kvcache_inputs(q, k, v)
    return launch_decode(q, k, v, shape, cache_seqlens=lens, causal=causal, scale=plan.default_scale,
                         config=plan.choice.config)[0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relaunched_decode_steps_equal_the_jit_launch_bitwise(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    b, hq, hkv, d = 1, 32, 8, 128
    k, v = (torch.randn(b, hkv, 1020, d, device="cuda", dtype=dtype) for _ in range(2))
    runs: list[int] = []
    with torch.no_grad():
        for step in range(40):  # 1020..1059 keys: split (the default gives 4 splits here), both passes
            q = _query(b, hq, 1, d, dtype)
            lens = torch.tensor([k.shape[2] - step % 3], dtype=torch.int32, device="cuda") if step % 2 else None
            got = attention_kvcache(q, k, v, cache_seqlens=lens, causal=True)
            plan = dispatch.kvcache_plan(q, k, v, True, lens is not None)
            assert torch.equal(got, _jit_reference(q, k, v, plan, lens, True)), step
            k, v = _grow(k), _grow(v)
        assert all(first is not None and (second is not None) == (key[0] > 0)
                   for key, (first, second) in plan.launch.launchers.items())
        # A pre-run hook on pass 1 sends the call through the JIT, which runs it.
        decode_split_kernel.add_pre_run_hook(lambda *a, **kw: runs.append(1))
        try:
            hooked = attention_kvcache(q, k, v, causal=True)
        finally:
            decode_split_kernel.pre_run_hooks.clear()
        again = attention_kvcache(q, k, v, causal=True)
    assert runs == [1] and torch.equal(hooked, again)


@pytest.mark.gpu
def test_a_specialisation_change_goes_through_the_jit_and_keeps_its_own_launcher() -> None:
    torch.manual_seed(1)
    b, hq, hkv, d = 2, 8, 2, 24  # D = 24: a contiguous cache's head stride Nk·24 is divisible by 16 iff Nk is even
    k, v = (torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.float16) for _ in range(2))
    seen: dict[int, set] = {}
    with torch.no_grad():
        for _ in range(600):  # Nk 1 (an int equal to 1), odd and even, one split then several
            q = _query(b, hq, 1, d, torch.float16)
            got = attention_kvcache(q, k, v)
            plan = dispatch.kvcache_plan(q, k, v, False, False)
            assert torch.equal(got, _jit_reference(q, k, v, plan, None, False)), k.shape[2]
            seen.setdefault(id(plan), set()).update(plan.launch.launchers)
            k, v = _grow(k), _grow(v)
        # A query 8 bytes past an aligned address, same plan: another specialisation, kept under its own key.
        base = torch.randn(b * hq * d + 4, device="cuda", dtype=torch.float16)
        odd = base[4:].view(b, hq, 1, d)
        aligned = odd.clone()
        assert odd.data_ptr() % 16 == 8 and aligned.stride() == odd.stride()
        attention_kvcache(aligned, k, v)
        plan = dispatch.kvcache_plan(odd, k, v, False, False)
        assert dispatch.kvcache_plan(aligned, k, v, False, False) is plan
        before = set(plan.launch.launchers)
        got = attention_kvcache(odd, k, v)
        assert torch.equal(got, _jit_reference(odd, k, v, plan, None, False))
        assert set(plan.launch.launchers) - before
        assert torch.equal(attention_kvcache(odd, k, v), got)  # now relaunched under that key
    assert max(len(keys) for keys in seen.values()) >= 2


@pytest.mark.gpu
def test_cuda_graph_capture_replays_a_relaunched_decode_step() -> None:
    torch.manual_seed(2)
    q = _query(1, 32, 1, 128, torch.bfloat16)
    k, v = (torch.randn(1, 8, 2000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert replay_matches_eager(lambda: attention_kvcache(q, k, v, causal=True), (q, k, v))
