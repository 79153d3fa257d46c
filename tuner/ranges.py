"""Parsers for the command line's values: sequence ranges, head dims, dtypes, bounded integers, durations.

Each raises ValueError with a message that names the bad text and the accepted forms; the CLI
(`tuner.cli.common`) prefixes the option's name and turns it into one line and exit code 2.
"""
from __future__ import annotations

import math
import re

from ..db.types import HEAD_DIMS, HEAD_DIMS_TEXT, INT32_MAX, check_head_dim, normalize_dtype

SEQ_FORMS = "A..B (doubling from A to B), A..B:S (steps of S), or a comma list such as 128,512,1000"
# The database stores lengths as 32-bit integers (PostgreSQL INTEGER), so a longer one could be
# tuned on SQLite and then never be exported into PostgreSQL: refuse it at the command line.
MAX_SEQ_LEN = INT32_MAX  # a key's sequence lengths are int32 columns
_INT = r"\s*(\d+)\s*"
_MAX_VALUES = 4096  # a range that expands past this is a typo, not a tuning plan
_SHOWN = 24  # characters of a huge number quoted in a message


def _quote(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _whole(text: str) -> int:
    # Only digits reach here; int() of more than 4,300 of them raises, and no such number is in range.
    digits = text.strip().lstrip("0") or "0"
    return int(digits) if len(digits) <= 20 else 10**20


def _seq_len(text: str, whole: str) -> int:
    value = _whole(text)
    within = "" if text.strip() == whole.strip() else f" in {_quote(whole)}"
    if value < 1:
        raise ValueError(f"bad sequence length {_quote(text)}{within}: lengths must be at least 1")
    if value > MAX_SEQ_LEN:
        raise ValueError(f"sequence length {_quote(text)}{within} is above the limit of {MAX_SEQ_LEN} (2**31 - 1)")
    return value


def parse_seq_lens(text: str) -> list[int]:
    """Expand '128..4096' (doubling), '128..1024:128' (steps) and comma lists, in the order given.

    Items may be mixed ('64,128..512'); repeats are dropped. A range must run upwards and every
    length must be from 1 to MAX_SEQ_LEN.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty sequence-length list {text!r}: expected {SEQ_FORMS}")
    values: list[int] = []
    for item in text.split(","):
        if m := re.fullmatch(_INT, item):
            values.append(_seq_len(m.group(1), text))
        elif m := re.fullmatch(_INT + r"\.\." + _INT + r"(?::" + _INT + r")?", item):
            lo, hi = _seq_len(m.group(1), text), _seq_len(m.group(2), text)
            if hi < lo:
                raise ValueError(f"reversed range {item.strip()!r} in {text!r}: write it low..high, e.g. {hi}..{lo}")
            if m.group(3) is None:
                n = lo
                while n <= hi:
                    values.append(n)
                    n *= 2
            else:
                step = _whole(m.group(3))
                if step < 1:
                    raise ValueError(f"bad step in {item.strip()!r}: the step after ':' must be at least 1")
                if (hi - lo) // step + 1 > _MAX_VALUES:
                    raise ValueError(f"range {item.strip()!r} expands to more than {_MAX_VALUES} lengths")
                values.extend(range(lo, hi + 1, step))
        else:
            raise ValueError(f"malformed sequence lengths {_quote(text)} (at {_quote(item)}): expected {SEQ_FORMS}")
    return list(dict.fromkeys(values))


def parse_seq_len(text: str) -> int:
    """One sequence length (for commands about one key or shape): a whole number from 1 to MAX_SEQ_LEN."""
    if not isinstance(text, str) or not re.fullmatch(_INT, text):
        raise ValueError(f"malformed sequence length {_quote(str(text))}: expected one whole number, e.g. 4096")
    return _seq_len(text, text)


def parse_head_dims(text: str) -> list[int]:
    """A comma list of head dims, each one the kernel supports; repeats dropped."""
    return list(dict.fromkeys(parse_head_dim(item) for item in str(text).split(",")))


def parse_head_dim(text: str) -> int:
    """One head dim the kernel supports."""
    if not re.fullmatch(_INT, str(text)):
        raise ValueError(f"malformed head dim {_quote(str(text))}: expected {HEAD_DIMS_TEXT}")
    value = _whole(text)
    if value > max(HEAD_DIMS):  # before check_head_dim: a huge value is quoted as typed, not as an int
        raise ValueError(f"unsupported head dim {_quote(text)}: expected {HEAD_DIMS_TEXT}")
    return check_head_dim(value)


def parse_dtypes(text: str) -> list[str]:
    """A comma list of dtype names ('fp16,bf16', 'float16', ...) in canonical form; repeats dropped."""
    return list(dict.fromkeys(normalize_dtype(item) for item in str(text).split(",")))


def parse_int(text: str, lo: int, hi: int = INT32_MAX) -> int:
    """A whole number from `lo` to `hi`."""
    raw = str(text).strip()
    if not re.fullmatch(r"[+-]?\d+", raw):
        raise ValueError(f"expected a whole number from {lo} to {hi}, got {_quote(raw)}")
    value = -_whole(raw[1:]) if raw.startswith("-") else _whole(raw.lstrip("+"))
    if not lo <= value <= hi:
        raise ValueError(f"{_quote(raw)} is out of range: expected a whole number from {lo} to {hi}")
    return value


def parse_float(text: str, lo: float, hi: float = math.inf, *, low_open: bool = False) -> float:
    """A finite number from `lo` (excluded when `low_open`) to `hi`."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"expected a number, got {_quote(str(text))}") from None
    if not math.isfinite(value) or value > hi or value < lo or (low_open and value == lo):
        bound = f"above {lo:g}" if low_open else f"at least {lo:g}"
        raise ValueError(f"{_quote(str(text))} is out of range: expected a finite number {bound}"
                         + (f" and at most {hi:g}" if math.isfinite(hi) else ""))
    return value


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_DURATION_S = 366 * 24 * 3600.0  # a year: anything longer is a typo


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '10m', '1.5h' or '1h30m'; above zero and at most a year."""
    raw = str(text).strip().lower()
    if raw.startswith("-"):
        raise ValueError(f"duration {text!r} must be above zero")
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh]?)", raw)
    rebuilt = "".join(f"{num}{unit}" for num, unit in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", raw) or (len(parts) > 1 and any(u == "" for _, u in parts)):
        raise ValueError(f"malformed duration {_quote(str(text))}: expected seconds or a number with s, m or h, "
                         "e.g. 90, 90s, 10m, 1h30m")
    seconds = sum(float(num) * _UNITS[unit] for num, unit in parts)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be above zero")
    if not seconds <= _MAX_DURATION_S:
        raise ValueError(f"duration {_quote(str(text))} is longer than a year")
    return seconds
