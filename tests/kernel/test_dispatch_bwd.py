"""The dispatcher's op="bwd" table: the backward's config by the forward's rules (exact, nearest within
NEAREST_LIMIT, default), kept apart from the forward's, on real SQLite and PostgreSQL databases; the
stored config's gradients against float64 autograd; on CUDA, attention()'s backward running it."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from flashtune.db.types import Config, Key
from flashtune.kernel import attention, dispatch
from flashtune.kernel.ops.bwd import attention_bwd
from flashtune.kernel.ops.bwd import default_bwd_config
from flashtune.kernel.ops.fwd import attention_fwd
from flashtune.kernel.checks import check_inputs
from flashtune.kernel.testing import attention_reference
from flashtune.kernel.version import OP_VERSIONS
from helpers.dispatch import build_db

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B512 = Config(32, 64, 4, 2, {"block_m_dq": 64, "block_n_dq": 32})
B2048 = Config(64, 128, 8, 2, {"deterministic": False})
FWD512 = Config(64, 32, 4, 2)


def bkey(n: int, *, op: str = "bwd", d: int = 32, causal: bool = True, bh: int = 4, group: int = 2,
         arch: str = "sm_90") -> Key:
    return Key(arch, op, n, d, "float16", causal, batch_heads=bh, group=group)


@pytest.fixture
def tuned(db_url: str, restore_table: None) -> str:
    build_db(db_url, [(bkey(512), B512, 0.02, OP_VERSIONS["bwd"]), (bkey(2048), B2048, 0.3, OP_VERSIONS["bwd"]),
                      (bkey(512, op="fwd"), FWD512, 0.01, OP_VERSIONS["fwd"]),
                      (bkey(1024, d=64), Config(16, 64, 4, 2, {"warp_shuffle": True}), 0.1, OP_VERSIONS["bwd"])])
    assert dispatch.reload(db_url, archs=["sm_90"]).winners == 4
    return db_url


def look(n: int, **kw: object) -> dispatch.Choice:
    args = {"head_dim": 32, "dtype": "float16", "causal": True, "batch_heads": 4, "group": 2, "op": "bwd", **kw}
    return dispatch.lookup("sm_90", n, **args)  # type: ignore[arg-type]


def test_bwd_lookup_exact_nearest_and_default_apart_from_the_forward(tuned: str) -> None:
    exact = look(512)
    assert (exact.config, exact.source, exact.op) == (B512, "exact", "bwd") and exact.winner.key == bkey(512)
    assert look(2048).config == B2048
    near = look(700)  # log2(700/512) = 0.45 < log2(2048/700) = 1.55
    assert (near.config, near.source) == (B512, "nearest") and "the winner for " + str(bkey(512)) in near.reason
    assert (look(4096).config, look(4096).source) == (B2048, "nearest")
    far = look(16384)  # three doublings past the largest tuned N: beyond NEAREST_LIMIT
    assert far.source == "default" and far.config == default_bwd_config("sm_90", 32, "float16")
    # The forward's table is another op: its winner for the same shape is not the backward's, and back.
    fwd = dispatch.lookup("sm_90", 512, 32, "float16", True, batch_heads=4, group=2)
    assert (fwd.config, fwd.op) == (FWD512, "fwd")
    assert dispatch.lookup("sm_90", 2048, 32, "float16", True, batch_heads=4, group=2).config != B2048
    # A stored config whose knobs the backward does not know falls back to the default, saying why.
    unknown = look(1024, head_dim=64)
    assert unknown.source == "default" and "warp_shuffle" in unknown.reason
    with pytest.raises(ValueError, match="unknown op 'kv'"):
        look(512, op="kv")


def test_explain_bwd_and_the_stored_config_gives_float64_gradients(tuned: str) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(int(torch.randint(0, 2**31, (1,))))
    q = torch.randn(2, 2, 700, 32, generator=gen, device=DEVICE).half()  # B·Hq = 4, group 2: bkey(700)
    k, v = (torch.randn(2, 1, 700, 32, generator=gen, device=DEVICE).half() for _ in range(2))
    choice = dispatch.explain(q, k, v, True, arch="sm_90", op="bwd")
    assert (choice.config, choice.source, choice.key) == (B512, "nearest", bkey(700))
    assert dispatch.explain(q, k, v, True, arch="sm_90").config == FWD512
    if DEVICE == "cpu":  # the interpreter's full 700-token backward is slow: the same config on 47 tokens
        q, k, v = (x[:, :, :47] for x in (q, k, v))
    do = torch.randn(q.shape, generator=gen, device=DEVICE).half()
    o, lse = attention_fwd(q, k, v, causal=True, return_lse=True)
    got = attention_bwd(do, q, k, v, o, lse, causal=True, scale=32 ** -0.5, config=choice.config)
    ref = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    attention_reference(*ref, causal=True).backward(do.double())
    for g, r in zip(got, ref):
        assert float((g.double() - r.grad).norm() / r.grad.norm()) < 4e-3  # fp16 bound of test_autograd


def test_cpu_backward_takes_the_interpreter_default(tuned: str) -> None:
    if DEVICE != "cpu":
        pytest.skip("CPU tensors under the interpreter")
    q = torch.randn(2, 2, 16, 32).half()
    shape = check_inputs(q, q[:, :1], q[:, :1])
    choice = dispatch.bwd_choice(q, shape, True)
    assert choice.source == "default" and choice.config == default_bwd_config(dispatch.INTERPRETER_ARCH, 32,
                                                                              "float16")
    assert dispatch.bwd_choice(q, shape, True) is choice  # memoised: one dict lookup
    assert dispatch.bwd_config(q, shape, True) == choice.config


@pytest.mark.gpu
def test_attention_backward_runs_the_stored_bwd_winner(tmp_path: Path, restore_table: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from flashtune.kernel import api
    from flashtune.kernel.device import device_arch

    arch = device_arch(0)
    stored = Config(32, 64, 4, 2, {"block_m_dq": 64, "block_n_dq": 32})
    key = Key(arch, "bwd", 1024, 64, "float16", True, batch_heads=4, group=2)
    dispatch.reload(build_db(tmp_path / "bwd.db", [(key, stored, 0.1, OP_VERSIONS["bwd"])]))
    q = torch.randn(2, 2, 1024, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(2, 1, 1024, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(2))
    assert dispatch.explain(q, k, v, True, op="bwd").config == stored
    launched = []
    real = api.launch_bwd

    def spy(*args, **kwargs):  # records the config; the real backward runs
        launched.append(kwargs["config"])
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "launch_bwd", spy)
    do = torch.randn_like(q)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dispatch.DispatchWarning)
        attention(q, k, v, is_causal=True, enable_gqa=True).backward(do)
    assert launched == [stored]
    ref = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    attention_reference(*ref, causal=True).backward(do.double())
    for g, r in zip((q.grad, k.grad, v.grad), ref):
        assert float((g.double() - r.grad).norm() / r.grad.norm()) < 4e-3
