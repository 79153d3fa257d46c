"""The exchange file: winners moved between machines as a versioned JSON document.

Reading is all-or-nothing: only a regular file is read (never a FIFO, device or directory), its
size bounded on the open descriptor; then the JSON, its format and version, every field's type and
range (pydantic, strict: integers within int32, finite times, labels per `db.text`), every key and
config (the same checks the store uses) and whether each config fits the shared memory of its arch,
and only then does anything touch the database. Nothing from a file is unpickled or evaluated; it
is parsed as JSON. The merge is planned from a read and written in batches (`Store.merge_winners`).
"""
from __future__ import annotations

import codecs
import platform
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Sequence, Union

from pydantic import (AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError,
                      with_config)
from typing_extensions import NotRequired, TypedDict

from .arch import ARCH_SMEM, normalize_arch
from .files import UnreadableFileError, read_regular_file
from .models import WinnerRow, utcnow
from .rows import DamagedRow
from .schema import SCHEMA_VERSION
from .store import Store, Winner
from .text import label_problem, printable, shown
from .errors import one_line
from .types import (FEATURE_DEFAULTS, INT32_MAX, MAX_BATCH_HEADS, MAX_CONFIG_TEXT, MAX_GROUP, MAX_PAGE_SIZE,
                    MAX_SEQ_LEN, MAX_TOKENS, MAX_WINDOW, Config, InvalidField, Key, normalize_dtype)

FORMAT = "flashtune-winners"
# 2: keys carry batch_heads and group, winners kernel_config (version 1 files still import: the
# fields are optional, their defaults the schema-1 meaning). A key's attention features (window,
# softcap, sinks, alibi, dropout, mask) are optional fields of version 2, written only when on: a
# file without them is exactly what it was, and an older reader refuses one with them by name.
FORMAT_VERSION = 2
MAX_FILE_BYTES = 64 * 1024 * 1024
POLICIES: tuple[str, ...] = ("faster", "newer", "replace", "keep")
_MAX_LISTED_ERRORS = 10


class ExchangeFileError(ValueError):
    """An exchange file that cannot be read or fails validation; names the file and the problem."""


# --- the document's shape ----------------------------------------------------------------------
# A winner is a TypedDict, not a model: a file holds tens of thousands, and validating into dicts
# is three times faster and lighter than building four model objects per winner. Every text field
# is a label (db.text: printable, at most its column's length), every integer fits int32, every
# time is finite, so whatever validates can be stored on SQLite and PostgreSQL alike. Pydantic
# checks the lengths; a winner's labels are checked for printability as it is built (below), in
# one pass instead of a Python validator call per field.

_STRICT = ConfigDict(extra="forbid", strict=True)


def _label(max_length: int, *, required: bool = False) -> Any:
    """A label field checked by a validator (for the few labels of the document's header)."""
    def check(value: str) -> str:
        problem = label_problem(value, max_length, required=required)
        if problem is not None:
            raise ValueError(problem)
        return value
    return Annotated[str, AfterValidator(check)]


def _column_text(column: str, *, required: bool = False) -> Any:
    """Text as long as the winners table's column of that name (checked as a label when built)."""
    return Annotated[str, Field(min_length=int(required), max_length=WinnerRow.__table__.c[column].type.length)]


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC (years 1 to 9999)") from None


UTCTime = Annotated[AwareDatetime, AfterValidator(_in_utc)]
Int32 = Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
Length = Annotated[int, Field(gt=0, le=MAX_SEQ_LEN)]


