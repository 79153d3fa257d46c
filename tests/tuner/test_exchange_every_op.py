"""A database tuned with --op fwd,bwd,kvcache exports and imports, through the CLI, into an empty SQLite
file and into PostgreSQL with every winner kept field by field. The real tuning loop times each op's
own space (tuner.ops) with a deterministic cost model that favours what the forward's shared-memory
model overestimates: a backward winner fits by its own model and not by the forward's, so an import
whose fit check used one model for every op would refuse the file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from click.testing import CliRunner

from flashtune.db.arch import smem_limit
from flashtune.db.store import RunInfo, Store, Winner
from flashtune.db.types import Config, Key
from flashtune.kernel.ops import smem_need
from flashtune.kernel.ops.fwd import estimate_smem
from flashtune.tuner.cli import main
from flashtune.tuner.gpu import planned_gpu
from flashtune.tuner.measure import FunctionBench
from flashtune.tuner.session import TuningSession

KEYS = [Key("sm_90", "fwd", 4096, d, "float16", True, batch_heads=32) for d in (64, 128)] + \
       [Key("sm_90", "bwd", 2048, d, dt, False, batch_heads=16) for d, dt in ((64, "bfloat16"), (128, "float32"))] + \
       [Key("sm_90", "kvcache", 1, d, "float16", True, seq_len_kv=32768, batch_heads=256, group=4) for d in (64, 128)]


def _tuned(url: str) -> list[Winner]:
    """Tune KEYS into the database at `url` with the session's op spaces; the winners stored."""
    gpu = planned_gpu("sm_90")
    with Store.open(url) as store:
        run = store.start_run(RunInfo("test gpu", "sm_90", 132, smem_limit("sm_90"), "1", "12.4", "3.6", "2.11",
                                      "e" * 12, "host", {}))

        def cost(key: Key, config: Config, careful: bool) -> float:
            # The more shared memory the forward's model gives a config, the faster: winners that the
            # forward's model overestimates, e.g. backward tiles with their own dQ pass.
            if "provider" in config.extra_dict:
                return 10.0
            return 1.0 + 1.0 / (1 + estimate_smem(config, key.head_dim, key.dtype, key.arch))

        session = TuningSession(gpu, store, run, FunctionBench(cost))
        results = session.tune(KEYS)
        assert {r.key for r in results if r.winner is not None} == set(KEYS)
        assert {r.key.op for r in results if r.winner.config.extra_dict} >= {"bwd", "kvcache"}  # each op's own knobs
        # A winner that fits by its own op's model and not by the forward's: a fit check by the wrong
        # model would refuse the file.
        assert any(smem_need(r.key.op, r.winner.config, r.key.head_dim, r.key.dtype, r.key.arch) <= gpu.smem_limit
                   < estimate_smem(r.winner.config, r.key.head_dim, r.key.dtype, r.key.arch) for r in results)
        return store.winners("sm_90")


def test_every_op_exports_and_imports_with_every_winner_kept(db_url: str, tmp_path: Path) -> None:
    tuned = _tuned(f"sqlite:///{tmp_path / 'tuned.db'}")
    assert {w.key for w in tuned} == set(KEYS)
    file = tmp_path / "winners.json"
    exported = CliRunner().invoke(main, ["export", "--db", f"sqlite:///{tmp_path / 'tuned.db'}", "-o", str(file)])
    assert exported.exit_code == 0, exported.output
    imported = CliRunner().invoke(main, ["import", "--db", db_url, str(file)])
    assert imported.exit_code == 0, imported.output
    with Store.open(db_url, create=False) as store:
        got = {w.key: w for w in store.winners("sm_90")}
    # Every field, but the trial id: the importing database holds no trials.
    assert got == {w.key: dataclasses.replace(w, trial_id=None) for w in tuned}
