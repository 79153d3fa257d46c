"""The dispatcher: tuned configs in memory, and the rules that pick one config per call.

Importing this module reads the winners of every visible GPU's arch from the database in one
query (`db.store.load_winners`) and keeps them in an immutable in-memory table. A call never
touches the database or the filesystem: it is resolved once per distinct input signature
(shapes, strides, dtypes, devices, causal) and memoised, so the steady state is one dict lookup.

Rules, in order, for a call of op P ("fwd": the forward, "bwd": its backward, "kvcache":
attention_kvcache, with Nk the cache length Nmax and causal bottom-right) on a CUDA tensor of arch A
with shape (B, Hq, Hkv, Nq, Nk, D, dtype, causal), whose key carries the workload: BH = B·Hq rounded to
a power of two (db.types.bucket) and G = Hq/Hkv:
1. `FLASHTUNE_CONFIG` (e.g. `m64-n32-w4-s2`) forces that config for every forward call (debugging).
2. The winner stored for exactly (A, P, Nq, Nk, D, dtype, causal, BH, G).
3. Else the nearest tuned entry with the same (A, P, D, dtype, causal) and group class (G = 1, or
   G > 1): the entry minimising |log2(Nq/n)| + |log2(Nk/n_kv)| + |log2(BH/bh)| (+1 where the entry
   has no bucket, schema 1; +0.5 for another G of the class); a tie goes to the larger n, n_kv, bh.
   Only entries within NEAREST_LIMIT (2: e.g. twice the length and twice the bucket) count: the
   rule interpolates between tuned keys and never extrapolates far past them into losses.
4. Else the op's default for A and the device's shared-memory limit (`kernel.defaults.default_config`,
   `kernel.bwd_smem.default_bwd_config`, `kernel.decode.default_decode_config` with the SM count).
Each op's default, shared-memory estimate and knob check are one entry of `_OPS`.

"kvcache" buckets the cache length: a decode loop's Nk grows by one every token, so per-Nk plans would
re-resolve on every step. Unless a winner is stored for exactly the call's key, rules 2-4 apply to the
key with Nk replaced by `kv_bucket(Nk)` (the nearest power of two in log2, halfway up: 1449..2896 ->
2048), and `kvcache_plan` memoises per signature with Nk bucketed the same way. The chosen config's
num_splits is a count, so the split size still follows the exact Nk (kernel.kvcache.split_geometry).
Every call is still validated for what the bucketed signature does not fix (v's exact shape, each
cache's 32-bit head span, which grows with Nk and the strides), and records its own key (exact Nk).
A winner is a config of the kernel or an SDPA backend (`provider` knob, kernel.sdpa): a call whose
choice is a backend runs torch SDPA pinned to it, and falls back to the winner's kernel config
(`kernel_config`) if the backend refuses the inputs. `explain(..., kernel_only=True)` gives the
kernel config alone (what `flashtune bench` times as the kernel).
A stored config (2 or 3) is used only if its op's estimated shared memory fits the device and the
op's kernel knows its extra knobs (kernel.variants, kernel.bwd_smem.bwd_knobs). One from an older kernel version is used with one warning;
if it then fails to compile, the call and every later one with that config fall back to the default
(also with one warning). An override the kernel cannot run is ignored with one warning at load.

CPU tensors (only under TRITON_INTERPRET=1) never consult the table: they get the default for the
nominal arch `INTERPRETER_ARCH` (the interpreter has no shared-memory limit or timing to tune).
A table loaded with `reload(..., interpreter=True)` (tests, or checking a tuned table without a GPU)
is the exception: CPU tensors then take the rules above from its `INTERPRETER_ARCH` entries, with
that arch's planning shared-memory limit, an SDPA backend winner included.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from ..db.arch import ARCH_SMEM, normalize_arch
from ..db.errors import first_line, one_line
from ..db.smem import estimate_smem
from ..db.text import printable, shown
from ..db.types import Config, Key, bucket

from .bwd_smem import bwd_knobs, default_bwd_config, estimate_bwd_smem
from .decode import decode_knobs, default_decode_config, estimate_decode_smem
from .defaults import default_config
from .device import device_arch, device_sm_count, device_smem_limit
from .sdpa import KERNEL, provider_of
from .launch import AttnShape, check_causal, check_inputs, check_scale, check_tensors, head_span_fits
from .variants import fwd_variant
from .version import op_version

if TYPE_CHECKING:  # the store needs sqlalchemy; it is imported only when the database is read
    from ..db.store import Winner

__all__ = ["CONFIG_ENV_VAR", "Choice", "DispatchWarning", "INTERPRETER_ARCH", "KVCachePlan", "LoadInfo", "Plan",
           "explain", "info", "kv_bucket", "kvcache_key", "kvcache_plan", "lookup", "plan", "reload", "visible_archs"]

log = logging.getLogger("flashtune.dispatch")

CONFIG_ENV_VAR = "FLASHTUNE_CONFIG"
DB_ENV_VAR = "FLASHTUNE_DB"  # db.paths.ENV_VAR; repeated so that a missing sqlalchemy cannot break import
INTERPRETER_ARCH = "sm_80"
OP = "fwd"  # the op of `attention()`'s forward calls, and of lookup/explain unless told otherwise
KV_OP = "kvcache"  # attention_kvcache's op
NEAREST_LIMIT = 2.0  # log2 units: how far from a tuned key the nearest rule still reaches
_UNBUCKETED = 1.0  # distance charged for a winner without a bucket (schema 1)
_OTHER_GROUP = 0.5  # distance charged for another GQA group of the same class
_MEMO_LIMIT = 4096  # distinct call signatures kept; apps with ever-changing lengths just re-resolve
# FLASHTUNE_CONFIG is read at import, which must never fail: longer or more bracketed text is refused
# before parsing (a deeply nested JSON extra would raise RecursionError in the parser). A real
# override has one {...} of scalar knobs.
_OVERRIDE_MAX_CHARS = 1000
_OVERRIDE_MAX_BRACKETS = 16

# Choice.source values.
OVERRIDE, EXACT, NEAREST, DEFAULT = "override", "exact", "nearest", "default"


class DispatchWarning(UserWarning):
    """Why the dispatcher is not using what the database holds (unreadable, stale, failing)."""


@dataclass(frozen=True)
class Choice:
    """The config a call uses and why; `explain()` returns one, `str()` reads as a sentence."""

    config: Config
    source: str  # "override" | "exact" | "nearest" | "default"
    reason: str
    arch: str  # the arch whose rules were applied (INTERPRETER_ARCH for CPU tensors)
    key: Key | None = None  # the call's key; None where no key can be formed (an unlisted arch)
    winner: "Winner | None" = None  # the stored winner behind an exact/nearest choice
    stale: bool = False  # the winner was tuned with another kernel version
    provider: str = KERNEL  # "kernel", or the SDPA backend that won (kernel.sdpa)
    kernel_config: Config | None = None  # the kernel config to run when the provider cannot (None: `config`)
    op: str = OP  # which op's table and rules gave it: "fwd" or "bwd"

    def __str__(self) -> str:
        return f"{self.config} ({self.source}): {self.reason}"


@dataclass(frozen=True, slots=True)
class Plan:
    """What a call needs after validation, memoised per input signature."""

    shape: AttnShape
    choice: Choice
    default_scale: float  # 1/sqrt(D), used when the call passes scale=None
    grouped: bool  # Hq != Hkv: the call must pass enable_gqa=True
    kernel: Config  # the kernel config to launch: the choice's, or its fallback when a backend won
    sdpa: str | None = None  # the SDPA backend to run instead of the kernel
    # The compiled kernel kept for direct relaunch (kernel.launch.launch_cached), per return_lse;
    # filled on the plan's first launch. Not part of the plan's identity.
    launchers: dict[bool, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class KVCachePlan:
    """attention_kvcache's plan, memoised per signature with the cache length Nk bucketed (`kv_bucket`).

    `shape` holds the sizes of the signature, with seq_k the bucket's power of two (a call's own Nk
    is its caches'); `choice` the config and why, resolved for that bucketed key; `launch` the
    kernel.kvcache.DecodeLaunch that runs `choice.config` (it keeps the compiled passes for direct
    relaunch). `exact` maps the lengths inside the bucket that have a winner stored for exactly
    their key to their own plans (on CUDA; usually empty): such a call gets its tuned winner.
    """

    shape: AttnShape
    choice: Choice
    default_scale: float  # 1/sqrt(D), used when the call passes scale=None
    launch: Any = field(compare=False, repr=False)
    exact: dict[int, "KVCachePlan"] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class LoadInfo:
    """What the last load (import or `reload()`) read, for `flashtune doctor` and people."""

    url: str | None  # masked; None when no database was read
    archs: tuple[str, ...]
    winners: int
    ok: bool  # False when the database could not be read and warned about
    message: str
    override: Config | None = None


_GroupKey = tuple[str, str, int, str, bool, bool]  # (arch, op, head_dim, dtype, causal, grouped)
_Entry = tuple[int, int, int, int, "Winner"]  # (n, n_kv, batch_heads, group, winner)


@dataclass
class _Table:
    """One loaded snapshot. Replaced whole by reload(), so a reader never sees half a table."""

    exact: dict[Key, "Winner"]
    groups: dict[_GroupKey, tuple[_Entry, ...]]
    override: Config | None
    info: LoadInfo
    url: str | None = None  # what reload() was given (None: FLASHTUNE_DB or the default file)
    memo: dict[tuple[Any, ...], Plan] = field(default_factory=dict)
    choices: dict[tuple[Any, ...], Choice] = field(default_factory=dict)  # other ops' memo (bwd_choice)
    interpreter: bool = False  # CPU tensors take the rules from INTERPRETER_ARCH's entries (reload)


@dataclass(frozen=True)
class _OpRules:
    """What the dispatcher needs to know about one op's kernel: its default config for (arch, the
    call's shape, shared-memory limit or None, SM count or None), its shared-memory estimate for
    (config, D, dtype, arch), its knob check (raises ValueError/TypeError for a config the kernel
    cannot run), and whether FLASHTUNE_CONFIG applies to it."""

    default: Callable[[str, AttnShape, "int | None", "int | None"], Config]
    smem: Callable[[Config, int, str, "str | None"], int]
    knobs: Callable[[Config], Any]
    overridable: bool = False


def _fwd_default(arch: str, shape: AttnShape, smem_limit: int | None, sm_count: int | None) -> Config:
    return default_config(arch, shape.head_dim, shape.dtype, smem_limit)


def _bwd_default(arch: str, shape: AttnShape, smem_limit: int | None, sm_count: int | None) -> Config:
    return default_bwd_config(arch, shape.head_dim, shape.dtype, smem_limit)


def _kvcache_default(arch: str, shape: AttnShape, smem_limit: int | None, sm_count: int | None) -> Config:
    # The split count depends on the call's sizes and the GPU's SM count (DEFAULT_SM_COUNT when planning).
    return default_decode_config(shape.seq_q, shape.seq_k, shape.head_dim, shape.dtype,
                                 batch_heads=shape.batch * shape.heads_q, group=shape.group, sm_count=sm_count,
                                 arch=arch, smem_limit=smem_limit)


_OPS: dict[str, _OpRules] = {
    "fwd": _OpRules(_fwd_default, estimate_smem, fwd_variant, overridable=True),
    "bwd": _OpRules(_bwd_default, estimate_bwd_smem, bwd_knobs),
    "kvcache": _OpRules(_kvcache_default, estimate_decode_smem, decode_knobs),
}


def _rules(op: str) -> _OpRules:
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}: the dispatcher resolves {', '.join(_OPS)}") from None


def _build_table(winners: Iterable["Winner"], override: Config | None, info: LoadInfo) -> _Table:
    exact: dict[Key, Winner] = {}
    groups: dict[_GroupKey, list[_Entry]] = {}
    for w in winners:
        k = w.key
        exact[k] = w
        groups.setdefault((k.arch, k.op, k.head_dim, k.dtype, k.causal, k.group > 1), []).append(
            (k.seq_len, k.seq_len_kv, k.batch_heads, k.group, w))
    return _Table(exact, {g: tuple(sorted(v, key=lambda e: e[:4])) for g, v in groups.items()}, override, info)


# --- loading --------------------------------------------------------------------------------

def visible_archs() -> tuple[str, ...]:
    """Archs of the CUDA devices this process sees, sorted; () without CUDA."""
    if not torch.cuda.is_available():
        return ()
    return tuple(sorted({device_arch(i) for i in range(torch.cuda.device_count())}))


def _read_override() -> tuple[Config | None, str | None]:
    """FLASHTUNE_CONFIG as a config the kernel can run, or why it is ignored; never raises."""
    text = os.environ.get(CONFIG_ENV_VAR, "").strip()
    if not text:
        return None, None
    brackets = text.count("{") + text.count("[")
    if len(text) > _OVERRIDE_MAX_CHARS:
        problem = f"longer than {_OVERRIDE_MAX_CHARS} characters"
    elif brackets > _OVERRIDE_MAX_BRACKETS:
        problem = f"{brackets} brackets ('{{' or '['): extra knobs are scalars in one JSON object"
    else:
        try:
            config = Config.parse(text)
            fwd_variant(config)  # a knob the kernel does not know is refused here, not at every call
            return config, None
        except (ValueError, TypeError) as exc:
            problem = one_line(exc)
        except Exception as exc:  # noqa: BLE001 - import must never fail, whatever the parser raises
            problem = first_line(exc)
    return None, f"flashtune: ignoring {CONFIG_ENV_VAR}={shown(text, 120)}: {printable(problem, 300)}"


def _read_winners(url: str | None, archs: tuple[str, ...]) -> tuple[list["Winner"] | None, LoadInfo]:
    """The winners of `archs` (None when the database could not be read) and what happened."""
    if not archs:
        return [], LoadInfo(None, archs, 0, True, "no CUDA GPU visible: nothing loaded, defaults apply")
    where: str | None = None  # the masked URL, once known: a password never reaches a message
    try:
        from ..db.paths import default_sqlite_path, default_url, mask_url
        from ..db.store import StoreError, load_winners

        if url is None and not os.environ.get(DB_ENV_VAR, "").strip():
            path = default_sqlite_path()
            if not path.exists():
                # A fresh machine: nothing tuned yet is the normal state, not worth a warning.
                return [], LoadInfo(str(path), archs, 0, True,
                                    f"no database at {path} (nothing tuned yet): defaults apply")
        url = default_url() if url is None else url
        where = mask_url(url)
        winners = load_winners(archs, url)
    except StoreError as exc:
        return None, LoadInfo(where, archs, 0, False, str(exc))
    except Exception as exc:  # noqa: BLE001 - import must never fail: any other cause is reported too
        return None, LoadInfo(where, archs, 0, False, f"reading the database{' ' + where if where else ''} "
                              f"failed: {type(exc).__name__}: {exc}")
    return winners, LoadInfo(where, archs, len(winners), True,
                             f"{len(winners)} tuned config(s) for {', '.join(archs)} from {where}")


def _load(url: str | None, archs: Iterable[str] | None, previous: _Table | None) -> _Table:
    """Read the database and the override into a new table; warn (never raise) on failure."""
    override, override_problem = _read_override()
    if override_problem:
        warnings.warn(override_problem, DispatchWarning, stacklevel=3)
    try:
        arch_list = visible_archs() if archs is None else tuple(sorted({str(a) for a in archs}))
    except Exception as exc:  # noqa: BLE001 - a broken driver must not break `import kernel`
        warnings.warn(f"flashtune: cannot query the CUDA devices ({type(exc).__name__}: {exc}); "
                      "default configs will be used", DispatchWarning, stacklevel=3)
        arch_list = ()
    winners, info = _read_winners(url, arch_list)
    if winners is None:
        kept = list(previous.exact.values()) if previous is not None else []
        tail = (f"keeping the {len(kept)} config(s) loaded before" if kept
                else "default configs will be used")
        warnings.warn(f"flashtune: cannot load tuned configs: {info.message}; {tail}",
                      DispatchWarning, stacklevel=3)
        info = LoadInfo(info.url, info.archs, len(kept), False, f"{info.message}; {tail}")
        winners = kept
    else:
        log.info("flashtune: %s", info.message)
    info = LoadInfo(info.url, info.archs, info.winners, info.ok, info.message, override)
    table = _build_table(winners, override, info)
    table.url = url
    return table


_lock = threading.Lock()
_warned: set[Any] = set()
# (op, arch, smem, config, D, dtype, causal) -> error
_failed: dict[tuple[str, str, int, Config, int, str, bool], str] = {}
_table: _Table = _load(None, None, None)


def reload(url: str | None = None, archs: Iterable[str] | None = None, *, interpreter: bool = False) -> LoadInfo:
    """Re-read the database (default: `db.paths.default_url()` now) and FLASHTUNE_CONFIG.

    `archs` defaults to the visible GPUs' archs; pass some to load others (planning, tests). An
    unreadable database warns and keeps the configs loaded before; this never raises for it.
    `interpreter=True`: CPU tensors (the Triton interpreter) are resolved from the loaded
    `INTERPRETER_ARCH` entries by the same rules as a GPU's calls, instead of getting the default.
    """
    global _table
    new = _load(url, archs, _table)
    new.interpreter = bool(interpreter)
    with _lock:
        _table = new
    return new.info


def info() -> LoadInfo:
    """What the current table was loaded from."""
    return _table.info


def _table_for(arch: str) -> _Table:
    """The loaded table when it covers `arch`; else that arch's winners read now, for planning calls
    (`explain(arch=...)`, `lookup`) about a GPU that is not here. Never on the hot path, and the
    runtime table is left as it is."""
    table = _table
    if arch in table.info.archs:
        return table
    return _load(table.url, (arch,), None)


# --- resolution -----------------------------------------------------------------------------

def _nearest(entries: tuple[_Entry, ...], key: Key) -> "Winner | None":
    """The entry nearest to `key` in (log N, log N_kv, log BH), within NEAREST_LIMIT; None if none is."""
    lq, lk, lb = math.log2(key.seq_len), math.log2(key.seq_len_kv), math.log2(key.batch_heads or 1)
    best: tuple[float, int, int, int] | None = None
    chosen = None
    for n, n_kv, bh, group, w in entries:
        distance = abs(lq - math.log2(n)) + abs(lk - math.log2(n_kv))
        distance += abs(lb - math.log2(bh)) if bh and key.batch_heads else _UNBUCKETED
        distance += 0.0 if group == key.group else _OTHER_GROUP
        # Round so that exact ties in log space (e.g. 256 for 128 and 512) compare equal.
        score = (round(distance, 9), -n, -n_kv, -bh)
        if score[0] <= NEAREST_LIMIT and (best is None or score < best):
            best, chosen = score, w
    return chosen


def _timing(winner: "Winner") -> str:
    """'0.1234 ms on GPU' for a reason; a damaged stored time is shown, never formatted as a number."""
    ms = winner.median_ms
    when = (f"{ms:.4g} ms" if isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms)
            else f"an unreadable time {shown(ms)}")
    return f"{when} on {printable(winner.gpu_name, 100)}"


def _unknown_knobs(config: Config, op: str = OP) -> str | None:
    """Why `op`'s kernel cannot run `config`'s extra knobs (kernel.variants, bwd_knobs), or None if it can."""
    try:
        _rules(op).knobs(config)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def _key_or_none(arch: str, shape: AttnShape, causal: bool, op: str = OP) -> Key | None:
    try:
        return Key(arch, op, shape.seq_q, shape.head_dim, shape.dtype, causal, seq_len_kv=shape.seq_k,
                   batch_heads=bucket(shape.batch * shape.heads_q), group=shape.group)
    except ValueError:
        return None


def _kernel_fallback(winner: "Winner", provider: str) -> Config | None:
    """The kernel config a provider winner falls back to (None: none stored, use the default)."""
    if provider == KERNEL:
        return None
    return getattr(winner, "kernel_config", None)


def kv_bucket(seq_kv: int) -> int:
    """The cache length a kvcache plan is resolved and memoised for: Nk rounded to the nearest power
    of two in log2, halfway rounding up (as db.types.bucket rounds B·Hq). ValueError below 1."""
    low = 1 << (seq_kv.bit_length() - 1)
    return low << 1 if seq_kv * seq_kv >= 2 * low * low else low


def _kv_shape(table: _Table | None, arch: str, shape: AttnShape, causal: bool) -> AttnShape:
    """The shape a kvcache call's rules apply to: its own where a winner is stored for exactly its
    key (in `table`; None: the interpreter, which consults none), else Nk replaced by kv_bucket(Nk)."""
    seq_kv = kv_bucket(shape.seq_k)
    if seq_kv == shape.seq_k:
        return shape
    if table is not None:
        key = _key_or_none(arch, shape, causal, KV_OP)
        if key is not None and key in table.exact:
            return shape
    return dataclasses.replace(shape, seq_k=seq_kv)


def _resolve(table: _Table, arch: str, smem_limit: int, shape: AttnShape, causal: bool, *,
             kernel_only: bool = False, op: str = OP, sm_count: int | None = None) -> Choice:
    rules = _rules(op)
    if op == KV_OP:
        shape = _kv_shape(table, arch, shape, causal)
    key = _key_or_none(arch, shape, causal, op)
    head_dim, dtype = shape.head_dim, shape.dtype
    if table.override is not None and rules.overridable:
        return Choice(table.override, OVERRIDE, f"forced by {CONFIG_ENV_VAR}", arch, key, op=op)
    winner = table.exact.get(key) if key is not None else None
    source = EXACT
    if winner is None and key is not None:
        entries = table.groups.get((arch, op, head_dim, dtype, causal, key.group > 1))
        if entries:
            winner, source = _nearest(entries, key), NEAREST
    fallback_why = ("nothing tuned near this key (same arch, head dim, dtype, causal and group class, "
                    f"within {NEAREST_LIMIT:g} in log2 of N, N_kv and batch·heads)")
    provider = provider_of(winner.config) if winner is not None else KERNEL
    if winner is not None and provider != KERNEL:
        fallback = _kernel_fallback(winner, provider)
        if kernel_only or provider not in _sdpa_providers():
            # Run the kernel: its stored best (or the default), checked like any stored config below.
            if fallback is None:
                winner = None
                fallback_why = f"the winner is {provider} and no kernel config is stored beside it"
            else:
                winner = dataclasses.replace(winner, config=fallback)
                provider = KERNEL
        else:
            stale = winner.kernel_version != op_version(winner.key.op)
            what = "stored winner" if source == EXACT else f"nearest tuned key, the winner for {winner.key}"
            return Choice(winner.config, source, f"{what}: torch SDPA's {provider} backend, {_timing(winner)}",
                          arch, key, winner, stale, provider,
                          fallback or rules.default(arch, shape, smem_limit, sm_count), op=op)
    if winner is not None:
        config, wk = winner.config, winner.key
        failed = _failed.get((op, arch, smem_limit, config, head_dim, dtype, causal))
        stale = winner.kernel_version != op_version(winner.key.op)
        unknown = _unknown_knobs(config, op)
        need = rules.smem(config, head_dim, dtype, arch) if unknown is None else 0
        if failed is not None:
            fallback_why = f"stored config {config} for {wk} failed to compile here ({failed})"
        elif unknown is not None:
            fallback_why = f"stored config for {wk} cannot run here: {unknown}"
        elif need > smem_limit:
            fallback_why = (f"stored config {config} for {wk} needs about {need // 1024} KB of shared "
                            f"memory; this GPU allows {smem_limit // 1024} KB")
        else:
            what = "stored winner" if source == EXACT else f"nearest tuned key, the winner for {wk}"
            reason = f"{what}, {_timing(winner)}"
            if stale:
                reason += f" (tuned with kernel version {winner.kernel_version}, now {op_version(winner.key.op)})"
            return Choice(config, source, reason, arch, key, winner, stale, op=op)
    config = rules.default(arch, shape, smem_limit, sm_count)
    return Choice(config, DEFAULT, f"default for {arch}: {fallback_why}", arch, key, op=op)


def _arch_limit(arch: str) -> tuple[str, int]:
    try:
        name = normalize_arch(arch)
    except ValueError:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCH_SMEM)} "
                         "(or explain() a CUDA tensor of that GPU)") from None
    return name, ARCH_SMEM[name]


@lru_cache(maxsize=1)
def _sdpa_providers() -> frozenset[str]:
    from .sdpa import available_providers

    return frozenset(available_providers())


def lookup(arch: str, seq_len: int, head_dim: int, dtype: str, causal: bool, *,
           seq_len_kv: int | None = None, batch_heads: int = 1, group: int = 1,
           smem_limit: int | None = None, kernel_only: bool = False, op: str = OP,
           sm_count: int | None = None) -> Choice:
    """The config the rules give a call of `op` ("fwd", "bwd": the backward of such a forward, or
    "kvcache": attention_kvcache with seq_len = Nq and seq_len_kv = the cache length) on `arch` (no
    tensors, no memo, no warnings).

    `batch_heads` is the call's B·Hq (bucketed here), `group` its Hq/Hkv. `smem_limit` defaults to
    the arch table's planning figure (db.arch.ARCH_SMEM); `sm_count` (the kvcache default's split
    count depends on it) to kernel.decode.DEFAULT_SM_COUNT.
    """
    _rules(op)
    key = Key(arch, op, seq_len, head_dim, dtype, check_causal(causal), seq_len_kv=seq_len_kv or seq_len,
              batch_heads=bucket(batch_heads), group=group)
    limit = ARCH_SMEM[key.arch] if smem_limit is None else int(smem_limit)
    # A planning shape whose bucket and group are the key's: B=1, Hkv=BH/G (at least 1), Hq=Hkv·G.
    heads_kv = max(1, key.batch_heads // key.group)
    shape = AttnShape(1, heads_kv * key.group, heads_kv, key.seq_len, key.seq_len_kv, key.head_dim, key.dtype)
    return _resolve(_table_for(key.arch), key.arch, limit, shape, key.causal, kernel_only=kernel_only, op=op,
                    sm_count=sm_count)


def _choose(table: _Table, device: torch.device, shape: AttnShape, causal: bool, *,
            kernel_only: bool = False, op: str = OP) -> Choice:
    if device.type == "cuda":
        return _resolve(table, device_arch(device), device_smem_limit(device), shape, causal,
                        kernel_only=kernel_only, op=op, sm_count=device_sm_count(device))
    # check_inputs let a CPU tensor through, so the Triton interpreter runs it.
    if table.interpreter:
        return _resolve(table, INTERPRETER_ARCH, ARCH_SMEM[INTERPRETER_ARCH], shape, causal,
                        kernel_only=kernel_only, op=op)
    rules = _rules(op)
    if op == KV_OP:
        shape = _kv_shape(None, INTERPRETER_ARCH, shape, causal)
    key = _key_or_none(INTERPRETER_ARCH, shape, causal, op)
    if table.override is not None and rules.overridable:
        return Choice(table.override, OVERRIDE, f"forced by {CONFIG_ENV_VAR}", INTERPRETER_ARCH, key, op=op)
    config = rules.default(INTERPRETER_ARCH, shape, None, None)
    return Choice(config, DEFAULT, f"CPU tensors run under the Triton interpreter: the {INTERPRETER_ARCH} "
                  "default, tuned configs are not consulted", INTERPRETER_ARCH, key, op=op)


def _signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[Any, ...]:
    # Everything check_inputs and the rules depend on; data pointers do not matter to either.
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, causal)


def _warn_once(token: Any, message: str) -> None:
    with _lock:
        if token in _warned:
            return
        _warned.add(token)
    warnings.warn(message, DispatchWarning, stacklevel=5)  # the caller of attention()


def _warn_stale(choice: Choice) -> None:
    """One warning per key whose stored winner was tuned with another version of its op's kernels."""
    if choice.stale and choice.winner is not None:
        wk = choice.winner.key
        _warn_once(("stale", wk), f"flashtune: using {choice.config} for {wk}, tuned with {wk.op} kernel version "
                   f"{choice.winner.kernel_version} (current {op_version(wk.op)}); it fits this GPU, "
                   "re-tune to refresh it")


