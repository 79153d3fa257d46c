"""Fingerprints of every kernel's output on fixed inputs: one SHA-256 per (op, variant, case).

A refactor that must not change what the kernels compute (moving code, sharing jit helpers) is checked by
comparing these fingerprints before and after, bitwise: under the Triton interpreter in CI
(`tests/kernel/test_output_hashes.py` against `tests/fixtures/output_hashes_interpreter.json`) and once on a GPU
(run this script on both trees, then `--compare A.json B.json`).

    python bench/output_hashes.py --out hashes.json             # CUDA if present, else the interpreter
    python bench/output_hashes.py --compare before.json after.json

On the CPU the interpreter's arithmetic runs through numpy, OpenBLAS and torch's CPU kernels, which pick
their vector code by the CPU (AVX2 or AVX-512): the same kernel gives other last bits on another CPU. The
fingerprints are therefore taken with every one of them pinned to AVX2 (`PORTABLE_CPU_ENV`, set before
the process starts; any x86-64 CPU of the last ten years has it):

    env TRITON_INTERPRET=1 OPENBLAS_CORETYPE=Haswell OPENBLAS_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 \
        NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" \
        python bench/output_hashes.py --out tests/fixtures/output_hashes_interpreter.json

The inputs are seeded, so the same code on the same device type gives the same bytes. The explicit-config
entry points are used, never the dispatcher, so no database is read.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also when a test loads this file
from common import explicit_api  # noqa: E402


# Pins numpy, OpenBLAS and torch's CPU kernels to their AVX2 code, so the interpreter's fingerprints are the
# same on every x86-64 CPU (it must be in the environment before the process imports them).
PORTABLE_CPU_ENV: dict[str, str] = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": "1",
                                    "ATEN_CPU_CAPABILITY": "avx2",
                                    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


SOFTCAP = 2.0  # small enough that the scores of N(0, 1) inputs reach it


def _draw(gen: torch.Generator, device: str, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def cases(device: str) -> Iterator[tuple[str, Callable[[], tuple[torch.Tensor, ...]]]]:
    """(name, run) for each op, variant and shape; `run` returns the tensors to fingerprint."""
    api = explicit_api()
    Config = api["Config"]
    gpu = device == "cuda"
    dtypes = [torch.float16, torch.bfloat16] if gpu else [torch.float32, torch.float16]
    # (B, Hq, Hkv, Nq, Nk, D): tails, GQA, cross lengths, a padded head dim.
    shapes = ([(2, 8, 2, 1000, 1000, 128), (1, 4, 4, 777, 1531, 64), (2, 4, 1, 513, 513, 72)] if gpu else
              [(1, 2, 1, 37, 37, 16), (1, 2, 2, 19, 45, 32), (1, 2, 1, 24, 24, 24)])
    fwd_configs = ([Config(128, 64, 8, 3), Config(64, 32, 4, 2), Config(128, 64, 8, 2, {"loads": "tma"}),
                    Config(128, 128, 8, 2, {"loads": "tma", "ws": True}),
                    Config(128, 64, 8, 2, {"loads": "tma", "schedule": "heavy_first"})] if gpu else
                   [Config(16, 16, 2, 1), Config(32, 16, 4, 2), Config(16, 32, 2, 1, {"loads": "tma"}),
                    Config(32, 16, 4, 2, {"loads": "tma", "schedule": "heavy_first"})])
    bwd_configs = ([Config(32, 64, 4, 2, {"block_m_dq": 64, "block_n_dq": 32}),
                    Config(32, 128, 8, 2, {"block_m_dq": 64, "block_n_dq": 64, "deterministic": False})] if gpu else
                   [Config(16, 16, 2, 1, {"block_m_dq": 16, "block_n_dq": 16}),
                    Config(16, 32, 2, 1, {"block_m_dq": 32, "block_n_dq": 16, "deterministic": False})])
    kv_configs = ([Config(16, 64, 4, 2, {"num_splits": 1}), Config(16, 128, 4, 2, {"num_splits": 8})] if gpu else
                  [Config(16, 16, 2, 1, {"num_splits": 1}), Config(16, 16, 2, 1, {"num_splits": 3})])
    for dtype in dtypes:
        for si, (b, hq, hkv, nq, nk, d) in enumerate(shapes):
            for causal in (False, True):
                def inputs(seed: int) -> tuple[torch.Tensor, ...]:
                    gen = torch.Generator(device=device).manual_seed(seed)
                    return (_draw(gen, device, dtype, b, hq, nq, d), _draw(gen, device, dtype, b, hkv, nk, d),
                            _draw(gen, device, dtype, b, hkv, nk, d), _draw(gen, device, dtype, b, hq, nq, d))

                tag = f"{str(dtype).removeprefix('torch.')}/s{si}/{'causal' if causal else 'full'}"
                for config in fwd_configs:
                    def fwd(config: Any = config, causal: bool = causal) -> tuple[torch.Tensor, ...]:
                        q, k, v, _ = inputs(1)
                        return api["fwd"](q, k, v, causal=causal, config=config, return_lse=True)
                    yield f"fwd/{config}/{tag}", fwd
                if nq == nk:  # the backward's shapes: self-attention
                    for config in bwd_configs:
                        def bwd(config: Any = config, causal: bool = causal) -> tuple[torch.Tensor, ...]:
                            q, k, v, do = inputs(2)
                            o, lse = api["fwd"](q, k, v, causal=causal, config=fwd_configs[0], return_lse=True)
                            deterministic = config.extra_dict.get("deterministic", True)
                            return api["bwd"](do, q, k, v, o, lse, causal=causal, scale=None, config=config,
                                              deterministic=deterministic)
                        yield f"bwd/{config}/{tag}", bwd
                if si == 0:  # softcap (pointer kernels only), on the first shape
                    def capped_fwd(causal: bool = causal) -> tuple[torch.Tensor, ...]:
                        q, k, v, _ = inputs(4)
                        return api["fwd"](q, k, v, causal=causal, config=fwd_configs[1], return_lse=True,
                                          softcap=SOFTCAP)

                    def capped_bwd(causal: bool = causal) -> tuple[torch.Tensor, ...]:
                        q, k, v, do = inputs(4)
                        o, lse = capped_fwd(causal)
                        return api["bwd"](do, q, k, v, o, lse, causal=causal, scale=None, config=bwd_configs[0],
                                          softcap=SOFTCAP)
                    yield f"fwd/softcap/{tag}", capped_fwd
                    yield f"bwd/softcap/{tag}", capped_bwd
            for config in kv_configs:  # decode: a few queries against a cache, ragged lengths too
                for ragged in (False, True):
                    def kv(config: Any = config, ragged: bool = ragged) -> tuple[torch.Tensor, ...]:
                        gen = torch.Generator(device=device).manual_seed(3)
                        q = _draw(gen, device, dtype, b, hq, 1 if gpu else 2, d)
                        kc, vc = (_draw(gen, device, dtype, b, hkv, nk, d) for _ in range(2))
                        lens = (torch.arange(b, device=device, dtype=torch.int32) * 7 + nk // 3) if ragged else None
                        return (api["kvcache"](q, kc, vc, cache_seqlens=lens, causal=True, config=config),)
                    yield f"kvcache/{config}/{str(dtype).removeprefix('torch.')}/s{si}/" \
                          f"{'ragged' if ragged else 'uniform'}", kv
            if si == 0:
                def kv_capped() -> tuple[torch.Tensor, ...]:
                    gen = torch.Generator(device=device).manual_seed(5)
                    q = _draw(gen, device, dtype, b, hq, 1 if gpu else 2, d)
                    kc, vc = (_draw(gen, device, dtype, b, hkv, nk, d) for _ in range(2))
                    return (api["kvcache"](q, kc, vc, causal=True, config=kv_configs[1], softcap=SOFTCAP),)
                yield f"kvcache/softcap/{str(dtype).removeprefix('torch.')}/s{si}", kv_capped


def fingerprints(device: str) -> dict[str, str]:
    out = {}
    for name, run in cases(device):
        try:
            out[name] = _digest(*run())
        except Exception as error:  # noqa: BLE001 - a case this tree cannot run is recorded, not fatal
            out[name] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return out


def compare(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """Lines naming every case whose fingerprint differs or that only one side has."""
    return [f"{name}: {a.get(name)} vs {b.get(name)}" for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]


def main() -> int:
    from common import arguments, read_json, use_interpreter, write_json

    parser = arguments(__doc__, out=None)
    parser.add_argument("--out", help="write the fingerprints here as JSON")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two fingerprint files")
    args = parser.parse_args()
    if args.compare:
        a, b = (read_json(p) for p in args.compare)
        diff = compare(a, b)
        print(f"{len(a)} vs {len(b)} cases, {len(diff)} differ")
        print("\n".join(diff))
        return 1 if diff else 0
    use_interpreter()  # without a GPU, before fingerprints() imports the kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = fingerprints(device)
    errors = sum(v.startswith("error") for v in result.values())
    print(f"{len(result)} cases on {device}, {errors} errors")
    if args.out:
        write_json(args.out, result, sort_keys=True)
    else:
        print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
