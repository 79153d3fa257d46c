"""Ctrl-C during a tuning run: the first asks the run to stop after the trials in flight, a second
aborts at once. Either way every trial measured so far is stored, and the same command resumes.
The single-GPU run and the fleet run (one thread per GPU) both stop this way."""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import click


class StopRequest:
    """Whether the run was asked to stop (by Ctrl-C, or by a fleet thread that failed); calling it
    answers, as the tuning loop's `should_stop`."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


@contextmanager
def stop_on_ctrl_c(in_flight: str) -> Iterator[StopRequest]:
    """While inside, the first Ctrl-C sets the request it yields and says on stderr that the run stops
    after `in_flight`; a second one aborts: a line on stderr and exit code 130."""
    stop = StopRequest()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        click.echo(f"\nstopping after {in_flight} (Ctrl-C again to abort now)", err=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    except KeyboardInterrupt:
        click.echo("aborted; the trials measured so far are stored: run the same command again to resume", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