def _plan_miss(q: Any, k: Any, v: Any, causal: bool) -> Plan:
    shape = check_inputs(q, k, v)
    table = _table
    choice = _choose(table, q.device, shape, causal)
    _warn_stale(choice)
    sdpa = choice.provider if choice.provider != KERNEL else None
    kernel = choice.kernel_config if choice.provider != KERNEL and choice.kernel_config else choice.config
    entry = Plan(shape, choice, check_scale(None, shape.head_dim), shape.heads_q != shape.heads_kv, kernel, sdpa)
    with _lock:
        if len(table.memo) >= _MEMO_LIMIT:
            table.memo.clear()
        table.memo[_signature(q, k, v, causal)] = entry
    return entry


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Plan:
    """Validate q, k, v and pick the config, memoised per input signature (the hot path).

    Raises what kernel.launch.check_inputs raises (TypeError/ValueError) for bad inputs.
    """
    try:
        hit = _table.memo.get(_signature(q, k, v, causal))
    except (AttributeError, RuntimeError):  # not tensors, or nested ones: check_inputs names the problem
        hit = None
    return hit if hit is not None else _plan_miss(q, k, v, causal)


def backend_refused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """The SDPA backend of this call's plan refused its inputs: later calls of the same signature run the
    kernel config stored beside the backend's win straight away, and `plan(...).sdpa` says so (what ran)."""
    token = _signature(q, k, v, causal)
    with _lock:
        entry = _table.memo.get(token)
        if entry is not None and entry.sdpa is not None:
            _table.memo[token] = dataclasses.replace(entry, sdpa=None)


