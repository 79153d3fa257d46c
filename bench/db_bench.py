#!/usr/bin/env python
"""Benchmark of the config database: the dispatcher's import-time read, trial inserts, and imports.

    python bench/db_bench.py [--out bench/results/cpu] [--winners 10000] [--trials 1000000]
                             [--import-winners 60000]

Builds a SQLite database with 10,000 winners (spread over the 8 known archs) and 1,000,000
trials with bulk inserts, then measures
- `load_winners([arch])` for one arch, each time in a fresh Python process (what an app import
  pays; the process's import of `db.store` is reported apart), and in-process with a fresh Store;
- `Store.record_trial` with one commit per trial, on that full database;
- `flashtune import` of an exchange file of 60,000 winners (about 40 MB) into a fresh SQLite file,
  each time in a fresh process timed from start to exit, with its peak resident memory (the
  child's own high-water mark): into the empty database (every winner added), the same file again (every winner kept),
  and a file of faster times (every winner replaced). During the first, a tuner stand-in in
  another process records trials, one commit each: it must never be refused, and its slowest
  commit shows how long the import held the write lock.
Targets: load <= 50 ms, inserts >= 1,000 per second, the 60k import <= 10 s and < 500 MB with the
tuner never refused. Needs no GPU. Writes db_bench.json to --out and prints a table last.

The recorded keys (FLASHTUNE_RECORD=1), with --recorded-keys 200000 keys of fwd, bwd and kvcache,
written to db_recorded_bench.json (`--only-recorded` runs this part alone):
- an app that exits with 200k keys pending, its exit timed (the flush at exit), twice (the second
  flush merges into the stored counts), while a tuner stand-in records trials one commit each: it
  must never be refused, and the app must exit within 5 s;
- `flashtune show --recorded --json` over them in a fresh process: <= 10 s and < 200 MB peak;
- `tune --recorded --dry-run --op fwd,bwd,kvcache --arch sm_90 --json` over them: its wall time.
"""
from __future__ import annotations

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

from common import arguments, out_dir, print_table, provenance, write_json

ROOT = Path(__file__).resolve().parents[1]

import sqlalchemy  # noqa: E402
from sqlalchemy import create_engine, insert  # noqa: E402

from flashtune.db.arch import ARCH_SMEM
from flashtune.kernel.ops.fwd import fits  # noqa: E402
from flashtune.db.models import RunRow, TrialRow, WinnerRow  # noqa: E402
from flashtune.db.store import RunInfo, Store, load_winners  # noqa: E402
from flashtune.db.types import DTYPES, HEAD_DIMS, OPS, Config, Key  # noqa: E402

RECORD_EXIT_TARGET_S = 5.0
SHOW_RECORDED_TARGET_S = 10.0
SHOW_RECORDED_TARGET_MB = 200.0
LOAD_TARGET_MS = 50.0
INSERT_TARGET_PER_S = 1000.0
IMPORT_TARGET_S = 10.0
IMPORT_TARGET_MB = 500.0
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


# `flashtune import` in a fresh process: the wall time from start to exit is what a user waits. Its
# peak memory is the kernel's high-water mark of the process (VmHWM): on Linux, `ru_maxrss` of a
# child also counts the parent's resident set at the moment it was spawned (the high-water mark of
# the address space exec replaced), which here is the whole benchmark's.
IMPORT_CHILD = r"""
import json, resource, sys, time
def peak_mb():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
from flashtune.db import exchange
from flashtune.db.store import Store
t1 = time.perf_counter()
winners = exchange.read_document(sys.argv[2])
t2 = time.perf_counter()
with Store.open(sys.argv[1]) as store:
    report = exchange.merge(store, winners, policy=sys.argv[3])
t3 = time.perf_counter()
print(json.dumps({"import_modules_s": t1 - t0, "read_validate_s": t2 - t1, "merge_s": t3 - t2,
                  "added": len(report.added), "replaced": len(report.replaced), "kept": len(report.kept),
                  "peak_rss_mb": peak_mb()}))
"""

