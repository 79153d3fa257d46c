"""`kernel.attention` and the dispatcher on a CUDA GPU: torch.compile(fullgraph=True), CUDA graph
capture and replay, mixed shapes, stale winners, threads, the import-time load. Each test builds
its own SQLite database for the GPU's arch; run with `python -m pytest -m gpu tests/kernel/test_dispatch_gpu.py`."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashtune.kernel.ops.fwd import estimate_smem
from flashtune.db.types import Config, Key, bucket
from flashtune.kernel import attention, dispatch
from flashtune.kernel.device import device_arch, device_smem_limit
from flashtune.kernel.checks import check_inputs
from flashtune.kernel.ops.fwd import launch
from flashtune.kernel.testing import attention_reference
from flashtune.kernel.version import op_version
from helpers.subproc import REPO
from helpers.dispatch import build_db
from helpers.subproc import repo_env

FWD_VERSION = op_version("fwd")

pytestmark = pytest.mark.gpu
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 2e-5}  # relative norm vs fp64
OLD = "0123456789ab"


def arch() -> str:
    return device_arch(0)


def k(n: int, d: int = 64, dtype: str = "float16", causal: bool = False, nk: int | None = None, *,
      bh: int = 2, group: int = 1) -> Key:
    """A forward key of this GPU with the workload of B·Hq = `bh` query heads in groups of `group`."""
    return Key(arch(), "fwd", n, d, dtype, causal, seq_len_kv=nk or n, batch_heads=bucket(bh), group=group)


def qkv(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, dtype: torch.dtype,
        seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to("cuda", dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def tuned(tmp_path: Path, restore_table: None) -> str:
    url = build_db(tmp_path / "gpu.db", [
        (k(256, bh=8), Config(64, 32, 4, 2), 0.01, FWD_VERSION),
        (k(1024, causal=True, bh=8, group=4), Config(128, 64, 8, 3), 0.05, FWD_VERSION),
        (k(512, d=128, dtype="bfloat16"), Config(64, 64, 4, 3), 0.05, FWD_VERSION),
    ])
    info = dispatch.reload(url)  # the visible GPUs' archs
    assert info.ok and info.winners == 3 and arch() in info.archs
    return url


def test_mixed_shapes_use_their_own_rules(tuned: str) -> None:
    cases = [  # (b, hq, hkv, nq, nk, d, dtype, causal, expected source)
        (2, 4, 4, 256, 256, 64, torch.float16, False, "exact"),
        (1, 8, 2, 1024, 1024, 64, torch.float16, True, "exact"),
        (1, 2, 2, 512, 512, 128, torch.bfloat16, False, "exact"),
        (2, 4, 4, 300, 300, 64, torch.float16, False, "nearest"),
        (1, 2, 2, 700, 900, 128, torch.bfloat16, False, "nearest"),
        (1, 8, 2, 700, 1000, 64, torch.float16, True, "nearest"),
        (1, 2, 1, 77, 1000, 64, torch.float16, True, "default"),  # 16x fewer queries: too far to borrow
        (1, 2, 2, 100, 100, 80, torch.float16, False, "default"),
        (1, 2, 2, 128, 64, 64, torch.float32, True, "default"),
    ]
    for _round in range(2):  # the second round runs from the memo
        for b, hq, hkv, nq, nk, d, dtype, causal, source in cases:
            q, kk, v = qkv(b, hq, hkv, nq, nk, d, dtype)
            assert dispatch.explain(q, kk, v, is_causal=causal).source == source
            out = attention(q, kk, v, is_causal=causal, enable_gqa=hq != hkv)
            assert rel(out, attention_reference(q, kk, v, causal=causal)) < BOUND[dtype], (nq, nk, d, dtype)


def test_result_equals_launching_the_explained_config(tuned: str) -> None:
    q, kk, v = qkv(2, 4, 4, 1024, 1024, 64, torch.float16)
    choice = dispatch.explain(q, kk, v, is_causal=True)
    assert choice.config == Config(128, 64, 8, 3)
    by_hand, _, _ = launch(q, kk, v, check_inputs(q, kk, v), causal=True, scale=1 / 8, config=choice.config)
    assert torch.equal(attention(q, kk, v, is_causal=True), by_hand)


def test_stale_winner_is_used_with_one_warning(tmp_path: Path, restore_table: None) -> None:
    # A key no other test touches: the warning is once per process and key.
    dispatch.reload(build_db(tmp_path / "stale.db", [(k(1536, d=96, causal=True), Config(128, 32, 8, 2), 0.3, OLD)]))
    q, kk, v = qkv(1, 2, 2, 1536, 1536, 96, torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = attention(q, kk, v, is_causal=True)
    stale = [w for w in caught if issubclass(w.category, dispatch.DispatchWarning)]
    assert len(stale) == 1 and OLD in str(stale[0].message)
    assert dispatch.explain(q, kk, v, is_causal=True).stale
    assert rel(out, attention_reference(q, kk, v, causal=True)) < BOUND[torch.float16]


def test_stored_config_that_fails_to_compile_falls_back(tmp_path: Path, restore_table: None) -> None:
    # The dispatcher's safety net for a config the shared-memory model admits but Triton rejects.
    # The model equals the compiled figure for every config measured, so this probes the config
    # nearest the device limit and skips when it compiles (then there is nothing to fall back from).
    big, d = Config(128, 128, 8, 3), 128
    assert estimate_smem(big, d, "float16", arch()) <= device_smem_limit(0)
    q, kk, v = qkv(1, 1, 1, 512, 512, d, torch.float16)
    try:
        launch(q, kk, v, check_inputs(q, kk, v), causal=False, scale=0.1, config=big)
    except Exception as exc:  # noqa: BLE001 - whatever Triton raises is what the dispatcher must catch
        failure = exc
    else:
        pytest.skip(f"{big} compiles on this GPU: no stored config here fails to compile")
    dispatch.reload(build_db(tmp_path / "big.db", [(k(512, d=d), big, 0.1, OLD)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attention(q, kk, v)
        out2 = attention(q, kk, v)
    messages = [str(w.message) for w in caught if issubclass(w.category, dispatch.DispatchWarning)]
    assert any("failed to compile" in m and type(failure).__name__ in m for m in messages), messages
    assert sum("failed to compile" in m for m in messages) == 1
    assert torch.equal(out, out2) and rel(out, attention_reference(q, kk, v)) < BOUND[torch.float16]
    choice = dispatch.explain(q, kk, v)
    assert choice.source == "default" and "failed to compile" in choice.reason


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(tuned: str, dynamic: bool) -> None:
    def block(x: torch.Tensor, kk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.silu(attention(x * 0.5, kk, v, is_causal=True)) + x

    torch._dynamo.reset()
    q, kk, v = qkv(2, 4, 4, 1024, 1024, 64, torch.float16)
    assert torch._dynamo.explain(block)(q, kk, v).graph_break_count == 0
    compiled = torch.compile(block, fullgraph=True, dynamic=dynamic)
    eager = block(q, kk, v)
    torch.testing.assert_close(compiled(q, kk, v), eager, atol=2e-3, rtol=2e-3)
    q2, k2, v2 = qkv(2, 4, 4, 1024, 1024, 64, torch.float16, seed=5)
    torch.testing.assert_close(compiled(q2, k2, v2), block(q2, k2, v2), atol=2e-3, rtol=2e-3)
    if dynamic:  # another length through the same graph
        q3, k3, v3 = qkv(2, 4, 4, 700, 700, 64, torch.float16, seed=6)
        torch.testing.assert_close(compiled(q3, k3, v3), block(q3, k3, v3), atol=2e-3, rtol=2e-3)


def test_torch_compile_reduce_overhead(tuned: str) -> None:
    # mode="reduce-overhead" runs the compiled graph, custom op included, as a CUDA graph.
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: attention(a, b, c, is_causal=True), fullgraph=True,
                             mode="reduce-overhead")
    for seed in range(4):
        q, kk, v = qkv(1, 4, 4, 256, 256, 64, torch.float16, seed=seed)
        out = compiled(q, kk, v).clone()
        assert rel(out, attention_reference(q, kk, v, causal=True)) < BOUND[torch.float16]


def test_cuda_graph_capture_and_replay(tuned: str) -> None:
    shapes = [(1, 4, 4, 256, 256, 64, torch.float16, False), (1, 8, 2, 1000, 1000, 128, torch.bfloat16, True)]
    statics = [qkv(*s[:7]) for s in shapes]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: plan, compile and load each kernel before capture
        for (*_, causal), (q, kk, v) in zip(shapes, statics):
            attention(q, kk, v, is_causal=causal, enable_gqa=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [attention(q, kk, v, is_causal=s[-1], enable_gqa=True) for s, (q, kk, v) in zip(shapes, statics)]
    for seed in (11, 12):
        for shape, static in zip(shapes, statics):
            for dst, src in zip(static, qkv(*shape[:7], seed=seed)):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        for shape, (q, kk, v), out in zip(shapes, statics, outs):
            assert rel(out, attention_reference(q, kk, v, causal=shape[-1])) < BOUND[shape[6]]


def test_threads_share_the_table(tuned: str) -> None:
    shapes = [(1, 2, 2, n, n, d, dt, c) for n in (128, 256, 333, 1024) for d in (64, 128)
              for dt in (torch.float16, torch.bfloat16) for c in (False, True)]
    inputs = [qkv(*s[:7], seed=i) for i, s in enumerate(shapes)]
    refs = [attention_reference(*x, causal=s[-1]) for s, x in zip(shapes, inputs)]
    for s, x in zip(shapes, inputs):  # compile in this thread: the threads then test the table, not Triton
        attention(*x, is_causal=s[-1])
    errors: list[str] = []
    torch.cuda.synchronize()  # inputs and references are ready before other streams read them

    def work(offset: int) -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for i in range(len(shapes)):
                j = (i + offset) % len(shapes)
                out = attention(*inputs[j], is_causal=shapes[j][-1])
                stream.synchronize()
                if rel(out, refs[j]) >= BOUND[shapes[j][6]]:
                    errors.append(f"{shapes[j]} in thread {offset}")

    threads = [threading.Thread(target=work, args=(t * 5,)) for t in range(6)]
    for t in threads:
        t.start()
    dispatch.reload(tuned)  # a reload while calls run swaps the table whole
    for t in threads:
        t.join()
    assert errors == []


def test_mixed_arch_devices_use_their_own_arch() -> None:
    archs = {device_arch(i) for i in range(torch.cuda.device_count())}
    if len(archs) < 2:
        pytest.skip(f"needs GPUs of two archs; this machine has {sorted(archs)}")
    for i in range(torch.cuda.device_count()):
        x = torch.randn(1, 1, 64, 64, device=f"cuda:{i}", dtype=torch.float16)
        assert dispatch.explain(x, x, x).arch == device_arch(i)


def _child(db: Path, code: str) -> subprocess.CompletedProcess[str]:
    script = "import warnings\nwarnings.simplefilter('always')\n" + textwrap.dedent(code)
    env = repo_env(FLASHTUNE_DB=f"sqlite:///{db}")
    env.pop("FLASHTUNE_CONFIG", None)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_import_loads_the_visible_archs_once(tmp_path: Path) -> None:
    db = tmp_path / "import.db"
    build_db(db, [(k(256), Config(64, 32, 4, 2), 0.01, FWD_VERSION)])
    result = _child(db, """
        import sys
        events = []
        sys.addaudithook(lambda e, a: events.append(e) if e == "sqlite3.connect" else None)
        import torch
        from flashtune.kernel import attention, dispatch
        info = dispatch.info()
        print("LOADED", info.ok, info.winners, info.archs)
        x = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.float16)
        attention(x, x, x)
        print("SOURCE", dispatch.explain(x, x, x).source, "CONNECTS", len(events))
    """)
    assert result.returncode == 0, result.stderr
    assert f"LOADED True 1 ('{arch()}',)" in result.stdout
    assert "SOURCE exact CONNECTS 1" in result.stdout


def test_import_with_a_corrupt_database_warns_once(tmp_path: Path) -> None:
    db = tmp_path / "corrupt.db"
    db.write_bytes(b"not sqlite" * 300)
    result = _child(db, """
        import torch
        from flashtune.kernel import attention, dispatch
        x = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.float16)
        print("RAN", attention(x, x, x).shape, dispatch.explain(x, x, x).source)
    """)
    assert result.returncode == 0, result.stderr
    assert "RAN torch.Size([1, 2, 256, 64]) default" in result.stdout
    assert result.stderr.count("DispatchWarning") == 1 and "corrupt" in result.stderr