@with_config(_STRICT)
class KeyFields(TypedDict):
    arch: _column_text("arch")  # type: ignore[valid-type]
    op: _column_text("op")  # type: ignore[valid-type]
    seq_len: Length
    seq_len_kv: Length
    head_dim: Length
    dtype: _column_text("dtype")  # type: ignore[valid-type]
    causal: bool
    batch_heads: NotRequired[Annotated[int, Field(ge=0, le=MAX_BATCH_HEADS)]]
    group: NotRequired[Annotated[int, Field(ge=1, le=MAX_GROUP)]]
    # The attention features: written only when on, so a file of keys without them reads as before
    # (and older flashtune reads it); their values are checked by Key.
    window: NotRequired[Annotated[int, Field(ge=0, le=MAX_WINDOW)]]
    softcap: NotRequired[bool]
    sinks: NotRequired[bool]
    alibi: NotRequired[bool]
    dropout: NotRequired[bool]
    mask: NotRequired[Annotated[str, Field(max_length=8)]]
    tokens: NotRequired[Annotated[int, Field(ge=0, le=MAX_TOKENS)]]
    page_size: NotRequired[Annotated[int, Field(ge=0, le=MAX_PAGE_SIZE)]]


@with_config(_STRICT)
class ConfigFields(TypedDict):
    # Sizes are checked by Config (powers of two, ranges) with its own messages; here only that
    # they are ints a database can hold.
    block_m: Int32
    block_n: Int32
    num_warps: Int32
    num_stages: Int32
    # Knob values are typed here (left to right, so that a JSON integer stays an int) and checked
    # by Config: an int32, a finite float, a short label.
    extra: NotRequired[Annotated[dict[Annotated[str, Field(max_length=32)],
                                      Annotated[Union[bool, int, float, str], Field(union_mode="left_to_right")]],
                                 Field(max_length=64)]]


@with_config(_STRICT)
class ProvenanceFields(TypedDict):
    kernel_version: _column_text("kernel_version", required=True)  # type: ignore[valid-type]
    gpu_name: _column_text("gpu_name", required=True)  # type: ignore[valid-type]
    sm_count: NotRequired[Optional[Count]]
    driver: NotRequired[Optional[_column_text("driver")]]  # type: ignore[valid-type]
    cuda: NotRequired[Optional[_column_text("cuda")]]  # type: ignore[valid-type]
    triton_version: NotRequired[Optional[_column_text("triton_version")]]  # type: ignore[valid-type]
    torch_version: NotRequired[Optional[_column_text("torch_version")]]  # type: ignore[valid-type]
    host: NotRequired[Optional[_column_text("host")]]  # type: ignore[valid-type]
    measured_at: UTCTime


@with_config(_STRICT)
class WinnerFields(TypedDict):
    key: KeyFields
    config: ConfigFields
    median_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    tflops: NotRequired[Optional[Annotated[float, Field(ge=0, allow_inf_nan=False)]]]
    provenance: ProvenanceFields
    kernel_config: NotRequired[Optional[Annotated[str, Field(max_length=MAX_CONFIG_TEXT)]]]


_WINNER_ADAPTER = TypeAdapter(WinnerFields)
# name -> column length, for the label check of a winner as it is built
_PROVENANCE_LABELS = {name: WinnerRow.__table__.c[name].type.length for name in (
    "kernel_version", "gpu_name", "driver", "cuda", "triton_version", "torch_version", "host")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ProducerModel(_Strict):
    flashtune: _label(64)  # type: ignore[valid-type]
    schema_version: Count
    python: _label(64)  # type: ignore[valid-type]
    sqlalchemy: _label(64)  # type: ignore[valid-type]
    pydantic: _label(64)  # type: ignore[valid-type]
    host: _label(255)  # type: ignore[valid-type]


class ExportDocument(_Strict):
    """The whole file. `format_version` changes only when a reader would misread the old one.
    `winners` holds one `WinnerFields` dict per winner."""

    format: Literal["flashtune-winners"]
    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)]
    exported_at: UTCTime
    producer: ProducerModel
    filters: dict[_label(16), Optional[_label(16)]] = Field(default_factory=dict)  # type: ignore[valid-type]
    winners: list[WinnerFields]


# --- export ------------------------------------------------------------------------------------

