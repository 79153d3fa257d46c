"""The benchmark's records: the shape, the result row, and their CSV file (one row per provider and
shape, wide speed-up columns).

Torch-free on purpose: `flashtune plot` reads these files on machines that only want the figures.

Columns, in order (COLUMNS): provider, batch, heads, seq_len, head_dim, dtype, causal (0/1),
median_ms, tflops, speedup_vs_<baseline> for each SDPA backend (the baseline's median time over this
row's; empty where either did not run, and on the baseline's own row), max_abs_err, rel_err (both
against an fp32 reference), peak_mem_bytes (CUDA only: the most memory the call allocated beyond
what was allocated before it, its output included), status (ok / skipped / error), note (why a row
was skipped or failed; the config the dispatcher chose for flashtune), gpu.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

from ...db.files import read_regular_file
from ...db.types import check_head_dim, normalize_dtype

from ..ranges import INT32_MAX, MAX_SEQ_LEN

TUNED = "flashtune"
BASELINES: tuple[str, ...] = ("sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
PROVIDER_NAMES: tuple[str, ...] = (TUNED, *BASELINES)
STATUSES: tuple[str, ...] = ("ok", "skipped", "error")
SPEEDUP_PREFIX = "speedup_vs_"
COLUMNS: tuple[str, ...] = (
    "provider", "batch", "heads", "seq_len", "head_dim", "dtype", "causal", "median_ms", "tflops",
    *(SPEEDUP_PREFIX + b for b in BASELINES), "max_abs_err", "rel_err", "peak_mem_bytes", "status",
    "note", "gpu",
)
_REQUIRED = tuple(c for c in COLUMNS if not c.startswith(SPEEDUP_PREFIX) and c not in ("note", "gpu"))
MAX_CSV_BYTES = 64 * 1024 * 1024  # a sweep of every shape a GPU can hold is a few hundred kB
# The largest value each whole-number column may hold: the plots take logs and products of them.
_INT_LIMITS = {"batch": INT32_MAX, "heads": INT32_MAX, "seq_len": MAX_SEQ_LEN, "head_dim": INT32_MAX,
               "peak_mem_bytes": 2**63 - 1}


@dataclass(frozen=True)
class BenchShape:
    """One benchmarked problem: (batch, heads, seq_len, head_dim) inputs of one dtype, causal or not."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str
    causal: bool

    @property
    def flops(self) -> float:
        """Forward FLOPs: 4·B·H·N²·D, half when causal."""
        from ...kernel.testing import attention_flops  # imports torch: only the benchmark needs it

        return attention_flops(self.batch * self.heads, self.seq_len, self.seq_len, self.head_dim, self.causal)

    def throughput(self, ms: float) -> float:
        """TFLOP/s of one call that took `ms` milliseconds."""
        from ...kernel.testing import tflops

        return tflops(self.flops, ms)

    def __str__(self) -> str:
        return (f"B={self.batch} H={self.heads} N={self.seq_len} D={self.head_dim} {self.dtype} "
                f"{'causal' if self.causal else 'full'}")


@dataclass(frozen=True)
class BenchRow(BenchShape):
    """One provider on one shape: its time, throughput, accuracy and memory, or why it did not run."""

    provider: str
    status: str
    median_ms: float | None = None
    tflops: float | None = None
    speedups: Mapping[str, float] = field(default_factory=dict)  # baseline name -> its ms / this ms
    max_abs_err: float | None = None
    rel_err: float | None = None
    peak_mem_bytes: int | None = None
    note: str = ""
    gpu: str = ""

    @classmethod
    def of(cls, shape: BenchShape, provider: str, status: str, **values: Any) -> "BenchRow":
        """The row of `provider` on `shape`."""
        return cls(shape.batch, shape.heads, shape.seq_len, shape.head_dim, shape.dtype, shape.causal,
                   provider, status, **values)

    @property
    def shape(self) -> BenchShape:
        """The problem this row measured."""
        return BenchShape(self.batch, self.heads, self.seq_len, self.head_dim, self.dtype, self.causal)

    @property
    def group(self) -> tuple[int, str, bool]:
        """What one figure of `flashtune plot` holds: (head_dim, dtype, causal)."""
        return self.head_dim, self.dtype, self.causal

    def to_csv(self) -> dict[str, str]:
        """The row as CSV cells (empty cells for missing values)."""
        cells = {
            "provider": self.provider, "batch": str(self.batch), "heads": str(self.heads),
            "seq_len": str(self.seq_len), "head_dim": str(self.head_dim), "dtype": self.dtype,
            "causal": "1" if self.causal else "0", "median_ms": _num(self.median_ms),
            "tflops": _num(self.tflops), "max_abs_err": _num(self.max_abs_err), "rel_err": _num(self.rel_err),
            "peak_mem_bytes": "" if self.peak_mem_bytes is None else str(self.peak_mem_bytes),
            "status": self.status, "note": self.note, "gpu": self.gpu,
        }
        for name in BASELINES:
            cells[SPEEDUP_PREFIX + name] = _num(self.speedups.get(name))
        return cells


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class CsvWriter:
    """Writes rows as they are produced, so an interrupted benchmark keeps what it measured."""

    def __init__(self, stream: IO[str]) -> None:
        self._writer = csv.DictWriter(stream, fieldnames=list(COLUMNS), lineterminator="\n")
        self._stream = stream
        self._writer.writeheader()
        stream.flush()

    def write(self, rows: Iterable[BenchRow]) -> None:
        """Append rows and flush them to the file."""
        for row in rows:
            self._writer.writerow(row.to_csv())
        self._stream.flush()


