#!/usr/bin/env python
"""Benchmark of the config database: the dispatcher's import-time read, and trial inserts.

    python bench/db_bench.py [--out bench/results] [--winners 10000] [--trials 1000000]

Builds a SQLite database with 10,000 winners (spread over the 8 known archs) and 1,000,000
trials with bulk inserts, then measures
- `load_winners([arch])` for one arch, each time in a fresh Python process (what an app import
  pays; the process's import of `db.store` is reported apart), and in-process with a fresh Store;
- `Store.record_trial` with one commit per trial, on that full database.
Targets: load <= 50 ms, inserts >= 1,000 per second. Needs no GPU. Writes db_bench.json to --out
and prints a table last.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]

import sqlalchemy  # noqa: E402
from sqlalchemy import create_engine, insert  # noqa: E402

from flashtune.db.arch import ARCH_SMEM
from flashtune.db.smem import fits  # noqa: E402
from flashtune.db.models import RunRow, TrialRow, WinnerRow  # noqa: E402
from flashtune.db.store import RunInfo, Store, load_winners  # noqa: E402
from flashtune.db.types import DTYPES, HEAD_DIMS, OPS, Config, Key  # noqa: E402

LOAD_TARGET_MS = 50.0
INSERT_TARGET_PER_S = 1000.0
TRIAL_OUTCOMES = ("ok",) * 8 + ("out_of_resources", "compile_error")
CANDIDATES = [Config(m, n, w, s) for m, n, w, s in
              ((128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 2, 1), (16, 16, 1, 1))]

CHILD = r"""
import sys, time
t0 = time.perf_counter()
from flashtune.db.store import load_winners
t1 = time.perf_counter()
winners = load_winners([sys.argv[2]], sys.argv[1])
t2 = time.perf_counter()
print(f"{(t1 - t0) * 1e3:.3f} {(t2 - t1) * 1e3:.3f} {len(winners)}")
"""


def keys_for(arch: str, count: int) -> list[Key]:
    """`count` distinct keys of one arch (N doubling from 128, all head dims, dtypes, causal)."""
    seqs = (128 << i for i in itertools.count())
    combos = ((n, op, d, dt, c) for n in seqs for op in OPS for d in HEAD_DIMS for dt in DTYPES
              for c in (False, True))
    return [Key(arch, op, n, d, dt, c) for n, op, d, dt, c in itertools.islice(combos, count)]


def config_for(key: Key) -> Config:
    """The largest candidate config that fits the arch's shared memory for this key."""
    return next(c for c in CANDIDATES if fits(c, key.head_dim, key.dtype, ARCH_SMEM[key.arch], key.arch))


def _config_columns(config: Config) -> dict[str, Any]:
    return {"block_m": config.block_m, "block_n": config.block_n, "num_warps": config.num_warps,
            "num_stages": config.num_stages, "config_extra": "{}"}


def _key_columns(key: Key) -> dict[str, Any]:
    return {"arch": key.arch, "op": key.op, "seq_len": key.seq_len, "seq_len_kv": key.seq_len_kv,
            "head_dim": key.head_dim, "dtype": key.dtype, "causal": key.causal}


