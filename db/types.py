"""The shared vocabulary: dtypes, ops, the tuning key and the launch config value object.

Pure Python on purpose: the database, the kernel and the tuner all speak in these types, and `db`
must not import torch or triton.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

from .arch import ARCH_SMEM, normalize_arch
from .text import label_problem, shown

# float8_e4m3fn: fp8 inputs of the inference forward (kernel.fp8), one byte an element; forward keys only.
FP8_DTYPE = "float8_e4m3fn"
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", FP8_DTYPE)
DTYPE_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1}
_DTYPE_ALIASES: dict[str, str] = {
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
    "float8_e4m3fn": "float8_e4m3fn", "fp8": "float8_e4m3fn", "e4m3": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
}
# forward, backward, split-KV decode, training pair, and the packed-sequence (varlen) forward and backward
OPS: tuple[str, ...] = ("fwd", "bwd", "kvcache", "train", "varlen", "varlen_bwd")
MAX_OP_TEXT = 16
# out_of_memory: the key's workload (inputs, reference) or the candidate's launch did not fit the GPU's free memory.
OUTCOMES: tuple[str, ...] = ("ok", "out_of_resources", "compile_error", "wrong_result", "crashed", "timeout",
                             "out_of_memory")
# flash_attn's rule: every multiple of 8 up to 256. The kernels run each through a power-of-two tile
# of at least 16 columns (kernel.ops.common.padded_head_dim) and mask the rest.
HEAD_DIMS: tuple[int, ...] = tuple(range(8, 257, 8))
HEAD_DIMS_TEXT = "a multiple of 8 from 8 to 256"
_HEAD_DIM_SET = frozenset(HEAD_DIMS)  # Key's fast path: one hash lookup

ExtraValue = Union[bool, int, float, str]

# Every integer the store keeps fits a 32-bit signed column on every backend (PostgreSQL's INTEGER),
# so a value SQLite alone would take cannot make an export that PostgreSQL refuses.
INT32_MAX = 2**31 - 1
MAX_SEQ_LEN = INT32_MAX
MAX_BATCH_HEADS = 2**30  # the largest power of two a 32-bit signed column holds
MAX_GROUP = 2**16
MAX_WINDOW = 2**30  # the largest window bucket (a power of two a 32-bit signed column holds)
MAX_TOKENS = 2**30  # the largest total-token bucket of a packed call
MAX_PAGE_SIZE = 2**20  # the largest page of a paged KV cache, in tokens
# An explicit attn_mask's kind: none, a boolean mask (True keeps), or a float mask added to the scores.
MASKS: tuple[str, ...] = ("none", "bool", "float")
# The attention features that change the best config, as Key fields, in order, and their "off" values:
# a key without them reads as every key stored before they were fields. `tokens` (a packed call's total
# query tokens, bucketed; 0: not packed) and `page_size` (a paged cache's page; 0: contiguous) joined later.
FEATURES: tuple[str, ...] = ("window", "softcap", "sinks", "alibi", "dropout", "mask", "tokens", "page_size")
FEATURE_DEFAULTS: dict[str, Any] = {"window": 0, "softcap": False, "sinks": False, "alibi": False,
                                    "dropout": False, "mask": "none", "tokens": 0, "page_size": 0}
_FLAGS: tuple[str, ...] = ("softcap", "sinks", "alibi", "dropout")
MAX_EXTRA_TEXT = 64
MAX_CONFIG_TEXT = 4096  # the canonical text of any valid config is far shorter


class InvalidField(ValueError):
    """A field of a Key or Config that fails its check. `field` names it, so that a stored row can
    be reported by its column."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class InvalidFieldType(InvalidField, TypeError):
    """An InvalidField whose value has the wrong type (still a TypeError, as it always was)."""


def _field(name: str, check: Callable[[Any], Any], value: Any) -> Any:
    """`check(value)`, its ValueError or TypeError re-raised as an InvalidField naming `name`."""
    try:
        return check(value)
    except InvalidField:
        raise
    except TypeError as exc:
        raise InvalidFieldType(name, str(exc)) from None
    except ValueError as exc:
        raise InvalidField(name, str(exc)) from None


