"""Split-KV decode (`attention_kvcache`) as a tuner op: its space, default, FLOPs, bytes and benchmark inputs.

A "kvcache" key is Key(arch, "kvcache", seq_len=Nq, seq_len_kv=the cache length Nmax, head_dim, dtype,
causal=bottom-right causal, batch_heads=bucket(B·Hq), group=Hq/Hkv). Its workload is random q and
caches with real GQA (Hkv = Hq / group KV heads) and every sequence Nmax long; each candidate's output
is checked against kernel/testing.py in fp32 on the bench device, with the forward's
tolerance. A key with features (window, softcap, sinks, ALiBi: tuner.ops.mods; a decode call has no mask
and no dropout) runs them bottom-right aligned, as the cache's causal mask (diag = Nmax − Nq), and is
checked against the float64 reference of the same modifiers (tuner.ops.reference). A key with a page size
(Key.page_size) is timed on the same caches written into pages in a shuffled order (kernel.kvcache.paged_kv),
every sequence's length passed, as a serving engine calls it; no SDPA backend reads pages.

The space: num_splits x block_n x (warps, stages), and the half-size query tile where the packed rows
G·Nq fill more than 16 rows, around the key's default (kernel.ops.kvcache.default_decode_config with the
GPU's SM count). Split counts that give the same effective split (kernel.ops.kvcache.plan_decode rounds a
split to whole tiles) are one config. Pruned by the shared-memory estimate and CUDA's grid limit.

torch SDPA's backends compete where they compute the same thing (`sdpa_decode_key`): a query that sees
every cached key, i.e. one query (Nq = 1: bottom-right causal sees the whole cache) or a non-causal key, on a
full cache (the workload's), without attention features. SDPA has no per-sequence lengths and its is_causal
is top-left, so calls with `cache_seqlens` of a key an SDPA backend won run the kernel config stored beside
the win (kernel.dispatch.kvcache_plan), and causal keys with Nq > 1 have no SDPA candidate; nor do keys with
features: a window or ALiBi is aligned to each sequence's own length, which no one SDPA mask of a call with
lengths gives.

Decode is memory-bound: the trials table's rate column holds the FLOP rate (`kvcache_flops`) like every
op's, and `kvcache_bytes` (K + V + Q + O, kernel.ops.kvcache.decode_bytes) gives the TB/s that `tune` prints.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...db.types import DTYPE_BYTES, Config, Key
from ...kernel.jit.common import GRID_X_MAX
from ...kernel.ops.kvcache import SPLITS_KNOB, decode_bytes, num_splits_of, default_decode_config, estimate_decode_smem, plan_decode
from ...kernel.checks import check_kvcache_inputs
from ...kernel.ops.kvcache import launch_decode
from ...kernel.checks import AttnShape
from ...kernel.providers import KERNEL, provider_of
from ...kernel.sdpa import run_sdpa
from ...kernel.testing import attention_kvcache_reference

from .fwd import TOLERANCE
from .inputs import OpInputs, unmodified
from .mods import has_features
from .reference import modified_attention
from .space import Candidate
from .spec import OpSpec

if TYPE_CHECKING:
    from ..gpu import GpuInfo

OP = "kvcache"
SPLIT_STEPS = (-3, -2, -1, 0, 1, 2)  # num_splits = the default's times 2**step (and 1)
BLOCK_NS = (64, 128)  # the H200 sweep's winners all used 64 or 128 (bench/results/h200/decode_bench.csv)
WARPS_STAGES = ((4, 2), (4, 3), (8, 3))
HALF_TILE_WARPS_STAGES = ((4, 2),)  # the half-size query tile: its best pipeline only
REFERENCE_CHUNK_BYTES = 1 << 30  # fp32 K and V copies the reference holds at once
# The nominal key `tune --dry-run` lists the space of (the space scales with each key's default).
NOMINAL = dict(seq_len=1, seq_len_kv=32768, batch_heads=256, group=4)


def visible_pairs(seq_q: int, seq_kv: int, causal: bool) -> int:
    """(query, key) pairs one head computes: Nq·Nkv, less the bottom-right causal triangle."""
    if not causal:
        return seq_q * seq_kv
    return sum(max(0, min(seq_kv, seq_kv - seq_q + 1 + i)) for i in range(seq_q))


def kvcache_flops(key: Key, batch_heads: int) -> float:
    """FLOPs of one call: 4·B·Hq·D per visible (query, key) pair (QKᵀ and PV, a multiply-add each)."""
    return 4.0 * batch_heads * key.head_dim * visible_pairs(key.seq_len, key.seq_len_kv, key.causal)


def kvcache_bytes(key: Key, batch_heads: int) -> int:
    """Bytes one call must move on the benchmark inputs: K and V of every cached token, Q and O."""
    batch, heads_q, heads_kv = KVCacheInputs.sizes(key, batch_heads)
    return decode_bytes(batch=batch, heads_q=heads_q, heads_kv=heads_kv, seq_q=key.seq_len,
                        kv_tokens=batch * key.seq_len_kv, head_dim=key.head_dim, elt=DTYPE_BYTES[key.dtype])


def kvcache_default(key: Key, gpu: "GpuInfo") -> Config:
    """kernel.ops.kvcache.default_decode_config for the key on this GPU (its SM count and shared memory):
    what attention_kvcache runs untuned."""
    return default_decode_config(key.seq_len, key.seq_len_kv, key.head_dim, key.dtype,
                                 batch_heads=max(1, key.batch_heads), group=key.group, sm_count=gpu.sm_count,
                                 arch=gpu.arch, smem_limit=gpu.smem_limit)


def _effective(config: Config, key: Key) -> tuple[Config, int]:
    """`config` with num_splits replaced by the count plan_decode really launches, and its program count."""
    batch, _, heads_kv = KVCacheInputs.sizes(key, key.batch_heads)
    plan = plan_decode(config, batch=batch, heads_kv=heads_kv, group=key.group, seq_q=key.seq_len,
                       seq_kv=key.seq_len_kv, head_dim=key.head_dim)
    programs = plan.num_m_blocks * plan.num_splits * batch * heads_kv
    return Config(config.block_m, config.block_n, config.num_warps, config.num_stages,
                  ((SPLITS_KNOB, plan.num_splits),)), programs


def _candidates(key: Key, gpu: "GpuInfo") -> list[Candidate]:
    """Every config of the key's space with its estimated shared memory and, if dropped, why."""
    default = kvcache_default(key, gpu)
    base = int(default.extra_dict.get(SPLITS_KNOB, 1))
    splits = sorted({1, *(max(1, round(base * 2.0 ** step)) for step in SPLIT_STEPS)})
    tiles = [(default.block_m, WARPS_STAGES)]
    if default.block_m > 16:  # more packed rows than one 16-row tile: try two half tiles
        tiles.append((default.block_m // 2, HALF_TILE_WARPS_STAGES))
    asked = [(default.block_m, default.block_n, default.num_warps, default.num_stages, base)]
    asked += [(bm, bn, w, st, n) for bm, pipelines in tiles for bn in BLOCK_NS for w, st in pipelines for n in splits]
    # What runs depends on the tile and the split count alone: planned once per (block_m, block_n,
    # splits), and each distinct effective config built once (a dry run plans 200,000 keys).
    launched: dict[tuple[int, int, int], tuple[int, int]] = {}
    seen: dict[tuple[int, ...], Candidate] = {}
    for bm, bn, w, st, n in asked:
        if (bm, bn, n) not in launched:
            config, programs = _effective(Config(bm, bn, w, st, ((SPLITS_KNOB, n),)), key)
            launched[(bm, bn, n)] = (num_splits_of(config), programs)
        runs, programs = launched[(bm, bn, n)]
        if (bm, bn, w, st, runs) in seen:
            continue
        config = Config(bm, bn, w, st, ((SPLITS_KNOB, runs),))
        smem = estimate_decode_smem(config, key.head_dim, key.dtype, gpu.arch)
        dropped = None
        if smem > gpu.smem_limit:
            dropped = f"smem {smem // 1024} KB > {gpu.smem_limit // 1024} KB"
        elif programs > GRID_X_MAX:
            dropped = f"{programs} programs > CUDA's grid limit"
        seen[(bm, bn, w, st, runs)] = Candidate(config, smem, dropped)
    return list(seen.values())


def kvcache_space(key: Key, gpu: "GpuInfo") -> list[Config]:
    """The configs to time for a kvcache key on `gpu` (the default first), about 20-50 of them."""
    return [c.config for c in _candidates(key, gpu) if c.kept]


def kvcache_plan(head_dim: int, dtype: str, gpu: "GpuInfo") -> list[Candidate]:
    """The space of the nominal decode key (Nq=1, Nkv=32768, B·Hq=256, G=4) with estimates and drop
    reasons, for `tune --dry-run`; each real key's split counts centre on its own default."""
    return _candidates(Key(gpu.arch, OP, head_dim=head_dim, dtype=dtype, causal=False, **NOMINAL), gpu)


class KVCacheInputs(OpInputs):
    """A kvcache key's inputs (tuner.ops.inputs): q (B, Hq, Nq, D) and caches (B, Hkv, Nmax, D), every
    sequence Nmax long, and the fp32 reference (kernel/testing.py)."""

    tolerance = TOLERANCE
    against = "the KV-cache reference (fp32)"
    # A paged key's (k_pages, v_pages, block_table, lengths, paged shape), set by `prepare`; None: contiguous.
    paged: Any = None

    @classmethod
    def check_key(cls, key: Key) -> None:
        """ValueError for a causal key with more queries than cached keys (bottom-right causal would
        leave query 0 no key), or with features a decode call does not take (tuner.ops.mods.check_features)."""
        super().check_key(key)
        if key.causal and key.seq_len > key.seq_len_kv:
            raise ValueError(f"{key}: causal decode needs at least as many cached keys as queries "
                             f"(Nq={key.seq_len} > Nkv={key.seq_len_kv})")

    @classmethod
    def sizes(cls, key: Key, batch_heads: int) -> tuple[int, int, int]:
        """(B, Hq, Hkv) of the inputs, as `kvcache_bytes` counts them; a key without a bucket (0) as one of 1."""
        return super().sizes(key, max(1, batch_heads))

    @classmethod
    def footprint(cls, key: Key, batch_heads: int) -> int:
        """The contiguous inputs' footprint; a paged key holds a second, paged copy of the caches."""
        held = super().footprint(key, batch_heads)
        if key.page_size:
            batch, _, heads_kv = cls.sizes(key, batch_heads)
            pages = -(-key.seq_len_kv // key.page_size)
            held += 2 * batch * heads_kv * pages * key.page_size * key.head_dim * DTYPE_BYTES[key.dtype]
        return held

    def prepare(self, draw: Any) -> None:
        """A paged key's caches in shuffled pages, its block table and lengths (every sequence Nmax long)."""
        self.paged = None
        if self.key.page_size:
            from ...kernel.checks import check_paged_inputs
            from ...kernel.kvcache import paged_kv

            k_pages, v_pages, table = paged_kv(self.k, self.v, self.key.page_size,
                                               generator=torch.Generator().manual_seed(self.key.page_size))
            shape = check_paged_inputs(self.q, k_pages, v_pages, table)[0]
            lengths = torch.full((self.q.shape[0],), self.key.seq_len_kv, dtype=torch.int32, device=self.q.device)
            self.paged = (k_pages, v_pages, table, lengths, shape)

    @classmethod
    def shape_of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttnShape:
        """The launch shape, checked as attention_kvcache checks it."""
        return check_kvcache_inputs(q, k, v)

    def compute_reference(self) -> torch.Tensor:
        """The fp32 reference, a few sequences at a time: it holds fp32 copies of their K and V. With score
        modifiers: the float64 reference of the same modifiers, bottom-right aligned (tuner.ops.reference)."""
        q, k, v, key = self.q, self.k, self.v, self.key
        if not unmodified(self.mods):
            return modified_attention(q, k, v, causal=key.causal, scale=self.scale, mods=self.mods,
                                      diag=key.seq_len_kv - key.seq_len, max_bytes=self.reference_bytes)
        per_seq = 2 * 4 * k.shape[1] * key.seq_len_kv * key.head_dim
        step = max(1, (self.reference_bytes or REFERENCE_CHUNK_BYTES) // per_seq)
        return torch.cat([attention_kvcache_reference(q[i:i + step], k[i:i + step], v[i:i + step], causal=key.causal,
                                                      scale=self.scale, dtype=torch.float32)
                          for i in range(0, q.shape[0], step)])

    def run(self, config: Config, out: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """One attention_kvcache launch with `config` (scratch allocated per call, as the API does);
        returns (output, the compiled kernels of the passes run). A config with an SDPA `provider` runs
        torch SDPA pinned to that backend over the whole cache (it allocates its own output)."""
        provider = provider_of(config)
        if provider != KERNEL:
            return run_sdpa(provider, self.q, self.k, self.v, causal=False, scale=self.scale), None
        if self.paged is not None:
            k_pages, v_pages, table, lengths, shape = self.paged
            return launch_decode(self.q, k_pages, v_pages, shape, cache_seqlens=lengths, causal=self.key.causal,
                                 scale=self.scale, config=config, out=out, mods=self.mods, block_table=table)
        return launch_decode(self.q, self.k, self.v, self.shape, cache_seqlens=None, causal=self.key.causal,
                             scale=self.scale, config=config, out=out, mods=self.mods)


def sdpa_decode_key(key: Key) -> bool:
    """Whether SDPA (no lengths, top-left causal) computes a kvcache key's full-cache call: every query sees
    every cached key (one query, or not causal), and it has no attention features and no pages."""
    return (key.seq_len == 1 or not key.causal) and not has_features(key) and not key.page_size


KVCACHE = OpSpec(OP, space=kvcache_space, plan=kvcache_plan, default=kvcache_default,
                 flops=kvcache_flops, sdpa_providers=True, inputs=KVCacheInputs, bytes=kvcache_bytes,
                 sdpa_keys=sdpa_decode_key)
