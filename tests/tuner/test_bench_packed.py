"""bench/packed_bench.py: its document lengths and FLOP count, and a --smoke run of its cheap parts on the CPU."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from helpers.bench_scripts import BENCH, bench_script
from helpers.subproc import repo_env

SCRIPT = BENCH / "packed_bench.py"


@pytest.mark.parametrize(("total", "low", "high"), [(96, 5, 40), (16384, 100, 8192), (65536, 100, 8192)])
def test_document_lengths_fill_the_pack_within_bounds(total, low, high):
    bench = bench_script("packed_bench")
    lengths = bench.draw_lengths(total, low, high, seed=total)
    assert sum(lengths) == total
    assert all(low <= n < high + low for n in lengths)  # a short remainder joins the document before it
    assert len(set(lengths)) > 1  # mixed lengths
    assert lengths == bench.draw_lengths(total, low, high, seed=total)  # a fixed seed: every run, the same pack


def test_causal_flops_are_half_of_4hn2d_per_document():
    bench = bench_script("packed_bench")
    assert bench.causal_flops([100, 300], 16, 128) == 0.5 * 4 * 16 * 128 * (100 ** 2 + 300 ** 2)


def test_smoke_run_of_the_cheap_parts_writes_its_rows(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--only", "paged,prefill,encoder",
                           "--out", str(tmp_path)], check=False, capture_output=True, text=True, timeout=120,
                          env=repo_env(TRITON_INTERPRET="1"), cwd=BENCH.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "packed_bench.csv").open()))
    assert {r["part"] for r in rows} == {"paged", "prefill", "encoder"}
    assert not [r for r in rows if r["passed"] == "ERROR"], rows
    paged = [r for r in rows if r["who"].startswith("paged") and r["part"] in ("paged", "prefill")
             and "% of copy" not in r["who"]]
    assert paged and all("max |paged - contiguous| 0.0e+00" in r["note"] for r in paged)  # same arithmetic
    swapped = [r for r in rows if r["who"] == "swap_attention"]
    assert swapped and float(swapped[0]["note"].split("real tokens ")[1].split(";")[0]) < 1e-4
    summary = (tmp_path / "packed_bench.md").read_text()
    assert "## paged" in summary and "## encoder" in summary
    assert done.stdout.rstrip().splitlines()[-1].startswith("encoder")  # the tables are printed last


def test_an_unknown_part_is_named():
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--only", "paged,bogus", "--out", "/tmp/x"],
                          check=False, capture_output=True, text=True, timeout=60, env=repo_env(TRITON_INTERPRET="1"))
    assert done.returncode == 2 and "unknown part(s) bogus" in done.stderr