def check_int(name: str, value: Any, low: int = 1, high: int = INT32_MAX) -> int:
    """`value` when it is an int (not a bool) from `low` to `high`; ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int from {low} to {high}, got {shown(value)}")
    return value


def normalize_dtype(name: str) -> str:
    """Map 'fp16', 'torch.float16', 'half', ... to the canonical dtype name; ValueError if unknown."""
    text = str(name).strip().lower().removeprefix("torch.")
    try:
        return _DTYPE_ALIASES[text]
    except KeyError:
        raise ValueError(f"unknown dtype {shown(name)}: expected one of {', '.join(DTYPES)} "
                         f"(or fp16, bf16, fp32, fp8)") from None


def normalize_op(op: str) -> str:
    """Check an op name (one of OPS: 'fwd', 'bwd', 'kvcache', 'train', 'varlen', 'varlen_bwd')."""
    if op not in OPS:
        raise ValueError(f"unknown op {shown(op)}: expected one of {', '.join(OPS)}")
    return op


def check_head_dim(head_dim: int) -> int:
    """Check a head dim against the sizes the kernel supports."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim not in HEAD_DIMS:
        raise ValueError(f"unsupported head dim {shown(head_dim)}: expected {HEAD_DIMS_TEXT}")
    return head_dim


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _check_extra_item(item: Any) -> tuple[str, ExtraValue]:
    """One (name, value) knob of a config: a short identifier and a bool, int32, finite float or
    short printable str (the values a kernel launch takes)."""
    k, v = item
    if not isinstance(k, str) or len(k) > 32 or not re.fullmatch(r"[a-z_][a-z0-9_]*", k):
        raise ValueError(f"config extra key {shown(k)}: must be a lower-case identifier of at most 32 "
                         "characters")
    if isinstance(v, bool):
        return k, v
    if isinstance(v, int):
        check_int(f"config extra {k}", v, -INT32_MAX - 1, INT32_MAX)
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"config extra {k}={v!r}: must be a finite number")
    elif isinstance(v, str):
        problem = label_problem(v, MAX_EXTRA_TEXT)
        if problem is not None:
            raise ValueError(f"config extra {k}: {problem}")
    else:
        raise TypeError(f"config extra {k}={shown(v)}: values must be bool, int, float or str")
    return k, v


@dataclass(frozen=True, slots=True)
class Config:
    """One launch config: tile sizes, warps, pipeline depth, plus kernel-variant knobs in `extra`.

    Frozen and hashable; `extra` is kept as a sorted tuple of (name, scalar) pairs so that two
    configs built from equal dicts compare and hash equal. `str(config)` is the canonical text form
    and `Config.parse` reads it back.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    extra: tuple[tuple[str, ExtraValue], ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_warps", "num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidFieldType(name, f"config {name} must be an int, got {shown(value)}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not _is_pow2(value) or not 16 <= value <= 256:
                raise InvalidField(name, f"config {name}={value}: must be a power of two from 16 to 256")
        if not _is_pow2(self.num_warps) or not 1 <= self.num_warps <= 32:
            raise InvalidField("num_warps", f"config num_warps={self.num_warps}: must be a power of two "
                               "from 1 to 32")
        if not 1 <= self.num_stages <= 8:
            raise InvalidField("num_stages", f"config num_stages={self.num_stages}: must be from 1 to 8")
        extra = self.extra
        if isinstance(extra, Mapping):
            extra = tuple(extra.items())
        items = [_field("extra", _check_extra_item, item) for item in extra]
        object.__setattr__(self, "extra", tuple(sorted(items)))

    @property
    def extra_dict(self) -> dict[str, ExtraValue]:
        """The kernel-variant knobs as a fresh dict."""
        return dict(self.extra)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the exchange file and the database use it)."""
        return {"block_m": self.block_m, "block_n": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages, "extra": self.extra_dict}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        """Inverse of `to_dict`; unknown fields are an error."""
        allowed = {"block_m", "block_n", "num_warps", "num_stages", "extra"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        try:
            sizes = [int(data[name]) for name in ("block_m", "block_n", "num_warps", "num_stages")]
        except OverflowError as exc:  # int(float('inf'))
            raise ValueError(f"config sizes must be finite: {exc}") from None
        return cls(*sizes, tuple((data.get("extra") or {}).items()))

    def __str__(self) -> str:
        text = f"m{self.block_m}-n{self.block_n}-w{self.num_warps}-s{self.num_stages}"
        if self.extra:
            text += "+" + json.dumps(self.extra_dict, sort_keys=True, separators=(",", ":"))
        return text

    @classmethod
    def parse(cls, text: str) -> "Config":
        """Read the canonical text form, e.g. 'm128-n64-w8-s3' or 'm128-n64-w8-s3+{"tma":true}'."""
        if not isinstance(text, str) or len(text) > MAX_CONFIG_TEXT:
            raise ValueError(f"malformed config {shown(text)}: expected text of at most {MAX_CONFIG_TEXT} "
                             "characters, the form m128-n64-w8-s3[+{json}]")
        m = re.fullmatch(r"\s*m(\d{1,4})-n(\d{1,4})-w(\d{1,4})-s(\d{1,4})(?:\+(\{.*\}))?\s*", text)
        if not m:
            raise ValueError(f"malformed config {shown(text)}: expected the form m128-n64-w8-s3[+{{json}}]")
        try:
            extra = json.loads(m.group(5)) if m.group(5) else {}
        except RecursionError:  # a deeply nested object: not a knob anyway
            raise ValueError(f"malformed config {shown(text)}: extra is nested too deeply") from None
        if not isinstance(extra, dict):
            raise ValueError(f"malformed config {shown(text)}: extra must be a JSON object")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)),
                   tuple(extra.items()))


