"""Hostile scalar arguments of the public entry points: booleans that are not bools, scales numpy
and Python give, and TRITON_INTERPRET values Triton reads its own way."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from flashtune.kernel import attention, attention_kvcache, dispatch
from flashtune.kernel.ops.bwd import attention_bwd
from flashtune.kernel.ops.fwd import attention_fwd
from flashtune.kernel.testing import attention_reference
from helpers import qkv, rel
from helpers.subproc import repo_env

REPO = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs under the interpreter (conftest)


def _tensors(hq: int = 2, hkv: int = 2) -> tuple[torch.Tensor, ...]:
    return qkv(1, hq, hkv, 16, 16, 16, torch.float32, DEVICE, torch.Generator().manual_seed(0))


def _bwd(**kwargs: object) -> object:
    q, k, v = _tensors()
    o, lse = attention_fwd(q, k, v, return_lse=True)
    return attention_bwd(torch.ones_like(o), q, k, v, o, lse, **{"causal": False, "scale": None, **kwargs})


# Every boolean argument of the public functions, as (call taking that argument, its name).
BOOL_ARGS: list[tuple[Callable[..., object], str]] = [
    (lambda **kw: attention(*_tensors(), **kw), "is_causal"),
    (lambda **kw: attention(*_tensors(), **kw), "enable_gqa"),
    (lambda **kw: attention(*_tensors(), **kw), "fallback"),
    (lambda **kw: attention_kvcache(*_tensors(), **kw), "causal"),
    (lambda **kw: attention_kvcache(*_tensors(), **kw), "check_lengths"),
    (lambda **kw: attention_fwd(*_tensors(), **kw), "causal"),
    (lambda **kw: attention_fwd(*_tensors(), **kw), "return_lse"),
    (_bwd, "causal"),
    (_bwd, "deterministic"),
    (lambda **kw: dispatch.explain(*_tensors(), **kw), "is_causal"),
    (lambda **kw: dispatch.explain(*_tensors(), **kw), "kernel_only"),
    (lambda **kw: dispatch.lookup("sm_90", 64, 64, "float16", **{"causal": False, **kw}), "causal"),
    (lambda **kw: dispatch.lookup("sm_90", 64, 64, "float16", **{"causal": False, **kw}), "kernel_only"),
]
NOT_BOOLS = ["False", "no", 0, 1, 2.5, None, [], torch.tensor(False)]


@pytest.mark.parametrize("call, name", BOOL_ARGS, ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
def test_boolean_arguments_must_be_bools(call: Callable[..., object], name: str, value: object) -> None:
    # bool(value) made "False" mean True: causal attention or GQA the caller switched off.
    with pytest.raises(TypeError, match=rf"^{name} must be a bool \(True or False\), got .* of type "
                                        rf"{type(value).__name__}$"):
        call(**{name: value})


@pytest.mark.parametrize("call, name", BOOL_ARGS, ids=lambda x: x if isinstance(x, str) else "")
def test_numpy_bools_are_bools(call: Callable[..., object], name: str) -> None:
    call(**{name: np.bool_(name in ("check_lengths", "deterministic"))})


def test_kvcache_causal_string_is_not_causal_attention() -> None:
    q, k, v = _tensors()
    with pytest.raises(TypeError, match="causal must be a bool"):
        attention_kvcache(q, k, v, causal="False")
    out = attention_kvcache(q, k, v, causal=np.bool_(False))
    assert rel(out, attention_reference(q, k, v)) < 1e-5


def test_enable_gqa_string_is_refused() -> None:
    q, k, v = _tensors(hq=4, hkv=2)
    with pytest.raises(TypeError, match="enable_gqa must be a bool"):
        attention(q, k, v, enable_gqa="False")
    with pytest.raises(TypeError, match="enable_gqa must be a bool"):
        attention(q, k, v, enable_gqa="False", fallback=True)  # a wrong argument, not an unsupported input
    out = attention(q, k, v, enable_gqa=np.bool_(True))
    assert rel(out, attention_reference(q, k, v)) < 1e-5


_INTERPRET_PROBE = """
import torch, torch.nn.functional as F
from triton.runtime.interpreter import InterpretedFunction
from flashtune.kernel import attention, device
from flashtune.kernel.jit.fwd import attn_fwd_kernel
q = torch.randn(1, 2, 8, 16)
out = attention(q, q, q, fallback=True)
try:
    attention(q, q, q)
    refused = "-"
except ValueError as error:
    refused = "on cpu" if "are on cpu" in str(error) else str(error)
print(device.INTERPRET, isinstance(attn_fwd_kernel, InterpretedFunction),
      torch.allclose(out, F.scaled_dot_product_attention(q, q, q), atol=1e-5), refused)
"""


def test_triton_interpret_is_read_as_triton_reads_it() -> None:
    # flashtune read "2", "false" or "garbage" as on while Triton read them as off: CPU tensors then
    # reached kernels compiled for no driver, a RuntimeError that fallback=True did not catch.
    values = ["1", "true", "0", "false", "2", "garbage"]
    runs = {value: subprocess.Popen([sys.executable, "-c", _INTERPRET_PROBE], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=repo_env(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET=value))
            for value in values}
    for value, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, (value, err)
        flashtune_on, triton_on, fallback_ok, refused = out.split(maxsplit=3)
        assert flashtune_on == triton_on, (value, out)
        assert fallback_ok == "True", (value, out)
        # Interpreter on: the kernel runs CPU tensors; off: the documented ValueError naming the device.
        assert refused.strip() == ("-" if triton_on == "True" else "on cpu"), (value, out)


SCALED: dict[str, Callable[..., object]] = {
    "attention": lambda **kw: attention(*_tensors(), **kw),
    "attention_kvcache": lambda **kw: attention_kvcache(*_tensors(), **kw),
    "attention_fwd": lambda **kw: attention_fwd(*_tensors(), **kw),
    "attention_bwd": _bwd,
}


@pytest.mark.parametrize("call", SCALED.values(), ids=SCALED.keys())
@pytest.mark.parametrize("scale", [10**400, -10**400], ids=["1e400", "-1e400"])
def test_an_int_beyond_float_range_is_the_documented_value_error(call: Callable[..., object], scale: int) -> None:
    # float(10**400) raised OverflowError out of the scale check.
    with pytest.raises(ValueError, match=r"^scale must be a finite number, got -?1000.*\.\.\..*000$"):
        call(scale=scale)


@pytest.mark.parametrize("call", SCALED.values(), ids=SCALED.keys())
@pytest.mark.parametrize("scale", [np.float32(0.3), np.float16(0.3), np.int64(2), np.int32(-1)], ids=repr)
def test_numpy_scalars_are_scales_as_in_torch(call: Callable[..., object], scale: np.generic) -> None:
    # torch SDPA takes numpy floats and ints; np.float32 was refused while np.float64 (a float) passed.
    out, ref = call(scale=scale), call(scale=float(scale))
    for a, b in zip(*((x,) if isinstance(x, torch.Tensor) else x for x in (out, ref))):
        assert torch.equal(a, b)

