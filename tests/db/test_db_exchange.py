"""The exchange file: round trips, each merge policy, and bad files that must change nothing."""
from __future__ import annotations

import codecs
import copy
import dataclasses
import json
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from flashtune.db import exchange
from flashtune.db.exchange import ExchangeFileError, import_file, read_document
from flashtune.kernel.ops import smem_need
from flashtune.kernel.ops.fwd import estimate_smem
from flashtune.db.store import Store, Winner
from flashtune.db.types import Config, Key

from helpers.db import CFG_A, CFG_B, CFG_C, aware, finishes_within, key, populate, run_info, snapshot


def _winner(k=None, config=CFG_A, ms=1.0, gpu="NVIDIA H200", kernel="k1", when=None) -> Winner:
    return Winner(key=k or key(), config=config, median_ms=ms, tflops=10.0 / ms, kernel_version=kernel,
                  gpu_name=gpu, sm_count=132, driver="560.35", cuda="12.6", triton_version="3.6.0",
                  torch_version="2.11.0", host="node-1", measured_at=when or aware(), trial_id=None)


def _document(winners: list[Winner]) -> dict[str, Any]:
    return {"format": "flashtune-winners", "format_version": 1, "exported_at": "2025-02-01T00:00:00Z",
            "producer": {"flashtune": "0.1.0", "schema_version": 1, "python": "3.11", "sqlalchemy": "2.0",
                         "pydantic": "2.5", "host": "node-1"},
            "filters": {}, "winners": [exchange.winner_to_dict(w) for w in winners]}


