"""Kernel versions per op, from the compiled (@triton.jit) code only.

Each test edits a copy of the installed kernel package and recomputes the versions from that copy.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flashtune.kernel import version
from flashtune.kernel.version import OP_KERNELS, OP_VERSIONS, closure, jit_functions, op_versions

KERNEL = Path(version.__file__).resolve().parent


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    root = tmp_path / "kernel"
    shutil.copytree(KERNEL, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path.name}"
    path.write_text(text.replace(old, new))


def test_the_copy_has_the_installed_versions(copy: Path) -> None:
    assert op_versions(copy) == OP_VERSIONS
    assert set(OP_VERSIONS) == {"fwd", "bwd", "kvcache", "train", "varlen", "varlen_bwd"}
    # The packed forward and backward are tuned on the same kernels: one version.
    assert len(set(OP_VERSIONS.values())) == 5 and OP_VERSIONS["varlen_bwd"] == OP_VERSIONS["varlen"]


def test_host_only_edits_keep_every_version(copy: Path) -> None:
    # Host code: the grid helper and a host constant beside the jit helpers, the ops' launch arithmetic,
    # and a module with no jit code at all.
    _edit(copy / "jit" / "common.py", "def one_axis_grid(", "def one_axis_grid_renamed(")
    _edit(copy / "jit" / "common.py", "GRID_X_MAX = INT32_MAX", "GRID_X_MAX = INT32_MAX - 1")
    _edit(copy / "ops" / "fwd_tma.py", "_TMA_ALIGN = 16", "_TMA_ALIGN = 32")
    _edit(copy / "ops" / "kvcache.py", "MIN_SPLIT_TILES = 4", "MIN_SPLIT_TILES = 8")
    (copy / "api.py").write_text((copy / "api.py").read_text() + "\n\ndef added_host_helper():\n    return 1\n")
    assert op_versions(copy) == OP_VERSIONS


def test_a_comment_inside_a_kernel_keeps_its_version(copy: Path) -> None:
    _edit(copy / "jit" / "bwd.py", "def attn_bwd_dq_convert_kernel(", "# a reworded note\ndef attn_bwd_dq_convert_kernel(")
    assert op_versions(copy) == OP_VERSIONS


def _insert_in_body(path: Path, function: str, statement: str) -> None:
    """Insert `statement` as the first statement of `function`'s body (after its docstring)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {function}("))
    body = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith(":")
                and not lines[i].lstrip().startswith("#")) + 1
    while not lines[body].strip() or lines[body].lstrip().startswith(("#", '"""')):
        body += 1
    indent = lines[body][:len(lines[body]) - len(lines[body].lstrip())]
    lines.insert(body, indent + statement)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("op, module, function", [
    ("bwd", "jit/bwd.py", "attn_bwd_dq_kernel"),  # an entry kernel
    ("bwd", "jit/bwd.py", "_dkdv_tiles"),  # a helper only the backward's kernels call
    ("fwd", "jit/fwd.py", "_fwd_tiles"),
    ("fwd", "jit/fwd_tma.py", "_tma_step"),
    ("kvcache", "jit/decode.py", "_decode_tiles"),
])
def test_a_jit_body_edit_changes_its_op_only(copy: Path, op: str, module: str, function: str) -> None:
    _insert_in_body(copy / module, function, "_unused_edit = 1")
    after = op_versions(copy)
    # The training pair compiles the forward's and the backward's kernels: it changes with either.
    changed = {op, "train"} if op in ("fwd", "bwd") else {op}
    if function in ("_fwd_tiles", "_dkdv_tiles"):
        changed |= {"varlen", "varlen_bwd"}  # the packed-sequence kernels run the dense kernels' tile loops
    assert all(after[o] != OP_VERSIONS[o] for o in changed)
    assert {o: v for o, v in after.items() if o not in changed} == {
        o: v for o, v in OP_VERSIONS.items() if o not in changed}