def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _winner_dict(w: Winner) -> dict[str, Any]:
    k, c = w.key, w.config
    return {"key": key_to_dict(k),
            "config": {"block_m": c.block_m, "block_n": c.block_n, "num_warps": c.num_warps,
                       "num_stages": c.num_stages, "extra": c.extra_dict},
            "median_ms": w.median_ms, "tflops": w.tflops,
            "provenance": {"kernel_version": w.kernel_version, "gpu_name": w.gpu_name,
                           "sm_count": w.sm_count, "driver": w.driver, "cuda": w.cuda,
                           "triton_version": w.triton_version, "torch_version": w.torch_version,
                           "host": w.host, "measured_at": w.measured_at},
            "kernel_config": None if w.kernel_config is None else str(w.kernel_config)}


def key_to_dict(key: Key) -> dict[str, Any]:
    """A key in the exchange file's JSON shape (also `flashtune show --recorded --json`): the
    attention features only where they are on."""
    fields = {"arch": key.arch, "op": key.op, "seq_len": key.seq_len, "seq_len_kv": key.seq_len_kv,
              "head_dim": key.head_dim, "dtype": key.dtype, "causal": key.causal,
              "batch_heads": key.batch_heads, "group": key.group}
    return {**fields, **key.features_on()}


def winner_to_dict(winner: Winner) -> dict[str, Any]:
    """One winner in the exchange file's JSON shape (also `flashtune show --json`)."""
    return _WINNER_ADAPTER.dump_python(_winner_dict(winner), mode="json")


def export_winners(store: Store, arch: str | None = None, dtype: str | None = None) -> ExportDocument:
    """Every winner in `store` (optionally of one arch and/or dtype) as an exchange document.
    Damaged rows are left out, as every read of the store leaves them out (`Store.damaged_rows`)."""
    arch = normalize_arch(arch) if arch is not None else None
    dtype = normalize_dtype(dtype) if dtype is not None else None
    winners = store.winners(arch, dtype=dtype)
    return ExportDocument(
        format=FORMAT, format_version=FORMAT_VERSION, exported_at=utcnow(),
        producer=ProducerModel(flashtune=_version("flashtune"), schema_version=SCHEMA_VERSION,
                               python=platform.python_version(), sqlalchemy=_version("sqlalchemy"),
                               pydantic=_version("pydantic"), host=socket.gethostname()[:255]),
        filters={"arch": arch, "dtype": dtype},
        winners=[_winner_dict(w) for w in winners])


def dump_document(document: ExportDocument) -> str:
    """The document as JSON text (what `flashtune export` writes)."""
    return document.model_dump_json(indent=1) + "\n"


# --- reading and validation --------------------------------------------------------------------

class _Header(BaseModel):
    """The two fields that say what a file is, read on their own when the whole does not validate."""

    model_config = ConfigDict(extra="ignore")
    format: Any = None
    format_version: Any = None


def _check_header(raw: bytes, where: str) -> None:
    """ExchangeFileError for malformed JSON, another format or an unreadable format version."""
    try:
        header = _Header.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":  # the message names the line and column
            raise ExchangeFileError(f"{where}: malformed JSON: "
                                    f"{printable(first['msg'].removeprefix('Invalid JSON: '), 200)}") from None
        raise ExchangeFileError(f"{where}: expected a JSON object at the top") from None
    if header.format != FORMAT:
        raise ExchangeFileError(f"{where}: not a flashtune exchange file (format is "
                                f"{printable(shown(header.format))}, expected {FORMAT!r})")
    version = header.format_version
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 2**31:
        raise ExchangeFileError(f"{where}: invalid format_version {printable(shown(version))}: expected "
                                f"an integer from 1 to {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise ExchangeFileError(f"{where}: format version {version} is newer than version "
                                f"{FORMAT_VERSION} that this flashtune reads: upgrade flashtune")


def _pydantic_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        value = item.get("input")
        got = "" if isinstance(value, (dict, list)) else f" (got {printable(shown(value))})"
        problems.append(f"{printable(loc, 120) or 'document'}: {printable(item['msg'], 200)}{got}")
    return problems


