"""`flashtune doctor`: is it working? The GPUs, the software, the database, the dispatcher, one kernel run.

Each check yields Findings; a `fail` finding makes the command exit 1, `warn` findings do not (a
fresh machine with nothing tuned yet works, on default configs).
"""
from __future__ import annotations

import platform
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
import triton

from ..db.arch import ARCH_SMEM
from ..db.errors import one_line
from ..db.paths import default_url, sqlite_path
from ..db.text import mask_url
from ..db.rows import DamagedRowWarning, damage_summary
from ..db.store import Store, StoreError
from ..db.text import printable
from ..kernel.device import INTERPRET
from ..kernel.version import OP_VERSIONS

from .gpu import GpuInfo, NoGpuError, detect_gpu

LEVELS = ("ok", "info", "warn", "fail")
# Relative error a correct fp16 kernel stays well under (tests/kernel/test_kernel.py's bound).
SMOKE_TOLERANCE = {"float16": 2e-3, "float32": 2e-5}


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    level: str  # one of LEVELS
    topic: str
    message: str


def check_software() -> Iterator[Finding]:
    """Versions, and whether the Triton interpreter is on."""
    yield Finding("info", "software", f"python {platform.python_version()}, torch {torch.__version__} "
                  f"(CUDA {torch.version.cuda or 'none'}), triton {triton.__version__}, "
                  f"kernel versions {', '.join(f'{op} {v}' for op, v in OP_VERSIONS.items())}")
    if INTERPRET:
        level = "warn" if torch.cuda.is_available() else "info"
        yield Finding(level, "TRITON_INTERPRET", "set: kernels run in the Triton interpreter on the CPU "
                      "(for tests and debugging; slow, and no tuned configs apply)")
    else:
        yield Finding("ok", "TRITON_INTERPRET", "not set: kernels compile for the GPU")


def check_gpus() -> tuple[list[GpuInfo], list[Finding]]:
    """The CUDA GPUs this process sees, or why none."""
    findings = []
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = [detect_gpu(i) for i in range(count)]
    except NoGpuError:
        gpus = []
    except Exception as error:  # noqa: BLE001 - a broken driver is exactly what doctor reports
        return [], [Finding("fail", "GPU", f"querying the CUDA devices failed: {type(error).__name__}: {error}")]
    if not gpus:
        level = "warn" if INTERPRET else "fail"
        findings.append(Finding(level, "GPU", "no CUDA GPU visible (torch.cuda.is_available() is False): "
                                "the kernel runs only under TRITON_INTERPRET=1, on CPU tensors"))
    for g in gpus:
        findings.append(Finding("ok", f"GPU {g.index}", f"{g.name}, {g.arch}, {g.sm_count} SMs, "
                                f"{g.smem_limit // 1024} KB shared memory per block, driver {g.driver}, "
                                f"CUDA {g.cuda}"))
        if g.arch not in ARCH_SMEM:
            findings.append(Finding("warn", f"GPU {g.index}", f"{g.arch} is not in the arch table "
                                    f"({', '.join(ARCH_SMEM)}): tuning works, planning with --dry-run does not"))
    return gpus, findings


