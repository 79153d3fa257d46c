"""Bundled winners: exchange files shipped in the wheel, one per GPU model, the dispatcher's lowest tuned layer.

The files sit beside this module (`<model>.json`, the model's name as `file_name` writes it, e.g.
`h100-80gb-hbm3.json` for "NVIDIA H100 80GB HBM3") and are ordinary exchange files (db.exchange), so they carry
each winner's provenance: GPU name, SM count, driver, CUDA, Triton and torch versions, the op's kernel version,
and when it was measured.

A bundled winner applies to a GPU only when it was measured on the same model: the same device name (what
`torch.cuda.get_device_name` says, compared exactly) and, where both are known, the same SM count (a MIG slice
or a cut-down part of the same name differs there). The arch alone is not enough: an H100 PCIe is sm_90 like an
H100 SXM but has fewer SMs, other clocks and other memory. `FLASHTUNE_BUNDLED` chooses:

- unset, `1`, `on` or `model`: winners of the GPU's own model (the rule above);
- `arch`: winners of any model of the GPU's arch (an opt-in: another model's winners may be slower than the
  defaults); where several models tuned the same key, the GPU's own model's winner is taken, else the file
  first by name;
- `0`, `off`, `no` or `false`: no bundled winners.

`FLASHTUNE_BUNDLED_DIR` names a directory of such files to use instead of the wheel's (to try a bundle before
it ships).

The dispatcher reads them at import, so this module parses them with the standard library's json (no pydantic)
and builds each key, config and winner through db.types' own checks: a few milliseconds for hundreds of
winners. `read_bundle(..., strict=True)` validates a file the way `flashtune import` does (db.exchange), for
the release check and the CLI.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..files import UnreadableFileError, read_regular_file
from ..store import Winner
from ..types import Config, Key

ENV_VAR = "FLASHTUNE_BUNDLED"
DIR_ENV_VAR = "FLASHTUNE_BUNDLED_DIR"
PACKAGE_DIR = Path(__file__).resolve().parent
SUFFIX = ".json"
FORMAT = "flashtune-winners"  # db.exchange.FORMAT, repeated: that module needs pydantic, this one is read at import
MAX_BUNDLE_BYTES = 16 * 1024 * 1024  # a bundle holds winners only: thousands of keys stay well under a megabyte

# FLASHTUNE_BUNDLED's modes.
MODEL, ARCH, OFF = "model", "arch", "off"
_MODES = {"": MODEL, "1": MODEL, "on": MODEL, "yes": MODEL, "true": MODEL, "model": MODEL, "arch": ARCH,
          "0": OFF, "off": OFF, "no": OFF, "false": OFF}

# The command that writes the bundles (docs/bundled.md): named wherever a bundle is found stale.
REGENERATE = "bash bench/make_bundle.sh"


class BundleError(ValueError):
    """A bundled file that cannot be read; names the file and the problem."""


@dataclass(frozen=True)
class GpuModel:
    """A GPU as the bundled layer matches it: device name, arch, SM count (None: unknown)."""

    name: str
    arch: str
    sm_count: int | None = None


def mode(value: str | None = None) -> tuple[str, str | None]:
    """FLASHTUNE_BUNDLED (or `value`) as MODEL, ARCH or OFF, and why a value was not understood (then MODEL)."""
    text = os.environ.get(ENV_VAR, "") if value is None else value
    chosen = _MODES.get(text.strip().lower())
    if chosen is None:
        return MODEL, (f"flashtune: ignoring {ENV_VAR}={text[:40]!r}: expected model (the default), arch, or 0 "
                       "(off); bundled winners of this GPU's model apply")
    return chosen, None


def bundle_dir() -> Path:
    """Where the bundled files are read from: FLASHTUNE_BUNDLED_DIR, else the package's own directory."""
    override = os.environ.get(DIR_ENV_VAR, "").strip()
    return Path(override) if override else PACKAGE_DIR


def file_name(gpu_name: str) -> str:
    """The bundle file of a GPU model: its name lower-cased, without a leading 'NVIDIA', runs of other
    characters than letters and digits as one '-': 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3.json'."""
    if not isinstance(gpu_name, str) or not gpu_name.strip():
        raise ValueError(f"a GPU name must be non-empty text, got {gpu_name!r}")
    text = re.sub(r"^nvidia\s+", "", gpu_name.strip().lower())
    slug = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    if not slug:
        raise ValueError(f"GPU name {gpu_name!r} has no letters or digits to name a file with")
    return slug + SUFFIX


