"""The dispatcher's rules with the key's attention features: a call takes a winner tuned with exactly its features,
by the exact key or the nearest rule, and never one tuned without them (or with others)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flashtune.db.arch import ARCH_SMEM
from flashtune.db.store import load_winners
from flashtune.db.types import Config, Key
from flashtune.kernel.checks import AttnShape
from flashtune.kernel.dispatch.rules import DEFAULT, EXACT, NEAREST, group_key, key_or_none, resolve
from flashtune.kernel.dispatch.table import LoadInfo, build_table
from flashtune.kernel.ops import OPS
from flashtune.kernel.version import op_version
from helpers.dispatch import build_db, key

PLAIN, SOFTCAP, WINDOW = Config(128, 64, 4, 3), Config(64, 64, 4, 2), Config(64, 32, 4, 1)
WIN = 1024  # the window bucket tuned


@pytest.fixture
def table(tmp_path: Path):  # type: ignore[no-untyped-def]
    version = op_version("fwd")
    url = build_db(tmp_path / "f.db", [
        (key(1024, bh=16), PLAIN, 0.1, version),
        (dataclasses.replace(key(1024, bh=16), softcap=True), SOFTCAP, 0.2, version),
        (dataclasses.replace(key(4096, bh=16), window=WIN), WINDOW, 0.3, version),
    ])
    return build_table(load_winners(["sm_90"], url), None, LoadInfo(url, ("sm_90",), 3, True, ""))


def _choose(table, n: int, **features: object):  # type: ignore[no-untyped-def]
    shape = AttnShape(1, 16, 16, n, n, 64, "float16")
    return resolve(table, "sm_90", ARCH_SMEM["sm_90"], shape, False, rules=OPS["fwd"], failed={},
                   sdpa_providers=frozenset(), features=features)


def test_a_call_takes_only_winners_of_its_features(table) -> None:  # type: ignore[no-untyped-def]
    plain = _choose(table, 1024)
    assert (plain.source, plain.config) == (EXACT, PLAIN) and plain.key.features == (0, False, False, False, False,
                                                                                     "none", 0, 0)
    capped = _choose(table, 1024, softcap=True)
    assert (capped.source, capped.config) == (EXACT, SOFTCAP) and capped.key.softcap
    near = _choose(table, 2048, softcap=True)  # the softcap winner at 1024, not the plain one
    assert (near.source, near.config) == (NEAREST, SOFTCAP)
    assert _choose(table, 2048).config == PLAIN
    # Nothing tuned with these features: the default, though a plain winner sits at exactly this N.
    for features in ({"sinks": True}, {"softcap": True, "alibi": True}, {"mask": "bool"}, {"dropout": True}):
        choice = _choose(table, 1024, **features)
        assert choice.source == DEFAULT and "features" in choice.reason, (features, choice)
    windowed = _choose(table, 2048, window=WIN)
    assert (windowed.source, windowed.config) == (NEAREST, WINDOW)
    assert _choose(table, 2048, window=2 * WIN).source == DEFAULT  # another window bucket


def test_group_key_and_key_or_none_carry_the_features() -> None:
    shape = AttnShape(2, 8, 2, 512, 512, 64, "float16")
    plain = key_or_none("sm_90", shape, True)
    featured = key_or_none("sm_90", shape, True, window=256, softcap=True, sinks=True, alibi=True, dropout=True,
                           mask="float")
    assert plain is not None and featured is not None
    assert featured == Key("sm_90", "fwd", 512, 64, "float16", True, batch_heads=16, group=4, window=256,
                           softcap=True, sinks=True, alibi=True, dropout=True, mask="float")
    assert group_key(plain) != group_key(featured)
    assert group_key(plain)[:6] == group_key(featured)[:6]
    assert key_or_none("sm_90", shape, True, window=300) is None  # not a bucket: no key