def _write(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


def _plain(winners: list[Winner]) -> list[Winner]:
    return [dataclasses.replace(w, trial_id=None) for w in winners]


# --- round trips -------------------------------------------------------------------------------

def test_export_import_round_trip(tmp_path: Path, db_url: str) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    with Store.open(source) as store:
        populate(store)
        populate(store, arch="sm_80", gpu_name="NVIDIA A100", kernel_version="k2")
        store.offer_winner(store.record_trial(  # a cross-attention key with kernel knobs
            store.start_run(run_info()),
            key(1024, 128, "bfloat16", False, n_kv=4096), CFG_B, "ok", median_ms=0.123456789012345))
        expected = _plain(store.winners())
        document = exchange.export_winners(store)
    path = tmp_path / "winners.json"
    path.write_text(exchange.dump_document(document))
    assert json.loads(path.read_text())["format_version"] == exchange.FORMAT_VERSION
    with Store.open(db_url) as target:
        first = import_file(target, path)
        assert len(first.added) == len(expected) == 25 and first.changed == 25
        assert target.winners() == expected  # every field, floats bit for bit
        before = snapshot(db_url)
        for policy in exchange.POLICIES:  # the same file again changes nothing, whatever the policy
            again = import_file(target, path, policy)
            assert again.changed == 0 and len(again.kept) == 25 and not again.conflicts
        assert snapshot(db_url) == before


def test_export_filters(tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store:
        populate(store)
        populate(store, arch="sm_80", gpu_name="NVIDIA A100")
        assert len(exchange.export_winners(store, arch="sm80").winners) == 12
        assert len(exchange.export_winners(store, arch="sm_90", dtype="fp16").winners) == 12
        assert exchange.export_winners(store, dtype="bfloat16").winners == []
        with pytest.raises(ValueError, match="unknown dtype 'float8'"):
            exchange.export_winners(store, dtype="float8")


# --- merge policies ----------------------------------------------------------------------------

STORED = _winner(ms=1.0, when=aware(hours=0))
CASES = {
    "new key": _winner(key(4096), ms=9.0),
    "faster same gpu": _winner(key(), CFG_B, ms=0.5, when=aware(hours=-5)),
    "slower newer": _winner(key(), CFG_C, ms=2.0, when=aware(hours=5)),
    "faster other gpu": _winner(key(), CFG_B, ms=0.1, gpu="NVIDIA H100", when=aware(hours=-5)),
    "faster other kernel": _winner(key(), CFG_B, ms=0.1, kernel="k0", when=aware(hours=-5)),
}
EXPECTED = {  # policy -> case -> bucket
    "faster": {"new key": "added", "faster same gpu": "replaced", "slower newer": "kept",
               "faster other gpu": "conflicts", "faster other kernel": "conflicts"},
    "newer": {"new key": "added", "faster same gpu": "kept", "slower newer": "replaced",
              "faster other gpu": "kept", "faster other kernel": "kept"},
    "replace": {"new key": "added", "faster same gpu": "replaced", "slower newer": "replaced",
                "faster other gpu": "replaced", "faster other kernel": "replaced"},
    "keep": {"new key": "added", "faster same gpu": "kept", "slower newer": "kept",
             "faster other gpu": "kept", "faster other kernel": "kept"},
}


@pytest.mark.parametrize("policy", exchange.POLICIES)
@pytest.mark.parametrize("case", list(CASES))
def test_policy_decisions(policy: str, case: str) -> None:
    bucket, reason = exchange.decide(policy, CASES[case], None if case == "new key" else STORED)
    assert bucket == EXPECTED[policy][case], reason


@pytest.mark.parametrize("policy", exchange.POLICIES)
@pytest.mark.parametrize("case", ["faster same gpu", "slower newer", "faster other gpu"])
def test_policies_against_a_database(tmp_path: Path, db_url: str, policy: str, case: str) -> None:
    other = _winner(key(256), CFG_A, ms=3.0)
    with Store.open(db_url) as store:
        exchange.merge(store, [STORED, other], policy="replace")
    base = snapshot(db_url)
    path = _write(tmp_path / "w.json", _document([CASES[case], CASES["new key"], other]))
    with Store.open(db_url) as store:
        dry = import_file(store, path, policy, dry_run=True)
    assert snapshot(db_url) == base  # a dry run writes nothing
    with Store.open(db_url) as store:
        real = import_file(store, path, policy)
        winners = {w.key: w for w in store.winners()}
    assert dry.to_dict() | {"dry_run": True} == real.to_dict() | {"dry_run": True}
    bucket = EXPECTED[policy][case]
    assert [i.incoming for i in getattr(real, bucket) if i.key == key()] == [CASES[case]]
    assert [i.incoming for i in real.added] == [CASES["new key"]]
    assert [i.incoming for i in real.kept if i.key == key(256)] == [other]  # identical: kept
    assert winners[key()] == (CASES[case] if bucket == "replaced" else STORED)
    assert winners[key(4096)] == CASES["new key"] and winners[key(256)] == other
    assert len(winners) == 3


def test_unknown_policy(tmp_path: Path) -> None:
    path = _write(tmp_path / "w.json", _document([STORED]))
    with Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store:
        with pytest.raises(ValueError, match="unknown import policy 'fastest'"):
            import_file(store, path, "fastest")


# --- bad files ---------------------------------------------------------------------------------

def _set(path: str, value: Any) -> Callable[[dict], dict]:
    def mutate(doc: dict) -> dict:
        doc = copy.deepcopy(doc)
        target = doc
        parts = path.split(".")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        last = parts[-1]
        if value is _DELETE:
            del target[last]
        else:
            target[int(last) if last.isdigit() else last] = value
        return doc
    return mutate


_DELETE = object()
W0 = "winners.0"
BAD_DOCUMENTS: dict[str, tuple[Callable[[dict], Any], str]] = {
    "not an object": (lambda d: [d], "expected a JSON object"),
    "wrong format": (_set("format", "something-else"), "not a flashtune exchange file"),
    "future version": (_set("format_version", 3), "format version 3 is newer than version 2"),
    "version zero": (_set("format_version", 0), "invalid format_version 0"),
    "version as text": (_set("format_version", "1"), "invalid format_version '1'"),
    "unknown arch": (_set(f"{W0}.key.arch", "sm_99"), "unknown arch 'sm_99'"),
    "code as arch": (_set(f"{W0}.key.arch", "__import__('os').system('true')"), "winners[0].key.arch"),
    "unknown dtype": (_set(f"{W0}.key.dtype", "float8"), "unknown dtype 'float8'"),
    "unknown op": (_set(f"{W0}.key.op", "sideways"), "unknown op 'sideways'"),
    "zero block": (_set(f"{W0}.config.block_m", 0), "block_m=0"),
    "negative block": (_set(f"{W0}.config.block_n", -64), "block_n=-64"),
    "non power of two block": (_set(f"{W0}.config.block_m", 48), "block_m=48: must be a power of two"),
    "odd warps": (_set(f"{W0}.config.num_warps", 3), "num_warps=3"),
    "float block": (_set(f"{W0}.config.block_m", 64.0), "winners[0].config.block_m"),
    "text block": (_set(f"{W0}.config.block_m", "64"), "winners[0].config.block_m"),
    "nested extra": (_set(f"{W0}.config.extra", {"tma": {"on": True}}), "winners[0].config.extra"),
    "int causal": (_set(f"{W0}.key.causal", 1), "winners[0].key.causal"),
    "zero seq": (_set(f"{W0}.key.seq_len", 0), "winners[0].key.seq_len"),
    "odd head dim": (_set(f"{W0}.key.head_dim", 100), "unsupported head dim 100"),
    "zero time": (_set(f"{W0}.median_ms", 0), "winners[0].median_ms"),
    "negative time": (_set(f"{W0}.median_ms", -1.0), "winners[0].median_ms"),
    "missing time": (_set(f"{W0}.median_ms", _DELETE), "winners[0].median_ms"),
    "naive time": (_set(f"{W0}.provenance.measured_at", "2025-01-01T00:00:00"), "measured_at"),
    "unknown field": (_set(f"{W0}.comment", "hi"), "winners[0].comment"),
    "empty gpu": (_set(f"{W0}.provenance.gpu_name", ""), "winners[0].provenance.gpu_name"),
    "does not fit sm_75": (lambda d: _set(W0, exchange.winner_to_dict(_winner(
        key(1024, 256, "float32", arch="sm_75"), Config(256, 256, 8, 4))))(d),
        "more than the 65536 bytes of any sm_75 GPU"),
    "duplicate key": (lambda d: {**d, "winners": d["winners"] + d["winners"][:1]}, "repeats winners[0]"),
    # Integers a database cannot hold, and the same limit on both backends (2**31 - 1).
    "seq_len 2**63": (_set(f"{W0}.key.seq_len", 2**63), "winners[0].key.seq_len: Input should be less than or equal to 2147483647"),
    "seq_len 10**400": (_set(f"{W0}.key.seq_len", 10**400), "winners[0].key.seq_len"),
    "seq_len 2**31": (_set(f"{W0}.key.seq_len", 2**31), "winners[0].key.seq_len"),
    "seq_len_kv 2**31": (_set(f"{W0}.key.seq_len_kv", 2**31), "winners[0].key.seq_len_kv"),
    "head dim 10**400": (_set(f"{W0}.key.head_dim", 10**400), "winners[0].key.head_dim"),
    "block 2**63": (_set(f"{W0}.config.block_m", 2**63), "winners[0].config.block_m"),
    "extra int 2**63": (_set(f"{W0}.config.extra", {"num_splits": 2**63}), "winners[0].config.extra: config extra num_splits must be an int"),
    "sm_count 2**63": (_set(f"{W0}.provenance.sm_count", 2**63), "winners[0].provenance.sm_count"),
    "sm_count 10**400": (_set(f"{W0}.provenance.sm_count", 10**400), "winners[0].provenance.sm_count"),
    "infinite tflops": (_set(f"{W0}.tflops", float("inf")), "winners[0].tflops"),
    "NaN time": (_set(f"{W0}.median_ms", float("nan")), "winners[0].median_ms"),
    "time past year 9999 in UTC": (_set(f"{W0}.provenance.measured_at", "9999-12-31T23:59:59-14:00"),
                                   "winners[0].provenance.measured_at: Value error, is out of range once converted to UTC"),
    "time before year 1 in UTC": (_set(f"{W0}.provenance.measured_at", "0001-01-01T00:00:00+14:00"),
                                  "winners[0].provenance.measured_at"),
    # Text that would reach a terminal: printable only (no control, bidi or line-break characters).
    "NUL in gpu name": (_set(f"{W0}.provenance.gpu_name", "H200\x00"), "winners[0].provenance.gpu_name: holds the non-printable character U+0000"),
    "newline in host": (_set(f"{W0}.provenance.host", "node-1\nFAKE LINE"), "winners[0].provenance.host"),
    "ANSI escape in kernel version": (_set(f"{W0}.provenance.kernel_version", "\x1b[2Jk1"), "winners[0].provenance.kernel_version"),
    "right-to-left override in driver": (_set(f"{W0}.provenance.driver", "560\u202e"), "U+202E"),
    "bidi mark in cuda": (_set(f"{W0}.provenance.cuda", "\u200f12.6"), "winners[0].provenance.cuda"),
    "escape in triton version": (_set(f"{W0}.provenance.triton_version", "3.6\x1b]0;x\x07"), "winners[0].provenance.triton_version"),
    "escape in extra": (_set(f"{W0}.config.extra", {"loads": "tma\x1b[0m"}), "winners[0].config.extra"),
    "blank gpu name": (_set(f"{W0}.provenance.gpu_name", "   "), "winners[0].provenance.gpu_name: must not be empty"),
    "escape in producer host": (_set("producer.host", "a\x1bb"), "producer.host"),
    "gpu name too long": (_set(f"{W0}.provenance.gpu_name", "G" * 129), "winners[0].provenance.gpu_name"),
}


@pytest.fixture
def stored_db(tmp_path: Path, db_url: str) -> str:
    with Store.open(db_url) as store:
        populate(store)
    return db_url


def _valid(stored_url: str) -> dict:
    with Store.open(stored_url, create=False) as store:
        document = exchange.export_winners(store)
    fresh = [_winner(key(n, 64, "bfloat16"), ms=n / 100) for n in (64, 8192)]
    return json.loads(exchange.dump_document(document)) | {
        "winners": [exchange.winner_to_dict(w) for w in fresh]}


@pytest.mark.parametrize("case", list(BAD_DOCUMENTS))
def test_bad_documents_change_nothing(tmp_path: Path, stored_db: str, case: str) -> None:
    mutate, message = BAD_DOCUMENTS[case]
    good = _valid(stored_db)
    read_document(_write(tmp_path / "good.json", good))  # the unmutated file is fine
    path = _write(tmp_path / "bad.json", mutate(good))
    before = snapshot(stored_db)
    for policy in ("faster", "replace"):
        with Store.open(stored_db) as store:
            with pytest.raises(ExchangeFileError, match="bad.json") as info:
                import_file(store, path, policy, smem=smem_need)
        assert message in str(info.value)
        assert "\n" not in str(info.value)
    assert snapshot(stored_db) == before


@pytest.mark.parametrize("content, message", [
    ('{"format": "flashtune-winners", "winners": [', "malformed JSON"),
    ("", "malformed JSON"),
    ('{"format": "flashtune-winners", "format_version": 1, "median_ms": NaN}', "median_ms: Extra inputs"),
    ('{"format": "flashtune-winners", "format_version": 1, "winners": [{"median_ms": NaN}]}', "winners[0].median_ms"),
    ('[{"format": "flashtune-winners"}]', "expected a JSON object"),
    ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "malformed JSON"),
    (pickle.dumps({"winners": []}), "not UTF-8"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
])
def test_unparseable_files(tmp_path: Path, stored_db: str, content: Any, message: str) -> None:
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = snapshot(stored_db)
    with Store.open(stored_db) as store:
        with pytest.raises(ExchangeFileError, match=re.escape(message)):
            import_file(store, path)
    assert snapshot(stored_db) == before


def test_oversized_and_missing_files(tmp_path: Path, stored_db: str) -> None:
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:  # sparse: costs no disk
        fh.truncate(exchange.MAX_FILE_BYTES + 1)
    before = snapshot(stored_db)
    with Store.open(stored_db) as store:
        with pytest.raises(ExchangeFileError, match="larger than the 67108864-byte limit"):
            import_file(store, big)
        small_limit = _write(tmp_path / "ok.json", _document([STORED]))
        with pytest.raises(ExchangeFileError, match="larger than the 100-byte limit"):
            import_file(store, small_limit, max_bytes=100)
        with pytest.raises(ExchangeFileError, match="cannot read .*missing.json"):
            import_file(store, tmp_path / "missing.json")
        with pytest.raises(ExchangeFileError, match="cannot read"):
            import_file(store, tmp_path)
    assert snapshot(stored_db) == before


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_import_of_what_is_not_a_regular_file_is_refused_at_once(kind: str, tmp_path: Path, stored_db: str,
                                                                  fifo: Path) -> None:
    path = {"fifo": fifo, "device": Path("/dev/zero"), "directory": tmp_path}[kind]
    before = snapshot(stored_db)
    with Store.open(stored_db) as store:
        for dry_run in (True, False):
            with pytest.raises(ExchangeFileError, match="not a regular file") as info:
                finishes_within(10, lambda: import_file(store, path, dry_run=dry_run), unblock=fifo)
            assert str(path) in str(info.value)
    assert snapshot(stored_db) == before


def test_many_problems_are_counted(tmp_path: Path) -> None:
    bad = [_winner(key(64 * (i + 1)), ms=1.0) for i in range(30)]
    document = _document(bad)
    for item in document["winners"]:
        item["key"]["arch"] = "sm_1"
    with pytest.raises(ExchangeFileError, match=r"30 invalid value\(s\).*\(and 20 more\)"):
        read_document(_write(tmp_path / "w.json", document))


def test_a_winner_stored_while_an_import_plans_is_not_overwritten(db_url: str) -> None:
    # The merge is planned outside the write lock; a tuner may store a faster winner meanwhile.
    # The write then re-plans on what is stored, as if the import had run alone after the tuner.
    slow, other = _winner(key(), CFG_A, ms=2.0), _winner(key(256), CFG_A, ms=3.0)
    calls = []
    with Store.open(db_url) as store, Store.open(db_url) as tuner:
        def plan(existing):
            calls.append(dict(existing))
            if len(calls) == 1:
                exchange.merge(tuner, [_winner(key(), CFG_B, ms=1.0)], policy="replace")
            report, chosen = exchange.plan_import([slow, other], existing, "faster")
            return chosen

        store.merge_winners([slow.key, other.key], plan)
        winners = {w.key: w for w in store.winners()}
    assert len(calls) == 2 and calls[0] == {} and calls[1][key()].config == CFG_B
    assert winners[key()].config == CFG_B and winners[key(256)] == other


def test_each_config_is_checked_by_its_own_ops_model(tmp_path: Path) -> None:
    """A backward config that fits sm_90 by the backward's model but not by the forward's (whose model would
    refuse it) imports; the same config as a forward winner is refused, naming its op."""
    config = Config(64, 128, 4, 4, {"block_m_dq": 32, "block_n_dq": 32})
    bwd_key = Key("sm_90", "bwd", 4096, 128, "float16", True, batch_heads=64)
    # The forward's model, which the check once applied to every op, says this config cannot fit.
    assert smem_need("bwd", config, 128, "float16", "sm_90") <= 232448 < estimate_smem(config, 128, "float16", "sm_90")
    path = _write(tmp_path / "bwd.json", _document([_winner(bwd_key, config)]))
    [winner] = read_document(path, smem=smem_need)
    assert winner.key.op == "bwd" and winner.config == config
    big = Config(256, 256, 8, 4)
    _write(path, _document([_winner(Key("sm_90", "fwd", 4096, 256, "float16", True, batch_heads=64), big)]))
    with pytest.raises(ExchangeFileError, match="fwd config m256-n256-w8-s4 needs about"):
        read_document(path, smem=smem_need)


def test_a_file_starting_with_a_utf8_bom_imports(tmp_path: Path, db_url: str) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    with Store.open(source) as store:
        populate(store)
        expected = _plain(store.winners())
        document = exchange.export_winners(store)
    path = tmp_path / "winners.json"
    path.write_bytes(codecs.BOM_UTF8 + exchange.dump_document(document).encode("utf-8"))
    with Store.open(db_url) as target:
        assert len(import_file(target, path).added) == len(expected)
        assert target.winners() == expected
