"""What every command shares: the error, the option types and decorators, the table and the progress bar.

One convention for all commands: `--seq` (A..B doubles, A..B:S steps, comma lists; one length where
a command is about one key), `--head-dim`, `--dtype`, `--causal/--no-causal/--both`, `--db URL`,
`--json`. A bad value is one line naming the option (`--seq: ...`) and exit code 2, raised from the
option types here, so no command body sees unparsed text. This module imports neither torch nor
triton: `flashtune show` must stay quick on a machine that only holds the database.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO, TypeVar

import click

from ...db.arch import normalize_arch
from ...db.errors import StoreError, one_line
from ...db.text import printable
from ...db.types import DTYPES, HEAD_DIMS_TEXT, normalize_dtype, normalize_op

from ..ranges import (INT32_MAX, MAX_SEQ_LEN, SEQ_FORMS, parse_dtypes, parse_duration, parse_float, parse_head_dim,
                      parse_head_dims, parse_int, parse_seq_len, parse_seq_lens)

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """Bad input or an unusable database: one line on stderr, exit code 2."""

    exit_code = 2

    def __init__(self, message: object) -> None:
        super().__init__(printable(one_line(message)))


def echo(text: object, *, err: bool = False) -> None:
    """Print one line with every non-printable character escaped (`db.text.printable`): text from the
    database or the command line never reaches the terminal raw (no escape sequences, no forged lines)."""
    click.echo(printable(text), err=err)


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    text = one_line(message)
    echo(text if text.startswith("flashtune:") else f"flashtune: warning: {text}", err=True)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within: each warning (damaged rows, a failed write) is one escaped line on stderr, not Python's
    `file:line` and source line."""
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        yield


def handle_errors(func: F) -> F:
    """Turn the store's errors and the library's ValueErrors (a bad file, URL or filter) into CliError."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (StoreError, ValueError, TypeError) as error:
            raise CliError(error) from None
    return wrapper  # type: ignore[return-value]


# --- option values -----------------------------------------------------------------------------

def parse_option(func: Callable[[str], Any], text: str, option: str) -> Any:
    """`func(text)`, its ValueError turned into the CLI's one-line error naming `option`."""
    try:
        return func(text)
    except ValueError as error:
        raise CliError(f"{option}: {error}") from None


def option_name(param: click.Parameter | None) -> str:
    """How a parameter is spelled on the command line: its long option ('--seq'), or its metavar."""
    if param is None:
        return "value"
    longs = [o for o in param.opts if o.startswith("--")] or list(param.opts)
    return longs[0] if longs and longs[0].startswith("-") else param.human_readable_name


class Parsed(click.ParamType):
    """An option whose text `func` parses; a ValueError becomes one line naming the option (exit 2),
    not click's usage screen."""

    def __init__(self, func: Callable[[str], Any], metavar: str) -> None:
        self.func, self.name = func, metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (list, tuple)):  # a default that is already parsed
            return value
        return parse_option(self.func, str(value), option_name(param))


def count(lo: int = 1, hi: int = INT32_MAX) -> Parsed:
    """A whole number from `lo` to `hi` (default: at least 1, within int32)."""
    return Parsed(lambda text: parse_int(text, lo, hi), "N")


def number(lo: float, hi: float = math.inf, *, low_open: bool = False) -> Parsed:
    """A finite number from `lo` (excluded when `low_open`) to `hi`."""
    return Parsed(lambda text: parse_float(text, lo, hi, low_open=low_open), "X")


SEQ_LENS = Parsed(parse_seq_lens, "RANGE")
SEQ_LEN = Parsed(parse_seq_len, "N")
HEAD_DIM_LIST = Parsed(parse_head_dims, "D[,D...]")
HEAD_DIM = Parsed(parse_head_dim, "D")
DTYPE_LIST = Parsed(parse_dtypes, "DTYPE[,DTYPE...]")
DTYPE = Parsed(normalize_dtype, "DTYPE")
ARCH = Parsed(normalize_arch, "sm_XY")
OP = Parsed(normalize_op, "fwd|bwd")
DURATION = Parsed(parse_duration, "TIME")

SEQ_HELP = f"Sequence lengths: {SEQ_FORMS}; each at most {MAX_SEQ_LEN}."
HEAD_DIM_HELP = f"Head dims, a comma list, each {HEAD_DIMS_TEXT} (e.g. 64,128)."
DTYPE_HELP = f"Dtypes, a comma list of {', '.join(DTYPES)} (or fp16, bf16, fp32, fp8)."


def _attach(func: F, *decorators: Callable[[F], F]) -> F:
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def db_option(func: F) -> F:
    """`--db URL`: which database the command reads or writes."""
    return click.option("--db", "db_url", metavar="URL", default=None,
                        help="Database URL (default: $FLASHTUNE_DB, else the per-user SQLite file that "
                             "`flashtune db path` prints).")(func)