# An op's shared-memory model: (op, config, head dim, dtype, arch) -> bytes. The database knows no kernel;
# the caller that imports a file passes its ops' models (flashtune.kernel.ops.smem_need).
SmemModel = Callable[[str, Config, int, str, str], int]


class _WinnerBuilder:
    """Validated winner dicts to Winners, with the checks pydantic cannot make (the `Key` and
    `Config` rules and, given an `smem` model, whether a config fits its arch by its own op's model).
    Configs and fits repeat across thousands of winners, so each distinct one is built and checked once."""

    def __init__(self, smem: SmemModel | None = None) -> None:
        self._smem = smem
        self._configs: dict[Any, Config] = {}
        self._fits: dict[tuple[str, Config, int, str, str], str | None] = {}

    def _config(self, c: Mapping[str, Any]) -> Config:
        raw = (c["block_m"], c["block_n"], c["num_warps"], c["num_stages"],
               tuple(sorted(c.get("extra", {}).items())))
        config = self._configs.get(raw)
        if config is None:
            config = self._configs[raw] = Config(*raw[:4], raw[4])
        return config

    def _fit_problem(self, config: Config, key: Key) -> str | None:
        if self._smem is None:
            return None
        token = (key.op, config, key.head_dim, key.dtype, key.arch)
        if token not in self._fits:
            need, limit = self._smem(key.op, config, key.head_dim, key.dtype, key.arch), ARCH_SMEM[key.arch]
            self._fits[token] = None if need <= limit else (
                f"{key.op} config {config} needs about {need} bytes of shared memory for D={key.head_dim} "
                f"{key.dtype}, more than the {limit} bytes of any {key.arch} GPU")
        return self._fits[token]

    def __call__(self, data: Mapping[str, Any]) -> Winner:
        """A Winner; InvalidField naming the field (`key.arch`, `provenance.host`, ...) for a bad
        key, config or label, or a config that does not fit."""
        k, p = data["key"], data["provenance"]
        for name, length in _PROVENANCE_LABELS.items():
            value = p.get(name)
            if value is not None and not (value.isprintable() and value.strip()):  # fast path first
                problem = label_problem(value, length, required=name in ("kernel_version", "gpu_name"))
                if problem is not None:
                    raise InvalidField(f"provenance.{name}", problem)
        try:
            key = Key(k["arch"], k["op"], k["seq_len"], k["head_dim"], k["dtype"], k["causal"], k["seq_len_kv"],
                      k.get("batch_heads", 0), k.get("group", 1),
                      **{name: k.get(name, default) for name, default in FEATURE_DEFAULTS.items()})
        except InvalidField as exc:
            raise InvalidField(f"key.{exc.field}", str(exc)) from None
        kernel_text = data.get("kernel_config")
        kernel_config = None
        if kernel_text is not None:
            try:
                kernel_config = Config.parse(kernel_text)
            except (TypeError, ValueError) as exc:
                raise InvalidField("kernel_config", one_line(exc)) from None
        try:
            config = self._config(data["config"])
        except InvalidField as exc:
            raise InvalidField(f"config.{exc.field}", str(exc)) from None
        problem = self._fit_problem(config, key)
        if problem is not None:
            raise InvalidField("config", problem)
        return Winner(key=key, config=config, median_ms=data["median_ms"], tflops=data.get("tflops"),
                      kernel_version=p["kernel_version"], gpu_name=p["gpu_name"],
                      sm_count=p.get("sm_count"), driver=p.get("driver"), cuda=p.get("cuda"),
                      triton_version=p.get("triton_version"), torch_version=p.get("torch_version"),
                      host=p.get("host"), measured_at=p["measured_at"], trial_id=None, kernel_config=kernel_config)


def _fail(where: str, problems: Sequence[str]) -> ExchangeFileError:
    listed = "; ".join(problems[:_MAX_LISTED_ERRORS])
    more = f" (and {len(problems) - _MAX_LISTED_ERRORS} more)" if len(problems) > _MAX_LISTED_ERRORS else ""
    return ExchangeFileError(f"{where}: {len(problems)} invalid value(s), nothing imported: {listed}{more}")


