"""The kernel version: a hash of every kernel source, stored beside every tuned config.

A tuned config is only as current as the code it was timed with. The compiled kernels depend on the
files that define `@triton.jit` functions (the kernels, the helpers they call and, in fwd.py, the
grid they decode their program ids against), so the version hashes every such file of this package.
They are found, not listed, so a new kernel file cannot be forgotten; a change to any of them marks
earlier tuning results as stale.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_JIT = re.compile(rb"^\s*@triton\.jit\b", re.MULTILINE)


def jit_sources(root: Path = _PACKAGE) -> tuple[Path, ...]:
    """The package's Python files that define a @triton.jit function, sorted by relative path."""
    return tuple(sorted((p for p in root.rglob("*.py") if _JIT.search(p.read_bytes())),
                        key=lambda p: p.relative_to(root).as_posix()))


def source_hash(root: Path = _PACKAGE) -> str:
    """12 hex digits of SHA-256 over each jit file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in jit_sources(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


KERNEL_VERSION: str = source_hash()
