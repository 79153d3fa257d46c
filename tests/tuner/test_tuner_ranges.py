"""The `tune` argument parsers: sequence ranges, head dims, dtypes, durations."""
from __future__ import annotations

import pytest

from flashtune.tuner.ranges import parse_dtypes, parse_duration, parse_head_dims, parse_seq_lens


@pytest.mark.parametrize("text, expected", [
    ("128..4096", [128, 256, 512, 1024, 2048, 4096]),
    ("100..1000", [100, 200, 400, 800]),  # doubling stops before passing B
    ("128..512:128", [128, 256, 384, 512]),
    ("1..10:4", [1, 5, 9]),
    ("512,128,1000", [512, 128, 1000]),  # comma lists as given
    ("64, 128..512", [64, 128, 256, 512]),
    ("128,128..256", [128, 256]),  # repeats dropped
    ("7..7", [7]),
])
def test_seq_forms(text, expected):
    assert parse_seq_lens(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("0..8", "at least 1"),
    ("0", "at least 1"),
    ("4096..128", "reversed range"),
    ("128...256", "malformed"),
    ("128..", "malformed"),
    ("a..b", "malformed"),
    ("128,,256", "malformed"),
    ("", "empty"),
    ("-5..10", "malformed"),
    ("128..256:0", "step"),
    ("1..100000000:1", "more than"),
])
def test_seq_errors_name_the_text(text, needle):
    with pytest.raises(ValueError, match=needle) as info:
        parse_seq_lens(text)
    assert text in str(info.value)


def test_head_dims_and_dtypes():
    assert parse_head_dims("64,128,64") == [64, 128]
    with pytest.raises(ValueError, match="unsupported head dim 65"):
        parse_head_dims("64,65")
    with pytest.raises(ValueError, match="malformed head dim"):
        parse_head_dims("64;128")
    assert parse_dtypes("fp16,bf16,float16") == ["float16", "bfloat16"]
    assert parse_dtypes("fp16,fp8,e4m3") == ["float16", "float8_e4m3fn"]
    with pytest.raises(ValueError, match="unknown dtype 'fp4'"):
        parse_dtypes("fp16,fp4")


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400),
                                           ("1h30m", 5400), ("2m 30s", 150)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, needle", [("0", "above zero"), ("0m", "above zero"), ("-5m", "above zero"),
                                          ("ten", "malformed"), ("10x", "malformed"), ("", "malformed"),
                                          ("1h30", "malformed")])
def test_duration_errors(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_duration(text)