def bwd_choice(q: torch.Tensor, shape: AttnShape, causal: bool) -> Choice:
    """The backward's config for a call of `shape` on q's device, by the same rules as the forward
    from the op="bwd" entries of the table (exact, nearest within NEAREST_LIMIT, else
    kernel.bwd_smem.default_bwd_config); memoised: one dict lookup after the first call."""
    token = (q.device, shape, causal)
    hit = _table.choices.get(token)
    return hit if hit is not None else _bwd_miss(token, q.device, shape, causal)


def _bwd_miss(token: tuple[Any, ...], device: torch.device, shape: AttnShape, causal: bool) -> Choice:
    table = _table
    choice = _choose(table, device, shape, causal, op="bwd")
    _warn_stale(choice)
    with _lock:
        if len(table.choices) >= _MEMO_LIMIT:
            table.choices.clear()
        table.choices[token] = choice
    return choice


def bwd_config(q: torch.Tensor, shape: AttnShape, causal: bool) -> Config:
    """The backward config for a call of `shape` on q's device (`bwd_choice`'s config)."""
    return bwd_choice(q, shape, causal).config


def bwd_config_failed(q: torch.Tensor, shape: AttnShape, causal: bool, choice: Choice,
                      error: BaseException) -> Choice:
    """Record that a stored backward config failed to compile here (one warning); the choice every
    backward of this shape gets from now on (the default)."""
    _record_failure(q, shape, causal, choice, error)
    return bwd_choice(q, shape, causal)