def _parse(raw: bytes, where: str) -> ExportDocument:
    raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows write one; JSON itself has none
    try:
        raw.decode("utf-8")  # for the message: pydantic would only say 'expected value'
    except UnicodeDecodeError as exc:
        raise ExchangeFileError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        # NaN and Infinity parse here, then fail the finite-number checks of the fields.
        return ExportDocument.model_validate_json(raw)
    except ValidationError as exc:
        # Only now the header, on its own (a second parse costs as much memory as the first): a
        # file of another format or a newer version is named as such, not as a hundred fields.
        _check_header(raw, where)
        raise _fail(where, _pydantic_problems(exc)) from None


def read_document(path: str | Path, *, max_bytes: int = MAX_FILE_BYTES,
                  smem: SmemModel | None = None) -> list[Winner]:
    """Read and validate a whole exchange file; its winners, or ExchangeFileError naming every
    problem found (up to ten). Only a regular file is read (never a FIFO, device or directory),
    and never more than `max_bytes` of it. With `smem` (each op's shared-memory model), a config
    that fits no GPU of its arch is a problem too."""
    path = Path(path)
    where = printable(str(path), 200)
    try:
        raw = read_regular_file(path, max_bytes, what="exchange file")
    except UnreadableFileError as exc:
        raise ExchangeFileError(str(exc)) from None
    items = _parse(raw, where).winners
    del raw
    build = _WinnerBuilder(smem)
    winners: list[Winner] = []
    problems: list[str] = []
    seen: dict[Key, int] = {}
    for index in range(len(items)):
        data, items[index] = items[index], None  # each dict freed once built: peak memory stays low
        try:
            winner = build(data)
        except InvalidField as exc:
            problems.append(f"winners[{index}].{exc.field}: {printable(exc, 300)}")
            continue
        if winner.key in seen:
            problems.append(f"winners[{index}]: key {winner.key} repeats winners[{seen[winner.key]}]")
            continue
        seen[winner.key] = index
        winners.append(winner)
    if problems:
        raise _fail(where, problems)
    return winners


# --- merging -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportItem:
    """What happened to one winner of the file, and why."""

    key: Key
    incoming: Winner
    existing: Winner | None
    reason: str


