"""`flashtune doctor`: check the setup (GPUs, versions, the database, the dispatcher, one kernel call).

Exit code 1 when a check fails, 0 otherwise (warnings included). The checks report an unusable
database as a failed check; should one raise ValueError instead (a URL it cannot parse), that is
bad input: one line, exit code 2, never a traceback.
"""
from __future__ import annotations

import sys
from dataclasses import asdict

import click

from .common import CliError, db_option, echo_json, json_option


@click.command("doctor")
@db_option
@click.option("--no-run", is_flag=True, help="Skip the test call of the kernel.")
@json_option
def doctor(db_url: str | None, no_run: bool, as_json: bool) -> None:
    """Check the setup: GPUs, versions, the database, the dispatcher and one kernel call. Exit 1 if broken."""
    from ..doctor import diagnose

    try:
        findings = diagnose(db_url, run_kernel=not no_run)
    except ValueError as error:
        raise CliError(f"--db: {error}") from None
    failed = [f for f in findings if f.level == "fail"]
    if as_json:
        echo_json({"healthy": not failed, "findings": [asdict(f) for f in findings]})
    else:
        for f in findings:
            click.echo(f"[{f.level.upper():>4}] {f.topic}: {f.message}")
        click.echo("healthy" if not failed else
                   f"{len(failed)} problem(s): " + "; ".join(f"{f.topic}: {f.message}" for f in failed))
    if failed:
        sys.exit(1)


def register(group: click.Group) -> None:
    """Add `doctor` to the CLI group."""
    group.add_command(doctor)
