"""The dispatcher's plans: what each call needs after validation, resolved by the rules from the loaded table and
memoised per input signature, so the steady state is one dict lookup; the stale warning and the fallback of a
stored config that does not compile here, once for every op."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

import torch

from ...db.arch import ARCH_SMEM, normalize_arch
from ...db.errors import first_line
from ...db.types import Config, Key, bucket

from ..checks import (AttnShape, check_bool, check_inputs, check_kvcache_inputs, check_scale, check_tensors,
                      head_span_fits)
from ..device import device_arch, device_sm_count, device_smem_limit
from ..errors import launch_failure
from ..ops import OPS, Op
from ..mods import Features, sdpa_computes
from ..ops.kvcache import DecodeLaunch
from ..providers import KERNEL
from ..version import op_version
from . import table as _tables
from .rules import (CONFIG_ENV_VAR, DEFAULT, EXACT, KV_OP, NEAREST, OP, OVERRIDE, TRAIN_OP, VARLEN_BWD_OP, VARLEN_OP,
                    Choice, group_key, key_or_none, kv_bucket, kv_shape, resolve)
from .table import MEMO_LIMIT, DispatchWarning, Table

INTERPRETER_ARCH = "sm_80"  # the nominal arch of CPU tensors, which run under the Triton interpreter


def _rules(op: str) -> Op:
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}: the dispatcher resolves {', '.join(OPS)}") from None


def _remember(memo: dict[Any, Any], token: Any, entry: Any) -> None:
    """Memoise `entry` under `token`; a memo past MEMO_LIMIT starts over (an app whose lengths never repeat
    just re-resolves)."""
    with _tables.lock:
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        memo[token] = entry


def _resolve(table: Table, arch: str, smem_limit: int, shape: AttnShape, causal: bool, *,
             kernel_only: bool = False, op: str = OP, sm_count: int | None = None,
             features: Mapping[str, Any] | None = None) -> Choice:
    return resolve(table, arch, smem_limit, shape, causal, rules=_rules(op), failed=_tables.failed,
                   sdpa_providers=_sdpa_providers(), kernel_only=kernel_only, op=op, sm_count=sm_count,
                   features=features)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a call needs after validation, memoised per input signature."""

    shape: AttnShape
    choice: Choice
    default_scale: float  # 1/sqrt(D), used when the call passes scale=None
    grouped: bool  # Hq != Hkv: the call must pass enable_gqa=True
    kernel: Config  # the kernel config to launch: the choice's, or its fallback when a backend won
    sdpa: str | None = None  # the SDPA backend to run instead of the kernel
    # A training plan (`train_plan`): the backward config its pair decided; None: the op="bwd" table's.
    bwd: Config | None = None
    # The call's key features that are on (kernel.mods: features, window, sinks, ALiBi, dropout, mask), sorted.
    features: Features = ()
    # The compiled kernel kept for direct relaunch (kernel.ops.fwd.launch_cached), per return_lse;
    # filled on the plan's first launch. Not part of the plan's identity.
    launchers: dict[bool, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class KVCachePlan:
    """attention_kvcache's plan, memoised per signature with the cache length Nk bucketed (`kv_bucket`).

    `shape` holds the sizes of the signature, with seq_k the bucket's power of two (a call's own Nk
    is its caches'); `choice` the config and why, resolved for that bucketed key; `launch` the
    kernel.ops.kvcache.DecodeLaunch that runs `choice.config` (it keeps the compiled passes for direct
    relaunch). `exact` maps the lengths inside the bucket that have a winner stored for exactly
    their key to their own plans (on CUDA; usually empty): such a call gets its tuned winner. Where an
    SDPA backend won the key, `sdpa` names it for the calls it computes the same (no lengths, and every
    query sees every key), and `launch` runs the kernel config stored beside the win for the others.
    """

    shape: AttnShape
    choice: Choice
    default_scale: float  # 1/sqrt(D), used when the call passes scale=None
    launch: Any = field(compare=False, repr=False)
    exact: dict[int, "KVCachePlan"] = field(default_factory=dict, compare=False, repr=False)
    # The SDPA backend that won the key, for calls it computes the same (`_sdpa_serves`); None: the kernel.
    sdpa: str | None = None


def _arch_limit(arch: str) -> tuple[str, int]:
    try:
        name = normalize_arch(arch)
    except ValueError:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCH_SMEM)} "
                         "(or explain() a CUDA tensor of that GPU)") from None
    return name, ARCH_SMEM[name]