def _record_failure(q: torch.Tensor, shape: AttnShape, causal: bool, choice: Choice, error: BaseException) -> None:
    smem = device_smem_limit(q.device) if q.device.type == "cuda" else ARCH_SMEM[INTERPRETER_ARCH]
    text = first_line(error)
    token = (choice.op, choice.arch, smem, choice.config, shape.head_dim, shape.dtype, causal)
    with _lock:
        _failed[token] = text
        _table.memo.clear()
        _table.choices.clear()
    what = choice.winner.key if choice.winner is not None else choice.key
    _warn_once(("failed", *token), f"flashtune: stored config {choice.config} for {what} failed to compile "
               f"({text}); using the default config instead")


def config_failed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, choice: Choice,
                  error: BaseException) -> Plan:
    """Record that a stored config failed to compile here; the plan every call gets from now on."""
    _record_failure(q, check_inputs(q, k, v), causal, choice, error)
    return _plan_miss(q, k, v, causal)


def kvcache_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, causal: bool,
                 has_seqlens: bool) -> KVCachePlan:
    """Validate q and the caches and pick attention_kvcache's config: the rules above with op="kvcache"
    (key: Nq, the cache length Nmax as N_kv, D, dtype, bottom-right causal, B·Hq bucket, Hq/Hkv; the
    default is kernel.decode.default_decode_config for the device's SM count), for Nmax bucketed
    (`kv_bucket`) unless a winner is stored for exactly the call's key.

    Memoised per signature with Nmax bucketed: q's shape, strides, dtype and device, the caches' B,
    Hkv, D, dtypes and devices, causal and whether lengths are given. A growing cache (Nmax + 1
    every decode step, strides changing with it) therefore hits the same plan until it enters the
    next bucket. Each hit still checks what that signature leaves open and check_kvcache_inputs
    checks: v's exact shape equals k's, and each cache's head slice spans at most 2**31 elements
    (it grows with Nmax and the strides); anything else goes through the full check. Raises what
    kernel.kvcache.check_kvcache_inputs raises for bad inputs. The checks that involve the exact
    Nmax and the lengths (causal with fewer keys than queries, cache_seqlens) are the caller's.
    """
    try:
        kshape = k_cache.shape
        seq_kv = kshape[2]
        token = (KV_OP, has_seqlens, causal, q.shape, q.stride(), q.dtype, q.device, kshape[0], kshape[1],
                 kshape[3:], kv_bucket(seq_kv), k_cache.layout, k_cache.dtype, k_cache.device, v_cache.dtype,
                 v_cache.device)
        hit = _table.memo.get(token)
        if hit is not None:
            head_dim = kshape[3]
            if (v_cache.shape != kshape or not head_span_fits(seq_kv, k_cache.stride(), head_dim)
                    or not head_span_fits(seq_kv, v_cache.stride(), head_dim)):
                hit = None  # the full check below names the problem
            elif hit.exact:
                hit = hit.exact.get(seq_kv, hit)
    except (AttributeError, RuntimeError, TypeError, IndexError, ValueError):  # not dense tensors, Nmax = 0
        token, hit = None, None
    return hit if hit is not None else _kvcache_miss(token, q, k_cache, v_cache, causal, has_seqlens)


