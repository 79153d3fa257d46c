"""The fleet tests' deterministic tuning world: keys, a small config space, a cost model, and the
worker process main that tunes a job's units with it (spawned by the tests as real processes)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

from flashtune.db.jobs import JobQueue, Worker
from flashtune.db.store import RunInfo, Store
from flashtune.db.types import Config, Key
from flashtune.tuner.fleet.worker import work
from flashtune.tuner.loop import KeyResult, Tuner, TuneSettings
from flashtune.tuner.measure import FunctionBench

ARCH, KV, GPU = "sm_90", "f" * 12, "model gpu"
BUCKETS = (16, 64, 256)
# 20 sibling classes x 3 buckets = 60 keys, in tuning order.
KEYS = [Key(ARCH, "fwd", n, d, "float16", c, batch_heads=bh) for d in (64, 128) for c in (False, True)
        for n in (128, 256, 512, 1024, 2048) for bh in BUCKETS]
SPACE = [Config(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
DEFAULT = Config(128, 64, 8, 3)
SETTINGS = TuneSettings(careful_top=3, sibling_top=4)
BEST = {16: Config(64, 64, 4, 3), 64: Config(64, 128, 4, 2), 256: Config(128, 128, 8, 2)}


def cost(key: Key, config: Config, careful: bool) -> float:
    """A bowl around the bucket's best tile (in log2 space), scaled by N and the bucket."""
    best = BEST[key.batch_heads]
    d = (abs(math.log2(config.block_m / best.block_m)) + abs(math.log2(config.block_n / best.block_n))
         + abs(math.log2(config.num_warps / best.num_warps)) + 0.3 * abs(config.num_stages - best.num_stages))
    return key.seq_len * key.batch_heads / 4096 * (1 + 0.25 * d) * (1 + key.head_dim / 1000)


def run_info(host: str = "model-host") -> RunInfo:
    return RunInfo(GPU, ARCH, 132, 232448, "1", "12.4", "3.6", "2.11", KV, host, {})


def make_tuner(store: Store, run_id: int, bench: FunctionBench, should_stop=lambda: False) -> Tuner:
    return Tuner(store, run_id, bench, kernel_version=KV, gpu_name=GPU, space=lambda k: SPACE,
                 default=lambda k: DEFAULT, batch_heads=lambda k: k.batch_heads, settings=SETTINGS,
                 should_stop=should_stop)


class _TrapBench(FunctionBench):
    """The cost model, except that the careful pass of a key's second bucket announces itself in
    `marker` and then hangs (the test kills this process there, mid-key)."""

    def __init__(self, marker: Path) -> None:
        super().__init__(self._trap)
        self.marker = marker

    def _trap(self, key: Key, config: Config, careful: bool) -> float:
        if careful and key.batch_heads == BUCKETS[1]:
            self.marker.write_text(json.dumps({"pid": os.getpid(), "key": str(key)}))
            time.sleep(600)
        return cost(key, config, careful)


def worker_main(url: str, job_name: str, out: str, host: str, gpu: int, trap: str | None = None) -> None:
    """A fleet worker process: join `job_name` and tune with the cost model until the job is done;
    write the keys this process finished (and whether each was narrowed) to `out` as JSON."""
    with Store.open(url, create=False) as store:
        queue = JobQueue(store)
        job = queue.get(job_name)
        run_id = store.start_run(run_info(host))
        bench = _TrapBench(Path(trap)) if trap else FunctionBench(cost)

        def tune_unit(keys: Sequence[Key], should_stop) -> list[KeyResult]:
            return make_tuner(store, run_id, bench, should_stop).run(keys, keep_order=True)

        result = work(queue, job, Worker(host, os.getpid(), gpu, GPU), tune_unit)
        store.finish_run(run_id, result.status)
    Path(out).write_text(json.dumps({"status": result.status, "claims": result.claims,
                                     "keys": [[str(r.key), r.narrowed] for r in result.results]}))
