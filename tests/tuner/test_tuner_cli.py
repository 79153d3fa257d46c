"""The `tune` command: --dry-run, bad input, and whole runs through the real spawned benchmark worker.

This machine has no GPU: the tests that get past the GPU check answer the GPU detection with a
stand-in (the only thing stubbed). The benchmark worker is the real one: a spawned process that runs
LocalBench on the CPU under the Triton interpreter (conftest sets TRITON_INTERPRET=1; the child
inherits it), on a tiny key whose space the stand-in's small shared memory keeps to a few configs.
"""
from __future__ import annotations

import dataclasses
import json
import sqlite3

import pytest
import torch
from click.testing import CliRunner

import flashtune.tuner.gpu

from flashtune.db.store import Store
from flashtune.db.types import Key
from flashtune.tuner.cli import main
from flashtune.tuner.gpu import planned_gpu
from helpers.cli import one_line_error

# A GPU of a known arch whose 8 KB of shared memory leaves one config of the D=16 fp32 space, plus
# the default: a tune of one key is two trials, about ten seconds in the interpreter.
STAND_IN = dataclasses.replace(planned_gpu("sm_80"), name="CPU stand-in (interpreter)", sm_count=1,
                               smem_limit=8192, present=True)
TINY = ["--seq", "16", "--head-dim", "16", "--dtype", "fp32", "--no-causal", "--batch-heads", "1"]


def run(*args: str):
    return CliRunner().invoke(main, ["tune", *args])




def dry(arch: str) -> dict:
    result = run("--dry-run", "--arch", arch, "--head-dim", "64,128", "--dtype", "fp16,bf16", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_dry_run_lists_only_configs_that_fit_and_sm90_keeps_more():
    sm86, sm90 = dry("sm_86"), dry("sm_90")
    assert sm86["smem_limit"] == 99 * 1024 and sm90["smem_limit"] == 227 * 1024
    assert sm86["keys"] == 6 * 2 * 2 * 2 * 3  # N × D × dtype × causal × the default buckets 16, 64, 256
    assert sm86["providers"] == ["m16-n16-w1-s1+{\"provider\":\"sdpa_cudnn\"}",
                                 "m16-n16-w1-s1+{\"provider\":\"sdpa_flash\"}",
                                 "m16-n16-w1-s1+{\"provider\":\"sdpa_efficient\"}"]
    for small, big in zip(sm86["groups"], sm90["groups"]):
        assert small["configs"] and all(c["smem"] <= 99 * 1024 for c in small["configs"])
        assert any(c["smem"] > 99 * 1024 for c in big["configs"])
        assert {c["config"] for c in small["configs"]} < {c["config"] for c in big["configs"]}
        assert small["dropped_smem"] > big["dropped_smem"]


def test_dry_run_table_for_people():
    result = run("--dry-run", "--arch", "sm_86", "--head-dim", "64", "--dtype", "fp16")
    assert result.exit_code == 0
    assert "99 KB" in result.output and "m128-n64-w4-s2" in result.output


@pytest.mark.parametrize("args, needle", [
    (["--seq", "0..8"], "--seq: bad sequence length '0' in '0..8': lengths must be at least 1"),
    (["--seq", "4096..128"], "--seq: reversed range"),
    (["--seq", "128..x"], "--seq: malformed"),
    (["--seq", str(2**31)], f"--seq: sequence length '{2**31}' is above the limit of 2147483647"),
    (["--seq", "128.." + "9" * 5000], "--seq: sequence length '999999999999999999999999...'"),
    (["--head-dim", "65"], "--head-dim: unsupported head dim 65"),
    (["--head-dim", str(10**30)], "--head-dim: unsupported head dim '1" + "0" * 23 + "...'"),
    (["--dtype", "fp4"], "--dtype: unknown dtype 'fp4'"),
    (["--dtype", "fp8", "--op", "bwd"], "--dtype fp8: fp8 keys are plain forward keys"),
    (["--budget", "0"], "--budget: duration '0' must be above zero"),
    (["--budget", "-1m"], "--budget: duration '-1m' must be above zero"),
    (["--batch-heads", "0"], "--batch-heads: bad B·Hq bucket '0': buckets must be at least 1"),
    (["--batch-heads", "16..256:16"], "--batch-heads: 48 is not a bucket: B·Hq buckets are powers of two"),
    (["--batch-heads", "x"], "--batch-heads: malformed B·Hq buckets 'x'"),
    (["--group", "0"], "--group: '0' is out of range: expected a whole number from 1 to 65536"),
    (["--group", "2,x"], "--group: expected a whole number from 1 to 65536, got 'x'"),
    (["--group", "32", "--batch-heads", "16"], "--group: every group (32) is larger than every B·Hq bucket (16)"),
    (["--compile-threads", "x"], "--compile-threads: expected a whole number"),
    (["--trial-timeout", "1e400s"], "--trial-timeout: malformed duration"),
    (["--trial-timeout", "9" * 400 + "s"], "--trial-timeout: duration '999999999999999999999999...' is longer than a year"),
    (["--arch", "sm_91"], "--arch: unknown arch 'sm_91'"),
])
def test_bad_input_is_one_line_naming_the_option(args, needle):
    result = run("--dry-run", "--arch", "sm_90", *args) if "--arch" not in args else run("--dry-run", *args)
    assert needle in one_line_error(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_no_gpu_without_dry_run(tmp_path):
    result = run("--db", f"sqlite:///{tmp_path / 'x.db'}")
    one_line_error(result, "no CUDA GPU")
    assert not (tmp_path / "x.db").exists()


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """The GPU detection answers for STAND_IN; everything else (worker, harness, store) is real."""
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: STAND_IN)
    return STAND_IN


def test_arch_other_than_the_gpu_is_an_error(stand_in_gpu, tmp_path):
    result = run("--arch", "sm_90", "--db", f"sqlite:///{tmp_path / 'x.db'}")
    one_line_error(result, "--arch sm_90", "sm_80")
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("where, message", [
    ("postgresql", "database postgresql+psycopg://nobody@127.0.0.1:1/none is unreachable"),
    ("sqlite", "database sqlite:///{tmp}/a-file/x.db: cannot create directory {tmp}/a-file"),
    ("mysql", "unsupported database URL 'mysql://u@h/d'"),
    ("unknown-driver", "unsupported database URL 'postgresql+nodriver://u@h/d'"),
])
def test_unusable_db_is_one_line_naming_it(stand_in_gpu, tmp_path, where, message):
    (tmp_path / "a-file").write_text("not a directory")
    url = {"postgresql": "postgresql+psycopg://nobody@127.0.0.1:1/none",
           "sqlite": f"sqlite:///{tmp_path / 'a-file' / 'x.db'}",
           "mysql": "mysql://u@h/d",
           "unknown-driver": "postgresql+nodriver://u@h/d"}[where]
    line = one_line_error(run("--db", url, *TINY))
    assert line.startswith("Error: " + message.format(tmp=tmp_path)), line
    assert (tmp_path / "a-file").read_text() == "not a directory"


def test_gpu_of_an_unknown_arch_is_one_line_and_exit_2(monkeypatch, tmp_path):
    future = dataclasses.replace(STAND_IN, name="Future GPU", arch="sm_103")
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: future)
    one_line_error(run("--db", f"sqlite:///{tmp_path / 'x.db'}", *TINY), "Future GPU is sm_103")
    assert not (tmp_path / "x.db").exists()