def _kvcache_miss(token: tuple[Any, ...] | None, q: Any, k_cache: Any, v_cache: Any, causal: bool,
                  has_seqlens: bool) -> KVCachePlan:
    from .kvcache import check_kvcache_inputs  # kernel.kvcache imports this module

    shape = check_kvcache_inputs(q, k_cache, v_cache)
    table = _table
    bucketed = dataclasses.replace(shape, seq_k=kv_bucket(shape.seq_k))
    exact = {n: _kv_plan(table, q.device, dataclasses.replace(shape, seq_k=n), causal, has_seqlens)
             for n in _kv_exact_lengths(table, q.device, bucketed, causal)}
    entry = _kv_plan(table, q.device, bucketed, causal, has_seqlens, exact)
    if token is not None:
        with _lock:
            if len(table.memo) >= _MEMO_LIMIT:
                table.memo.clear()
            table.memo[token] = entry
    return entry.exact.get(shape.seq_k, entry)


def _kv_plan(table: _Table, device: torch.device, shape: AttnShape, causal: bool, has_seqlens: bool,
             exact: dict[int, KVCachePlan] | None = None) -> KVCachePlan:
    from .kvcache import DecodeLaunch

    choice = _choose(table, device, shape, causal, op=KV_OP)
    _warn_stale(choice)
    launch = DecodeLaunch(shape, choice.config, causal=causal, ragged=has_seqlens)
    return KVCachePlan(shape, choice, check_scale(None, shape.head_dim), launch, exact or {})