@lru_cache(maxsize=1)
def _sdpa_providers() -> frozenset[str]:
    from ..sdpa import available_providers

    return frozenset(available_providers())


def lookup(arch: str, seq_len: int, head_dim: int, dtype: str, causal: bool, *,
           seq_len_kv: int | None = None, batch_heads: int = 1, group: int = 1,
           smem_limit: int | None = None, kernel_only: bool = False, op: str = OP,
           sm_count: int | None = None, window: int = 0, softcap: bool = False, sinks: bool = False,
           alibi: bool = False, dropout: bool = False, mask: str = "none", tokens: int = 0,
           page_size: int = 0) -> Choice:
    """The config the rules give a call of `op` ("fwd", "bwd": the backward of such a forward, "train": the
    pair of a training call, "kvcache": attention_kvcache with seq_len = Nq and seq_len_kv = the cache
    length, or "varlen" / "varlen_bwd": attention_varlen with seq_len and seq_len_kv the longest documents and
    `tokens` the total query tokens) on `arch` (no tensors, no memo, no warnings). The key's features:
    `window` (a window bucket, 0: none), `softcap`, `sinks`, `alibi`, `dropout` (bools), `mask` ("none",
    "bool" or "float"), `tokens` (bucketed here) and `page_size` (a paged cache's page, 0: contiguous).

    `batch_heads` is the call's B·Hq (bucketed here), `group` its Hq/Hkv. `smem_limit` defaults to
    the arch table's planning figure (db.arch.ARCH_SMEM); `sm_count` (the kvcache default's split
    count depends on it) to kernel.ops.kvcache.DEFAULT_SM_COUNT.
    """
    _rules(op)
    kernel_only = check_bool(kernel_only, "kernel_only")
    features = feature_fields(window=window, softcap=softcap, sinks=sinks, alibi=alibi, dropout=dropout, mask=mask,
                              tokens=bucket(tokens) if tokens else 0, page_size=page_size)
    key = Key(arch, op, seq_len, head_dim, dtype, check_bool(causal, "causal"), seq_len_kv=seq_len_kv or seq_len,
              batch_heads=bucket(batch_heads), group=group, **dict(features))
    limit = ARCH_SMEM[key.arch] if smem_limit is None else int(smem_limit)
    # A planning shape whose bucket and group are the key's: B=1, Hkv=BH/G (at least 1), Hq=Hkv·G.
    heads_kv = max(1, key.batch_heads // key.group)
    shape = AttnShape(1, heads_kv * key.group, heads_kv, key.seq_len, key.seq_len_kv, key.head_dim, key.dtype)
    return _resolve(_tables.table_for(key.arch), key.arch, limit, shape, key.causal, kernel_only=kernel_only, op=op,
                    sm_count=sm_count, features=_features(features))


def _features(features: Features) -> dict[str, Any] | None:
    return dict(features) if features else None


def feature_fields(*, window: int = 0, softcap: bool = False, sinks: bool = False, alibi: bool = False,
                   dropout: bool = False, mask: str = "none", tokens: int = 0, page_size: int = 0) -> Features:
    """The key features that are on, as the dispatcher carries them (kernel.mods.Features), from a key's
    fields; ValueError / TypeError naming a bad one (db.types.Key checks the window bucket, the mask, the
    token bucket and the page size)."""
    flags = {name: check_bool(value, name) for name, value in
             (("softcap", softcap), ("sinks", sinks), ("alibi", alibi), ("dropout", dropout))}
    sizes = {"window": window, "tokens": tokens, "page_size": page_size}
    Key("sm_90", OP, 1, 64, "float16", False, mask=mask, **sizes, **flags)  # validates the sizes and the mask
    fields: dict[str, Any] = {name: True for name, on in flags.items() if on}
    fields.update((name, value) for name, value in sizes.items() if value)
    if mask != "none":
        fields["mask"] = mask
    return tuple(sorted(fields.items()))


def _choose(table: Table, device: torch.device, shape: AttnShape, causal: bool, *,
            kernel_only: bool = False, op: str = OP, features: Features = ()) -> Choice:
    features = _features(features)
    if device.type == "cuda":
        return _resolve(table, device_arch(device), device_smem_limit(device), shape, causal,
                        kernel_only=kernel_only, op=op, sm_count=device_sm_count(device), features=features)
    # check_inputs let a CPU tensor through, so the Triton interpreter runs it.
    if table.interpreter:
        return _resolve(table, INTERPRETER_ARCH, ARCH_SMEM[INTERPRETER_ARCH], shape, causal,
                        kernel_only=kernel_only, op=op, features=features)
    rules = _rules(op)
    if op == KV_OP:
        shape = kv_shape(None, INTERPRETER_ARCH, shape, causal)
    key = key_or_none(INTERPRETER_ARCH, shape, causal, op, **(features or {}))
    if table.override is not None and rules.overridable:
        return Choice(table.override, OVERRIDE, f"forced by {CONFIG_ENV_VAR}", INTERPRETER_ARCH, key, op=op)
    config = rules.default(INTERPRETER_ARCH, shape, None, None)
    return Choice(config, DEFAULT, f"CPU tensors run under the Triton interpreter: the {INTERPRETER_ARCH} "
                  "default, tuned configs are not consulted", INTERPRETER_ARCH, key, op=op)


def _signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               features: Features = ()) -> tuple[Any, ...]:
    # Everything check_inputs and the rules depend on; data pointers do not matter to either. Features (features,
    # a window, ...) resolve another key (the plain signature stays the common case's tuple).
    signature = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
                 q.device, k.device, v.device, causal)
    return (*signature, features) if features else signature


