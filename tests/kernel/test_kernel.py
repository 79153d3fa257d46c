"""The forward kernel against the fp64 reference, on CPU under the interpreter or on CUDA."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flashtune.db.types import Config
from flashtune.kernel.jit.common import GRID_X_MAX, one_axis_grid
from flashtune.kernel.jit.fwd import attn_fwd_kernel
from flashtune.kernel.ops.fwd import attention_fwd, check_config, launch
from flashtune.kernel.checks import check_inputs
from flashtune.kernel.testing import attention_reference, lse_reference
from helpers import dtypes, qkv, rel

# Relative-norm error bounds ‖o − ref‖ / ‖ref‖ against fp64: fp16 inputs round Q, K, V and P to an
# 11-bit mantissa (~5e-4 per element, averaging down), bf16 to an 8-bit one; fp32 with IEEE dots is
# near 1e-6; tf32 dots near 3e-4.
BOUNDS = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 2e-5}
TF32_BOUND = 2e-3

CONFIGS = [Config(16, 16, 2, 1), Config(32, 16, 4, 1), Config(16, 32, 2, 2), Config(64, 32, 4, 2)]

# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal)
CASES = [
    (1, 1, 1, 1, 1, 16, False),
    (1, 1, 1, 1, 1, 16, True),
    (2, 2, 2, 17, 17, 32, False),
    (2, 2, 2, 17, 17, 32, True),
    (1, 3, 3, 67, 67, 64, True),      # prime length, not a multiple of any block
    (1, 4, 2, 31, 31, 64, True),      # GQA
    (1, 4, 1, 40, 40, 16, False),     # MQA
    (1, 2, 2, 23, 61, 80, False),     # cross attention, padded head dim
    (1, 2, 2, 23, 61, 80, True),
    (1, 2, 2, 61, 23, 96, True),      # more queries than keys
    (1, 1, 1, 19, 19, 112, True),
    (1, 1, 1, 33, 33, 128, False),
    (1, 2, 1, 21, 21, 160, True),     # padded to a 256-wide head tile
    (1, 1, 1, 18, 35, 192, False),
]








def _check_case(case, dtype, config, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(*case[:6], dtype, device, gen)
    causal = case[-1]
    shape = check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(case[5])
    poisoned = torch.full_like(q, float("nan"))
    o, lse, _ = launch(q, k, v, shape, causal=causal, scale=scale, config=config, return_lse=True,
                       out=poisoned)
    ref = attention_reference(q, k, v, causal=causal)
    assert torch.isfinite(o).all(), "unwritten (NaN-poisoned) or non-finite output elements"
    err = rel(o, ref)
    assert err < BOUNDS[dtype], f"{case} {dtype} {config}: relative error {err:.2e}"
    lse_err = (lse.double() - lse_reference(q, k, causal=causal)).abs().max().item()
    assert lse_err < 1e-3, f"LSE error {lse_err:.2e}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}/{}n{}x{}d{}{}".format(*c[:6], "c" if c[6] else ""))
def test_matches_fp64_reference(case, kernel_device):
    for i, dtype in enumerate(dtypes(kernel_device)):
        config = CONFIGS[(CASES.index(case) + i) % len(CONFIGS)]
        _check_case(case, dtype, config, kernel_device, seed=1000 * CASES.index(case) + i)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_config_gives_the_same_function(config, kernel_device):
    _check_case((1, 2, 2, 45, 45, 64, True), torch.float16, config, kernel_device, seed=7)


@pytest.fixture
def kernel_calls():
    """The Q, K, V arguments of every forward-kernel launch while the test runs, as Triton passes them
    to the kernel (its pre-run hook; under the interpreter the host view of the same storage)."""
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(*args, **kwargs):
        calls.append(tuple(args[:3]))

    attn_fwd_kernel.add_pre_run_hook(hook)
    yield calls
    attn_fwd_kernel.pre_run_hooks.remove(hook)


def test_strided_bnhd_view_needs_no_copy(kernel_device, kernel_calls):
    # (B, H, N, D) views of (B, N, H, 2D) storage whose other half is NaN: the kernel must get the
    # caller's memory and strides (a copy would hand it a new pointer and contiguous strides) and
    # must read exactly the viewed elements (a wrong stride would pick up the NaN holes).
    gen = torch.Generator().manual_seed(3)
    b, n, h, d = 2, 29, 3, 64
    views = []
    for _ in range(3):
        storage = torch.full((b, n, h, 2 * d), float("nan"), dtype=torch.float16, device=kernel_device)
        storage[..., :d] = torch.randn(b, n, h, d, generator=gen).to(kernel_device, torch.float16)
        views.append(storage.transpose(1, 2)[..., :d])
    q, k, v = views
    assert not q.is_contiguous() and q.stride() == (n * h * 2 * d, 2 * d, h * 2 * d, 1)
    o = attention_fwd(q, k, v, causal=True, config=Config(16, 16, 2, 1))
    [seen] = kernel_calls
    for given, got in zip((q, k, v), seen):
        assert (got.data_ptr(), got.stride()) == (given.data_ptr(), given.stride())
    assert torch.isfinite(o).all()
    assert rel(o, attention_reference(q, k, v, causal=True)) < BOUNDS[torch.float16]


def test_sliced_inputs_with_odd_strides(kernel_device):
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(1, 2, 50, 3 * 32, generator=gen).to(kernel_device, torch.float32)
    q, k, v = big[..., :32], big[..., 32:64], big[:, :, 5:40, 64:]
    o = attention_fwd(q, k[:, :, 5:40], v, config=Config(16, 16, 2, 1))
    assert rel(o, attention_reference(q, k[:, :, 5:40], v)) < BOUNDS[torch.float32]


def test_default_config_custom_scale_and_lse(kernel_device):
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(1, 2, 2, 20, 20, 32, torch.float32, kernel_device, gen)
    o, lse = attention_fwd(q, k, v, causal=True, scale=0.3, return_lse=True)
    assert rel(o, attention_reference(q, k, v, causal=True, scale=0.3)) < BOUNDS[torch.float32]
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 20)
    assert (lse.double() - lse_reference(q, k, causal=True, scale=0.3)).abs().max() < 1e-4


@pytest.mark.gpu
def test_fp32_tf32_is_selectable():
    # GPU only: the interpreter computes both precisions with the same fp32 numpy dot, so on the
    # CPU the two results are bitwise equal and nothing here could fail.
    gen = torch.Generator().manual_seed(6)
    q, k, v = qkv(1, 1, 1, 64, 64, 64, torch.float32, "cuda", gen)
    ref = attention_reference(q, k, v)
    ieee = attention_fwd(q, k, v, config=Config(16, 16, 2, 1), fp32_precision="ieee")
    tf32 = attention_fwd(q, k, v, config=Config(16, 16, 2, 1), fp32_precision="tf32")
    assert rel(ieee, ref) < BOUNDS[torch.float32]
    assert rel(tf32, ref) < TF32_BOUND
    assert rel(tf32, ref) > 10 * rel(ieee, ref)  # tensor cores round to a 10-bit mantissa


def test_grid_is_one_axis_of_every_query_block():
    # CUDA allows 65535 programs in grid y and z but 2**31-1 in x: batch and heads share axis x.
    assert one_axis_grid(1, 65536, 1, 16) == (65536,)
    assert one_axis_grid(65536, 2, 33, 16) == (65536 * 2 * 3,)
    assert one_axis_grid(3, 5, 128, 64) == (30,)
    q = torch.zeros(1, 1, 1, 16).expand(2**20, 2**12, 1, 16)  # broadcast: 2**32 (batch, head) pairs
    assert one_axis_grid(2**20, 2**12, 1, 16)[0] > GRID_X_MAX
    with pytest.raises(ValueError, match="grid limit"):
        check_inputs(q, q, q)


def test_program_ids_decode_batch_head_and_block(kernel_device):
    # Every (batch, head, query block) of a folded grid writes its own rows: three batches, GQA
    # heads and three query blocks, each with its own random data, the output and LSE poisoned.
    gen = torch.Generator().manual_seed(11)
    case = (3, 4, 2, 33, 20, 16, True)
    q, k, v = qkv(*case[:6], torch.float32, kernel_device, gen)
    shape = check_inputs(q, k, v)
    o, lse, _ = launch(q, k, v, shape, causal=True, scale=0.25, config=Config(16, 16, 2, 1), return_lse=True,
                       out=torch.full_like(q, float("nan")))
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert rel(o, attention_reference(q, k, v, causal=True)) < BOUNDS[torch.float32]
    assert (lse.double() - lse_reference(q, k, causal=True)).abs().max() < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("batch, heads", [(1, 65536), (65536, 1), (300, 300)])
def test_gpu_batch_or_heads_beyond_65535(batch, heads):
    gen = torch.Generator().manual_seed(12)
    q, k, v = qkv(batch, heads, heads, 3, 5, 16, torch.float16, "cuda", gen)
    o, _, _ = launch(q, k, v, check_inputs(q, k, v), causal=False, scale=0.25, config=Config(16, 16, 2, 1),
                     out=torch.full_like(q, float("nan")))
    assert torch.isfinite(o).all()
    assert rel(o, attention_reference(q, k, v, scale=0.25)) < BOUNDS[torch.float16]


# --- bad input: a clear error naming the problem, nothing launched --------------------------------

def _good(device="cpu", dtype=torch.float16):
    return [torch.randn(1, 2, 8, 32).to(device, dtype) for _ in range(3)]


def _like(q: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return torch.randn(1, heads, 8, head_dim, device=q.device).half()


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda q, k, v: ([1, 2], k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "float64"),
    (lambda q, k, v: (q, k.float(), v), TypeError, "share one dtype"),
    (lambda q, k, v: (q, k[:, :, :4], v), ValueError, "same shape"),
    (lambda q, k, v: (q[:1].expand(2, -1, -1, -1), k, v), ValueError, "batch size differs"),
    (lambda q, k, v: (_like(q, 2, 24), k, v), ValueError, "head dim differs"),
    (lambda q, k, v: (_like(q, 2, 20), _like(q, 2, 20),
                      _like(q, 2, 20)), ValueError, "unsupported head dim 20: .* a multiple of 8 from 8 to 256"),
    (lambda q, k, v: (_like(q, 3, 32), k, v), ValueError, "multiple of key/value heads"),
    (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "empty"),
    (lambda q, k, v: (q.to_sparse(), k, v), TypeError, "dense"),
    (lambda q, k, v: (torch.nested.nested_tensor([q[0], q[0, :, :4]], layout=torch.jagged), k, v),
     TypeError, "q has layout nested"),
])
def test_bad_inputs_raise_named_errors(mutate, exc, words, kernel_device):
    q, k, v = mutate(*_good(kernel_device))
    with pytest.raises(exc, match=words):
        attention_fwd(q, k, v, config=Config(16, 16, 2, 1))


def test_bad_scale_precision_and_config(kernel_device):
    q, k, v = _good(kernel_device)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        attention_fwd(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="fp32_precision must be one of"):
        attention_fwd(q, k, v, fp32_precision="fast")
    with pytest.raises(TypeError, match="config must be a flashtune.db.types.Config"):
        attention_fwd(q, k, v, config="m16-n16-w2-s1")
    with pytest.raises(ValueError, match="power of two"):
        Config(48, 16, 2, 1)


@pytest.mark.parametrize("causal", ["False", "no", 2.5, [], None, 1, 0, torch.tensor(True)])
def test_causal_must_be_a_bool(causal, kernel_device, kernel_calls):
    q, k, v = _good(kernel_device)
    with pytest.raises(TypeError, match=r"causal must be a bool.*of type " + type(causal).__name__):
        attention_fwd(q, k, v, causal=causal)
    assert kernel_calls == []


def test_numpy_bools_are_bools(kernel_device):
    q, k, v = _good(kernel_device, torch.float32)
    causal = attention_fwd(q, k, v, causal=np.bool_(True), config=Config(16, 16, 2, 1))
    assert torch.equal(causal, attention_fwd(q, k, v, causal=True, config=Config(16, 16, 2, 1)))
    assert rel(causal, attention_reference(q, k, v, causal=True)) < BOUNDS[torch.float32]
    assert rel(attention_fwd(q, k, v, causal=np.bool_(False)), attention_reference(q, k, v)) < BOUNDS[torch.float32]


def test_inputs_that_require_grad_are_refused(kernel_device, kernel_calls):
    q, k, v = _good(kernel_device, torch.float32)
    with pytest.raises(NotImplementedError, match="require grad.*train through flashtune.kernel.attention"):
        attention_fwd(q, k.requires_grad_(), v)
    assert kernel_calls == []
    with torch.no_grad():  # no gradient is asked for: it runs
        o = attention_fwd(q, k, v, config=Config(16, 16, 2, 1))
    assert rel(o, attention_reference(q, k.detach(), v)) < BOUNDS[torch.float32]


def test_unknown_kernel_knobs_are_refused_before_launch(kernel_device, kernel_calls):
    q, k, v = _good(kernel_device, torch.float32)
    knobbed = Config(16, 16, 2, 1, extra={"tma": True})
    expected = r"does not know the knob 'tma' \(known knobs: none\)"
    with pytest.raises(ValueError, match=expected):
        check_config(knobbed, check_inputs(q, k, v), None)
    with pytest.raises(ValueError, match=expected):
        attention_fwd(q, k, v, config=knobbed)
    with pytest.raises(ValueError, match=expected):
        launch(q, k, v, check_inputs(q, k, v), causal=False, scale=0.1, config=knobbed)
    assert kernel_calls == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only without a GPU here")
def test_bf16_under_the_interpreter_is_refused_with_the_reason(kernel_calls):
    q, k, v = _good("cpu", torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 on the CPU: the Triton interpreter computes bf16 dots wrongly"):
        attention_fwd(q, k, v)
    assert kernel_calls == []


def test_cpu_tensors_rejected_outside_interpreter(monkeypatch):
    from flashtune.kernel import device

    monkeypatch.setattr(device, "INTERPRET", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention_fwd(*_good())


@pytest.mark.gpu
def test_config_too_large_for_gpu_is_refused():
    q, k, v = (torch.randn(1, 2, 8, 256, device="cuda", dtype=torch.float32) for _ in range(3))
    with pytest.raises(ValueError, match="shared memory"):
        attention_fwd(q, k, v, config=Config(256, 256, 8, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_longer_sequences(dtype):
    for i, (n, d, causal) in enumerate([(1000, 64, True), (2049, 128, False), (777, 256, True), (513, 96, True)]):
        gen = torch.Generator().manual_seed(100 + i)
        q, k, v = qkv(2, 4, 2, n, n, d, dtype, "cuda", gen)
        o = attention_fwd(q, k, v, causal=causal)
        assert rel(o, attention_reference(q, k, v, causal=causal)) < BOUNDS[dtype]


def test_one_dtype_map_matches_the_database_names():
    from flashtune.db.types import DTYPES
    from flashtune.kernel.dtypes import TORCH_DTYPES, dtype_name, torch_dtype

    assert tuple(TORCH_DTYPES) == DTYPES
    for name, dtype in TORCH_DTYPES.items():
        assert dtype_name(dtype) == name and torch_dtype(name) is dtype
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("torch.float16") is torch.float16
    assert torch_dtype("fp8") is torch_dtype("e4m3") is torch_dtype("torch.float8_e4m3fn") is torch.float8_e4m3fn
    with pytest.raises(TypeError, match="torch.float64 is not supported"):
        dtype_name(torch.float64)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        torch_dtype("int8")