def build(url: str, n_winners: int, n_trials: int) -> dict[str, Any]:
    """Create the schema through the store, then bulk-insert runs, trials and winners."""
    Store.open(url).close()
    archs = list(ARCH_SMEM)
    per_arch = -(-n_winners // len(archs))
    keys = [k for arch in archs for k in keys_for(arch, per_arch)][:n_winners]
    now = datetime.now(timezone.utc)
    engine = create_engine(url)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA synchronous = OFF")
        run_ids = {}
        for arch in archs:
            run_ids[arch] = conn.execute(insert(RunRow).values(
                gpu_name=f"GPU {arch}", arch=arch, sm_count=100, smem_limit=ARCH_SMEM[arch],
                driver="560", cuda="12.6", triton_version="3.6.0", torch_version="2.11.0",
                kernel_version="bench", host="bench", args={}, status="done", started_at=now,
                finished_at=now)).inserted_primary_key[0]
        per_key = max(1, n_trials // len(keys))

        def trials() -> Iterator[dict[str, Any]]:
            made = 0
            for i, key in enumerate(keys):
                columns = _key_columns(key)
                for j in range(per_key if i < len(keys) - 1 else n_trials - made):
                    outcome = TRIAL_OUTCOMES[j % len(TRIAL_OUTCOMES)]
                    yield {"run_id": run_ids[key.arch], **columns, **_config_columns(CANDIDATES[j % 5]),
                           "outcome": outcome, "median_ms": 1.0 + j if outcome == "ok" else None,
                           "tflops": 100.0 / (1 + j) if outcome == "ok" else None, "compile_s": 0.5,
                           "error": None if outcome == "ok" else outcome, "kernel_version": "bench",
                           "gpu_name": f"GPU {key.arch}", "created_at": now + timedelta(microseconds=made)}
                    made += 1

        rows = trials()
        while chunk := list(itertools.islice(rows, 50_000)):
            conn.execute(insert(TrialRow), chunk)
        conn.execute(insert(WinnerRow), [
            {**_key_columns(k), **_config_columns(config_for(k)), "median_ms": 1.0, "tflops": 100.0,
             "kernel_version": "bench", "gpu_name": f"GPU {k.arch}", "sm_count": 100, "driver": "560",
             "cuda": "12.6", "triton_version": "3.6.0", "torch_version": "2.11.0", "host": "bench",
             "measured_at": now, "trial_id": None} for k in keys])
    engine.dispose()
    with Store.open(url) as store:
        counts = store.counts()
        store.vacuum()  # ANALYZE too: what `flashtune db vacuum` leaves behind
    return {"seconds": time.perf_counter() - started, **counts}


def time_load_fresh_process(url: str, arch: str, repeat: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    imports, loads, count = [], [], 0
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", CHILD, url, arch], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        imports.append(float(out[0]))
        loads.append(float(out[1]))
        count = int(out[2])
    return {"winners": count, "median_ms": statistics.median(loads), "min_ms": min(loads),
            "max_ms": max(loads), "import_db_store_median_ms": statistics.median(imports), "runs": repeat}


def time_load_in_process(url: str, archs: list[str], repeat: int) -> dict[str, Any]:
    times, count = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        count = len(load_winners(archs, url))
        times.append((time.perf_counter() - t0) * 1e3)
    return {"winners": count, "median_ms": statistics.median(times), "min_ms": min(times),
            "max_ms": max(times), "runs": repeat}


def time_inserts(url: str, n: int) -> dict[str, Any]:
    with Store.open(url) as store:
        run = store.start_run(RunInfo("GPU sm_90", "sm_90", 132, ARCH_SMEM["sm_90"], "560", "12.6",
                                      "3.6.0", "2.11.0", "bench-insert", "bench", {}))
        key = Key("sm_90", "fwd", 999_424, 64, "float16", True)
        t0 = time.perf_counter()
        for i in range(n):
            store.record_trial(run, key, CANDIDATES[i % 5], "ok", median_ms=1.0 + i, tflops=1.0,
                               compile_s=0.1)
        elapsed = time.perf_counter() - t0
        store.prune("bench")  # leave the database as built
    return {"trials": n, "seconds": elapsed, "per_second": n / elapsed,
            "ms_per_trial": elapsed / n * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results directory")
    parser.add_argument("--winners", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=1_000_000)
    parser.add_argument("--arch", default="sm_90", help="the arch whose winners are loaded")
    parser.add_argument("--repeat", type=int, default=15, help="fresh processes for the load timing")
    parser.add_argument("--inserts", type=int, default=3000, help="single-commit trial inserts to time")
    parser.add_argument("--db", type=Path, default=None, help="where to build the database (default: a temp dir)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="flashtune-db-bench-") as tmp:
        path = args.db or Path(tmp) / "bench.db"
        if path.exists():
            parser.error(f"--db {path} exists: give a new path")
        url = f"sqlite:///{path}"
        built = build(url, args.winners, args.trials)
        built["file_bytes"] = path.stat().st_size
        fresh = time_load_fresh_process(url, args.arch, args.repeat)
        warm = time_load_in_process(url, [args.arch], args.repeat * 2)
        every = time_load_in_process(url, list(ARCH_SMEM), max(3, args.repeat // 3))
        inserts = time_inserts(url, args.inserts)

    result = {
        "benchmark": "db", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "sqlite": sqlite3.sqlite_version,
                    "sqlalchemy": sqlalchemy.__version__},
        "database": built,
        "load_one_arch_fresh_process": {"arch": args.arch, **fresh},
        "load_one_arch_in_process": {"arch": args.arch, **warm},
        "load_all_archs_in_process": every,
        "trial_inserts_single_commit": inserts,
        "targets": {"load_ms": LOAD_TARGET_MS, "inserts_per_s": INSERT_TARGET_PER_S},
        "pass": {"load": fresh["median_ms"] <= LOAD_TARGET_MS,
                 "inserts": inserts["per_second"] >= INSERT_TARGET_PER_S},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "db_bench.json"
    out_file.write_text(json.dumps(result, indent=1) + "\n")

    rows = [
        ("database", f"{built['winners']} winners, {built['trials']} trials, "
                     f"{built['file_bytes'] / 2**20:.0f} MiB, built in {built['seconds']:.1f} s", ""),
        (f"load_winners([{args.arch}]) fresh process",
         f"{fresh['median_ms']:.1f} ms median ({fresh['winners']} winners; import of db.store "
         f"{fresh['import_db_store_median_ms']:.0f} ms apart)",
         f"target <= {LOAD_TARGET_MS:.0f} ms: {'PASS' if result['pass']['load'] else 'FAIL'}"),
        (f"load_winners([{args.arch}]) in process", f"{warm['median_ms']:.1f} ms median", ""),
        ("load_winners(all 8 archs) in process",
         f"{every['median_ms']:.1f} ms median ({every['winners']} winners)", ""),
        ("record_trial, one commit each", f"{inserts['per_second']:.0f} trials/s "
                                          f"({inserts['ms_per_trial']:.2f} ms each)",
         f"target >= {INSERT_TARGET_PER_S:.0f}/s: {'PASS' if result['pass']['inserts'] else 'FAIL'}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"results: {out_file}")
    for name, value, verdict in rows:
        print(f"{name.ljust(width)}  {value}  {verdict}".rstrip())
    return 0 if all(result["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
