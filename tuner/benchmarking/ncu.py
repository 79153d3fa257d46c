"""Nsight Compute for `flashtune profile`: the command that captures one launch, and reading its report.

The profiled launch runs inside the NVTX push/pop range NVTX_RANGE after the warm-up launches, so
`--nvtx --nvtx-include "flashtune/"` with the kernel-name filter selects exactly that launch
(`--launch-skip 0 --launch-count 1` inside the range). `--clock-control none` keeps the GPU at its
normal boost clocks, as in a real run, instead of ncu's locked base clock.
"""
from __future__ import annotations

import csv
import glob
import io
import shutil
import sys
from typing import Sequence

KERNEL_NAME = "attn_fwd_kernel"  # the @triton.jit function in kernel/jit/fwd.py
NVTX_RANGE = "flashtune"

# What the summary prints from the raw page, each with the metric names to try in order (names
# differ between GPU generations: Hopper's wgmma runs on the "gmma" pipe, Ampere's mma on "hmma").
SUMMARY_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernel", ("Kernel Name",)),
    ("duration", ("gpu__time_duration.sum",)),
    ("grid / block", ("launch__grid_size", "launch__block_size")),
    ("registers per thread", ("launch__registers_per_thread",)),
    ("shared memory per block", ("launch__shared_mem_per_block_dynamic", "launch__shared_mem_per_block")),
    ("theoretical occupancy", ("sm__maximum_warps_per_active_cycle_pct",)),
    ("achieved occupancy", ("sm__warps_active.avg.pct_of_peak_sustained_active",)),
    ("compute (SM) throughput", ("sm__throughput.avg.pct_of_peak_sustained_elapsed",)),
    ("memory throughput", ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",)),
    ("DRAM throughput", ("dram__throughput.avg.pct_of_peak_sustained_elapsed",
                         "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed")),
    ("tensor pipe active", ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                            "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
                            "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active")),
)


def find_ncu() -> str | None:
    """The ncu executable: on PATH, else in the usual CUDA and Nsight Compute install folders."""
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/usr/local/cuda-*/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"):
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[-1]
    return None


def ncu_command(profile_args: Sequence[str], *, report: str = "flashtune_profile", ncu: str = "ncu",
                python: str | None = None) -> list[str]:
    """The ncu command that captures the profiled launch of `flashtune profile <profile_args>` into
    `<report>.ncu-rep` (the full section set)."""
    return [ncu, "--clock-control", "none", "--nvtx", "--nvtx-include", f"{NVTX_RANGE}/",
            "-k", f"regex:{KERNEL_NAME}", "--launch-skip", "0", "--launch-count", "1",
            "--set", "full", "-f", "-o", report,
            python or sys.executable, "-m", "flashtune.tuner.cli", "profile", *profile_args]


def import_command(report: str, *, ncu: str = "ncu") -> list[str]:
    """The ncu command that prints the report's raw metrics as CSV."""
    return [ncu, "--import", f"{report}.ncu-rep", "--page", "raw", "--csv"]


def parse_raw_csv(text: str) -> list[dict[str, tuple[str, str]]]:
    """The kernels of `ncu --page raw --csv` output: per kernel, metric name -> (value, unit).

    ncu prints a header of metric names, then a row of units, then one row per profiled kernel;
    lines before the header (ncu's own ==PROF== messages) are skipped.
    """
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if len(rows) < 2:
        return []
    header = rows[0]
    units = rows[1] if len(rows) > 1 and not (rows[1][0].strip().isdigit()) else [""] * len(header)
    kernels = []
    for row in rows[1:]:
        if not row or not row[0].strip().isdigit():
            continue  # the units row
        kernels.append({name: (value, unit) for name, value, unit in zip(header, row, units)})
    return kernels


def summarize(kernel: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """(label, 'value unit') for each SUMMARY_METRICS entry the report holds, plus every other
    tensor-pipe utilisation metric it has."""
    out = []
    shown: set[str] = set()
    for label, names in SUMMARY_METRICS:
        if label == "grid / block":
            cells = [kernel[n][0] for n in names if n in kernel]
            if cells:
                out.append((label, " / ".join(cells)))
            continue
        for name in names:
            if name in kernel:
                value, unit = kernel[name]
                out.append((label, f"{value} {unit}".strip()))
                shown.add(name)
                break
    for name in sorted(kernel):
        if "tensor" in name and "pct_of_peak" in name and name not in shown:
            value, unit = kernel[name]
            out.append((name, f"{value} {unit}".strip()))
    return out
