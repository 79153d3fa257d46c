"""Decode keys won by a torch SDPA backend: `attention_kvcache` runs the backend where it computes the same thing
(a full cache, every query seeing every key) and the kernel config stored beside the win elsewhere (lengths,
causal with several queries, a backend that refuses), on CPU tensors through the dispatcher's own path.

Winners are written to a real SQLite file and loaded for the interpreter (`tuned_table`); which Triton kernels ran
is observed where Triton launches them (`launches`); outputs are checked against the float64 reference. On the CPU
torch's flash backend runs and cuDNN refuses every input.
"""
from __future__ import annotations

import pytest
import torch

from flashtune.db.types import Config, Key, bucket
from flashtune.kernel import attention_kvcache, dispatch
from flashtune.kernel.dispatch import kv_bucket
from flashtune.kernel.providers import provider_config
from flashtune.kernel.testing import attention_kvcache_reference
from flashtune.tuner.ops import op_spec
from flashtune.tuner.session import key_providers
from helpers import rel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="routes CPU tensors under the interpreter")

ARCH = dispatch.INTERPRETER_ARCH
B, HQ, HKV, NK, D = 2, 4, 2, 40, 16
FALLBACK = Config(16, 16, 2, 1, {"num_splits": 2})  # the kernel config stored beside the backend's win


def _key(nq: int, causal: bool) -> Key:
    return Key(ARCH, "kvcache", nq, D, "float32", causal, seq_len_kv=kv_bucket(NK), batch_heads=bucket(B * HQ),
               group=HQ // HKV)


def _inputs(nq: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    return tuple(torch.randn(B, h, n, D, generator=gen) for h, n in ((HQ, nq), (HKV, NK), (HKV, NK)))


def _block_n(launches) -> list[int]:
    return [x.kwargs["BLOCK_N"] for x in launches if x.name == "decode_split_kernel"]


def test_sdpa_competes_for_the_decode_keys_it_computes() -> None:
    spec = op_spec("kvcache")
    assert spec.sdpa_competes(_key(1, True)) and spec.sdpa_competes(_key(3, False))
    assert not spec.sdpa_competes(_key(3, True))  # top-left is_causal is not the cache's bottom-right
    assert key_providers(_key(1, True)) and key_providers(_key(3, True)) == []
    assert key_providers(_key(1, True), kernel_only=True) == []


def test_a_backend_winner_runs_full_cache_calls_and_the_stored_kernel_config_with_lengths(tuned_table,
                                                                                          launches) -> None:
    tuned_table([(_key(1, True), provider_config("sdpa_flash"), FALLBACK)])
    q, k, v = _inputs(1)
    out = attention_kvcache(q, k, v, causal=True)
    assert launches == []  # torch's flash backend computed it
    assert rel(out, attention_kvcache_reference(q, k, v, causal=True), floor=0.1) < 2e-5
    lengths = torch.tensor([NK - 7, 11], dtype=torch.int32)
    out = attention_kvcache(q, k, v, causal=True, cache_seqlens=lengths)
    assert _block_n(launches) == [FALLBACK.block_n]  # SDPA has no lengths: the kernel config beside the win
    assert rel(out, attention_kvcache_reference(q, k, v, causal=True, cache_seqlens=lengths), floor=0.1) < 2e-5


def test_causal_calls_of_several_queries_never_run_the_backend(tuned_table, launches) -> None:
    tuned_table([(_key(3, True), provider_config("sdpa_flash"), FALLBACK)])
    q, k, v = _inputs(3)
    out = attention_kvcache(q, k, v, causal=True)
    assert _block_n(launches) == [FALLBACK.block_n]
    assert rel(out, attention_kvcache_reference(q, k, v, causal=True), floor=0.1) < 2e-5


def test_a_refusing_backend_runs_the_stored_kernel_config_from_then_on(tuned_table, launches) -> None:
    tuned_table([(_key(1, False), provider_config("sdpa_cudnn"), FALLBACK)])
    q, k, v = _inputs(1)
    assert dispatch.kvcache_plan(q, k, v, False, False).sdpa == "sdpa_cudnn"
    out = attention_kvcache(q, k, v)
    assert _block_n(launches) == [FALLBACK.block_n]
    assert rel(out, attention_kvcache_reference(q, k, v), floor=0.1) < 2e-5
    assert dispatch.kvcache_plan(q, k, v, False, False).sdpa is None