def _warn_once(token: Any, message: str) -> None:
    with _tables.lock:
        if token in _tables.warned:
            return
        _tables.warned.add(token)
    warnings.warn(message, DispatchWarning, stacklevel=5)  # the caller of attention()


def _warn_stale(choice: Choice) -> None:
    """One warning per key whose stored winner was tuned with another version of its op's kernels."""
    if choice.stale and choice.winner is not None:
        wk = choice.winner.key
        _warn_once(("stale", wk), f"flashtune: using {choice.config} for {wk}, tuned with {wk.op} kernel version "
                   f"{choice.winner.kernel_version} (current {op_version(wk.op)}); it fits this GPU, "
                   "re-tune to refresh it")


def _plan_miss(q: Any, k: Any, v: Any, causal: bool, features: Features = ()) -> Plan:
    # fp8 inputs plan their own keys; only attention()'s fp8 path (kernel.fp8) brings them here.
    shape = check_inputs(q, k, v, fp8=True)
    table = _tables.current
    choice = _choose(table, q.device, shape, causal, features=features)
    _warn_stale(choice)
    sdpa = choice.provider if choice.provider != KERNEL and sdpa_computes(features) else None
    kernel = choice.kernel_config if choice.provider != KERNEL and choice.kernel_config else choice.config
    entry = Plan(shape, choice, check_scale(None, shape.head_dim), shape.heads_q != shape.heads_kv, kernel, sdpa,
                 features=features)
    _remember(table.memo, _signature(q, k, v, causal, features), entry)
    return entry


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, features: Features = ()) -> Plan:
    """Validate q, k, v and pick the config, memoised per input signature (the hot path); `features`: the
    call caps its scores (a key feature).

    Raises what kernel.checks.check_inputs raises (TypeError/ValueError) for bad inputs.
    """
    try:
        hit = _tables.current.memo.get(_signature(q, k, v, causal, features))
    except (AttributeError, RuntimeError):  # not tensors, or nested ones: check_inputs names the problem
        hit = None
    return hit if hit is not None else _plan_miss(q, k, v, causal, features)