def _kv_exact_lengths(table: _Table, device: torch.device, bucketed: AttnShape, causal: bool) -> list[int]:
    """The cache lengths in `bucketed`'s bucket, other than the bucket's own, with a winner stored for
    exactly their key (the call's key with that Nk); none for CPU tensors (no table is consulted)."""
    if device.type != "cuda":
        return []
    arch = device_arch(device)
    key = _key_or_none(arch, bucketed, causal, KV_OP)
    if key is None:
        return []
    entries = table.groups.get((arch, KV_OP, key.head_dim, key.dtype, causal, key.group > 1), ())
    return [n_kv for n, n_kv, bh, group, _ in entries
            if (n, bh, group) == (key.seq_len, key.batch_heads, key.group) and n_kv != key.seq_len_kv
            and kv_bucket(n_kv) == key.seq_len_kv]


def kvcache_key(plan: KVCachePlan, seq_kv: int) -> Key | None:
    """The key a call of `plan` with a cache of `seq_kv` keys counts under FLASHTUNE_RECORD: the
    plan's key with the call's own Nmax (None where no key can be formed)."""
    key = plan.choice.key
    if key is None or key.seq_len_kv == seq_kv:
        return key
    try:
        return dataclasses.replace(key, seq_len_kv=seq_kv)
    except ValueError:
        return None