def bundle_files(directory: Path | None = None) -> list[Path]:
    """The bundle files of `directory` (default `bundle_dir()`), sorted by name; [] when there is none."""
    where = bundle_dir() if directory is None else Path(directory)
    try:
        return sorted(p for p in where.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
    except OSError:
        return []


def matches(winner: Winner, gpu: GpuModel, how: str = MODEL) -> bool:
    """Whether a bundled winner applies to `gpu`: the same arch, and with `how` MODEL the same model (device
    name, and SM count where both are known)."""
    if winner.key.arch != gpu.arch:
        return False
    if how == ARCH:
        return True
    if winner.gpu_name.strip() != gpu.name.strip():
        return False
    return winner.sm_count is None or gpu.sm_count is None or winner.sm_count == gpu.sm_count


def _when(text: Any) -> datetime:
    if not isinstance(text, str):
        raise TypeError(f"measured_at must be an ISO time, got {type(text).__name__}")
    when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)  # 3.10 reads no 'Z'
    if when.tzinfo is None:
        raise ValueError(f"measured_at {text!r} has no time zone")
    return when.astimezone(timezone.utc)


def _text(value: Any, name: str, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise TypeError(f"{name} must be {'non-empty ' if required else ''}text, got {type(value).__name__}")
    return value


def _winner(data: Mapping[str, Any], configs: dict[Any, Config]) -> Winner:
    """One exchange-file winner dict as a Winner, through Key's and Config's own checks; the key's fields are
    passed by name, so every field the exchange file writes (key_to_dict) comes through."""
    k, c, p = data["key"], data["config"], data["provenance"]
    key = Key(**k)
    raw = (c["block_m"], c["block_n"], c["num_warps"], c["num_stages"], tuple(sorted(c.get("extra", {}).items())))
    config = configs.get(raw)
    if config is None:
        config = configs[raw] = Config(*raw[:4], raw[4])
    kernel_text = data.get("kernel_config")
    ms, tflops, sm_count = data["median_ms"], data.get("tflops"), p.get("sm_count")
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms > 0:
        raise ValueError(f"median_ms must be a positive number, got {ms!r}")
    if sm_count is not None and (isinstance(sm_count, bool) or not isinstance(sm_count, int)):
        raise TypeError(f"provenance.sm_count must be an integer, got {sm_count!r}")
    return Winner(key=key, config=config, median_ms=float(ms), tflops=tflops,
                  kernel_version=_text(p["kernel_version"], "provenance.kernel_version", required=True),
                  gpu_name=_text(p["gpu_name"], "provenance.gpu_name", required=True), sm_count=sm_count,
                  driver=_text(p.get("driver"), "provenance.driver"), cuda=_text(p.get("cuda"), "provenance.cuda"),
                  triton_version=_text(p.get("triton_version"), "provenance.triton_version"),
                  torch_version=_text(p.get("torch_version"), "provenance.torch_version"),
                  host=_text(p.get("host"), "provenance.host"), measured_at=_when(p["measured_at"]), trial_id=None,
                  kernel_config=None if kernel_text is None else Config.parse(kernel_text))


def read_bundle(path: Path, *, strict: bool = False,
                smem: Callable[[str, Config, int, str, str], int] | None = None) -> list[Winner]:
    """The winners of one bundled file; BundleError naming the file and the problem.

    `strict`: validate it as `flashtune import` does (db.exchange.read_document, every field's type and range,
    with `smem` each config against its op's shared-memory model); else the quick read the dispatcher does at
    import (JSON, the format, and Key's and Config's checks)."""
    where = str(path)
    if strict:
        from ..exchange import ExchangeFileError, read_document

        try:
            return read_document(path, max_bytes=MAX_BUNDLE_BYTES, smem=smem)
        except ExchangeFileError as exc:
            raise BundleError(str(exc)) from None
    try:
        document = json.loads(read_regular_file(path, MAX_BUNDLE_BYTES, what="bundled file"))
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"not a flashtune exchange file (format {FORMAT!r} expected)")
        # The format version is left to the strict read (the release check): a field this flashtune does not
        # know fails Key's or Config's constructor below all the same.
        items = document["winners"]
        if not isinstance(items, list):
            raise TypeError("winners must be a list")
    except UnreadableFileError as exc:
        raise BundleError(str(exc)) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"{where}: {type(exc).__name__}: {exc}") from None
    configs: dict[Any, Config] = {}
    winners: list[Winner] = []
    seen: set[Key] = set()
    for index, data in enumerate(items):
        try:
            winner = _winner(data, configs)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BundleError(f"{where}: winners[{index}]: {type(exc).__name__}: {exc}") from None
        if winner.key in seen:
            raise BundleError(f"{where}: winners[{index}]: key {winner.key} repeats")
        seen.add(winner.key)
        winners.append(winner)
    return winners


