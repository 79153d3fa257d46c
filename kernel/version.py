"""The kernel version: a hash of the kernel source, stored beside every tuned config."""
from __future__ import annotations

import hashlib
from pathlib import Path

_SOURCES = ("fwd.py",)


def _source_hash() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((Path(__file__).with_name(name)).read_bytes())
    return digest.hexdigest()[:12]


KERNEL_VERSION: str = _source_hash()
