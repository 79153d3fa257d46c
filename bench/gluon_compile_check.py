"""Compile the Gluon forward kernel (kernel/jit/fwd_gluon.py) for sm_90 without a GPU and report what came out.

Runs against whichever Triton is first on PYTHONPATH (the GPU machine has Triton 3.6):

    PYTHONPATH=/tmp/tr36site python bench/gluon_compile_check.py

For each config (dtype, head dim, block sizes, stages, warp specialisation, overlap, causal,
persistent, consumer partitions) it prints
ptxas's registers and spill stores, shared memory, warps, the consumers' setmaxnreg budget and whether the PTX holds `wgmma.mma_async` and TMA copies (`cp.async.bulk.tensor`).
The kernel file is loaded by path, so neither torch nor the rest of flashtune is imported. Exits 1 if any
config fails to compile or lacks wgmma.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

_KERNEL = Path(__file__).resolve().parents[1] / "kernel" / "jit" / "fwd_gluon.py"

_ARGS = ("Q", "K", "V", "O", "LSE",
         "stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn",
         "stride_vb", "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_om",
         "seq_q", "seq_k", "heads_q", "group", "qk_scale", "num_m", "num_units")


def _load_kernel():
    spec = importlib.util.spec_from_file_location("fwd_gluon_check", _KERNEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.attn_fwd_gluon_kernel


def compile_one(kernel, dtype: str, head_dim: int, block_m: int, block_n: int, stages: int, ws: bool,
                causal: bool, overlap: bool = False, persistent: bool = False, consumers: int = 1,
                store_lse: bool = True, producer_regs: int = 24, consumer_regs: int = 232):
    """Compile one config for sm_90; returns Triton's compiled kernel."""
    elt = {"fp16": "*fp16", "bf16": "*bf16"}[dtype]
    signature = {name: "i32" for name in _ARGS}
    signature.update(Q=elt, K=elt, V=elt, O=elt, LSE="*fp32", qk_scale="fp32")
    num_warps = block_m // 16 // consumers
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages,
                  "CAUSAL": causal, "STORE_LSE": store_lse, "NEG_SCALE": False, "WS": ws, "REVERSE": causal,
                  "OVERLAP": overlap, "PERSISTENT": persistent, "CONSUMERS": consumers,
                  "PRODUCER_REGS": producer_regs, "CONSUMER_REGS": consumer_regs, "num_warps": num_warps}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    src = GluonASTSource(kernel, signature, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill bytes stored) that ptxas reports for `ptx` on sm_90a.

    A compiled kernel knows its registers only once loaded on a GPU, so ask the ptxas Triton ships."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = run.stdout + run.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    return max(map(int, regs or [0])), max(map(int, spills or [0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one config per head dim")
    parser.add_argument("--ptx", type=Path, help="write each config's PTX into this folder")
    args = parser.parse_args(argv)
    kernel = _load_kernel()
    print(f"triton {triton.__version__} from {Path(triton.__file__).parent}")
    configs = [("fp16", d, bm, bn, st, ws, ov, c, False, 1)
               for d, (bm, bn, st), ws, ov, c in itertools.product(
                   (64, 128), ((128, 128, 2), (128, 64, 3), (64, 128, 2), (128, 128, 3)), (False, True),
                   (False, True), (False, True))]
    configs += [("fp16", d, 128, 128, 2, ws, ov, True, True, 1)
                for d, ws, ov in itertools.product((64, 128), (False, True), (False, True))]
    configs += [("fp16", d, 128, bn, st, True, ov, c, p, 2)
                for d, (bn, st), ov, c, p in itertools.product((64, 128), ((128, 2), (64, 3)), (False, True),
                                                               (False, True), (False, True))]
    configs += [("bf16", 128, 128, 128, 2, ws, True, True, False, 1) for ws in (False, True)]
    configs += [("bf16", 128, 128, 128, 2, True, True, True, True, 2)]
    if args.quick:
        configs = [c for c in configs if c[2:5] == (128, 128, 2) and c[0] == "fp16" and c[7]]
    failed = 0
    print(f"{'dtype':5} {'D':>3} {'BM':>3} {'BN':>3} {'st':>2} {'ws':>5} {'ovl':>5} {'causal':>6} {'pers':>5} {'cons':>4} "
          f"{'regs':>4} "
          f"{'spill':>5} {'smem':>6} {'warps':>5} {'maxnreg':>7} wgmma tma")
    for cfg in configs:
        dtype, d, bm, bn, st, ws, ov, causal, pers, cons = cfg
        head = f"{dtype:5} {d:>3} {bm:>3} {bn:>3} {st:>2} {ws!s:>5} {ov!s:>5} {causal!s:>6} {pers!s:>5} {cons:>4}"
        try:
            ck = compile_one(kernel, dtype, d, bm, bn, st, ws, causal, overlap=ov, persistent=pers, consumers=cons)
        except Exception as exc:  # noqa: BLE001 - report and go on: one config's failure says nothing of the others
            failed += 1
            print(f"{head} FAILED: "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            traceback.print_exc(limit=2, file=sys.stdout)
            continue
        ptx = ck.asm.get("ptx", "")
        regs, spills = ptxas_usage(ptx)
        wgmma = "wgmma.mma_async" in ptx
        tma = "cp.async.bulk.tensor" in ptx
        if not wgmma:
            failed += 1
        if args.ptx:
            args.ptx.mkdir(parents=True, exist_ok=True)
            (args.ptx / f"{dtype}_d{d}_{bm}x{bn}_s{st}_ws{int(ws)}_ov{int(ov)}_c{int(causal)}_p{int(pers)}_n{cons}.ptx").write_text(ptx)
        # With ws the consumer warps raise their register budget (setmaxnreg) above the launch figure.
        maxnreg = max(map(int, re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", ptx)), default=0)
        # (the largest budget any partition raises to)
        print(f"{head} {regs:>4} {spills:>5} {ck.metadata.shared:>6} {ck.metadata.num_warps:>5} "
              f"{maxnreg or '-':>7} {wgmma!s:>5} {tma!s:>4}")
    print(f"{len(configs) - failed}/{len(configs)} configs compiled with wgmma")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
