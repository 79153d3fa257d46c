"""What the command-line tests share."""
from __future__ import annotations

from click.testing import Result


def assert_usage_error(result: Result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def one_line_error(result: Result, *needles: str) -> str:
    """The single `Error: ...` line of a command that exited with code 2 (output and errors together), holding
    every one of `needles`."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