@dataclass(frozen=True, slots=True)
class Key:
    """What a winner is stored for: GPU arch, op, sequence lengths, head dim, dtype, causal, and the
    workload: the B·Hq bucket and the GQA group.

    `seq_len` is the query length N; `seq_len_kv` the key/value length, equal to N unless the
    key is for cross attention. `batch_heads` is B·Hq rounded to a power of two (`bucket`), the
    amount of parallel work that decides wave quantisation; 0 means "not recorded" (winners of
    schema 1 and exchange format 1, timed at one synthetic size). `group` is Hq / Hkv (1 for
    plain multi-head attention).

    The attention features that change the best config (FEATURES), all "off" by default:
    `window` is a sliding window's total size bucketed to a power of two (`window_bucket`; 0: no
    window), `softcap`, `sinks`, `alibi` and `dropout` say whether the call uses logit softcapping,
    attention sinks, ALiBi slopes and dropout, and `mask` is the kind of an explicit attention mask
    ("none", "bool" or "float"). `tokens` is a packed (varlen) call's total query tokens bucketed to a power of
    two (0: not a packed call; its seq_len and seq_len_kv are then the longest documents' lengths, bucketed
    likewise), and `page_size` a paged KV cache's tokens per page (0: a contiguous cache).
    """

    arch: str
    op: str
    seq_len: int
    head_dim: int
    dtype: str
    causal: bool
    seq_len_kv: int = 0  # 0 means "same as seq_len"; normalised in __post_init__
    batch_heads: int = 0  # B·Hq bucket, a power of two; 0: not recorded (schema 1)
    group: int = 1  # Hq / Hkv
    window: int = 0  # sliding window size, a power of two (window_bucket); 0: none
    softcap: bool = False
    sinks: bool = False
    alibi: bool = False
    dropout: bool = False
    mask: str = "none"  # one of MASKS
    tokens: int = 0  # a packed (varlen) call's total query tokens, a power of two (bucket); 0: not packed
    page_size: int = 0  # a paged KV cache's page size in tokens, a power of two; 0: a contiguous cache

    def __post_init__(self) -> None:
        kv = self.seq_len_kv if self.seq_len_kv != 0 else self.seq_len
        if not (self.window == 0 and self.softcap is False and self.sinks is False and self.alibi is False
                and self.dropout is False and self.mask == "none" and type(self.window) is int
                and type(self.mask) is str and self.tokens == 0 and self.page_size == 0
                and type(self.tokens) is int and type(self.page_size) is int):
            self._check_features()
        bh, group = self.batch_heads, self.group
        if (type(bh) is not int or not (bh == 0 or (0 < bh <= MAX_BATCH_HEADS and bh & (bh - 1) == 0))):
            raise InvalidField("batch_heads", f"batch_heads must be 0 or a power of two from 1 to "
                                              f"{MAX_BATCH_HEADS}, got {shown(bh)}")
        if type(group) is not int or not 1 <= group <= MAX_GROUP:
            raise InvalidField("group", f"group must be an int from 1 to {MAX_GROUP}, got {shown(group)}")
        # Fast path: canonical values, as the store and the exchange file hold them (a key is built
        # per stored winner at app import). Anything else takes the checks below, which normalise
        # aliases and name the field that fails.
        if (type(self.arch) is str and self.arch in ARCH_SMEM and self.op in OPS
                and type(self.dtype) is str and self.dtype in DTYPE_BYTES
                and type(self.head_dim) is int and self.head_dim in _HEAD_DIM_SET
                and type(self.seq_len) is int and 0 < self.seq_len <= MAX_SEQ_LEN
                and type(kv) is int and 0 < kv <= MAX_SEQ_LEN and type(self.causal) is bool):
            object.__setattr__(self, "seq_len_kv", kv)
            return
        object.__setattr__(self, "arch", _field("arch", normalize_arch, self.arch))
        object.__setattr__(self, "op", _field("op", normalize_op, self.op))
        object.__setattr__(self, "dtype", _field("dtype", normalize_dtype, self.dtype))
        _field("head_dim", check_head_dim, self.head_dim)
        _field("seq_len", lambda n: check_int("seq_len", n, 1, MAX_SEQ_LEN), self.seq_len)
        _field("seq_len_kv", lambda n: check_int("seq_len_kv", n, 1, MAX_SEQ_LEN), kv)
        object.__setattr__(self, "seq_len_kv", kv)
        # `in (True, False)` compares by value: bools, 0/1 and numpy bools pass; "False", 2 or
        # None do not, where bool() would have turned them into a silent True or False.
        if self.causal not in (True, False):
            raise InvalidField("causal", f"causal must be a bool, got {shown(self.causal)}")
        object.__setattr__(self, "causal", bool(self.causal))

    def _check_features(self) -> None:
        """Check the attention features (the slow path: some feature is on, or not of its type)."""
        w = self.window
        if type(w) is not int or not (w == 0 or (0 < w <= MAX_WINDOW and w & (w - 1) == 0)):
            raise InvalidField("window", f"window must be 0 (none) or a power of two from 1 to {MAX_WINDOW}, "
                                         f"got {shown(w)} (window_bucket gives it from a window's sides)")
        for name in _FLAGS:
            value = getattr(self, name)
            if value not in (True, False):  # by value, as causal: 'False', 2 or None are refused
                raise InvalidField(name, f"{name} must be a bool, got {shown(value)}")
            object.__setattr__(self, name, bool(value))
        if type(self.mask) is not str or self.mask not in MASKS:
            raise InvalidField("mask", f"mask must be one of {', '.join(MASKS)}, got {shown(self.mask)}")
        for name, high, what in (("tokens", MAX_TOKENS, "bucket gives it from a packed call's total tokens"),
                                 ("page_size", MAX_PAGE_SIZE, "a paged cache's tokens per page")):
            value = getattr(self, name)
            if type(value) is not int or not (value == 0 or (0 < value <= high and value & (value - 1) == 0)):
                raise InvalidField(name, f"{name} must be 0 or a power of two from 1 to {high} ({what}), "
                                         f"got {shown(value)}")

    @property
    def features(self) -> tuple[Any, ...]:
        """The attention features in FEATURES order: keys that differ in them never share a winner."""
        return (self.window, self.softcap, self.sinks, self.alibi, self.dropout, self.mask, self.tokens,
                self.page_size)

    def __str__(self) -> str:
        n = str(self.seq_len) if self.seq_len_kv == self.seq_len else f"{self.seq_len}x{self.seq_len_kv}"
        text = (f"{self.arch}/{self.op}/N={n}/D={self.head_dim}/{self.dtype}/"
                f"{'causal' if self.causal else 'full'}")
        if self.batch_heads:
            text += f"/BH={self.batch_heads}"
        if self.group != 1:
            text += f"/G={self.group}"
        return "/".join((text, *self.feature_parts()))

    def feature_parts(self) -> list[str]:
        """The features that are on, as the key's text shows them: ['W=4096', 'softcap', 'mask=bool']."""
        parts = [f"W={self.window}"] if self.window else []
        parts += [name for name in _FLAGS if getattr(self, name)]
        parts += [f"mask={self.mask}"] if self.mask != "none" else []
        parts += [f"T={self.tokens}"] if self.tokens else []
        return parts + ([f"P={self.page_size}"] if self.page_size else [])

    def features_on(self) -> dict[str, Any]:
        """The features that are on, by field name (what the exchange file and JSON output write)."""
        return {name: value for (name, default), value in zip(FEATURE_DEFAULTS.items(), self.features)
                if value != default}

    @classmethod
    def parse(cls, text: str) -> "Key":
        """Read the canonical text form `str(key)` gives, e.g. 'sm_90/fwd/N=1024/D=64/float16/causal',
        'sm_90/fwd/N=4096/D=128/bfloat16/causal/BH=64/G=4/W=4096/softcap/mask=bool',
        'sm_90/varlen/N=8192/D=128/bfloat16/causal/BH=16/T=32768' or 'sm_90/kvcache/N=1x32768/D=128/.../P=64'."""
        m = None
        if isinstance(text, str) and len(text) <= 256:
            m = _KEY_TEXT.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"malformed key {shown(text)}: expected the form "
                             "ARCH/OP/N=1024[x2048]/D=64/DTYPE/causal|full[/BH=..][/G=..][/W=..][/softcap]"
                             "[/sinks][/alibi][/dropout][/mask=bool|float][/T=..][/P=..]")
        n_kv = m["n_kv"]
        return cls(m["arch"], m["op"], int(m["n"]), int(m["d"]), m["dtype"], m["causal"] == "causal",
                   int(n_kv) if n_kv else 0, int(m["bh"] or 0), int(m["g"] or 1), int(m["w"] or 0),
                   **{name: bool(m[name]) for name in _FLAGS}, mask=m["mask"] or "none",
                   tokens=int(m["t"] or 0), page_size=int(m["p"] or 0))


