"""The `tune` command: --dry-run, bad input, and a whole run on a stand-in GPU with a cost-model bench."""
from __future__ import annotations

import dataclasses

import json

import pytest
import torch
from click.testing import CliRunner

import flashtune.tuner.gpu
import flashtune.tuner.worker
from flashtune.db.store import Store
from flashtune.db.types import Config
from flashtune.tuner.cli import main
from flashtune.tuner.gpu import GpuInfo
from flashtune.tuner.measure import FunctionBench

H200 = GpuInfo("NVIDIA H200 (stand-in)", "sm_90", 132, 232448, "570.0", "12.8", "3.6.0", "2.11", "host", True)


def run(*args: str):
    return CliRunner().invoke(main, ["tune", *args])


def dry(arch: str) -> dict:
    result = run("--dry-run", "--arch", arch, "--head-dim", "64,128", "--dtype", "fp16,bf16", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_dry_run_lists_only_configs_that_fit_and_sm90_keeps_more():
    sm86, sm90 = dry("sm_86"), dry("sm_90")
    assert sm86["smem_limit"] == 99 * 1024 and sm90["smem_limit"] == 227 * 1024
    assert sm86["keys"] == 6 * 2 * 2 * 2
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
    (["--seq", "0..8"], "at least 1"),
    (["--seq", "4096..128"], "reversed range"),
    (["--seq", "128..x"], "malformed"),
    (["--head-dim", "65"], "unsupported head dim 65"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--budget", "0"], "--budget"),
    (["--budget", "-1m"], "above zero"),
    (["--batch-heads", "0"], "--batch-heads"),
    (["--arch", "sm_91"], "unknown arch"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    result = run("--dry-run", "--arch", "sm_90", *args) if "--arch" not in args else run("--dry-run", *args)
    assert result.exit_code == 2
    assert needle in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_no_gpu_without_dry_run(tmp_path):
    result = run("--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.exit_code == 2 and "no CUDA GPU" in result.output
    assert not (tmp_path / "x.db").exists()


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """The GPU detection answers for an H200 and the bench is a cost model: no GPU is needed."""
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: H200)
    best = Config(128, 64, 4, 2)

    def cost(key, config, careful):
        return key.seq_len / 100 * (1 + abs(config.block_m - best.block_m) / 64 + abs(config.block_n - best.block_n) / 64
                                    + abs(config.num_warps - best.num_warps) / 4 + abs(config.num_stages - 2) / 4)

    monkeypatch.setattr(flashtune.tuner.worker, "WorkerBench", lambda *a, **kw: FunctionBench(cost))
    return best


def test_arch_other_than_the_gpu_is_an_error(stand_in_gpu, tmp_path):
    result = run("--arch", "sm_86", "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.exit_code == 2 and "sm_86" in result.output and "sm_90" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("where", ["postgresql", "sqlite", "mysql", "unknown-driver"])
def test_unreachable_db_is_one_line_and_exit_2(stand_in_gpu, tmp_path, where):
    (tmp_path / "a-file").write_text("not a directory")
    url = {"postgresql": "postgresql+psycopg://nobody@127.0.0.1:1/none",
           "sqlite": f"sqlite:///{tmp_path / 'a-file' / 'x.db'}",
           "mysql": "mysql://u@h/d",
           "unknown-driver": "postgresql+nodriver://u@h/d"}[where]
    result = run("--db", url, "--seq", "128")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def test_tune_stores_winners_and_resumes(stand_in_gpu, tmp_path):
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    args = ["--arch", "sm_90", "--seq", "128..256", "--head-dim", "64", "--dtype", "fp16", "--no-causal",
            "--db", url, "--json"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output[first.output.index("{"):])
    assert summary["status"] == "done" and [k["seq_len"] for k in summary["keys"]] == [128, 256]
    assert all(k["winner"] == str(stand_in_gpu) and k["complete"] and k["speedup"] >= 1 for k in summary["keys"])
    with Store.open(url) as store:
        assert {str(w.config) for w in store.winners("sm_90")} == {str(stand_in_gpu)}
        count = len(store.trials())
    second = run(*args)
    again = json.loads(second.output[second.output.index("{"):])
    assert all(k["new_trials"] == 0 and k["skipped"] > 0 for k in again["keys"])
    with Store.open(url) as store:
        assert len(store.trials()) == count
    table = run(*args[:-1])
    assert "geomean speed-up" in table.output and str(stand_in_gpu) in table.output


def test_gpu_of_an_unknown_arch_is_one_line_and_exit_2(stand_in_gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(flashtune.tuner.gpu, "detect_gpu", lambda index=0: dataclasses.replace(H200, name="Future GPU",
                                                                                     arch="sm_103"))
    result = run("--db", f"sqlite:///{tmp_path / 'x.db'}", "--seq", "128")
    assert result.exit_code == 2 and "sm_103" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x.db").exists()
