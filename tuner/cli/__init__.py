"""The `flashtune` command line. Each command lives in its own module and registers here; what they
share (the error, option types, causal options, table, progress bar) is in `common`.

Commands import torch and triton lazily, inside their bodies, so that `flashtune show` or
`flashtune export` on a machine that only holds the database stays quick.
"""
from __future__ import annotations

import click

from . import bench as cli_bench, db as cli_db, doctor as cli_doctor, plot as cli_plot, profile as cli_profile
from . import jobs as cli_jobs, tune as cli_tune
from .common import one_line_warnings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashtune")
@click.pass_context
def main(ctx: click.Context) -> None:
    """flashtune: a tuned FlashAttention kernel and its per-GPU config database."""
    ctx.with_resource(one_line_warnings())


for _module in (cli_tune, cli_db, cli_jobs, cli_bench, cli_plot, cli_profile, cli_doctor):
    _module.register(main)


def tune_main() -> None:
    """Entry point of the short `tune` command: the `tune` command itself, so that its usage line
    and `--version` read as `tune`'s (same as `flashtune tune`)."""
    with one_line_warnings():
        cli_tune.tune.main(prog_name="tune")


if __name__ == "__main__":
    main()
