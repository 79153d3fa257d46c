"""Parsers for the `tune` command's list arguments: sequence ranges, int lists, dtypes, durations.

Each raises ValueError with a message that names the bad text and the accepted forms; the CLI turns
that into one line and exit code 2.
"""
from __future__ import annotations

import re

from ..db.types import HEAD_DIMS, check_head_dim, normalize_dtype

SEQ_FORMS = "A..B (doubling from A to B), A..B:S (steps of S), or a comma list such as 128,512,1000"
_INT = r"\s*(\d+)\s*"
_MAX_VALUES = 4096  # a range that expands past this is a typo, not a tuning plan


def _positive(text: str, value: int, whole: str) -> int:
    if value < 1:
        raise ValueError(f"bad sequence length {text.strip()!r} in {whole!r}: lengths must be at least 1")
    return value


def parse_seq_lens(text: str) -> list[int]:
    """Expand '128..4096' (doubling), '128..1024:128' (steps) and comma lists, in the order given.

    Items may be mixed ('64,128..512'); repeats are dropped. A range must run upwards and every
    length must be at least 1.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty sequence-length list {text!r}: expected {SEQ_FORMS}")
    values: list[int] = []
    for item in text.split(","):
        if m := re.fullmatch(_INT, item):
            values.append(_positive(item, int(m.group(1)), text))
        elif m := re.fullmatch(_INT + r"\.\." + _INT + r"(?::" + _INT + r")?", item):
            lo, hi = int(m.group(1)), int(m.group(2))
            _positive(m.group(1), lo, text)
            if hi < lo:
                raise ValueError(f"reversed range {item.strip()!r} in {text!r}: write it low..high, e.g. {hi}..{lo}")
            if m.group(3) is None:
                n = lo
                while n <= hi:
                    values.append(n)
                    n *= 2
            else:
                step = int(m.group(3))
                if step < 1:
                    raise ValueError(f"bad step in {item.strip()!r}: the step after ':' must be at least 1")
                if (hi - lo) // step + 1 > _MAX_VALUES:
                    raise ValueError(f"range {item.strip()!r} expands to more than {_MAX_VALUES} lengths")
                values.extend(range(lo, hi + 1, step))
        else:
            raise ValueError(f"malformed sequence lengths {text!r} (at {item.strip()!r}): expected {SEQ_FORMS}")
    return list(dict.fromkeys(values))


def parse_head_dims(text: str) -> list[int]:
    """A comma list of head dims, each one the kernel supports; repeats dropped."""
    dims: list[int] = []
    for item in str(text).split(","):
        if not re.fullmatch(_INT, item):
            raise ValueError(f"malformed head dim {item.strip()!r} in {text!r}: expected a comma list of "
                             f"{', '.join(map(str, HEAD_DIMS))}")
        dims.append(check_head_dim(int(item)))
    return list(dict.fromkeys(dims))


def parse_dtypes(text: str) -> list[str]:
    """A comma list of dtype names ('fp16,bf16', 'float16', ...) in canonical form; repeats dropped."""
    return list(dict.fromkeys(normalize_dtype(item) for item in str(text).split(",")))


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '10m', '1.5h' or '1h30m'; the result must be above zero."""
    raw = str(text).strip().lower()
    if raw.startswith("-"):
        raise ValueError(f"duration {text!r} must be above zero")
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh]?)", raw)
    rebuilt = "".join(f"{num}{unit}" for num, unit in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", raw) or (len(parts) > 1 and any(u == "" for _, u in parts)):
        raise ValueError(f"malformed duration {text!r}: expected seconds or a number with s, m or h, "
                         "e.g. 90, 90s, 10m, 1h30m")
    seconds = sum(float(num) * _UNITS[unit] for num, unit in parts)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be above zero")
    return seconds
