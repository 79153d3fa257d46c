"""The exchange file: winners moved between machines as a versioned JSON document.

Reading is all-or-nothing: the size is checked before parsing, then the JSON, its format and
version, every field's type (pydantic, strict), every key and config (the same checks the store
uses) and whether each config fits the shared memory of its arch, and only then does anything
touch the database. Nothing from a file is unpickled or evaluated; it is parsed as JSON.
"""
from __future__ import annotations

import json
import platform
import socket
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from .arch import ARCH_SMEM, normalize_arch
from .smem import estimate_smem
from .models import utcnow
from .schema import SCHEMA_VERSION
from .store import Store, Winner
from .types import Config, Key, normalize_dtype

FORMAT = "flashtune-winners"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 64 * 1024 * 1024
POLICIES: tuple[str, ...] = ("faster", "newer", "replace", "keep")
_MAX_LISTED_ERRORS = 10


class ExchangeFileError(ValueError):
    """An exchange file that cannot be read or fails validation; names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class KeyModel(_Strict):
    arch: str = Field(max_length=16)
    op: str = Field(max_length=8)
    seq_len: int = Field(gt=0)
    seq_len_kv: int = Field(gt=0)
    head_dim: int
    dtype: str = Field(max_length=16)
    causal: bool


class ConfigModel(_Strict):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    extra: dict[str, Union[bool, int, float, str]] = Field(default_factory=dict)


class ProvenanceModel(_Strict):
    kernel_version: str = Field(min_length=1, max_length=64)
    gpu_name: str = Field(min_length=1, max_length=128)
    sm_count: Optional[int] = Field(default=None, ge=0)
    driver: Optional[str] = Field(default=None, max_length=64)
    cuda: Optional[str] = Field(default=None, max_length=64)
    triton_version: Optional[str] = Field(default=None, max_length=64)
    torch_version: Optional[str] = Field(default=None, max_length=64)
    host: Optional[str] = Field(default=None, max_length=255)
    measured_at: AwareDatetime


class WinnerModel(_Strict):
    key: KeyModel
    config: ConfigModel
    median_ms: float = Field(gt=0, allow_inf_nan=False)
    tflops: Optional[float] = Field(default=None, ge=0, allow_inf_nan=False)
    provenance: ProvenanceModel


class ProducerModel(_Strict):
    flashtune: str
    schema_version: int
    python: str
    sqlalchemy: str
    pydantic: str
    host: str


class ExportDocument(_Strict):
    """The whole file. `format_version` changes only when a reader would misread the old one."""

    format: Literal["flashtune-winners"]
    format_version: int
    exported_at: AwareDatetime
    producer: ProducerModel
    filters: dict[str, Optional[str]] = Field(default_factory=dict)
    winners: list[WinnerModel]


# --- export ------------------------------------------------------------------------------------

def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _winner_model(w: Winner) -> WinnerModel:
    k = w.key
    return WinnerModel(
        key=KeyModel(arch=k.arch, op=k.op, seq_len=k.seq_len, seq_len_kv=k.seq_len_kv,
                     head_dim=k.head_dim, dtype=k.dtype, causal=k.causal),
        config=ConfigModel(block_m=w.config.block_m, block_n=w.config.block_n,
                           num_warps=w.config.num_warps, num_stages=w.config.num_stages,
                           extra=w.config.extra_dict),
        median_ms=w.median_ms, tflops=w.tflops,
        provenance=ProvenanceModel(kernel_version=w.kernel_version, gpu_name=w.gpu_name,
                                   sm_count=w.sm_count, driver=w.driver, cuda=w.cuda,
                                   triton_version=w.triton_version, torch_version=w.torch_version,
                                   host=w.host, measured_at=w.measured_at))


def winner_to_dict(winner: Winner) -> dict[str, Any]:
    """One winner in the exchange file's JSON shape (also `flashtune show --json`)."""
    return _winner_model(winner).model_dump(mode="json")


def export_winners(store: Store, arch: str | None = None, dtype: str | None = None) -> ExportDocument:
    """Every winner in `store` (optionally of one arch and/or dtype) as an exchange document."""
    arch = normalize_arch(arch) if arch is not None else None
    dtype = normalize_dtype(dtype) if dtype is not None else None
    winners = store.winners(arch, dtype=dtype)
    return ExportDocument(
        format=FORMAT, format_version=FORMAT_VERSION, exported_at=utcnow(),
        producer=ProducerModel(flashtune=_version("flashtune"), schema_version=SCHEMA_VERSION,
                               python=platform.python_version(), sqlalchemy=_version("sqlalchemy"),
                               pydantic=_version("pydantic"), host=socket.gethostname()),
        filters={"arch": arch, "dtype": dtype},
        winners=[_winner_model(w) for w in winners])


def dump_document(document: ExportDocument) -> str:
    """The document as JSON text (what `flashtune export` writes)."""
    return document.model_dump_json(indent=1) + "\n"


# --- reading and validation --------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ExchangeFileError(f"{path}: {size} bytes is larger than the {max_bytes}-byte "
                                    f"limit for an exchange file")
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ExchangeFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # grew while reading, or a pipe
        raise ExchangeFileError(f"{path}: larger than the {max_bytes}-byte limit for an exchange file")
    return data


def _check_header(data: Any, path: Path) -> None:
    if not isinstance(data, dict):
        raise ExchangeFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ExchangeFileError(f"{path}: not a flashtune exchange file (format is "
                                f"{data.get('format')!r}, expected {FORMAT!r})")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExchangeFileError(f"{path}: invalid format_version {version!r}: expected an integer "
                                f"from 1 to {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise ExchangeFileError(f"{path}: format version {version} is newer than version "
                                f"{FORMAT_VERSION} that this flashtune reads: upgrade flashtune")