def train_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, features: Features = ()) -> Plan:
    """The plan of a training call (inputs that require grad): the forward+backward pair stored for its
    "train" key (a kernel pair, or an SDPA backend running both passes), by the rules above; where no
    pair is tuned near the key, the forward's own plan (`plan`) with the backward from the op="bwd"
    table (`bwd` None). Memoised per input signature like `plan`."""
    try:
        token = (TRAIN_OP, _signature(q, k, v, causal, features))
        hit = _tables.current.memo.get(token)
    except (AttributeError, RuntimeError):
        token, hit = None, None
    return hit if hit is not None else _train_miss(token, q, k, v, causal, features)


def _train_miss(token: Any, q: Any, k: Any, v: Any, causal: bool, features: Features) -> Plan:
    forward = plan(q, k, v, causal, features)  # validates the inputs
    table = _tables.current
    choice = _choose(table, q.device, forward.shape, causal, op=TRAIN_OP, features=features)
    if choice.source in (EXACT, NEAREST):
        _warn_stale(choice)
        from ..ops.train import split_pair

        pair = choice.kernel_config if choice.provider != KERNEL else choice.config
        fwd_config, bwd_config = split_pair(pair)
        sdpa = choice.provider if choice.provider != KERNEL and sdpa_computes(features) else None
        entry = dataclasses.replace(forward, choice=choice, kernel=fwd_config, sdpa=sdpa, bwd=bwd_config,
                                    launchers={})
    else:  # nothing tuned as a pair: the forward and backward tables, each on its own
        entry = dataclasses.replace(forward, choice=dataclasses.replace(forward.choice, key=choice.key))
    if token is not None:
        _remember(table.memo, token, entry)
    return entry


def backend_refused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, features: Features = ()) -> None:
    """The SDPA backend of this call's plan refused its inputs: later calls of the same signature run the
    kernel config stored beside the backend's win straight away, and `plan(...).sdpa` says so (what ran)."""
    signature = _signature(q, k, v, causal, features)
    with _tables.lock:
        for token in (signature, (TRAIN_OP, signature)):  # the inference plan and the training plan
            entry = _tables.current.memo.get(token)
            if entry is not None and entry.sdpa is not None:
                _tables.current.memo[token] = dataclasses.replace(entry, sdpa=None)


def bwd_choice(q: torch.Tensor, shape: AttnShape, causal: bool, features: Features = ()) -> Choice:
    """The backward's config for a call of `shape` on q's device, by the same rules as the forward
    from the op="bwd" entries of the table (exact, nearest within NEAREST_LIMIT, else
    kernel.ops.bwd.default_bwd_config); memoised: one dict lookup after the first call."""
    token = (q.device, shape, causal, features)
    hit = _tables.current.choices.get(token)
    return hit if hit is not None else _bwd_miss(token, q.device, shape, causal, features)


def _bwd_miss(token: tuple[Any, ...], device: torch.device, shape: AttnShape, causal: bool,
              features: Features) -> Choice:
    table = _tables.current
    choice = _choose(table, device, shape, causal, op="bwd", features=features)
    _warn_stale(choice)
    _remember(table.choices, token, choice)
    return choice


def bwd_config(q: torch.Tensor, shape: AttnShape, causal: bool, features: Features = ()) -> Config:
    """The backward config for a call of `shape` on q's device (`bwd_choice`'s config)."""
    return bwd_choice(q, shape, causal, features).config


def bwd_config_failed(q: torch.Tensor, shape: AttnShape, causal: bool, choice: Choice,
                      error: BaseException, features: Features = ()) -> Choice:
    """Record that a stored backward config failed to compile here (one warning); the choice every
    backward of this shape gets from now on (the default)."""
    _record_failure(q, shape, causal, choice, error)
    return bwd_choice(q, shape, causal, features)


