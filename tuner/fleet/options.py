"""The `tune` options of fleet tuning (`--gpus`, `--job`, `--join`, `--lease`), kept here so that the
`tune` command only adds them and branches; imports neither torch nor triton."""
from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

import click

from ..cli.common import DURATION, CliError, Parsed
from .gpus import parse_gpus

F = TypeVar("F", bound=Callable[..., Any])
GPUS = Parsed(parse_gpus, "all|I[,I...]")


def fleet_options(func: F) -> F:
    """Add the fleet options; the command receives them as `gpus`, `job`, `join` and `lease_s`."""
    for option in reversed([
        click.option("--gpus", "gpus", type=GPUS, default=None,
                     help="Tune on several GPUs of this host: 'all' or a comma list of indices; one benchmark "
                          "worker per GPU, keys dealt through one claim queue in --db."),
        click.option("--job", "job", metavar="NAME", default=None,
                     help="Make the keys fleet job NAME in --db and work on it; other hosts add their GPUs "
                          "with --join NAME (PostgreSQL)."),
        click.option("--join", "join", metavar="NAME", default=None,
                     help="Work on fleet job NAME of the PostgreSQL --db: its keys, options and lease."),
        click.option("--lease", "lease_s", type=DURATION, default=None,
                     help="With --job/--gpus: a claim its worker stops renewing (killed, powered off) is taken "
                          "over after this long [default: 60s]."),
    ]):
        func = option(func)
    return func


def fleet_requested(fleet: Mapping[str, Any]) -> bool:
    """Whether any fleet option was given (then `tune` runs as a fleet, tuner.fleet.command)."""
    return any(fleet.get(name) is not None for name in ("gpus", "job", "join"))


def refuse_dry_run(fleet: Mapping[str, Any]) -> None:
    """`--dry-run` plans one arch's space without a GPU or database: no fleet options with it."""
    if fleet_requested(fleet) or fleet.get("lease_s") is not None:
        raise CliError("--dry-run plans without GPUs or a database: drop --gpus, --job, --join and --lease")
