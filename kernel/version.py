"""Kernel versions: one per op, a hash of the `@triton.jit` code that op compiles, stored beside every tuned config.

A tuned config is only as current as the compiled code it was timed with, and no more: host code (launch
arithmetic, checks, docstrings outside the kernels) can change without touching what the GPU runs. So each
op's version hashes its entry kernels and, transitively, every `@triton.jit` helper and module-level constant
they name (constants are compile-time values to Triton), read from the source with `ast`. Each piece is
hashed as its source without comments or blank lines, so rewording a comment keeps the version.

`OP_KERNELS` names each op's entry kernels; every `@triton.jit` function of the package must be reachable from
one of them (a test checks it), so a new kernel cannot be left out of every version. `KERNEL_VERSION` folds the
op versions into one value for what spans ops: a tuning run and a fleet job.
"""
from __future__ import annotations

import ast
import hashlib
import io
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent

# op -> its entry kernels, as "module:function" with the module path relative to this package.
OP_KERNELS: dict[str, tuple[str, ...]] = {
    # The dropout mask kernel writes out the draws the forward (and the backward) make: it belongs to them.
    "fwd": ("jit/fwd:attn_fwd_kernel", "jit/fwd_tma:attn_fwd_tma_kernel", "jit/fwd_gluon:attn_fwd_gluon_kernel",
            "jit/dropout:dropout_mask_kernel"),
    "bwd": ("jit/bwd:attn_bwd_preprocess_kernel", "jit/bwd:attn_bwd_dkdv_kernel", "jit/bwd:attn_bwd_dq_kernel",
            "jit/bwd:attn_bwd_dq_convert_kernel"),
    "kvcache": ("jit/decode:decode_split_kernel", "jit/decode:decode_combine_kernel"),
    # Packed sequences: their entries run the forward's and the backward's tile loops.
    "varlen": ("jit/varlen:attn_fwd_varlen_kernel", "jit/varlen:attn_bwd_dq_varlen_kernel",
               "jit/varlen:attn_bwd_dkdv_varlen_kernel", "jit/bwd:attn_bwd_preprocess_kernel"),
}
# The packed backward's configs are timed on the same kernels.
OP_KERNELS["varlen_bwd"] = OP_KERNELS["varlen"]
# A training pair compiles both the forward's and the backward's kernels.
OP_KERNELS["train"] = OP_KERNELS["fwd"] + OP_KERNELS["bwd"]


def _is_jit(node: ast.AST) -> bool:
    """A function decorated with `triton.jit` or `triton.jit(...)` (also as `jit` or `gluon.jit`)."""
    if not isinstance(node, ast.FunctionDef):
        return False
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "jit":
            return True
    return False


def _tokens(text: str) -> str:
    """`text` without comments, trailing spaces or blank lines.

    Only the comments' positions come from `tokenize`: they are the same on every Python version, while
    token types are not (3.12 numbers them differently and splits f-strings), and the version must be the
    same wherever flashtune runs."""
    lines = text.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return "\n".join(line.rstrip() for line in lines if line.strip())


@dataclass(frozen=True)
class _Module:
    """One source file: its top-level definitions and what its relative imports bind."""
    name: str  # path relative to the package, without .py, '/'-separated
    lines: tuple[str, ...]
    defs: dict[str, ast.stmt]  # top-level function, class-free assignment by name
    imported: dict[str, tuple[str, str | None]]  # local name -> (module name, attribute or None for a module)

    def segment(self, node: ast.stmt) -> str:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return "\n".join(self.lines[first - 1:node.end_lineno]) + "\n"


def _resolve(base: str, level: int, module: str | None) -> str:
    """The package-relative name of `from <level dots><module> import ...` written in module `base`."""
    parts = base.split("/")[:-1]
    if level > 1:
        parts = parts[:len(parts) - (level - 1)]
    if module:
        parts += module.split(".")
    return "/".join(parts)