def _record_failure(q: torch.Tensor, shape: AttnShape, causal: bool, choice: Choice, error: BaseException) -> None:
    smem = device_smem_limit(q.device) if q.device.type == "cuda" else ARCH_SMEM[INTERPRETER_ARCH]
    text = first_line(error)
    token = (choice.op, choice.arch, smem, choice.config, shape.head_dim, shape.dtype, causal)
    with _tables.lock:
        _tables.failed[token] = text
        _tables.current.memo.clear()
        _tables.current.choices.clear()
    what = choice.winner.key if choice.winner is not None else choice.key
    _warn_once(("failed", *token), f"flashtune: stored config {choice.config} for {what} failed to compile "
               f"({text}); using the default config instead")


def stored_config_failed(choice: Choice, error: BaseException) -> bool:
    """Whether `error`, raised launching `choice`, is a stored winner's config that does not compile on this GPU
    (Triton's compile errors, out of resources), so the call should fall back to the default (`config_failed`,
    `bwd_config_failed`, `kvcache_config_failed`); anything else is the caller's to raise."""
    return choice.source in (EXACT, NEAREST) and launch_failure(error) in ("compile_error", "out_of_resources")


def config_failed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, choice: Choice,
                  error: BaseException, features: Features = ()) -> Plan:
    """Record that a stored config failed to compile here; the plan every call gets from now on (a training
    plan when `choice` was a training pair's)."""
    _record_failure(q, check_inputs(q, k, v), causal, choice, error)
    if choice.op == TRAIN_OP:
        return train_plan(q, k, v, causal, features)
    return _plan_miss(q, k, v, causal, features)


def kvcache_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, causal: bool,
                 has_seqlens: bool, features: Features = ()) -> KVCachePlan:
    """Validate q and the caches and pick attention_kvcache's config: the rules above with op="kvcache"
    (key: Nq, the cache length Nmax as N_kv, D, dtype, bottom-right causal, B·Hq bucket, Hq/Hkv; the
    default is kernel.ops.kvcache.default_decode_config for the device's SM count), for Nmax bucketed
    (`kv_bucket`) unless a winner is stored for exactly the call's key.

    Memoised per signature with Nmax bucketed: q's shape, strides, dtype and device, the caches' B,
    Hkv, D, dtypes and devices, causal and whether lengths are given. A growing cache (Nmax + 1
    every decode step, strides changing with it) therefore hits the same plan until it enters the
    next bucket. Each hit still checks what that signature leaves open and check_kvcache_inputs
    checks: v's exact shape equals k's, and each cache's head slice spans at most 2**31 elements
    (it grows with Nmax and the strides); anything else goes through the full check. Raises what
    kernel.kvcache.check_kvcache_inputs raises for bad inputs. The checks that involve the exact
    Nmax and the lengths (causal with fewer keys than queries, cache_seqlens) are the caller's.
    `features`: the call's key features (kernel.mods.Features: its own plan).
    """
    try:
        kshape = k_cache.shape
        seq_kv = kshape[2]
        token = _kv_token(q, k_cache, v_cache, causal, has_seqlens, features)
        hit = _tables.current.memo.get(token)
        if hit is not None:
            head_dim = kshape[3]
            if (v_cache.shape != kshape or not head_span_fits(seq_kv, k_cache.stride(), head_dim)
                    or not head_span_fits(seq_kv, v_cache.stride(), head_dim)):
                hit = None  # the full check below names the problem
            elif hit.exact:
                hit = hit.exact.get(seq_kv, hit)
    except (AttributeError, RuntimeError, TypeError, IndexError, ValueError):  # not dense tensors, Nmax = 0
        token, hit = None, None
    return hit if hit is not None else _kvcache_miss(token, q, k_cache, v_cache, causal, has_seqlens, features)


def _kv_token(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, causal: bool,
              has_seqlens: bool, features: Features = ()) -> tuple[Any, ...]:
    kshape = k_cache.shape
    return (KV_OP, has_seqlens, causal, features, q.shape, q.stride(), q.dtype, q.device, kshape[0], kshape[1],
            kshape[3:], kv_bucket(kshape[2]), k_cache.layout, k_cache.dtype, k_cache.device, v_cache.dtype,
            v_cache.device)


