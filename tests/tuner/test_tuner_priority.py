"""`tune --recorded` orders keys by their estimated share of the app's attention time, not by calls:
recorded tables in a real SQLite file where call counts and sizes disagree."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flashtune.db.store import Store
from flashtune.db.types import Key
from flashtune.tuner.cli import main
from flashtune.tuner.options import recorded_keys, recorded_ranking
from flashtune.tuner.priority import PEAKS, by_attention_time, call_seconds

SHORT = Key("sm_90", "fwd", 512, 128, "bfloat16", True, batch_heads=16)  # called most, cheap per call
LONG = Key("sm_90", "fwd", 8192, 128, "bfloat16", True, batch_heads=16)  # 256x the FLOPs of SHORT
MID = Key("sm_90", "fwd", 1024, 128, "bfloat16", False, batch_heads=16)
DECODE = Key("sm_90", "kvcache", 1, 128, "bfloat16", False, seq_len_kv=32768, batch_heads=32, group=4)


def _record(tmp_path, counts: dict[Key, int]) -> str:
    url = f"sqlite:///{tmp_path / 'recorded.db'}"
    with Store.open(url) as store:
        store.add_recorded(counts)
    return url


def _fwd_seconds(key: Key) -> float:
    """4·B·H·N²·D FLOPs (half when causal) at H100's nominal 989 TFLOP/s, written out here."""
    flops = 4 * key.batch_heads * key.seq_len * key.seq_len_kv * key.head_dim / (2 if key.causal else 1)
    return flops / 989e12


def test_recorded_keys_come_by_estimated_time_not_calls(tmp_path):
    counts = {SHORT: 1000, LONG: 10, MID: 300}
    url = _record(tmp_path, counts)
    # Calls alone: SHORT, MID, LONG. Time: LONG (10 x 256 = 2560 SHORT calls), then MID (300 x 4 = 1200), SHORT.
    keys = recorded_keys(url, "sm_90", ("fwd",))
    assert keys == [LONG, MID, SHORT]
    want = {k: n * _fwd_seconds(k) for k, n in counts.items()}
    ranking = recorded_ranking(url, "sm_90", ("fwd",))
    for r in ranking:
        assert r.calls == counts[r.key] and r.seconds == pytest.approx(want[r.key], rel=1e-9)
        assert r.share == pytest.approx(want[r.key] / sum(want.values()), rel=1e-9)
    assert sorted(keys, key=lambda k: -want[k]) == keys


def test_a_memory_bound_key_is_weighed_by_its_bytes(tmp_path):
    # DECODE does 1/50 of MID's FLOPs x calls, but moves 134 MB a call: at 3.35 TB/s it takes longer.
    counts = {MID: 100, DECODE: 30}
    url = _record(tmp_path, counts)
    peak_flops, peak_bytes = PEAKS["sm_90"]
    from flashtune.tuner.ops import spec_of

    spec = spec_of(DECODE)
    assert spec.flops(DECODE, 32) * 30 < spec_of(MID).flops(MID, 16) * 100
    assert call_seconds(DECODE) == spec.bytes(DECODE, 32) / peak_bytes > spec.flops(DECODE, 32) / peak_flops
    assert recorded_keys(url, "sm_90", ("fwd", "kvcache")) == [DECODE, MID]
    # The dry run shows the same order, with the calls and the shares.
    result = CliRunner().invoke(main, ["tune", "--recorded", "--dry-run", "--arch", "sm_90", "--op", "fwd,kvcache",
                                       "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["recorded"]
    assert [r["key"] for r in rows] == [str(DECODE), str(MID)]
    assert [r["calls"] for r in rows] == [30, 100]
    assert rows[0]["time_share"] > 0.5 and sum(r["time_share"] for r in rows) == pytest.approx(1.0)
    table = CliRunner().invoke(main, ["tune", "--recorded", "--dry-run", "--arch", "sm_90", "--op", "fwd,kvcache",
                                      "--db", url])
    assert table.exit_code == 0, table.output
    assert "time share" in table.stdout and table.stdout.index(str(DECODE)) < table.stdout.index(str(MID))


def test_ties_go_to_the_most_called():
    twin = Key("sm_90", "fwd", 512, 128, "bfloat16", True, batch_heads=32)  # twice SHORT's work a call
    ranked = by_attention_time([(SHORT, 200), (twin, 100)])
    assert ranked[0].seconds == pytest.approx(ranked[1].seconds, rel=1e-12)
    assert [r.key for r in ranked] == [SHORT, twin]