# A tuner stand-in: one trial per commit until the stop file appears; its slowest commit and count.
WRITER_CHILD = r"""
import json, os, sys, time
from flashtune.db.store import RunInfo, Store, StoreError
from flashtune.db.types import Config, Key
url, stop = sys.argv[1], sys.argv[2]
worst, count, error = 0.0, 0, None
with Store.open(url) as store:
    run = store.start_run(RunInfo("GPU sm_90", "sm_90", 132, 232448, "560", "12.6", "3.6.0", "2.11.0",
                                  "bench-writer", "bench", {}))
    key = Key("sm_90", "fwd", 999_424, 64, "float16", True)
    print("ready", flush=True)
    while not os.path.exists(stop):
        t = time.perf_counter()
        try:
            store.record_trial(run, key, Config(64, 64, 4, 2), "ok", median_ms=1.0)
        except StoreError as exc:
            error = str(exc)
            break
        worst = max(worst, time.perf_counter() - t)
        count += 1
        time.sleep(0.005)
print(json.dumps({"trials": count, "slowest_commit_s": worst, "refused": error}))
"""

# An app that ends with `count` recorded keys pending: the atexit flush writes them. It prints the
# wall clock at the end of its work; the parent times from there to the process's exit.
APP_CHILD = r"""
import sys, time
from flashtune.kernel import record
from db_bench import recorded_counts
record._counts.update(recorded_counts(int(sys.argv[1])))
print(time.time(), flush=True)
"""

# A command-line call of `flashtune` in a fresh process, its peak resident memory (VmHWM) on stderr.
CLI_CHILD = r"""
import atexit, sys
def peak():
    with open("/proc/self/status") as status:
        mb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    print(f"peak_rss_mb {mb}", file=sys.stderr)
atexit.register(peak)
from flashtune.tuner.cli import main
main(sys.argv[1:])
"""


def recorded_counts(count: int) -> dict[Key, int]:
    """`count` distinct recorded keys of sm_90, a third each of fwd, bwd and kvcache (kvcache keys:
    one query, caches of N keys), with call counts from 1 to 1000."""
    combos = ((n, op, d, dt, bh) for n in itertools.count(1) for op in ("fwd", "bwd", "kvcache") for d in (64, 128)
              for dt in ("float16", "bfloat16") for bh in (8, 32, 64, 256))
    counts = {}
    for i, (n, op, d, dt, bh) in enumerate(itertools.islice(combos, count)):
        if op == "kvcache":
            key = Key("sm_90", op, 1, d, dt, True, seq_len_kv=64 * n, batch_heads=bh, group=4)
        else:
            key = Key("sm_90", op, 64 * n, d, dt, True, batch_heads=bh)
        counts[key] = 1 + i % 1000
    return counts