def json_option(func: F) -> F:
    """`--json`: machine-readable output on stdout instead of the table."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of the table.")(func)


CAUSAL_MODES: dict[str, tuple[bool, ...]] = {"causal": (True,), "no-causal": (False,), "both": (False, True)}


def causal_option(*, default: str = "both", one_key: bool = False) -> Callable[[F], F]:
    """`--causal / --no-causal / --both`, passed to the command as `causal`.

    A command over many keys gets the tuple of masks to cover. A command about one key or shape
    (`one_key=True`) gets one bool, and `--both` is refused there with one line.
    """
    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, causal: str, **kwargs: Any) -> Any:
            mode = causal if causal in CAUSAL_MODES else default
            if not one_key:
                return func(*args, causal=CAUSAL_MODES[mode], **kwargs)
            if mode == "both":
                raise CliError("--both: this command is about one shape; give --causal or --no-causal")
            return func(*args, causal=mode == "causal", **kwargs)

        helps = {"causal": "Causal attention only.", "no-causal": "Non-causal attention only.",
                 "both": "Causal and non-causal."}
        options = [click.option(f"--{mode}", "causal", flag_value=mode, default=mode == default,
                                help=helps[mode] + (" (default)" if mode == default else ""))
                   for mode in CAUSAL_MODES]
        return _attach(wrapper, *options)  # type: ignore[arg-type]
    return decorate


def key_options(*, many: bool, seq_default: str | None = None, head_dim_default: str | None = None,
                dtype_default: str | None = None, causal_default: str = "both") -> Callable[[F], F]:
    """`--seq`, `--head-dim`, `--dtype` and the causal options: lists for a sweep (`many`), else one value
    each for a command about one key or shape (whose `causal_default` is then not 'both')."""
    def decorate(func: F) -> F:
        return _attach(
            func,
            click.option("--seq", "seq", type=SEQ_LENS if many else SEQ_LEN, default=seq_default,
                         show_default=seq_default is not None,
                         help=SEQ_HELP if many else f"Sequence length N (at most {MAX_SEQ_LEN})."),
            click.option("--head-dim", "head_dim", type=HEAD_DIM_LIST if many else HEAD_DIM,
                         default=head_dim_default, show_default=head_dim_default is not None,
                         help=HEAD_DIM_HELP if many else "Head dim D."),
            click.option("--dtype", "dtype", type=DTYPE_LIST if many else DTYPE, default=dtype_default,
                         show_default=dtype_default is not None,
                         help=DTYPE_HELP if many else "Dtype: fp16, bf16 or fp32."),
            causal_option(default=causal_default, one_key=not many),
        )
    return decorate


# --- output ------------------------------------------------------------------------------------

def fmt_num(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or '-' when it is missing."""
    return "-" if value is None else format(value, spec)


def geomean(values: Iterable[float]) -> float | None:
    """The geometric mean of positive values; None for none."""
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def echo_json(data: Any) -> None:
    """`data` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=1))


def echo_json_array(records: Iterable[Mapping[str, Any]]) -> None:
    """The records (dicts) as one indented JSON array on stdout, exactly as `echo_json(list(records))`
    writes it, written a thousand at a time: a listing of any length never holds its text whole."""
    chunk: list[str] = []
    count = 0
    for record in records:
        chunk.append(("[\n " if count == 0 else ",\n ") + _indented_record(record))
        count += 1
        if len(chunk) == 1000:
            click.echo("".join(chunk), nl=False)
            chunk = []
    click.echo("".join(chunk) + ("\n]" if count else "[]"))


def _indented_record(record: Mapping[str, Any]) -> str:
    """One array element as json.dumps(indent=1) nests it. A record of scalars goes through the C
    encoder (separators that carry the indent): the indenting encoder is pure Python, 5x slower."""
    if not record or any(isinstance(v, (dict, list, tuple)) for v in record.values()):
        return json.dumps(record, indent=1).replace("\n", "\n ")
    return "{\n  " + json.dumps(record, separators=(",\n  ", ": "))[1:-1] + "\n }"


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Iterable[str] = ()) -> list[str]:
    """A plain-text table: a header, a rule, the rows. Columns are as wide as their widest cell,
    numbers named in `right` right-aligned; the last column is not padded (it holds free text)."""
    aligned = set(right)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), ["-" * w for w in widths], *rows]:
        cells = [c.rjust(w) if h in aligned else c.ljust(w) for h, c, w in zip(headers, row, widths)]
        lines.append("  ".join(cells).rstrip())
    return lines


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Iterable[str] = (),
               title: str | None = None) -> None:
    """Print `table_lines(...)` on stdout, after `title` when given."""
    if title:
        echo(title)
    for line in table_lines(headers, [[printable(cell) for cell in row] for row in rows], right=right):
        echo(line)


def fmt_seconds(seconds: float) -> str:
    """'42s' or '3m07s'."""
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Progress on stderr: a bar with an ETA on a terminal; otherwise (a log, a pipe) one line per
    finished item with the elapsed time and the ETA.

    `total` counts units of work (trials, shapes); `items` the things the log lines report (keys,
    shapes), when known.
    """

    def __init__(self, label: str, total: int, *, items: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.items = label, max(total, 1), items
        self.done = 0
        self.finished_items = 0
        self._clock = clock
        self._started = clock()
        self._bar: Any = None
        if sys.stderr.isatty():
            self._bar = click.progressbar(length=self.total, label=label, file=sys.stderr, show_eta=True,
                                          show_pos=True)
            self._bar.__enter__()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def eta(self) -> str:
        """The time left at the average rate so far, or '?' before the first unit."""
        if not self.done:
            return "?"
        elapsed = self._clock() - self._started
        return fmt_seconds(elapsed / self.done * max(self.total - self.done, 0))

    def advance(self, n: int = 1, what: str | None = None) -> None:
        """`n` more units done; `what` is shown beside the bar."""
        self.done += n
        if self._bar is not None:
            if what is not None:
                self._bar.label = what
            self._bar.update(n)

    def item_done(self, text: str) -> None:
        """One item finished: a line in a log (the bar already shows it on a terminal)."""
        self.finished_items += 1
        if self._bar is None:
            count_text = f"{self.finished_items}/{self.items}" if self.items else str(self.finished_items)
            click.echo(f"[{count_text}] {text}; elapsed {fmt_seconds(self._clock() - self._started)}, "
                       f"ETA {self.eta()}", err=True)

    def close(self) -> None:
        """End the bar (idempotent)."""
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