def write_csv(path: str | Path, rows: Iterable[BenchRow]) -> None:
    """Write `rows` to `path` in the COLUMNS schema (OSError if it cannot be written)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        CsvWriter(fh).write(rows)


def _cell(record: Mapping[str, str], name: str, line: int, where: str, kind: type) -> Any:
    text = (record.get(name) or "").strip()
    if not text:
        return None
    shown = repr(text if len(text) <= 24 else text[:24] + "...")
    try:
        value = kind(text)
    except ValueError:  # also int() of more than 4,300 digits
        raise ValueError(f"{where} line {line}: column {name!r} holds {shown}, "
                         f"expected {'a whole number' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{where} line {line}: column {name!r} holds {shown}, expected a finite number")
    if kind is int and not 0 <= value <= _INT_LIMITS.get(name, INT32_MAX):
        raise ValueError(f"{where} line {line}: column {name!r} holds {shown}, expected a whole number "
                         f"from 0 to {_INT_LIMITS.get(name, INT32_MAX)}")
    return value


def _row(record: Mapping[str, str], line: int, where: str) -> BenchRow:
    def need(name: str, kind: type) -> Any:
        value = _cell(record, name, line, where, kind)
        if value is None:
            raise ValueError(f"{where} line {line}: column {name!r} is empty")
        return value

    status = (record.get("status") or "").strip()
    if status not in STATUSES:
        raise ValueError(f"{where} line {line}: status {status!r} is not one of {', '.join(STATUSES)}")
    causal = (record.get("causal") or "").strip().lower()
    if causal not in ("0", "1", "true", "false"):
        raise ValueError(f"{where} line {line}: causal {causal!r} must be 0 or 1")
    try:
        dtype = normalize_dtype(record.get("dtype") or "")
        head_dim = check_head_dim(need("head_dim", int))
    except ValueError as exc:
        raise ValueError(f"{where} line {line}: {exc}") from None
    speedups = {}
    for name in record:
        if name and name.startswith(SPEEDUP_PREFIX):
            value = _cell(record, name, line, where, float)
            if value is not None:
                speedups[name[len(SPEEDUP_PREFIX):]] = value
    row = BenchRow(
        provider=need("provider", str), batch=need("batch", int), heads=need("heads", int),
        seq_len=need("seq_len", int), head_dim=head_dim, dtype=dtype, causal=causal in ("1", "true"),
        status=status, median_ms=_cell(record, "median_ms", line, where, float),
        tflops=_cell(record, "tflops", line, where, float), speedups=speedups,
        max_abs_err=_cell(record, "max_abs_err", line, where, float),
        rel_err=_cell(record, "rel_err", line, where, float),
        peak_mem_bytes=_cell(record, "peak_mem_bytes", line, where, int),
        note=(record.get("note") or "").strip(), gpu=(record.get("gpu") or "").strip())
    if row.status == "ok" and (row.median_ms is None or row.median_ms <= 0):
        raise ValueError(f"{where} line {line}: an 'ok' row needs a positive median_ms")
    if min(row.batch, row.heads, row.seq_len) < 1:
        raise ValueError(f"{where} line {line}: batch, heads and seq_len must be at least 1")
    return row


def read_csv(path: str | Path, *, max_bytes: int = MAX_CSV_BYTES) -> list[BenchRow]:
    """Read a benchmark CSV; ValueError naming the file (and the line) for anything wrong with it:
    missing or unreadable, not a regular file (a FIFO, device or directory is refused before it is
    read), over `max_bytes`, not UTF-8, or bad content."""
    where = str(path)
    data = read_regular_file(path, max_bytes, what="CSV")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not UTF-8 text (byte {exc.start}): expected a CSV written by "
                         "`flashtune bench --csv`") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames
        if not header:
            raise ValueError(f"{where} is empty: expected a CSV written by `flashtune bench --csv`")
        missing = [c for c in _REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{where} is not a flashtune bench CSV: missing column(s) {', '.join(missing)} "
                             f"(expected {', '.join(COLUMNS)})")
        rows = [_row(record, reader.line_num, where) for record in reader]
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit(): a file without newlines
        raise ValueError(f"{where} line {reader.line_num}: malformed CSV: {exc}") from None
    if not rows:
        raise ValueError(f"{where} has a header but no rows")
    return rows