def kvcache_backend_refused(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, causal: bool,
                            has_seqlens: bool) -> None:
    """The SDPA backend of this decode call's plan refused its inputs: later calls of the same signature run
    the kernel config stored beside the backend's win straight away (a capped call never runs one)."""
    token = _kv_token(q, k_cache, v_cache, causal, has_seqlens)
    with _tables.lock:
        entry = _tables.current.memo.get(token)
        if entry is not None:
            _tables.current.memo[token] = dataclasses.replace(entry, sdpa=None, exact={
                n: dataclasses.replace(p, sdpa=None) for n, p in entry.exact.items()})


def _kvcache_miss(token: tuple[Any, ...] | None, q: Any, k_cache: Any, v_cache: Any, causal: bool,
                  has_seqlens: bool, features: Features = ()) -> KVCachePlan:
    shape = check_kvcache_inputs(q, k_cache, v_cache)
    table = _tables.current
    bucketed = dataclasses.replace(shape, seq_k=kv_bucket(shape.seq_k))
    exact = {n: _kv_plan(table, q.device, dataclasses.replace(shape, seq_k=n), causal, has_seqlens, features=features)
             for n in _kv_exact_lengths(table, q.device, bucketed, causal, features)}
    entry = _kv_plan(table, q.device, bucketed, causal, has_seqlens, exact, features=features)
    if token is not None:
        _remember(table.memo, token, entry)
    return entry.exact.get(shape.seq_k, entry)


def _kv_plan(table: Table, device: torch.device, shape: AttnShape, causal: bool, has_seqlens: bool,
             exact: dict[int, KVCachePlan] | None = None, *, features: Features = ()) -> KVCachePlan:
    choice = _choose(table, device, shape, causal, op=KV_OP, features=features)
    _warn_stale(choice)
    config, sdpa = choice.config, None
    if choice.provider != KERNEL:
        config = choice.kernel_config or config
        sdpa = choice.provider if _sdpa_serves(shape, causal, has_seqlens) and not features else None
    launch = DecodeLaunch(shape, config, causal=causal, ragged=has_seqlens)
    return KVCachePlan(shape, choice, check_scale(None, shape.head_dim), launch, exact or {}, sdpa)


def _sdpa_serves(shape: AttnShape, causal: bool, has_seqlens: bool) -> bool:
    # SDPA has no per-sequence lengths and aligns is_causal top-left: it computes a decode call only where
    # every query sees every cached key (what the tuner timed it on: tuner.ops.kvcache.sdpa_decode_key).
    return not has_seqlens and (shape.seq_q == 1 or not causal)


def _kv_exact_lengths(table: Table, device: torch.device, bucketed: AttnShape, causal: bool,
                      features: Features = ()) -> list[int]:
    """The cache lengths in `bucketed`'s bucket, other than the bucket's own, with a winner stored (in the
    user's database or bundled) for exactly their key (the call's key with that Nk); none for CPU tensors (no table is consulted)."""
    if device.type != "cuda":
        return []
    arch = device_arch(device)
    key = key_or_none(arch, bucketed, causal, KV_OP, **dict(features))
    if key is None:
        return []
    entries = (*table.groups.get(group_key(key), ()), *table.bundled.groups.get(group_key(key), ()))
    return sorted({n_kv for n, n_kv, bh, group, _ in entries
                   if (n, bh, group) == (key.seq_len, key.batch_heads, key.group) and n_kv != key.seq_len_kv
                   and kv_bucket(n_kv) == key.seq_len_kv})


def kvcache_key(plan: KVCachePlan) -> Key | None:
    """The key a call of `plan` counts under FLASHTUNE_RECORD: the key its plan was resolved for, i.e.
    the call's key with Nmax replaced by its bucket (`kv_bucket`), or the call's exact key where a
    winner is stored for exactly it. Every length of a bucket runs the bucket's choice, so that is
    the key worth tuning (None where no key can be formed)."""
    return plan.choice.key


def kvcache_config_failed(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, causal: bool,
                          has_seqlens: bool, choice: Choice, error: BaseException,
                          features: Features = ()) -> KVCachePlan:
    """Record that a stored kvcache config failed to compile here (one warning); the plan every such
    call gets from now on (the default)."""
    _record_failure(q, kvcache_plan(q, k_cache, v_cache, causal, has_seqlens, features).shape, causal, choice, error)
    return kvcache_plan(q, k_cache, v_cache, causal, has_seqlens, features)