@dataclass
class ImportReport:
    """The outcome of an import (or what it would be, with `dry_run`). Each winner of the file
    lands in exactly one list; `conflicts` are kept because the two times are not comparable.
    `damaged` lists the stored rows of the file's keys that could not be read: the file's winner
    counts as added for such a key and replaces the damaged row."""

    path: str
    policy: str
    dry_run: bool
    added: list[ImportItem] = field(default_factory=list)
    replaced: list[ImportItem] = field(default_factory=list)
    kept: list[ImportItem] = field(default_factory=list)
    conflicts: list[ImportItem] = field(default_factory=list)
    damaged: list[DamagedRow] = field(default_factory=list)

    @property
    def changed(self) -> int:
        """How many winners were (or would be) written."""
        return len(self.added) + len(self.replaced)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for `flashtune import --json`."""
        def items(rows: list[ImportItem]) -> list[dict[str, Any]]:
            return [{"key": str(i.key), "incoming": str(i.incoming.config),
                     "existing": str(i.existing.config) if i.existing else None,
                     "reason": i.reason} for i in rows]
        return {"path": self.path, "policy": self.policy, "dry_run": self.dry_run,
                "added": items(self.added), "replaced": items(self.replaced),
                "kept": items(self.kept), "conflicts": items(self.conflicts),
                "damaged": [str(d) for d in self.damaged]}


def _same_measurement(a: Winner, b: Winner) -> bool:
    return (a.config == b.config and a.median_ms == b.median_ms and a.gpu_name == b.gpu_name
            and a.kernel_version == b.kernel_version and a.measured_at == b.measured_at)


def decide(policy: str, incoming: Winner, existing: Winner | None) -> tuple[str, str]:
    """('added' | 'replaced' | 'kept' | 'conflicts', reason) for one incoming winner."""
    if existing is None:
        return "added", "new key"
    if _same_measurement(incoming, existing):
        return "kept", "same measurement already stored"
    if policy == "replace":
        return "replaced", "--policy replace"
    if policy == "keep":
        return "kept", "--policy keep"
    if policy == "newer":
        if incoming.measured_at > existing.measured_at:
            return "replaced", f"measured later ({incoming.measured_at:%Y-%m-%d %H:%M} UTC)"
        return "kept", f"stored one measured later ({existing.measured_at:%Y-%m-%d %H:%M} UTC)"
    # faster: times compare only when measured on the same GPU model with the same kernel.
    if incoming.gpu_name != existing.gpu_name:
        return "conflicts", (f"measured on '{printable(incoming.gpu_name)}', stored one on "
                             f"'{printable(existing.gpu_name)}': kept the stored one")
    if incoming.kernel_version != existing.kernel_version:
        return "conflicts", (f"kernel version {printable(incoming.kernel_version)} vs stored "
                             f"{printable(existing.kernel_version)}: kept the stored one")
    if incoming.median_ms < existing.median_ms:
        return "replaced", f"faster ({incoming.median_ms:.4g} ms < {existing.median_ms:.4g} ms)"
    return "kept", f"stored one is as fast or faster ({existing.median_ms:.4g} ms)"


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown import policy {printable(shown(policy))}: expected one of "
                         f"{', '.join(POLICIES)}")


def plan_import(winners: Sequence[Winner], existing: Mapping[Key, Winner],
                policy: str = "faster", *, dry_run: bool = False,
                source: str = "") -> tuple[ImportReport, list[Winner]]:
    """Decide each incoming winner against the stored ones; the report and the winners to write."""
    _check_policy(policy)
    report = ImportReport(path=source, policy=policy, dry_run=dry_run)
    chosen = []
    for winner in winners:
        stored = existing.get(winner.key)
        bucket, reason = decide(policy, winner, stored)
        getattr(report, bucket).append(ImportItem(winner.key, winner, stored, reason))
        if bucket in ("added", "replaced"):
            chosen.append(winner)
    return report, chosen


def merge(store: Store, winners: Sequence[Winner], *, policy: str = "faster",
          dry_run: bool = False, source: str = "") -> ImportReport:
    """Merge validated winners into `store` in one transaction, following `policy` (see
    `Store.merge_winners`: planned before the write lock is taken; `dry_run` takes none)."""
    _check_policy(policy)
    reports: list[ImportReport] = []

    def plan(existing: Mapping[Key, Winner]) -> list[Winner]:
        report, chosen = plan_import(winners, existing, policy, dry_run=dry_run, source=source)
        reports.append(report)  # the last plan is the one written
        return chosen

    damaged_before = len(store.damaged_rows)
    store.merge_winners([w.key for w in winners], plan, dry_run=dry_run)
    report = reports[-1]
    report.damaged = store.damaged_rows[damaged_before:]
    return report


def import_file(store: Store, path: str | Path, policy: str = "faster", dry_run: bool = False,
                *, max_bytes: int = MAX_FILE_BYTES, smem: SmemModel | None = None) -> ImportReport:
    """Validate the whole file (with `smem`, each config against its op's shared-memory model), then merge
    it into `store` in one transaction."""
    _check_policy(policy)
    winners = read_document(path, max_bytes=max_bytes, smem=smem)
    return merge(store, winners, policy=policy, dry_run=dry_run, source=str(path))


__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_FILE_BYTES", "POLICIES", "ExchangeFileError", "key_to_dict",
           "ExportDocument", "ImportItem", "ImportReport", "decide",
           "dump_document", "export_winners", "import_file", "merge", "plan_import", "read_document",
           "winner_to_dict"]