# The parts of Key.__str__, in its order; numbers of at most 10 digits, so that int() stays cheap.
_KEY_TEXT = re.compile(
    r"(?P<arch>[A-Za-z0-9_]{1,16})/(?P<op>[a-z_]{1,16})/N=(?P<n>\d{1,10})(?:x(?P<n_kv>\d{1,10}))?/D=(?P<d>\d{1,10})"
    r"/(?P<dtype>[a-z0-9_]{1,16})/(?P<causal>causal|full)(?:/BH=(?P<bh>\d{1,10}))?(?:/G=(?P<g>\d{1,10}))?"
    r"(?:/W=(?P<w>\d{1,10}))?(?P<softcap>/softcap)?(?P<sinks>/sinks)?(?P<alibi>/alibi)?(?P<dropout>/dropout)?"
    r"(?:/mask=(?P<mask>[a-z]{1,8}))?(?:/T=(?P<t>\d{1,10}))?(?:/P=(?P<p>\d{1,10}))?")


def window_bucket(left: int, right: int, seq_len_kv: int) -> int:
    """A sliding window's Key.window: its total size (left + 1 + right keys) rounded to a power of two
    as `bucket` rounds B·Hq; 0 when the window reaches across all `seq_len_kv` keys on both sides (no
    window at all). flash_attn's convention: `left` / `right` of -1 is unbounded on that side."""
    for name, value in (("window left", left), ("window right", right)):
        check_int(name, value, -1, INT32_MAX)
    check_int("seq_len_kv", seq_len_kv, 1, MAX_SEQ_LEN)
    lo = seq_len_kv if left < 0 else min(left, seq_len_kv)
    hi = seq_len_kv if right < 0 else min(right, seq_len_kv)
    if lo >= seq_len_kv - 1 and hi >= seq_len_kv - 1:
        return 0
    return bucket(lo + 1 + hi)


def bucket(batch_heads: int) -> int:
    """B·Hq rounded to the nearest power of two in log2 (halfway rounds up): the key's workload bucket."""
    if isinstance(batch_heads, bool) or not isinstance(batch_heads, int) or batch_heads < 1:
        raise ValueError(f"batch·heads must be a positive int, got {shown(batch_heads)}")
    low = 1 << (batch_heads.bit_length() - 1)
    # Nearest in log space: compare batch_heads² with low·2low, exact in integers.
    return min(low * 2 if batch_heads * batch_heads >= 2 * low * low else low, MAX_BATCH_HEADS)