@lru_cache(maxsize=None)
def _module(root: Path, name: str) -> _Module | None:
    path = root / f"{name}.py"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    defs: dict[str, ast.stmt] = {}
    imported: dict[str, tuple[str, str | None]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            defs[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defs[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            defs[node.target.id] = node
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            source = _resolve(name, node.level, node.module)
            for alias in node.names:
                local = alias.asname or alias.name
                # `from . import fwd` binds a module; `from .fwd import f` binds a name in one.
                is_module = (root / f"{source}/{alias.name}.py").is_file() if source else (
                    (root / f"{alias.name}.py").is_file())
                imported[local] = ((f"{source}/{alias.name}" if source else alias.name), None) if is_module \
                    else (source, alias.name)
    return _Module(name, tuple(text.splitlines()), defs, imported)


def _lookup(root: Path, module: str, name: str, depth: int = 0) -> tuple[_Module, str, ast.stmt] | None:
    """(module, name, definition) where `name`, as seen from `module`, is defined in this package."""
    mod = _module(root, module)
    if mod is None or depth > 8:
        return None
    if name in mod.defs:
        return mod, name, mod.defs[name]
    if name in mod.imported:
        source, attr = mod.imported[name]
        if attr is not None:
            return _lookup(root, source, attr, depth + 1)
    return None


def _referenced(mod: _Module, node: ast.stmt) -> list[tuple[str, str]]:
    """(module, name) of every package-level name `node` uses: bare names and `module_alias.name`."""
    found: list[tuple[str, str]] = []
    body = node.body if isinstance(node, ast.FunctionDef) else [node]
    for stmt in body:
        for sub in ast.walk(stmt):
            if isinstance(sub, ast.Name):
                found.append((mod.name, sub.id))
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                alias = mod.imported.get(sub.value.id)
                if alias is not None and alias[1] is None:
                    found.append((alias[0], sub.attr))
    return found


def closure(entries: tuple[str, ...], root: Path = _PACKAGE) -> dict[str, str]:
    """'module:name' -> normalised source of each jit function and constant the entry kernels reach."""
    pieces: dict[str, str] = {}
    todo = []
    for entry in entries:
        module, name = entry.split(":")
        found = _lookup(root, module, name)
        if found is None or not _is_jit(found[2]):
            raise LookupError(f"{entry} is not a @triton.jit function of {root}")
        todo.append(found)
    while todo:
        mod, name, node = todo.pop()
        label = f"{mod.name}:{name}"
        if label in pieces:
            continue
        pieces[label] = _tokens(mod.segment(node))
        for module, ref in _referenced(mod, node):
            found = _lookup(root, module, ref)
            if found is not None and (_is_jit(found[2]) or isinstance(found[2], (ast.Assign, ast.AnnAssign))):
                todo.append(found)
    return pieces


def op_versions(root: Path = _PACKAGE, op_kernels: dict[str, tuple[str, ...]] = OP_KERNELS) -> dict[str, str]:
    """op -> 12 hex digits of SHA-256 over the jit code that op compiles."""
    versions = {}
    for op, entries in op_kernels.items():
        digest = hashlib.sha256()
        # By name and code, not by file: moving a function between modules keeps the version.
        for name, text in sorted((label.split(":")[1], text) for label, text in closure(entries, root).items()):
            digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        versions[op] = digest.hexdigest()[:12]
    return versions


def jit_functions(root: Path = _PACKAGE) -> set[str]:
    """'module:name' of every top-level @triton.jit function in the package."""
    found = set()
    for path in root.rglob("*.py"):
        name = path.relative_to(root).with_suffix("").as_posix()
        mod = _module(root, name)
        if mod is not None:
            found |= {f"{name}:{n}" for n, node in mod.defs.items() if _is_jit(node)}
    return found


def combined(versions: dict[str, str]) -> str:
    """One 12-digit value for a set of op versions."""
    text = ",".join(f"{op}={v}" for op, v in sorted(versions.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


OP_VERSIONS: dict[str, str] = op_versions()
KERNEL_VERSION: str = combined(OP_VERSIONS)


def op_version(op: str) -> str:
    """The current version of `op`'s compiled code; KeyError for an op with no kernels."""
    return OP_VERSIONS[op]