def test_every_jit_function_belongs_to_an_op() -> None:
    reached = set().union(*(closure(entries) for entries in OP_KERNELS.values()))
    assert jit_functions(KERNEL) - reached == set()


def _package(root: Path, common: str, kernel: str) -> Path:
    root.mkdir()
    (root / "jit").mkdir()
    (root / "jit" / "common.py").write_text(common)
    (root / "jit" / "fwd.py").write_text(kernel)
    return root


COMMON = '''import triton
import triton.language as tl

SCALE = 1.5
HOST_ONLY = 3


@triton.jit
def helper(x):
    return x * SCALE


@triton.jit
def unused(x):
    return x
'''
KERNEL_SRC = '''import triton
from . import common
from .common import helper


@triton.jit
def entry(X):
    return helper(X) + common.unused(X)
'''


def test_helpers_and_constants_across_modules(tmp_path: Path) -> None:
    ops = {"fwd": ("jit/fwd:entry",)}
    base = op_versions(_package(tmp_path / "a", COMMON, KERNEL_SRC), ops)
    assert set(closure(ops["fwd"], tmp_path / "a")) == {"jit/fwd:entry", "jit/common:helper",
                                                         "jit/common:unused", "jit/common:SCALE"}
    # A constant the helper reads is compiled in; one it does not read is not.
    assert op_versions(_package(tmp_path / "b", COMMON.replace("SCALE = 1.5", "SCALE = 2.5"), KERNEL_SRC),
                       ops) != base
    assert op_versions(_package(tmp_path / "c", COMMON.replace("HOST_ONLY = 3", "HOST_ONLY = 4"), KERNEL_SRC),
                       ops) == base
    # The helper reached through the module alias counts too.
    assert op_versions(_package(tmp_path / "d", COMMON.replace("return x\n", "return x + 1\n"), KERNEL_SRC),
                       ops) != base


def test_an_entry_that_is_not_a_kernel_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="not a @triton.jit function"):
        op_versions(_package(tmp_path / "a", COMMON, KERNEL_SRC), {"fwd": ("jit/fwd:missing",)})


def test_moving_a_helper_to_another_module_keeps_the_version(tmp_path: Path) -> None:
    ops = {"fwd": ("jit/fwd:entry",)}
    base = op_versions(_package(tmp_path / "a", COMMON, KERNEL_SRC), ops)
    helper = '''

@triton.jit
def helper(x):
    return x * SCALE
'''
    common = COMMON.replace(helper, "\n")
    assert common != COMMON
    moved = KERNEL_SRC.replace("from .common import helper\n", "from .common import SCALE\n") + helper
    assert op_versions(_package(tmp_path / "b", common, moved), ops) == base


def test_the_version_is_the_same_on_every_python(tmp_path: Path) -> None:
    # Pinned: CI and the GPU machine run different Python versions (3.11, 3.12), whose tokenizers differ;
    # an app must compute the version its database was tuned with wherever it runs.
    fstring = 'import triton\n\n\n@triton.jit\ndef entry(X):  # a note\n    tl.static_assert(X, f"{X} # not a comment")\n'
    assert version._tokens(fstring) == ('import triton\n@triton.jit\ndef entry(X):\n'
                                        '    tl.static_assert(X, f"{X} # not a comment")')
    assert op_versions(_package(tmp_path / "a", COMMON, KERNEL_SRC), {"fwd": ("jit/fwd:entry",)}) == {
        "fwd": "90f24297484b"}


def test_a_shared_helper_is_in_the_version_of_every_op_that_calls_it(copy: Path) -> None:
    # load_tile serves the pointer forward, the backward and the decode; the TMA kernel does not call it.
    _insert_in_body(copy / "jit" / "common.py", "load_tile", "_unused_edit = 1")
    after = op_versions(copy)
    assert all(after[op] != OP_VERSIONS[op] for op in ("fwd", "bwd", "kvcache"))
    assert "jit/common:load_tile" not in closure(("jit/fwd_tma:attn_fwd_tma_kernel",))
