"""What the commands share (tuner/cli/common.py): one option convention, one error line, one table, one
progress bar."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from flashtune.tuner.cli import main
from flashtune.tuner.cli.common import (SEQ_LEN, SEQ_LENS, CliError, Progress, causal_option, handle_errors,
                                        table_lines)

COMMANDS = {name: main.commands[name] for name in ("tune", "bench", "profile", "plot", "show", "export", "import",
                                                   "doctor")}


def options(command: click.Command) -> dict[str, click.Parameter]:
    return {opt: p for p in command.params for opt in p.opts if opt.startswith("--")}


@pytest.mark.parametrize("name, expected", [
    ("tune", {"--seq", "--head-dim", "--dtype", "--causal", "--no-causal", "--both", "--db", "--json"}),
    ("bench", {"--seq", "--head-dim", "--dtype", "--causal", "--no-causal", "--both", "--db", "--json",
               "--warmup-ms", "--rep-ms"}),
    ("profile", {"--seq", "--head-dim", "--dtype", "--causal", "--no-causal", "--both", "--db", "--json",
                 "--warmup-ms"}),
    ("plot", {"--seq", "--head-dim", "--dtype", "--causal", "--no-causal", "--both", "--db", "--json"}),
    ("show", {"--head-dim", "--dtype", "--causal", "--no-causal", "--both", "--db", "--json"}),
    ("import", {"--db", "--json"}),
    ("doctor", {"--db", "--json"}),
])
def test_every_command_spells_the_shared_options_alike(name, expected):
    have = options(COMMANDS[name])
    assert expected <= set(have), sorted(expected - set(have))
    if "--seq" in have:  # one parser for every --seq: ranges for sweeps, one length for one key
        assert have["--seq"].type in (SEQ_LENS, SEQ_LEN)
    assert "--warmup" not in have  # the warm-up is a time budget in ms wherever there is one


@pytest.mark.parametrize("args, line", [
    (["show", "--op", "back"], "Error: --op: unknown op 'back': expected one of fwd, bwd"),
    (["show", "--arch", "sm_1"], "Error: --arch: unknown arch 'sm_1'"),
    (["export", "--dtype", "fp64"], "Error: --dtype: unknown dtype 'fp64'"),
    (["bench", "--seq", "1..8:0"], "Error: --seq: bad step in '1..8:0': the step after ':' must be at least 1"),
    (["profile", "--seq", "0"], "Error: --seq: bad sequence length '0': lengths must be at least 1"),
    (["plot", "--heatmap", "--head-dim", "12"], "Error: --head-dim: unsupported head dim 12"),
])
def test_bad_values_are_one_line_naming_the_option(args, line):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    [got] = result.output.strip().splitlines()
    assert got.startswith(line), got


def test_causal_modes_many_keys_and_one_key():
    seen = []

    @click.command()
    @causal_option()
    def many(causal):
        seen.append(causal)

    @click.command()
    @causal_option(default="no-causal", one_key=True)
    def one(causal):
        seen.append(causal)

    runner = CliRunner()
    for args in ([], ["--causal"], ["--no-causal"], ["--both"]):
        assert runner.invoke(many, args).exit_code == 0
    for args in ([], ["--causal"], ["--no-causal"]):
        assert runner.invoke(one, args).exit_code == 0
    assert seen == [(False, True), (True,), (False,), (False, True), False, True, False]
    refused = runner.invoke(one, ["--both"])
    assert refused.exit_code == 2 and refused.output == ("Error: --both: this command is about one shape; "
                                                         "give --causal or --no-causal\n")


def test_library_errors_become_one_line_with_their_text():
    @click.command()
    @handle_errors
    def broken():
        raise ValueError("database sqlite:///x.db is corrupt\n  (opening: file is not a database)")

    result = CliRunner().invoke(broken, [])
    assert result.exit_code == 2
    assert result.output == "Error: database sqlite:///x.db is corrupt (opening: file is not a database)\n"
    assert CliError("a\nb\tc").format_message() == "a b c"


def test_table_pads_columns_and_right_aligns_numbers():
    lines = table_lines(["config", "ms", "note"], [["m128-n64-w8-s3", "0.25", "exact"], ["m64-n32-w4-s2", "12.5", ""]],
                        right=["ms"])
    assert lines == ["config            ms  note",
                     "--------------  ----  -----",
                     "m128-n64-w8-s3  0.25  exact",
                     "m64-n32-w4-s2   12.5"]


def test_progress_in_a_log_is_one_line_per_item_with_the_eta(capsys):
    now = [100.0]
    progress = Progress("bench", 4, items=2, clock=lambda: now[0])
    now[0] += 30
    progress.advance(1)
    progress.item_done("first shape")
    now[0] += 90
    progress.advance(3)
    progress.item_done("second shape")
    progress.close()
    assert capsys.readouterr().err.splitlines() == [
        "[1/2] first shape; elapsed 30s, ETA 1m30s",
        "[2/2] second shape; elapsed 2m00s, ETA 0s",
    ]