def _pydantic_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        value = item.get("input")
        shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
        problems.append(f"{loc or 'document'}: {item['msg']}{shown}")
    return problems


def _winner_from_model(model: WinnerModel) -> Winner:
    """A Winner from a validated model; ValueError/TypeError for a bad key, config or fit."""
    k, c, p = model.key, model.config, model.provenance
    key = Key(k.arch, k.op, k.seq_len, k.head_dim, k.dtype, k.causal, k.seq_len_kv)
    config = Config(c.block_m, c.block_n, c.num_warps, c.num_stages, tuple(c.extra.items()))
    need, limit = estimate_smem(config, key.head_dim, key.dtype, key.arch), ARCH_SMEM[key.arch]
    if need > limit:
        raise ValueError(f"config {config} needs about {need} bytes of shared memory for "
                         f"D={key.head_dim} {key.dtype}, more than the {limit} bytes of any "
                         f"{key.arch} GPU")
    return Winner(key=key, config=config, median_ms=model.median_ms, tflops=model.tflops,
                  kernel_version=p.kernel_version, gpu_name=p.gpu_name, sm_count=p.sm_count,
                  driver=p.driver, cuda=p.cuda, triton_version=p.triton_version,
                  torch_version=p.torch_version, host=p.host, measured_at=p.measured_at,
                  trial_id=None)


def _fail(path: Path, problems: Sequence[str]) -> ExchangeFileError:
    shown = "; ".join(problems[:_MAX_LISTED_ERRORS])
    more = f" (and {len(problems) - _MAX_LISTED_ERRORS} more)" if len(problems) > _MAX_LISTED_ERRORS else ""
    return ExchangeFileError(f"{path}: {len(problems)} invalid value(s), nothing imported: {shown}{more}")


def read_document(path: str | Path, *, max_bytes: int = MAX_FILE_BYTES) -> list[Winner]:
    """Read and validate a whole exchange file; its winners, or ExchangeFileError naming every
    problem found (up to ten)."""
    path = Path(path)
    raw = _read_bytes(path, max_bytes)
    try:
        text = raw.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ExchangeFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ExchangeFileError(f"{path}: malformed JSON: {exc.msg} at line {exc.lineno} "
                                f"column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise ExchangeFileError(f"{path}: malformed JSON: {exc}") from None
    _check_header(data, path)
    try:
        document = ExportDocument.model_validate_json(text)
    except ValidationError as exc:
        raise _fail(path, _pydantic_problems(exc)) from None
    winners: list[Winner] = []
    problems: list[str] = []
    seen: dict[Key, int] = {}
    for index, model in enumerate(document.winners):
        try:
            winner = _winner_from_model(model)
        except (TypeError, ValueError) as exc:
            problems.append(f"winners[{index}]: {exc}")
            continue
        if winner.key in seen:
            problems.append(f"winners[{index}]: key {winner.key} repeats winners[{seen[winner.key]}]")
            continue
        seen[winner.key] = index
        winners.append(winner)
    if problems:
        raise _fail(path, problems)
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
    lands in exactly one list; `conflicts` are kept because the two times are not comparable."""

    path: str
    policy: str
    dry_run: bool
    added: list[ImportItem] = field(default_factory=list)
    replaced: list[ImportItem] = field(default_factory=list)
    kept: list[ImportItem] = field(default_factory=list)
    conflicts: list[ImportItem] = field(default_factory=list)

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
                "kept": items(self.kept), "conflicts": items(self.conflicts)}


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
        return "conflicts", (f"measured on {incoming.gpu_name!r}, stored one on "
                             f"{existing.gpu_name!r}: kept the stored one")
    if incoming.kernel_version != existing.kernel_version:
        return "conflicts", (f"kernel version {incoming.kernel_version} vs stored "
                             f"{existing.kernel_version}: kept the stored one")
    if incoming.median_ms < existing.median_ms:
        return "replaced", f"faster ({incoming.median_ms:.4g} ms < {existing.median_ms:.4g} ms)"
    return "kept", f"stored one is as fast or faster ({existing.median_ms:.4g} ms)"


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown import policy {policy!r}: expected one of {', '.join(POLICIES)}")


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
    """Merge validated winners into `store` in one transaction, following `policy`."""
    report, _ = plan_import(winners, {}, policy, dry_run=dry_run, source=source)

    def plan(existing: Mapping[Key, Winner]) -> list[Winner]:
        nonlocal report
        report, chosen = plan_import(winners, existing, policy, dry_run=dry_run, source=source)
        return chosen

    if winners:
        store.merge_winners({w.key.arch for w in winners}, plan, dry_run=dry_run)
    return report


def import_file(store: Store, path: str | Path, policy: str = "faster", dry_run: bool = False,
                *, max_bytes: int = MAX_FILE_BYTES) -> ImportReport:
    """Validate the whole file, then merge it into `store` in one transaction."""
    _check_policy(policy)
    winners = read_document(path, max_bytes=max_bytes)
    return merge(store, winners, policy=policy, dry_run=dry_run, source=str(path))


def document_winners(document: ExportDocument) -> list[Winner]:
    """The winners of an in-memory document (validated like a file's)."""
    return [_winner_from_model(m) for m in document.winners]


__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_FILE_BYTES", "POLICIES", "ExchangeFileError",
           "ExportDocument", "ImportItem", "ImportReport", "decide", "document_winners",
           "dump_document", "export_winners", "import_file", "merge", "plan_import", "read_document",
           "winner_to_dict"]

