"""The key's attention features (window, softcap, sinks, alibi, dropout, mask) on real databases: they round-trip
through the store, the exchange file, the key's text and `show --json`, they part winners, and bad values are
refused naming the field (a stored one skipped as a damaged row)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from helpers.db import execute_raw, run_info
from flashtune.db import exchange
from flashtune.db.rows import DamagedRowWarning
from flashtune.db.store import Store
from flashtune.db.types import FEATURE_DEFAULTS, Config, InvalidField, Key, window_bucket
from flashtune.tuner.cli import db as cli_db

PLAIN = Key("sm_90", "fwd", 2048, 128, "bfloat16", True, batch_heads=64, group=4)
ON: dict[str, object] = {"window": 4096, "softcap": True, "sinks": True, "alibi": True, "dropout": True,
                         "mask": "float"}
# The plain key with each feature on alone, and with all of them on.
FEATURED = [Key(**{**_fields, name: value}) for _fields in [
    {f: getattr(PLAIN, f) for f in ("arch", "op", "seq_len", "head_dim", "dtype", "causal", "seq_len_kv",
                                    "batch_heads", "group")}] for name, value in ON.items()]
ALL_ON = Key("sm_90", "fwd", 2048, 128, "bfloat16", True, batch_heads=64, group=4, **ON)
KEYS = [PLAIN, *FEATURED, ALL_ON, Key("sm_90", "bwd", 512, 64, "float16", False, mask="bool")]


def _fill(store: Store) -> None:
    run = store.start_run(run_info())
    for i, key in enumerate(KEYS):
        config = Config(64, 32 * (1 + i % 2), 4, 2)
        trial = store.record_trial(run, key, config, "ok", median_ms=1.0 + i)
        assert store.offer_winner(trial)
    store.add_recorded({key: i + 1 for i, key in enumerate(KEYS)})


def test_keys_with_features_round_trip_and_are_winners_of_their_own(db_url: str) -> None:
    with Store.open(db_url) as store:
        _fill(store)
        winners = {w.key: w for w in store.winners()}
        assert set(winners) == set(KEYS) and len(KEYS) == 9  # each differs from PLAIN in features alone
        assert winners[ALL_ON].median_ms == 1.0 + KEYS.index(ALL_ON)
        for key in KEYS:  # each key's trials are its own, matched on every feature
            (trial,) = store.trials(key)
            assert trial.key == key and trial.median_ms == 1.0 + KEYS.index(key)
        assert {r.key: r.calls for r in store.recorded()} == {key: i + 1 for i, key in enumerate(KEYS)}
        assert store.damaged_rows == []
        # A faster trial of one featured key replaces that key's winner only.
        run = store.start_run(run_info())
        assert store.offer_winner(store.record_trial(run, ALL_ON, Config(128, 64, 8, 3), "ok", median_ms=0.5))
        after = {w.key: w for w in store.winners()}
        assert after[ALL_ON].config == Config(128, 64, 8, 3) and after[PLAIN] == winners[PLAIN]


def test_exchange_file_carries_features_only_when_on(db_url: str, tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'source.db'}") as source:
        _fill(source)
        document = exchange.export_winners(source)
        exported = source.winners()
    path = tmp_path / "w.json"
    path.write_text(exchange.dump_document(document))
    raw = json.loads(path.read_text())
    assert raw["format_version"] == 2
    by_text = {str(Key(**{**w["key"]})): w["key"] for w in raw["winners"]}
    assert set(by_text[str(PLAIN)]) == {"arch", "op", "seq_len", "seq_len_kv", "head_dim", "dtype", "causal",
                                        "batch_heads", "group"}  # a key without features: the file as before
    assert {k: by_text[str(ALL_ON)][k] for k in ON} == ON
    with Store.open(db_url) as target:
        report = exchange.import_file(target, path)
        assert len(report.added) == len(KEYS)
        assert [(w.key, w.config, w.median_ms) for w in target.winners()] == \
            [(w.key, w.config, w.median_ms) for w in exported]
    raw["winners"][1]["key"]["window"] = 3000  # not a power of two
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(exchange.ExchangeFileError, match=r"winners\[1\]\.key\.window.*power of two"):
        exchange.read_document(bad)
    raw["winners"][1]["key"].update(window=0, mask="int")
    bad.write_text(json.dumps(raw))
    with pytest.raises(exchange.ExchangeFileError, match=r"winners\[1\]\.key\.mask.*none, bool, float"):
        exchange.read_document(bad)


def test_show_json_and_table_carry_the_features(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    with Store.open(url) as store:
        _fill(store)

    @click.group()
    def cli() -> None:
        pass

    cli_db.register(cli)
    shown = CliRunner().invoke(cli, ["show", "--db", url, "--json"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    keys = {Key(**w["key"]) for w in json.loads(shown.stdout)}
    assert keys == set(KEYS)
    table = CliRunner().invoke(cli, ["show", "--db", url], catch_exceptions=False).stdout
    assert "features" in table and "W=4096 softcap sinks alibi dropout mask=float" in table
    recorded = CliRunner().invoke(cli, ["show", "--db", url, "--recorded", "--json"], catch_exceptions=False)
    assert {Key(**{k: v for k, v in r.items() if k not in ("calls", "first_seen", "last_seen")})
            for r in json.loads(recorded.stdout)} == set(KEYS)


def test_key_text_round_trips_and_keeps_the_old_form() -> None:
    for key in KEYS:
        assert Key.parse(str(key)) == key
    assert str(PLAIN) == "sm_90/fwd/N=2048/D=128/bfloat16/causal/BH=64/G=4"  # as before the features
    assert str(ALL_ON) == str(PLAIN) + "/W=4096/softcap/sinks/alibi/dropout/mask=float"
    assert str(Key("sm_80", "fwd", 1, 64, "fp16", False, 4096, window=256)) == \
        "sm_80/fwd/N=1x4096/D=64/float16/full/W=256"
    for text in ("sm_90/fwd/N=1024/D=64/float16/causal/W=3", "sm_90/fwd/N=1024/D=64/float16/causal/mask=int",
                 "sm_90/fwd/N=1024/D=64/float16/causal/softcap/W=64", "sm_90/fwd/N=1024", 7):
        with pytest.raises(ValueError):
            Key.parse(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value, message", [
    ("window", 3, "window must be 0 .none. or a power of two"), ("window", -1, "window must be"),
    ("window", 2**31, "window must be"), ("window", True, "window must be"), ("window", 64.0, "window must be"),
    ("softcap", "yes", "softcap must be a bool"), ("sinks", 2, "sinks must be a bool"),
    ("alibi", None, "alibi must be a bool"), ("dropout", "False", "dropout must be a bool"),
    ("mask", "int", "mask must be one of none, bool, float"), ("mask", True, "mask must be one of"),
])
def test_bad_feature_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidField, match=message) as caught:
        Key("sm_90", "fwd", 128, 64, "float16", False, **{field: value})
    assert caught.value.field == field and isinstance(caught.value, ValueError)


def test_features_default_off_and_flags_take_bool_values() -> None:
    assert Key("sm_90", "fwd", 128, 64, "float16", False).features == tuple(FEATURE_DEFAULTS.values())
    key = Key("sm_90", "fwd", 128, 64, "float16", False, softcap=1, sinks=0)
    assert key.softcap is True and key.sinks is False and key == Key("sm_90", "fwd", 128, 64, "float16", False,
                                                                     softcap=True)


def test_window_bucket() -> None:
    assert window_bucket(4095, 0, 32768) == 4096  # Mistral's causal window: 4096 keys
    assert window_bucket(-1, -1, 1024) == 0 and window_bucket(1023, 1023, 1024) == 0  # the whole sequence
    assert window_bucket(5000, 5000, 1024) == 0
    assert window_bucket(-1, 0, 1024) == 1024  # unbounded on the left only: still a window (nearest power of two)
    assert window_bucket(100, 100, 4096) == 256  # 201 keys: 256 is nearer in log2 than 128
    assert window_bucket(0, 0, 4096) == 1
    for args, field in (((-2, 0, 64), "window left"), ((0, 1.5, 64), "window right"), ((0, 0, 0), "seq_len_kv")):
        with pytest.raises(ValueError, match=field):
            window_bucket(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("column, value, message", [
    ("window", 3, "window must be 0 (none) or a power of two"), ("mask", "int", "mask must be one of"),
    ("softcap", 2, "softcap must be a bool"),
])
def test_a_stored_bad_feature_is_a_damaged_row(db_url: str, column: str, value: object, message: str) -> None:
    if column == "softcap" and not db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's boolean column holds no 2")
    with Store.open(db_url) as store:
        _fill(store)
        row_id = next(w.trial_id for w in store.winners() if w.key == ALL_ON)
    execute_raw(db_url, f'UPDATE flashtune_winners SET "{column}" = :v WHERE trial_id = :t', {"v": value, "t": row_id})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Store.open(db_url, create=False) as store:
            keys = {w.key for w in store.winners()}
            (problem,) = store.damaged_rows
    assert keys == set(KEYS) - {ALL_ON}
    assert (problem.table, problem.column) == ("flashtune_winners", column) and message in problem.problem
    texts = [str(w.message) for w in caught if issubclass(w.category, DamagedRowWarning)]
    assert len(texts) == 1 and f"column {column}" in texts[0]