def test_tune_through_the_real_worker_stores_the_winner_and_resumes(stand_in_gpu, tmp_path):
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    first = CliRunner().invoke(main, ["tune", *TINY, "--db", url, "--json"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["status"] == "done" and summary["worker_restarts"] == 0
    [key] = summary["keys"]
    assert key["key"] == "sm_80/fwd/N=16/D=16/float32/full/BH=1" and key["complete"] and key["winner_stored"]
    assert key["batch_heads"] == 1 and key["group"] == 1
    # The kernel configs and torch SDPA's backends: on the CPU only the flash backend runs (cuDNN and
    # efficient refuse: compile_error trials); the interpreter's results are right.
    assert key["new_trials"] >= 5 and key["outcomes"] == {"ok": key["new_trials"] - 2, "compile_error": 2}
    assert key["provider"] in ("kernel", "sdpa_flash") and key["kernel_config"] is not None
    assert "[1/1] sm_80/fwd/N=16/D=16/float32/full/BH=1" in first.stderr and "ETA" in first.stderr  # log progress
    with Store.open(url, create=False) as store:
        [winner] = store.winners("sm_80")
        assert str(winner.config) == key["winner"] and winner.gpu_name == STAND_IN.name
        trials = store.trials()
    # The reported times and speed-up are the stored trials': the default's time over the winner's.
    by_config = {str(t.config): t for t in trials}
    default_ms, winner_ms = by_config[key["default"]].median_ms, by_config[key["winner"]].median_ms
    assert key["default_ms"] == default_ms and key["median_ms"] == winner_ms == winner.median_ms > 0
    assert key["speedup"] == pytest.approx(default_ms / winner_ms, rel=1e-9)
    # The careful pass's noise (the default timed twice, at least the 1 % floor), per key.
    assert isinstance(key["noise"], float) and key["noise"] >= 0.01
    assert key["shrunk_from"] is None and key["bench_batch_heads"] == 1
    if key["default_won"]:
        assert key["winner"] == key["default"] and key["speedup"] == 1.0
    else:  # a candidate wins only by beating the default by more than the measured noise
        assert key["noise"] >= 0.01 and winner_ms * (1 + key["noise"]) < default_ms
    assert len(trials) == key["new_trials"]
    with sqlite3.connect(tmp_path / "tune.db") as raw:
        assert raw.execute("SELECT status FROM flashtune_runs").fetchall() == [("done",)]
    again = CliRunner().invoke(main, ["tune", *TINY, "--db", url, "--json"])
    resumed = json.loads(again.stdout)["keys"][0]
    assert resumed["new_trials"] == 0 and resumed["skipped"] == key["new_trials"] and resumed["complete"]
    with Store.open(url, create=False) as store:
        assert len(store.trials()) == len(trials)
    table = run(*TINY, "--db", url)
    assert table.exit_code == 0
    shown = "default" if key["default_won"] else key["winner"] if key["provider"] == "kernel" else key["provider"]
    assert "geomean speed-up over the default config: " in table.stdout and shown in table.stdout
    assert "noise" in table.stdout.splitlines()[0]


def test_kernel_only_times_no_sdpa_backend(stand_in_gpu, tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    result = CliRunner().invoke(main, ["tune", *TINY, "--kernel-only", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    [key] = json.loads(result.stdout)["keys"]
    assert key["provider"] == "kernel" and key["outcomes"] == {"ok": key["new_trials"]}
    with Store.open(url, create=False) as store:
        assert all("provider" not in t.config.extra_dict for t in store.trials())


def record(url: str, counts: dict) -> None:
    with Store.open(url) as store:
        store.add_recorded(counts)


def tiny_key(arch: str = "sm_80", bh: int = 1, n: int = 16) -> Key:
    return Key(arch, "fwd", n, 16, "float32", False, batch_heads=bh)


def test_recorded_dry_run_plans_the_recorded_keys_without_a_gpu(tmp_path):
    url = f"sqlite:///{tmp_path / 'rec.db'}"
    gqa = Key("sm_90", "fwd", 4096, 128, "bfloat16", True, batch_heads=32, group=4)
    record(url, {gqa: 5, Key("sm_90", "fwd", 1024, 64, "float16", False, batch_heads=256): 40,
                 tiny_key("sm_80"): 100})
    result = run("--recorded", "--dry-run", "--arch", "sm_90", "--db", url, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [r["key"] for r in plan["recorded"]] == ["sm_90/fwd/N=1024/D=64/float16/full/BH=256", str(gqa)]
    assert plan["recorded"][1]["batch_heads"] == 32 and plan["recorded"][1]["group"] == 4
    assert all(r["kernel_configs"] > 0 and r["providers"] == 3 for r in plan["recorded"])
    assert "skipping 1 recorded key(s) not for sm_90: sm_80/" in result.stderr
    one_line_error(run("--recorded", "--dry-run", "--db", url), "--recorded --dry-run: give --arch")
    one_line_error(run("--recorded", "--dry-run", "--arch", "sm_86", "--db", url),
                   "--recorded: no recorded sm_86 keys")
    fwd_only = run("--recorded", "--op", "fwd", "--dry-run", "--arch", "sm_80", "--db", url, "--json")
    assert "skipping 2 recorded key(s) not for sm_80 fwd" in fwd_only.stderr


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_tune_recorded_tunes_exactly_the_recorded_keys_most_called_first(stand_in_gpu, tmp_path, request, backend):
    url = f"sqlite:///{tmp_path / 'rec.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    record(url, {tiny_key(bh=1): 3, tiny_key(bh=2): 9, tiny_key("sm_90", bh=2): 50})
    result = CliRunner().invoke(main, ["tune", "--recorded", "--kernel-only", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # The most-called first; the sm_90 key is not for this GPU: skipped with a note.
    assert [k["key"] for k in summary["keys"]] == [str(tiny_key(bh=2)), str(tiny_key(bh=1))]
    assert [k["bench_batch_heads"] for k in summary["keys"]] == [2, 1]
    assert summary["keys"][1]["narrowed"]  # the sibling bucket timed the first one's top configs
    assert "skipping 1 recorded key(s) not for sm_80" in result.stderr
    with Store.open(url, create=False) as store:
        assert {w.key for w in store.winners("sm_80")} == {tiny_key(bh=1), tiny_key(bh=2)}


def test_dry_run_lists_the_tma_and_gluon_variants_on_sm90_only() -> None:
    from click.testing import CliRunner

    from flashtune.tuner.cli import main as cli_main

    hopper = CliRunner().invoke(cli_main, ["tune", "--dry-run", "--arch", "sm_90", "--seq", "1024", "--head-dim",
                                           "128", "--dtype", "fp16", "--json"])
    assert hopper.exit_code == 0, hopper.output
    [group] = json.loads(hopper.stdout)["groups"]
    loads = {json.loads(v["config"].split("+", 1)[1])["loads"] for v in group["variants"]}
    assert loads <= {"tma", "gluon"} and "tma" in loads
    assert all(v["smem"] <= 227 * 1024 for v in group["variants"])
    ampere = CliRunner().invoke(cli_main, ["tune", "--dry-run", "--arch", "sm_86", "--seq", "1024", "--head-dim",
                                           "128", "--dtype", "fp16", "--json"])
    assert ampere.exit_code == 0 and json.loads(ampere.stdout)["groups"][0]["variants"] == []