@dataclass(frozen=True)
class Skipped:
    """A bundled winner that matched the GPU but is not used, and why."""

    winner: Winner
    reason: str


@dataclass(frozen=True)
class Selection:
    """What the bundled layer gives a set of GPUs: the winners used, those skipped (stale), the files read and
    the problems met (unreadable files), for the dispatcher's load info."""

    winners: tuple[Winner, ...]
    skipped: tuple[Skipped, ...]
    files: tuple[Path, ...]
    problems: tuple[str, ...]
    how: str
    gpus: int = 0  # how many GPUs were matched against

    @property
    def message(self) -> str:
        """One line for the load info: how many bundled winners apply, and how many are stale."""
        if self.how == OFF:
            return f"bundled winners off ({ENV_VAR}=0)"
        if not self.gpus:
            return "no GPU to match: bundled winners not consulted"
        text = f"{len(self.winners)} bundled winner(s) from {len(self.files)} file(s)"
        if self.skipped:
            text += f", {len(self.skipped)} skipped (tuned with another kernel version: {REGENERATE})"
        if self.problems:
            text += f"; {len(self.problems)} unreadable: {self.problems[0]}"
        return text


def stale_reason(winner: Winner, versions: Mapping[str, str]) -> str | None:
    """Why a bundled winner is stale (tuned with another kernel version than the installed op's), or None."""
    installed = versions.get(winner.key.op)
    if installed is None:
        return f"op {winner.key.op!r} has no kernels in this flashtune"
    if winner.kernel_version != installed:
        return (f"bundled winner tuned with {winner.key.op} kernel version {winner.kernel_version}, "
                f"installed {installed}")
    return None


def select(gpus: Sequence[GpuModel], versions: Mapping[str, str], *, how: str | None = None,
           directory: Path | None = None) -> Selection:
    """The bundled winners for `gpus` (the visible GPUs, or stand-ins): per arch, those whose model matches
    every GPU of that arch (`matches`; the dispatcher keeps one table per arch, so two models of one arch in
    one machine take none in model mode), current with `versions` (op -> installed kernel version); stale
    ones are listed as skipped. `how` defaults to FLASHTUNE_BUNDLED's mode."""
    how = mode()[0] if how is None else how
    if how == OFF or not gpus:
        return Selection((), (), (), (), how)
    files = bundle_files(directory)
    if how == MODEL:
        wanted = {file_name(g.name) for g in gpus}
        files = [f for f in files if f.name in wanted]
    else:  # the GPUs' own models' files first: their winners take a key another model also tuned
        own = {file_name(g.name) for g in gpus}
        files = sorted(files, key=lambda f: (f.name not in own, f.name))
    by_arch: dict[str, list[GpuModel]] = {}
    for gpu in gpus:
        by_arch.setdefault(gpu.arch, []).append(gpu)
    chosen: dict[Key, Winner] = {}
    skipped: list[Skipped] = []
    problems: list[str] = []
    read: list[Path] = []
    for path in files:
        try:
            winners = read_bundle(path)
        except BundleError as exc:
            problems.append(str(exc))
            continue
        read.append(path)
        for w in winners:
            here = by_arch.get(w.key.arch)
            if not here or w.key in chosen or not all(matches(w, g, how) for g in here):
                continue
            reason = stale_reason(w, versions)
            if reason is None:
                chosen[w.key] = w
            else:
                skipped.append(Skipped(w, reason))
    return Selection(tuple(chosen.values()), tuple(skipped), tuple(read), tuple(problems), how, len(gpus))


def stale_winners(paths: Iterable[Path], versions: Mapping[str, str]) -> list[str]:
    """One line per winner of `paths` whose kernel version is not the installed op's (the release check)."""
    lines = []
    for path in paths:
        for w in read_bundle(path):
            reason = stale_reason(w, versions)
            if reason is not None:
                lines.append(f"{path.name}: {w.key}: {reason}")
    return lines


__all__ = ["ARCH", "DIR_ENV_VAR", "ENV_VAR", "MODEL", "OFF", "PACKAGE_DIR", "REGENERATE", "BundleError", "GpuModel",
           "Selection", "Skipped", "bundle_dir", "bundle_files", "file_name", "matches", "mode", "read_bundle",
           "select", "stale_reason", "stale_winners"]
