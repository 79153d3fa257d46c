"""Compile the pointer forward kernel's fp8 path (kernel/jit/fwd.py, FP8=True) for sm_90 without a GPU.

Runs against whichever Triton is first on PYTHONPATH (the GPU machines have Triton 3.6), with flashtune importable:

    PYTHONPATH=/tmp/tr36site:<flashtune> python bench/fp8_compile_check.py

For a few tile configs, causal and not, at D=128 with e4m3 q, k, v and a bf16 output, it prints whether the kernel
compiles, its shared memory, and the warpgroup MMA instructions in the PTX (both dots should be `...e4m3.e4m3`).
The integer arguments are compiled unspecialised (no 16-divisibility hints), so the loads are not the vectorised,
pipelined ones of a real launch: this checks that the code compiles and which MMAs it uses, not its speed. Exits 1
if a config fails or a dot is not an fp8 wgmma (both dots share one instruction when block_n equals D).
"""
from __future__ import annotations

import re
import sys

import triton
from flashtune.kernel.jit.fwd import attn_fwd_kernel
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTERS = {"Q": "*fp8e4nv", "K": "*fp8e4nv", "V": "*fp8e4nv", "O": "*bf16", "LSE": "*fp32", "QD": "*fp32",
            "KD": "*fp32", "VD": "*fp32", "Sinks": "*fp32", "Alibi": "*fp32", "Mask": "*i1"}
FLOATS = {"qk_scale", "cap_in", "cap_out", "dropout_p"}
CONFIGS = ((128, 64, 3, 8, False), (128, 128, 2, 8, True), (128, 64, 4, 8, True), (64, 64, 3, 4, False))


def compile_fp8(block_m: int, block_n: int, stages: int, warps: int, causal: bool) -> tuple[int, list[str]]:
    """(shared memory bytes, the distinct wgmma instructions) of one fp8 config compiled for sm_90."""
    const = {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "CAUSAL": causal,
             "STORE_LSE": False, "PRECISION": "ieee", "SOFTCAP": False, "WINDOW": False, "SINKS": False,
             "ALIBI": False, "MASK": 0, "DROPOUT": False, "FP8": True}
    signature = {name: "constexpr" if name in const else POINTERS.get(name, "fp32" if name in FLOATS else "i32")
                 for name in attn_fwd_kernel.arg_names}
    compiled = triton.compile(ASTSource(attn_fwd_kernel, signature, const), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return compiled.metadata.shared, sorted(set(re.findall(r"wgmma\.mma_async\.[a-z0-9._]+", compiled.asm["ptx"])))


def main() -> int:
    print(f"triton {triton.__version__}, sm_90, D=128, e4m3 q/k/v, bf16 out")
    bad = 0
    for block_m, block_n, stages, warps, causal in CONFIGS:
        name = f"m{block_m}-n{block_n}-w{warps}-s{stages} {'causal' if causal else 'full'}"
        try:
            smem, mmas = compile_fp8(block_m, block_n, stages, warps, causal)
        except Exception as error:  # noqa: BLE001 (report every config, then fail)
            print(f"{name}: FAILED {type(error).__name__}: {str(error)[:300]}")
            bad += 1
            continue
        # Both dots (QKᵀ: n = block_n; PV: n = D) are one instruction when block_n equals D.
        fp8 = bool(mmas) and all(m.endswith(".e4m3.e4m3") for m in mmas)
        bad += not fp8
        print(f"{name}: smem {smem} B, {', '.join(mmas)}{'' if fp8 else '  <- a dot is not an fp8 wgmma'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
