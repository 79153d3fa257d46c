"""The `flashtune` command line. Each command group lives in its own module and registers here.

Commands import torch and triton lazily, inside their bodies, so that `flashtune show` or
`flashtune export` on a machine that only holds the database stays quick.
"""
from __future__ import annotations

import click

from . import bench as cli_bench, db as cli_db, tune as cli_tune


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashtune")
def main() -> None:
    """flashtune: a tuned FlashAttention kernel and its per-GPU config database."""


cli_tune.register(main)
cli_db.register(main)
cli_bench.register(main)


def tune_main() -> None:
    """Entry point of the short `tune` command (same as `flashtune tune`)."""
    main.main(args=["tune", *__import__("sys").argv[1:]], prog_name="tune")


if __name__ == "__main__":
    main()
