"""The shared vocabulary: dtypes, ops, the tuning key and the launch config value object.

Pure Python on purpose: the database, the kernel and the tuner all speak in these types, and `db`
must not import torch or triton.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from .arch import normalize_arch

DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
DTYPE_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}
_DTYPE_ALIASES: dict[str, str] = {
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
}
OPS: tuple[str, ...] = ("fwd", "bwd")
OUTCOMES: tuple[str, ...] = ("ok", "out_of_resources", "compile_error", "wrong_result", "crashed", "timeout")
HEAD_DIMS: tuple[int, ...] = (16, 32, 64, 80, 96, 112, 128, 160, 192, 256)

ExtraValue = Union[bool, int, float, str]


def normalize_dtype(name: str) -> str:
    """Map 'fp16', 'torch.float16', 'half', ... to the canonical dtype name; ValueError if unknown."""
    text = str(name).strip().lower().removeprefix("torch.")
    try:
        return _DTYPE_ALIASES[text]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)} "
                         f"(or fp16, bf16, fp32)") from None


def normalize_op(op: str) -> str:
    """Check an op name ('fwd' or 'bwd')."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: expected one of {', '.join(OPS)}")
    return op


def check_head_dim(head_dim: int) -> int:
    """Check a head dim against the sizes the kernel supports."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim not in HEAD_DIMS:
        raise ValueError(f"unsupported head dim {head_dim!r}: expected one of "
                         f"{', '.join(map(str, HEAD_DIMS))}")
    return head_dim


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True)
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
                raise TypeError(f"config {name} must be an int, got {value!r}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not _is_pow2(value) or not 16 <= value <= 256:
                raise ValueError(f"config {name}={value}: must be a power of two from 16 to 256")
        if not _is_pow2(self.num_warps) or not 1 <= self.num_warps <= 32:
            raise ValueError(f"config num_warps={self.num_warps}: must be a power of two from 1 to 32")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"config num_stages={self.num_stages}: must be from 1 to 8")
        extra = self.extra
        if isinstance(extra, Mapping):
            extra = tuple(extra.items())
        items = []
        for k, v in extra:
            if not isinstance(k, str) or not re.fullmatch(r"[a-z_][a-z0-9_]*", k):
                raise ValueError(f"config extra key {k!r}: must be a lower-case identifier")
            if not isinstance(v, (bool, int, float, str)):
                raise TypeError(f"config extra {k}={v!r}: values must be bool, int, float or str")
            items.append((k, v))
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
        return cls(int(data["block_m"]), int(data["block_n"]), int(data["num_warps"]),
                   int(data["num_stages"]), tuple((data.get("extra") or {}).items()))

    def __str__(self) -> str:
        text = f"m{self.block_m}-n{self.block_n}-w{self.num_warps}-s{self.num_stages}"
        if self.extra:
            text += "+" + json.dumps(self.extra_dict, sort_keys=True, separators=(",", ":"))
        return text

    @classmethod
    def parse(cls, text: str) -> "Config":
        """Read the canonical text form, e.g. 'm128-n64-w8-s3' or 'm128-n64-w8-s3+{"tma":true}'."""
        m = re.fullmatch(r"\s*m(\d+)-n(\d+)-w(\d+)-s(\d+)(?:\+(\{.*\}))?\s*", text)
        if not m:
            raise ValueError(f"malformed config {text!r}: expected the form m128-n64-w8-s3[+{{json}}]")
        extra = json.loads(m.group(5)) if m.group(5) else {}
        if not isinstance(extra, dict):
            raise ValueError(f"malformed config {text!r}: extra must be a JSON object")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)),
                   tuple(extra.items()))


@dataclass(frozen=True)
class Key:
    """What a winner is stored for: GPU arch, op, sequence lengths, head dim, dtype, causal.

    `seq_len` is the query length N; `seq_len_kv` the key/value length, equal to N unless the
    key is for cross attention.
    """

    arch: str
    op: str
    seq_len: int
    head_dim: int
    dtype: str
    causal: bool
    seq_len_kv: int = 0  # 0 means "same as seq_len"; normalised in __post_init__

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch", normalize_arch(self.arch))
        object.__setattr__(self, "op", normalize_op(self.op))
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        check_head_dim(self.head_dim)
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {self.seq_len!r}")
        kv = self.seq_len_kv or self.seq_len
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1:
            raise ValueError(f"seq_len_kv must be a positive int, got {self.seq_len_kv!r}")
        object.__setattr__(self, "seq_len_kv", kv)
        object.__setattr__(self, "causal", bool(self.causal))

    def __str__(self) -> str:
        n = str(self.seq_len) if self.seq_len_kv == self.seq_len else f"{self.seq_len}x{self.seq_len_kv}"
        return (f"{self.arch}/{self.op}/N={n}/D={self.head_dim}/{self.dtype}/"
                f"{'causal' if self.causal else 'full'}")
