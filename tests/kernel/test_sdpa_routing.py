"""Run-time routing of a key won by a torch SDPA backend, and the kernel fallback when the backend
refuses the inputs, on CPU tensors through the dispatcher's own code path.

The winners live in a real SQLite database written through the store, for the nominal arch the
dispatcher gives CPU tensors (`dispatch.INTERPRETER_ARCH`), loaded with `reload(..., interpreter=True)`
so that CPU calls take the stored winners. On the CPU torch's flash backend runs (torch has a CPU
implementation of it) and the cuDNN and memory-efficient backends refuse every input: the natural
refusal that sends a call to the kernel config stored beside the backend's win. Which Triton kernels
ran, with which tiles, is observed where Triton launches them (the `launches` fixture, conftest.py);
results and gradients are checked against float64 PyTorch.
"""
from __future__ import annotations


import pytest
import torch

from flashtune.db.arch import ARCH_SMEM
from flashtune.db.types import Config, Key, bucket
from flashtune.kernel import attention, dispatch
from flashtune.kernel.ops.bwd import default_bwd_config
from flashtune.kernel.ops.fwd import default_config
from flashtune.kernel.testing import attention_reference
from flashtune.kernel.sdpa import is_refusal, run_sdpa
from flashtune.kernel.providers import provider_config
from helpers import rel

ARCH = dispatch.INTERPRETER_ARCH
BOUND = {torch.float32: 2e-5, torch.float16: 4e-3}  # relative Frobenius error against float64
FALLBACK = Config(16, 32, 2, 1)  # the kernel config stored beside a backend's win (not any default)
B, HQ, HKV, N, D = 1, 4, 2, 24, 16


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="routes CPU tensors under the interpreter")