def _run_cli(args: list[str]) -> dict[str, Any]:
    """`flashtune ARGS` in a fresh process, stdout discarded: its wall time and peak memory."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLI_CHILD, *args], env=_child_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"flashtune {' '.join(args)}: {done.stderr.strip()[-500:]}")
    peak = next(float(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("peak_rss_mb"))
    return {"seconds": seconds, "peak_rss_mb": peak}


def time_recorded(directory: Path, count: int) -> dict[str, Any]:
    """The recorded-keys part of the docstring, on a fresh SQLite file."""
    url = f"sqlite:///{directory / 'recorded.db'}"
    Store.open(url).close()
    env = {**_child_env(), "FLASHTUNE_DB": url, "FLASHTUNE_RECORD": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), env["PYTHONPATH"]])
    stop = directory / "stop-recorded"
    writer = subprocess.Popen([sys.executable, "-c", WRITER_CHILD, url, str(stop)], env=_child_env(),
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    writer.stdout.readline()
    exits = []
    for _ in range(2):  # into the empty table, then merged into the stored counts
        app = subprocess.Popen([sys.executable, "-c", APP_CHILD, str(count)], env=env, stdout=subprocess.PIPE,
                               text=True)
        assert app.stdout is not None
        work_done = float(app.stdout.readline())
        app.wait(timeout=600)
        exits.append(time.time() - work_done)
    stop.touch()
    concurrent = json.loads(writer.communicate(timeout=60)[0])
    with Store.open(url) as store:
        stored = sum(1 for _ in store.iter_recorded())
    show = _run_cli(["show", "--recorded", "--json", "--db", url])
    dry_run = _run_cli(["tune", "--recorded", "--dry-run", "--op", "fwd,bwd,kvcache", "--arch", "sm_90", "--json",
                        "--db", url])
    return {"keys": count, "stored": stored, "app_exit_s": exits, "writer_during_flushes": concurrent,
            "show_recorded_json": show, "tune_recorded_dry_run": dry_run,
            "targets": {"app_exit_s": RECORD_EXIT_TARGET_S, "show_s": SHOW_RECORDED_TARGET_S,
                        "show_peak_mb": SHOW_RECORDED_TARGET_MB},
            "pass": {"flush": max(exits) <= RECORD_EXIT_TARGET_S and concurrent["refused"] is None and stored == count,
                     "show": show["seconds"] <= SHOW_RECORDED_TARGET_S and show["peak_rss_mb"] < SHOW_RECORDED_TARGET_MB}}


def recorded_main(out: Path, count: int) -> bool:
    """Run and report the recorded-keys part; whether it passed."""
    with tempfile.TemporaryDirectory(prefix="flashtune-db-bench-") as tmp:
        rec = time_recorded(Path(tmp), count)
    out_file = write_json(out / "db_recorded_bench.json", {"benchmark": "db_recorded", **provenance(),
                                                           "machine": {"platform": platform.platform(),
                                                                       "cpus": os.cpu_count(),
                                                                       "sqlite": sqlite3.sqlite_version},
                                                           **rec})
    writer = rec["writer_during_flushes"]
    print(f"results: {out_file}")
    print_table(["what", "measured", "target"], [
        (f"app exit flushing {count:,} recorded keys (empty, merged)",
         ", ".join(f"{s:.1f} s" for s in rec["app_exit_s"]), f"<= {RECORD_EXIT_TARGET_S:.0f} s"),
        ("tuner writing during the flushes", f"{writer['trials']} trials, slowest commit "
                                             f"{writer['slowest_commit_s'] * 1e3:.0f} ms, refused: {writer['refused'] or 'never'}",
         f"flush: {'PASS' if rec['pass']['flush'] else 'FAIL'}"),
        ("show --recorded --json", f"{rec['show_recorded_json']['seconds']:.1f} s, "
                                   f"peak {rec['show_recorded_json']['peak_rss_mb']:.0f} MB",
         f"<= {SHOW_RECORDED_TARGET_S:.0f} s, < {SHOW_RECORDED_TARGET_MB:.0f} MB: "
         f"{'PASS' if rec['pass']['show'] else 'FAIL'}"),
        ("tune --recorded --dry-run (fwd,bwd,kvcache)", f"{rec['tune_recorded_dry_run']['seconds']:.1f} s, "
                                                        f"peak {rec['tune_recorded_dry_run']['peak_rss_mb']:.0f} MB", ""),
    ])
    return all(rec["pass"].values())


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


def import_document(n_winners: int, scale: float = 1.0) -> dict[str, Any]:
    """An exchange document of `n_winners` distinct keys over the 8 archs (N in steps of 64, every
    head dim, dtype, op and causal), each with the largest candidate config that fits."""
    from flashtune.db import exchange
    from flashtune.db.store import Winner

    archs = list(ARCH_SMEM)
    per_arch = -(-n_winners // len(archs))
    measured = datetime(2025, 1, 1, tzinfo=timezone.utc)
    winners = []
    for arch in archs:
        combos = ((64 * (j + 1), op, d, dt, c) for j in itertools.count() for op in OPS for d in HEAD_DIMS
                  for dt in DTYPES for c in (False, True))
        for i, (n, op, d, dt, c) in enumerate(itertools.islice(combos, per_arch)):
            key = Key(arch, op, n, d, dt, c)
            winners.append(exchange.winner_to_dict(Winner(
                key, config_for(key), scale * (0.01 + 1e-5 * i), 123.4, "bench-kernel", f"GPU {arch}", 132,
                "560.35", "12.6", "3.6.0", "2.11.0", "bench-host", measured + timedelta(seconds=i), None)))
    return {"format": "flashtune-winners", "format_version": 1, "exported_at": measured.isoformat(),
            "producer": {"flashtune": "bench", "schema_version": 1, "python": platform.python_version(),
                         "sqlalchemy": sqlalchemy.__version__, "pydantic": "2", "host": "bench"},
            "filters": {}, "winners": winners[:n_winners]}


def _child_env() -> dict[str, str]:
    """This process's environment for a child Python, the repository first on its path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}


def _run_import(url: str, path: Path, policy: str) -> dict[str, Any]:
    env = _child_env()
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", IMPORT_CHILD, url, str(path), policy], env=env, check=True,
                         capture_output=True, text=True).stdout
    return {"seconds": time.perf_counter() - t0, **json.loads(out)}


