"""The rules that pick one config for a call of an op: FLASHTUNE_CONFIG, the winner stored for exactly the call's
key, else the nearest tuned key, else the op's default (the package docstring gives them in full).

Pure: no torch, no database, no state of its own. The plans module hands `resolve` the loaded table, the op's
registry entry (kernel.ops.OPS), the configs that failed to compile here and the SDPA backends torch has.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from ...db.text import printable, shown
from ...db.types import Config, Key, bucket

from ..providers import KERNEL, provider_of
from ..version import op_version

if TYPE_CHECKING:  # the store needs sqlalchemy; it is imported only when the database is read
    from ...db.store import Winner

CONFIG_ENV_VAR = "FLASHTUNE_CONFIG"
OP = "fwd"  # the op of `attention()`'s forward calls, and of lookup/explain unless told otherwise
KV_OP = "kvcache"  # attention_kvcache's op
TRAIN_OP = "train"  # a training call's forward+backward pair
VARLEN_OP, VARLEN_BWD_OP = "varlen", "varlen_bwd"  # attention_varlen's forward and backward
NEAREST_LIMIT = 2.0  # log2 units: how far from a tuned key the nearest rule still reaches
_UNBUCKETED = 1.0  # distance charged for a winner without a bucket (schema 1)
_OTHER_GROUP = 0.5  # distance charged for another GQA group of the same class

# Choice.source values.
OVERRIDE, EXACT, NEAREST, DEFAULT = "override", "exact", "nearest", "default"
# Choice.layer values: where a stored winner came from (None for an override or a default).
DATABASE, BUNDLED = "database", "bundled"

# (arch, op, head_dim, dtype, causal, grouped, the key's attention features): the nearest rule never
# crosses a feature, so a softcap call never takes a winner tuned without softcap. A packed call's token
# bucket is a workload size like B·Hq, not a feature: the group holds every bucket, and the distance counts it.
GroupKey = tuple[str, str, int, str, bool, bool, tuple[Any, ...]]
Entry = tuple[int, int, int, int, "Winner"]  # (n, n_kv, batch_heads, group, winner)
# (op, arch, smem, config, D, dtype, causal) -> the error a stored config failed to compile with here
Failures = Mapping[tuple[str, str, int, Config, int, str, bool], str]


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
    layer: str | None = None  # "database" (the user's) or "bundled" (shipped in the wheel) for a stored winner

    def __str__(self) -> str:
        where = f"{self.layer} {self.source}" if self.layer == BUNDLED else self.source
        return f"{self.config} ({where}): {self.reason}"


@dataclass(frozen=True)
class Layer:
    """One layer of stored winners: by exact key, and per group sorted for the nearest rule."""

    exact: Mapping[Key, "Winner"]
    groups: Mapping[GroupKey, tuple[Entry, ...]]


EMPTY = Layer({}, {})


class Tables(Protocol):
    """What the rules read of a loaded table: the user's winners by exact key, the winners of each group sorted
    for the nearest rule, the forced config (FLASHTUNE_CONFIG) if any, the bundled layer under them, and why
    bundled winners of some keys were skipped (stale)."""

    exact: Mapping[Key, "Winner"]
    groups: Mapping[GroupKey, tuple[Entry, ...]]
    override: Config | None
    bundled: Layer
    skipped: Mapping[Key, str]


def find(table: Tables, key: Key) -> tuple["Winner | None", str, str | None]:
    """The stored winner for `key` and how it was found: the user's exact, the user's nearest, the bundled
    exact, the bundled nearest; (None, DEFAULT, None) when no layer has one."""
    for layer, exact, groups in ((DATABASE, table.exact, table.groups),
                                 (BUNDLED, table.bundled.exact, table.bundled.groups)):
        winner = exact.get(key)
        if winner is not None:
            return winner, EXACT, layer
        entries = groups.get(group_key(key))
        winner = nearest(entries, key) if entries else None
        if winner is not None:
            return winner, NEAREST, layer
    return None, DEFAULT, None


def has_exact(table: Tables, key: Key) -> bool:
    """Whether any layer stores a winner for exactly `key`."""
    return key in table.exact or key in table.bundled.exact


def nearest(entries: tuple[Entry, ...], key: Key) -> "Winner | None":
    """The entry nearest to `key` in (log N, log N_kv, log BH, and a packed key's log tokens), within
    NEAREST_LIMIT; None if none is."""
    lq, lk, lb = math.log2(key.seq_len), math.log2(key.seq_len_kv), math.log2(key.batch_heads or 1)
    lt = math.log2(key.tokens) if key.tokens else 0.0
    best: tuple[float, int, int, int] | None = None
    chosen = None
    for n, n_kv, bh, group, w in entries:
        distance = abs(lq - math.log2(n)) + abs(lk - math.log2(n_kv))
        distance += abs(lb - math.log2(bh)) if bh and key.batch_heads else _UNBUCKETED
        distance += 0.0 if group == key.group else _OTHER_GROUP
        if lt:
            distance += abs(lt - math.log2(w.key.tokens))
        # Round so that exact ties in log space (e.g. 256 for 128 and 512) compare equal.
        score = (round(distance, 9), -n, -n_kv, -bh)
        if score[0] <= NEAREST_LIMIT and (best is None or score < best):
            best, chosen = score, w
    return chosen


def timing(winner: "Winner") -> str:
    """'0.1234 ms on GPU' for a reason; a damaged stored time is shown, never formatted as a number."""
    ms = winner.median_ms
    when = (f"{ms:.4g} ms" if isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms)
            else f"an unreadable time {shown(ms)}")
    return f"{when} on {printable(winner.gpu_name, 100)}"


def _unknown_knobs(config: Config, knobs: Callable[[Config], Any]) -> str | None:
    """Why the op's kernel cannot run `config`'s extra knobs (its registry entry's `knobs`), or None if it can."""
    try:
        knobs(config)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def group_key(key: Key) -> GroupKey:
    """The nearest rule's group of `key`: the winners it may take are those of the same group."""
    features = key.features
    if key.tokens:
        features = dataclasses.replace(key, tokens=1).features  # any bucket: `nearest` measures the distance
    return (key.arch, key.op, key.head_dim, key.dtype, key.causal, key.group > 1, features)


def key_or_none(arch: str, shape: Any, causal: bool, op: str = OP, *, window: int = 0, softcap: bool = False,
                sinks: bool = False, alibi: bool = False, dropout: bool = False, mask: str = "none",
                tokens: int = 0, page_size: int = 0) -> Key | None:
    """The key of a call of `shape`, with its attention features (`window` and `tokens` already bucketed:
    db.types.window_bucket, bucket); None where the call has no key (an unlisted arch, a shape no key holds)."""
    try:
        return Key(arch, op, shape.seq_q, shape.head_dim, shape.dtype, causal, seq_len_kv=shape.seq_k,
                   batch_heads=bucket(shape.batch * shape.heads_q), group=shape.group, window=window,
                   softcap=softcap, sinks=sinks, alibi=alibi, dropout=dropout, mask=mask, tokens=tokens,
                   page_size=page_size)
    except ValueError:
        return None


def kernel_fallback(winner: "Winner", provider: str) -> Config | None:
    """The kernel config a provider winner falls back to (None: none stored, use the default)."""
    if provider == KERNEL:
        return None
    return getattr(winner, "kernel_config", None)


def kv_bucket(seq_kv: int) -> int:
    """The cache length a kvcache plan is resolved and memoised for: Nk rounded to the nearest power
    of two in log2, halfway rounding up (as db.types.bucket rounds B·Hq). ValueError below 1."""
    low = 1 << (seq_kv.bit_length() - 1)
    return low << 1 if seq_kv * seq_kv >= 2 * low * low else low


def kv_shape(table: Tables | None, arch: str, shape: Any, causal: bool,
             features: Mapping[str, Any] | None = None) -> Any:
    """The shape a kvcache call's rules apply to: its own where a winner is stored for exactly its
    key (in `table`; None: the interpreter, which consults none), else Nk replaced by kv_bucket(Nk)."""
    seq_kv = kv_bucket(shape.seq_k)
    if seq_kv == shape.seq_k:
        return shape
    if table is not None:
        key = key_or_none(arch, shape, causal, KV_OP, **(features or {}))
        if key is not None and has_exact(table, key):
            return shape
    return dataclasses.replace(shape, seq_k=seq_kv)


def resolve(table: Tables, arch: str, smem_limit: int, shape: Any, causal: bool, *, rules: Any,
            failed: Failures, sdpa_providers: frozenset[str], kernel_only: bool = False, op: str = OP,
            sm_count: int | None = None, features: Mapping[str, Any] | None = None) -> Choice:
    """The choice for a call of `shape` (an AttnShape) on `arch`: `rules` is the op's registry entry
    (kernel.ops.Op: default, smem, knobs, overridable); `features` the call's attention features,
    key_or_none's keywords (None: all off)."""
    if op == KV_OP:
        shape = kv_shape(table, arch, shape, causal, features)
    key = key_or_none(arch, shape, causal, op, **(features or {}))
    head_dim, dtype = shape.head_dim, shape.dtype
    if table.override is not None and rules.overridable:
        return Choice(table.override, OVERRIDE, f"forced by {CONFIG_ENV_VAR}", arch, key, op=op)
    winner, source, layer = find(table, key) if key is not None else (None, DEFAULT, None)
    fallback_why = ("nothing tuned near this key (same arch, head dim, dtype, causal, group class and features, "
                    f"within {NEAREST_LIMIT:g} in log2 of N, N_kv and batch·heads)")
    if winner is None and key is not None and key in table.skipped:
        fallback_why += f"; the {table.skipped[key]}, so it is not used"
    bundled = "bundled (shipped with flashtune) " if layer == BUNDLED else ""
    provider = provider_of(winner.config) if winner is not None else KERNEL
    if winner is not None and provider != KERNEL:
        fallback = kernel_fallback(winner, provider)
        if kernel_only or provider not in sdpa_providers:
            # Run the kernel: its stored best (or the default), checked like any stored config below.
            if fallback is None:
                winner = None
                fallback_why = f"the winner is {provider} and no kernel config is stored beside it"
            else:
                winner = dataclasses.replace(winner, config=fallback)
                provider = KERNEL
        else:
            stale = winner.kernel_version != op_version(winner.key.op)
            what = (f"{bundled}stored winner" if source == EXACT
                    else f"nearest {bundled}tuned key, the winner for {winner.key}")
            return Choice(winner.config, source, f"{what}: torch SDPA's {provider} backend, {timing(winner)}",
                          arch, key, winner, stale, provider,
                          fallback or rules.default(arch, shape, smem_limit, sm_count), op=op, layer=layer)
    if winner is not None:
        config, wk = winner.config, winner.key
        failure = failed.get((op, arch, smem_limit, config, head_dim, dtype, causal))
        stale = winner.kernel_version != op_version(winner.key.op)
        unknown = _unknown_knobs(config, rules.knobs)
        need = rules.smem(config, head_dim, dtype, arch) if unknown is None else 0
        if failure is not None:
            fallback_why = f"{bundled}stored config {config} for {wk} failed to compile here ({failure})"
        elif unknown is not None:
            fallback_why = f"{bundled}stored config for {wk} cannot run here: {unknown}"
        elif need > smem_limit:
            fallback_why = (f"{bundled}stored config {config} for {wk} needs about {need // 1024} KB of shared "
                            f"memory; this GPU allows {smem_limit // 1024} KB")
        else:
            what = f"{bundled}stored winner" if source == EXACT else f"nearest {bundled}tuned key, the winner for {wk}"
            reason = f"{what}, {timing(winner)}"
            if stale:
                reason += f" (tuned with kernel version {winner.kernel_version}, now {op_version(winner.key.op)})"
            return Choice(config, source, reason, arch, key, winner, stale, op=op, layer=layer)
    config = rules.default(arch, shape, smem_limit, sm_count)
    return Choice(config, DEFAULT, f"default for {arch}: {fallback_why}", arch, key, op=op)