def kvcache_config_failed(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, causal: bool,
                          has_seqlens: bool, choice: Choice, error: BaseException) -> KVCachePlan:
    """Record that a stored kvcache config failed to compile here (one warning); the plan every such
    call gets from now on (the default)."""
    _record_failure(q, kvcache_plan(q, k_cache, v_cache, causal, has_seqlens).shape, causal, choice, error)
    return kvcache_plan(q, k_cache, v_cache, causal, has_seqlens)


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, *,
            arch: str | None = None, kernel_only: bool = False, op: str = OP) -> Choice:
    """Which config `attention(q, k, v, is_causal=...)` uses and why, without running it; with
    `op="bwd"`, which config its backward uses; with `op="kvcache"`, which config
    `attention_kvcache(q, k, v, causal=is_causal)` uses (k, v: the caches).

    `arch` plans for another GPU arch (its table entries and planning shared-memory limit), e.g.
    to ask about sm_90 from a CPU machine: the tensors may then be on any device, since nothing
    runs. By default the tensors' own device decides, and it must be one the kernel runs on.
    `kernel_only` gives the flashtune kernel's config even where an SDPA backend won the key (what
    `flashtune bench` times as the kernel).
    """
    causal = check_causal(is_causal, "is_causal")
    _rules(op)
    if arch is not None:
        shape = check_tensors(q, k, v)
        name, limit = _arch_limit(arch)
        return _resolve(_table_for(name), name, limit, shape, causal, kernel_only=kernel_only, op=op)
    return _choose(_table, q.device, check_inputs(q, k, v), causal, kernel_only=kernel_only, op=op)
