"""Bundled files for tests: winners written to a real SQLite database through db.store, exported through
db.exchange into a directory as the wheel ships them (db.bundled.file_name), never into the package."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from flashtune.db import bundled, exchange
from flashtune.db.store import Store
from flashtune.db.types import Config, Key
from flashtune.kernel.version import op_version

from .db import run_info

H100_SXM = bundled.GpuModel("NVIDIA H100 80GB HBM3", "sm_90", 132)
H100_PCIE = bundled.GpuModel("NVIDIA H100 PCIe", "sm_90", 114)
A100 = bundled.GpuModel("NVIDIA A100-SXM4-80GB", "sm_80", 108)  # the interpreter's nominal arch


def write_bundle(directory: Path, entries: Iterable[tuple[Key, Config]], gpu: bundled.GpuModel = H100_SXM, *,
                 kernel_version: str | None = None, median_ms: float = 0.05) -> Path:
    """`entries` as winners measured on `gpu` (with the installed op's version unless `kernel_version`), stored
    in a SQLite file beside `directory`, exported into `directory`/<model>.json; that file."""
    entries = list(entries)
    directory.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{directory.parent / (bundled.file_name(gpu.name) + '.db')}"
    with Store.open(url, create=True) as store:
        runs: dict[str, int] = {}
        for key, config in entries:
            if key.op not in runs:
                info = dataclasses.replace(run_info(gpu_name=gpu.name, arch=key.arch,
                                                    kernel_version=kernel_version or op_version(key.op)),
                                           sm_count=gpu.sm_count or 0)
                runs[key.op] = store.start_run(info)
            trial = store.record_trial(runs[key.op], key, config, "ok", median_ms=median_ms)
            assert store.offer_winner(trial, replace=True)
        document = exchange.export_winners(store)
    path = directory / bundled.file_name(gpu.name)
    path.write_text(exchange.dump_document(document))
    return path