def check_database(url: str, archs: list[str]) -> Iterator[Finding]:
    """Whether the database opens, its schema and counts, winners per arch and how many are stale,
    damaged rows (fail: they are skipped wherever they are read), and runs that were killed."""
    try:
        path = sqlite_path(url)  # an unusable URL (one line naming it and what is accepted) fails here
        missing = path is not None and not path.exists()
    except (StoreError, OSError) as error:
        yield Finding("fail", "database", one_line(error))
        return
    where = mask_url(url)
    if missing:
        yield Finding("warn", "database", f"no database at {printable(path)} yet: nothing is tuned, every call uses "
                      "the default config (run `tune` to tune this GPU)")
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamagedRowWarning)  # reported below, as a finding
            with Store.open(url, create=False) as store:
                version, counts, winners = store.schema_version, store.counts(), store.winners()
                stale_runs, damaged = store.stale_runs(), store.damaged_rows
    except StoreError as error:
        yield Finding("fail", "database", one_line(error))
        return
    yield Finding("ok", "database", f"{where}: schema version {version}, {counts['runs']} runs, "
                  f"{counts['trials']} trials, {counts['winners']} winners")
    if damaged:
        yield Finding("fail", "damaged rows", damage_summary(damaged, where))
    for run in stale_runs:
        yield Finding("warn", "stale run", f"run {run.run_id} ({printable(run.gpu_name)} on {printable(run.host)}, "
                      f"started {run.started_at:%Y-%m-%d %H:%M} UTC) is still marked running but has recorded "
                      f"nothing since {run.last_activity:%Y-%m-%d %H:%M} UTC: it was probably killed; its trials "
                      "are kept and a new `tune` resumes them")
    per_arch = Counter(w.key.arch for w in winners)
    if per_arch:
        yield Finding("info", "winners", ", ".join(f"{a}: {n}" for a, n in sorted(per_arch.items())))
    stale = [w for w in winners if w.kernel_version != OP_VERSIONS.get(w.key.op)]
    if stale:
        versions = ", ".join(sorted({printable(w.kernel_version) for w in stale}))
        now = ", ".join(f"{op} {v}" for op, v in OP_VERSIONS.items())
        yield Finding("warn", "stale winners", f"{len(stale)} of {len(winners)} winners were tuned with another "
                      f"version of their op's kernels ({versions}; now {now}): they are still used if they fit; "
                      "re-tune to refresh them")
    for arch in archs:
        if not per_arch.get(arch):
            yield Finding("warn", "winners", f"nothing tuned for {arch}, the GPU here: calls use the default "
                          "config (run `tune`)")


def check_dispatcher(db_url: str | None) -> Iterator[Finding]:
    """What the dispatcher loaded at import (from $FLASHTUNE_DB or the user file, never from --db)."""
    from ..kernel import dispatch

    info = dispatch.info()
    yield Finding("ok" if info.ok else "fail", "dispatcher", info.message)
    if db_url is not None and info.url is not None and info.url != mask_url(db_url):
        yield Finding("info", "dispatcher", f"apps read {info.url}, not --db; set FLASHTUNE_DB to change that")
    if info.override is not None:
        yield Finding("warn", "dispatcher", f"{dispatch.CONFIG_ENV_VAR}={info.override} forces one config "
                      "for every call")
    if info.bundled_message:
        # Stale or unreadable bundled winners are left out: worth a warning, the rest is information.
        yield Finding("warn" if info.bundled_left_out else "info", "bundled", info.bundled_message)


def check_kernel(device: torch.device) -> Iterator[Finding]:
    """One small call of kernel.attention against the float64 reference."""
    from ..kernel import attention, dispatch
    from .benchmarking.run import output_errors
    from ..kernel.testing import attention_reference

    on_gpu = device.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    size = (2, 4, 256, 64) if on_gpu else (1, 2, 32, 16)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(size, generator=gen, device=device, dtype=dtype) for _ in range(3))
    try:
        choice = dispatch.explain(q, k, v, is_causal=True)
        out = attention(q, k, v, is_causal=True)
        if on_gpu:
            torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - any failure of the kernel is the finding
        yield Finding("fail", "kernel", f"a test call on {device} failed: {type(error).__name__}: {error}")
        return
    _, rel = output_errors(out, attention_reference(q, k, v, causal=True).float())
    tol = SMOKE_TOLERANCE["float16" if on_gpu else "float32"]
    level = "ok" if rel < tol else "fail"
    yield Finding(level, "kernel", f"causal {tuple(size)} {str(dtype).removeprefix('torch.')} on {device} with "
                  f"{choice.config} ({choice.source}): relative error {rel:.1e} (limit {tol:g})")


def diagnose(db_url: str | None = None, *, run_kernel: bool = True) -> list[Finding]:
    """Every check, in the order printed."""
    findings = list(check_software())
    gpus, gpu_findings = check_gpus()
    findings += gpu_findings
    url = db_url or default_url()
    findings += check_database(url, sorted({g.arch for g in gpus}))
    findings += check_dispatcher(db_url)
    if run_kernel:
        if gpus:
            findings += check_kernel(torch.device("cuda", gpus[0].index))
        elif INTERPRET:
            findings += check_kernel(torch.device("cpu"))
    return findings