def time_import(directory: Path, n_winners: int) -> dict[str, Any]:
    """The three imports of the docstring into a fresh SQLite file, the first with a writer alongside."""
    url = f"sqlite:///{directory / 'import.db'}"
    Store.open(url).close()
    files = {}
    for name, scale in (("first", 1.0), ("faster", 0.5)):
        files[name] = directory / f"{name}.json"
        files[name].write_text(json.dumps(import_document(n_winners, scale), indent=1))  # as `export` writes it
    env = _child_env()
    stop = directory / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER_CHILD, url, str(stop)], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    writer.stdout.readline()  # "ready": the writer holds its run and commits in a loop
    first = _run_import(url, files["first"], "faster")
    stop.touch()
    concurrent = json.loads(writer.communicate(timeout=60)[0])
    again = _run_import(url, files["first"], "faster")
    faster = _run_import(url, files["faster"], "faster")
    return {"winners": n_winners, "file_mb": files["first"].stat().st_size / 2**20,
            "into_empty": first, "same_file_again": again, "all_faster": faster,
            "writer_during_first": concurrent}


def time_load_fresh_process(url: str, arch: str, repeat: int) -> dict[str, Any]:
    env = _child_env()
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
    parser = arguments(__doc__, whole_doc=True, out="optional", out_default=ROOT / "bench" / "results" / "cpu",
                       out_help="results directory (default bench/results/cpu: the benchmark needs no GPU)")
    parser.add_argument("--winners", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=1_000_000)
    parser.add_argument("--arch", default="sm_90", help="the arch whose winners are loaded")
    parser.add_argument("--repeat", type=int, default=15, help="fresh processes for the load timing")
    parser.add_argument("--inserts", type=int, default=3000, help="single-commit trial inserts to time")
    parser.add_argument("--import-winners", type=int, default=60_000, help="winners in the import benchmark's file")
    parser.add_argument("--db", type=Path, default=None, help="where to build the database (default: a temp dir)")
    parser.add_argument("--recorded-keys", type=int, default=200_000, help="recorded keys in the recorded part")
    parser.add_argument("--only-recorded", action="store_true", help="run the recorded-keys part alone")
    args = parser.parse_args(argv)
    recorded_ok = recorded_main(out_dir(args.out), args.recorded_keys)
    if args.only_recorded:
        return 0 if recorded_ok else 1

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
        imports = time_import(Path(tmp), args.import_winners)

    result = {
        "benchmark": "db", **provenance(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "sqlite": sqlite3.sqlite_version,
                    "sqlalchemy": sqlalchemy.__version__},
        "database": built,
        "load_one_arch_fresh_process": {"arch": args.arch, **fresh},
        "load_one_arch_in_process": {"arch": args.arch, **warm},
        "load_all_archs_in_process": every,
        "trial_inserts_single_commit": inserts,
        "import": imports,
        "targets": {"load_ms": LOAD_TARGET_MS, "inserts_per_s": INSERT_TARGET_PER_S,
                    "import_s": IMPORT_TARGET_S, "import_peak_mb": IMPORT_TARGET_MB},
        "pass": {"load": fresh["median_ms"] <= LOAD_TARGET_MS,
                 "inserts": inserts["per_second"] >= INSERT_TARGET_PER_S,
                 "import": all(imports[k]["seconds"] <= IMPORT_TARGET_S and imports[k]["peak_rss_mb"] < IMPORT_TARGET_MB
                               for k in ("into_empty", "same_file_again", "all_faster"))
                 and imports["writer_during_first"]["refused"] is None},
    }
    out_file = write_json(out_dir(args.out) / "db_bench.json", result)

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
        *((f"import {imports['winners']:,} winners ({name})",
           f"{imports[part]['seconds']:.1f} s, peak {imports[part]['peak_rss_mb']:.0f} MB "
           f"(read+validate {imports[part]['read_validate_s']:.1f} s, merge {imports[part]['merge_s']:.1f} s)",
           f"target <= {IMPORT_TARGET_S:.0f} s, < {IMPORT_TARGET_MB:.0f} MB")
          for part, name in (("into_empty", "all added"), ("same_file_again", "all kept"),
                             ("all_faster", "all replaced"))),
        ("tuner writing during the first import",
         f"{imports['writer_during_first']['trials']} trials, slowest commit "
         f"{imports['writer_during_first']['slowest_commit_s'] * 1e3:.0f} ms, "
         f"refused: {imports['writer_during_first']['refused'] or 'never'}",
         f"import: {'PASS' if result['pass']['import'] else 'FAIL'}"),
    ]
    print(f"results: {out_file}")
    print_table(["what", "measured", "target"], rows)
    return 0 if all(result["pass"].values()) and recorded_ok else 1


if __name__ == "__main__":
    sys.exit(main())
