"""The rule for short text that comes from files and machines, and how stored text is shown.

GPU names, hosts, kernel versions and version strings arrive from exchange files, drivers and other
databases, and end up on terminals. The rule: a *label* is a `str` whose every character is
printable in Python's sense (`str.isprintable`: no control characters such as NUL, newline or ESC,
no format characters such as the bidi overrides and marks, no separators other than the plain
space, no surrogates, private-use or unassigned code points), within its column's length. Labels
are checked where they enter (the exchange file's models, `RunInfo`) and where they are read back
(a stored row that breaks the rule is a damaged row). Free text such as a trial's error message
may hold anything; `printable` escapes it wherever it is shown.
"""
from __future__ import annotations

import re
from typing import Any

ELLIPSIS = "…"


def printable(text: Any, limit: int | None = None) -> str:
    """`text` (made a str) with every non-printable character escaped as `\\xNN`/`\\uNNNN`/`\\n`,
    and cut to `limit` characters (marked with '…'): safe to embed in a one-line message."""
    text = text if isinstance(text, str) else str(text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + ELLIPSIS
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to about `limit` characters: how a bad value appears in a message. An int
    too long to print (Python refuses past 4,300 digits) is described by its size instead."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"{ELLIPSIS} ({len(text)} characters)"


def label_problem(value: Any, max_length: int, *, required: bool = False) -> str | None:
    """Why `value` is not a label of at most `max_length` characters (non-blank if `required`);
    None when it is one."""
    if not isinstance(value, str):
        return f"must be text, got {type(value).__name__}"
    if len(value) > max_length:
        return f"is {len(value)} characters long, more than {max_length}"
    if required and not value.strip():
        return "must not be empty"
    if not value.isprintable():
        position, char = next((i, c) for i, c in enumerate(value) if not c.isprintable())
        return (f"holds the non-printable character U+{ord(char):04X} at position {position} "
                "(control, format, bidi and line-break characters are refused)")
    return None


def check_label(value: Any, field: str, max_length: int, *, required: bool = False) -> str:
    """`value` when it is a label (see the module doc); ValueError naming `field` otherwise."""
    problem = label_problem(value, max_length, required=required)
    if problem is not None:
        raise ValueError(f"{field} {problem}")
    return value


_SHOWN_URL_CHARS = 200


def mask_url(url: str) -> str:
    """The database URL with any password replaced by '***', control characters escaped and a very long one
    cut short: fit for messages and logs. Never raises, whatever `url` holds."""
    from sqlalchemy.engine import make_url  # here: the rest of this module is plain text handling
    from sqlalchemy.exc import ArgumentError

    text = str(url)
    try:
        text = make_url(text).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        # Unparseable, yet it may still hold 'user:password@': hide what sits there.
        text = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)
    return printable(text, _SHOWN_URL_CHARS)