@dataclass(frozen=True, slots=True)
class VarlenPlan:
    """attention_varlen's plan, memoised per signature: the forward's and the backward's choices for the key
    of the call's longest documents and total tokens (both bucketed to powers of two)."""

    fwd: Choice
    bwd: Choice


def varlen_plan(q: torch.Tensor, shape: AttnShape, total_q: int, causal: bool, features: Features = ()) -> VarlenPlan:
    """The configs of a packed call (inputs checked: kernel.ops.varlen.check_varlen_inputs gives `shape`, with
    batch = the documents and seq_q / seq_k = max_seqlen_q / k): the rules with op="varlen" and "varlen_bwd" for
    the key of N = bucket(max_seqlen_q), N_kv = bucket(max_seqlen_k), B·Hq = bucket(Hq) and tokens =
    bucket(total_q) (Key.tokens; the nearest rule measures it like B·Hq). Memoised: one dict lookup a call."""
    token = (VARLEN_OP, q.device, shape.heads_q, shape.heads_kv, shape.seq_q, shape.seq_k, shape.head_dim,
             shape.dtype, total_q, causal, features)
    hit = _tables.current.memo.get(token)
    if hit is not None:
        return hit
    table = _tables.current
    planning = AttnShape(1, shape.heads_q, shape.heads_kv, bucket(max(shape.seq_q, 1)), bucket(max(shape.seq_k, 1)),
                         shape.head_dim, shape.dtype)
    keyed = tuple(sorted((*features, ("tokens", bucket(max(total_q, 1))))))
    choices = []
    for op in (VARLEN_OP, VARLEN_BWD_OP):
        choice = _choose(table, q.device, planning, causal, op=op, features=keyed)
        _warn_stale(choice)
        choices.append(choice)
    entry = VarlenPlan(*choices)
    _remember(table.memo, token, entry)
    return entry


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, *,
            arch: str | None = None, kernel_only: bool = False, op: str = OP, window: int = 0,
            softcap: bool = False, sinks: bool = False, alibi: bool = False, dropout: bool = False,
            mask: str = "none", page_size: int = 0) -> Choice:
    """Which config `attention(q, k, v, is_causal=...)` uses and why, without running it; with
    `op="bwd"`, which config its backward uses; with `op="train"`, the pair a training call's key decides;
    with `op="kvcache"`, which config `attention_kvcache(q, k, v, causal=is_causal)` uses (k, v: the caches).
    The key features (`window` bucket, `softcap`, `sinks`, `alibi`, `dropout`, `mask`, as `lookup` takes
    them) ask the same for a call with those modifiers (its own key); `page_size` for a paged kvcache call
    (k, v then stand for the equivalent contiguous caches). A packed call's plan is `varlen_plan`'s.

    `arch` plans for another GPU arch (its table entries and planning shared-memory limit), e.g.
    to ask about sm_90 from a CPU machine: the tensors may then be on any device, since nothing
    runs. By default the tensors' own device decides, and it must be one the kernel runs on.
    `kernel_only` gives the flashtune kernel's config even where an SDPA backend won the key (what
    `flashtune bench` times as the kernel).
    """
    causal = check_bool(is_causal, "is_causal")
    kernel_only = check_bool(kernel_only, "kernel_only")
    features = feature_fields(window=window, softcap=softcap, sinks=sinks, alibi=alibi, dropout=dropout, mask=mask,
                              page_size=page_size)
    _rules(op)
    if arch is not None:
        shape = check_tensors(q, k, v, fp8=True)
        name, limit = _arch_limit(arch)
        return _resolve(_tables.table_for(name), name, limit, shape, causal, kernel_only=kernel_only, op=op,
                        features=_features(features))
    return _choose(_tables.current, q.device, check_inputs(q, k, v, fp8=True), causal, kernel_only=kernel_only, op=op,
                   features=features)