def _key(dtype: torch.dtype, causal: bool = True, op: str = "fwd") -> Key:
    return Key(ARCH, op, N, D, str(dtype).removeprefix("torch."), causal, seq_len_kv=N,
               batch_heads=bucket(B * HQ), group=HQ // HKV)






def _qkv(dtype: torch.dtype, grad: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    return tuple(torch.randn(B, h, N, D, generator=gen).to(dtype).requires_grad_(grad) for h in (HQ, HKV, HKV))




def _check_output(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    assert out.dtype == q.dtype and out.shape == q.shape
    ref = attention_reference(q.detach(), k.detach(), v.detach(), causal=causal)
    assert rel(out.detach(), ref, floor=0.1) < BOUND[q.dtype]


def _check_gradients(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    out.backward(grad_out)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    attention_reference(*ref_inputs, causal=causal).backward(grad_out.double())
    for got, want in zip((q.grad, k.grad, v.grad), ref_inputs):
        assert got is not None and got.dtype == q.dtype and got.shape == want.shape
        assert rel(got, want.grad, floor=0.1) < BOUND[q.dtype]


def _names(launches) -> list[str]:
    return [launch.name for launch in launches]


# --- a backend that runs: torch SDPA, no Triton kernel -------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_backend_winner_runs_torch_sdpa_and_no_kernel(tuned_table, launches, dtype: torch.dtype) -> None:
    tuned_table([(_key(dtype), provider_config("sdpa_flash"), FALLBACK)])
    q, k, v = _qkv(dtype)
    choice = dispatch.explain(q, k, v, True)
    assert (choice.provider, choice.source, choice.arch) == ("sdpa_flash", "exact", ARCH)
    assert choice.kernel_config == FALLBACK and "sdpa_flash backend" in choice.reason
    out = attention(q, k, v, is_causal=True, enable_gqa=True)
    assert _names(launches) == []  # the backend computed it: no Triton kernel was launched
    _check_output(out, q, k, v, True)


def test_a_backend_winner_trains_through_torch_sdpa(tuned_table, launches) -> None:
    tuned_table([(_key(torch.float32), provider_config("sdpa_flash"), FALLBACK)])
    q, k, v = _qkv(torch.float32, grad=True)
    out = attention(q, k, v, is_causal=True, enable_gqa=True)
    _check_gradients(out, q, k, v, True)
    assert _names(launches) == []  # forward and backward are torch's


# --- a backend that refuses: the stored kernel config ----------------------------------------------

@pytest.mark.parametrize("provider", ["sdpa_cudnn", "sdpa_efficient"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_refusing_backend_falls_back_to_the_stored_kernel_config(tuned_table, launches, provider: str,
                                                                    dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype)
    with pytest.raises(RuntimeError) as refused:  # the premise: torch's CPU build refuses this backend
        run_sdpa(provider, q, k, v, causal=True, scale=None)
    assert is_refusal(refused.value)
    assert FALLBACK != default_config(ARCH, D, str(dtype).removeprefix("torch."))  # tiles tell them apart
    tuned_table([(_key(dtype), provider_config(provider), FALLBACK)])
    choice = dispatch.explain(q, k, v, True)
    assert (choice.provider, choice.kernel_config) == (provider, FALLBACK)
    kernel_only = dispatch.explain(q, k, v, True, kernel_only=True)
    assert (kernel_only.config, kernel_only.source, kernel_only.provider) == (FALLBACK, "exact", "kernel")

    out = attention(q, k, v, is_causal=True, enable_gqa=True)
    [launch] = launches
    assert launch.name == "attn_fwd_kernel"
    assert (launch.kwargs["BLOCK_M"], launch.kwargs["BLOCK_N"]) == (FALLBACK.block_m, FALLBACK.block_n)
    assert (launch.kwargs["num_warps"], launch.kwargs["num_stages"]) == (FALLBACK.num_warps, FALLBACK.num_stages)
    _check_output(out, q, k, v, True)


def test_a_refusing_backend_trains_through_the_stored_kernel_config(tuned_table, launches) -> None:
    tuned_table([(_key(torch.float32), provider_config("sdpa_cudnn"), FALLBACK)])
    q, k, v = _qkv(torch.float32, grad=True)
    out = attention(q, k, v, is_causal=True, enable_gqa=True)
    [fwd] = launches
    assert fwd.name == "attn_fwd_kernel" and (fwd.kwargs["BLOCK_M"], fwd.kwargs["BLOCK_N"]) == (16, 32)
    assert fwd.kwargs["STORE_LSE"] is True  # the training forward, which keeps the LSE for the backward
    _check_gradients(out, q, k, v, True)
    # No backward winner is stored: the fused backward runs its default config.
    bwd_default = default_bwd_config(ARCH, D, "float32", ARCH_SMEM[ARCH])
    dkdv = [launch for launch in launches if launch.name == "attn_bwd_dkdv_kernel"]
    assert len(dkdv) == 1 and (dkdv[0].kwargs["BLOCK_M"], dkdv[0].kwargs["BLOCK_N"]) == (bwd_default.block_m,
                                                                                          bwd_default.block_n)


def test_a_refusing_backend_without_a_stored_kernel_config_runs_the_default(tuned_table, launches) -> None:
    tuned_table([(_key(torch.float32), provider_config("sdpa_efficient"), None)])
    q, k, v = _qkv(torch.float32)
    default = default_config(ARCH, D, "float32", ARCH_SMEM[ARCH])
    assert dispatch.explain(q, k, v, True).kernel_config == default
    out = attention(q, k, v, is_causal=True, enable_gqa=True)
    [launch] = launches
    assert (launch.name, launch.kwargs["BLOCK_M"], launch.kwargs["BLOCK_N"]) == ("attn_fwd_kernel", default.block_m,
                                                                                  default.block_n)
    _check_output(out, q, k, v, True)


# --- the table is the interpreter's only when loaded for it ----------------------------------------

def test_cpu_calls_ignore_the_table_unless_it_was_loaded_for_the_interpreter(tuned_table, launches) -> None:
    tuned_table([(_key(torch.float32), provider_config("sdpa_flash"), FALLBACK)], interpreter=False)
    q, k, v = _qkv(torch.float32)
    choice = dispatch.explain(q, k, v, True)
    assert choice.source == "default" and choice.provider == "kernel"
    out = attention(q, k, v, is_causal=True, enable_gqa=True)
    assert _names(launches) == ["attn_fwd_kernel"]
    _check_output(out, q, k, v, True)


# --- transformers counts what ran --------------------------------------------------------------------

@pytest.mark.parametrize("provider, runs", [("sdpa_flash", "backend"), ("sdpa_cudnn", "kernel")])
def test_transformers_counts_what_ran(tuned_table, launches, provider: str, runs: str) -> None:
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from flashtune.kernel.integrations import transformers as ft

    layers = 2
    tuned_table([(_key(torch.float32), provider_config(provider), FALLBACK)])
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    config = LlamaConfig(hidden_size=HQ * D, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=HQ, num_key_value_heads=HKV, vocab_size=128,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 128, (B, N))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits
        model.set_attn_implementation(ft.register())
        ft.reset_counts()
        launches.clear()
        out = model(ids).logits
        model.set_attn_implementation("sdpa")
    assert rel(out, ref.double(), floor=0.1) < 1e-5 and ft.fallback_counts() == {}
    if runs == "backend":
        assert ft.backend_counts() == {f"causal/{provider}": layers} and ft.kernel_counts() == {}
        assert _names(launches) == []
    else:  # the backend refused on the CPU: the stored kernel config ran, and is what is counted
        assert ft.kernel_counts() == {"causal": layers} and ft.backend_counts() == {}
        assert [(x.name, x.kwargs["BLOCK_N"]) for x in launches] == [("attn_fwd_kernel", FALLBACK.block_n)] * layers
