"""The tuning loop: for each key, find the fastest correct config and store every trial and the winner.

Modelled on Triton's runtime/autotuner.py (prune, bench each config, keep the fastest), with what a
persistent, resumable tuner adds:

- candidates come from tuner.space (pruned before anything compiles) plus the key's default config,
  ordered so that the winner of the neighbouring N (and then the default) is timed first;
- a short first pass times every candidate with a few repetitions and drops each config slower than
  `prune_ratio` times the best so far; the fastest survivors are then timed carefully;
- every trial is stored (one commit each) as soon as its final measurement is known, so an
  interrupted run loses at most the survivors of the key in flight; a second run skips every
  config already stored for the same key, kernel version and GPU;
- the stop check (Ctrl-C, the time budget) runs after every trial.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

from ..db.store import Store, TrialRecord, Winner
from ..db.types import Config, Key

from .bench import tflops
from .measure import Bench, Measurement
from .space import seeded_order


@dataclass(frozen=True)
class TuneSettings:
    """Knobs of the search."""

    prune_ratio: float = 1.3  # first pass: drop configs slower than this times the best so far
    careful_top: int = 6  # how many of the fastest survivors get the careful timing
    budget_s: float | None = None  # stop after the trial in flight once this much time has passed

    def __post_init__(self) -> None:
        if not self.prune_ratio > 1.0:
            raise ValueError(f"prune_ratio must be above 1, got {self.prune_ratio!r}")
        if self.careful_top < 1:
            raise ValueError(f"careful_top must be at least 1, got {self.careful_top!r}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(f"budget must be above zero seconds, got {self.budget_s!r}")


@dataclass
class KeyResult:
    """What tuning one key produced (this run and earlier runs of the same kernel on the same GPU)."""

    key: Key
    batch_heads: int
    default_config: Config
    winner: TrialRecord | None = None
    default_ms: float | None = None
    new_trials: int = 0
    skipped: int = 0  # configs already stored by an earlier run
    complete: bool = False
    winner_stored: bool = False
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        """Default config time over winner time."""
        if self.winner is None or self.winner.median_ms is None or self.default_ms is None:
            return None
        return self.default_ms / self.winner.median_ms


class Progress(Protocol):
    """Receives progress events; the CLI draws a bar with an ETA from them."""

    def start(self, total: int) -> None: ...
    def advance(self, key: Key, n: int = 1) -> None: ...
    def key_done(self, result: KeyResult) -> None: ...
    def finish(self) -> None: ...


class _NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, key: Key, n: int = 1) -> None:
        pass

    def key_done(self, result: KeyResult) -> None:
        pass

    def finish(self) -> None:
        pass


def tuning_order(keys: Iterable[Key]) -> list[Key]:
    """Keys grouped by everything but N, N ascending: neighbours seed each other and share compiles."""
    return sorted(dict.fromkeys(keys), key=lambda k: (k.arch, k.op, k.head_dim, k.dtype, k.causal,
                                                       k.seq_len, k.seq_len_kv))


def _same_group(a: Key, b: Key) -> bool:
    return (a.arch, a.op, a.head_dim, a.dtype, a.causal) == (b.arch, b.op, b.head_dim, b.dtype, b.causal)


class Tuner:
    """Runs the loop for a list of keys against a Bench and a Store."""

    def __init__(self, store: Store, run_id: int, bench: Bench, *, kernel_version: str, gpu_name: str,
                 space: Callable[[Key], Sequence[Config]], default: Callable[[Key], Config],
                 batch_heads: Callable[[Key], int], settings: TuneSettings = TuneSettings(),
                 progress: Progress | None = None, should_stop: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.run_id, self.bench = store, run_id, bench
        self.kernel_version, self.gpu_name = kernel_version, gpu_name
        self.space, self.default, self.batch_heads = space, default, batch_heads
        self.settings = settings
        self.progress = progress or _NoProgress()
        self._should_stop = should_stop
        self._clock = clock
        self._started = clock()
        self.stop_reason: str | None = None  # 'interrupted' | 'budget' once the loop stopped early

    def _stop(self) -> bool:
        if self.stop_reason is None:
            if self._should_stop():
                self.stop_reason = "interrupted"
            elif self.settings.budget_s is not None and self._clock() - self._started >= self.settings.budget_s:
                self.stop_reason = "budget"
        return self.stop_reason is not None

    def _stored(self, key: Key) -> dict[Config, TrialRecord]:
        rows = self.store.trials(key, kernel_version=self.kernel_version, gpu_name=self.gpu_name)
        return {t.config: t for t in rows}

    def _candidates(self, key: Key, seeds: Sequence[Config]) -> list[Config]:
        configs = list(dict.fromkeys([*self.space(key), self.default(key)]))
        return seeded_order(configs, [*seeds, self.default(key)])

    def plan_counts(self, keys: Sequence[Key]) -> int:
        """Trials the run expects to measure (first pass plus careful), for the progress bar."""
        total = 0
        for key in keys:
            todo = len(set(self._candidates(key, [])) - set(self._stored(key)))
            total += todo + (min(self.settings.careful_top + 1, todo) if todo else 0)
        return total

    def run(self, keys: Iterable[Key]) -> list[KeyResult]:
        """Tune `keys` in tuning order; returns one result per key reached (all of them unless stopped)."""
        ordered = tuning_order(keys)
        self.progress.start(self.plan_counts(ordered))
        results: list[KeyResult] = []
        previous: KeyResult | None = None
        try:
            for key in ordered:
                if self._stop():
                    break
                seeds = []
                if previous is not None and previous.winner is not None and _same_group(previous.key, key):
                    seeds.append(previous.winner.config)
                result = self._tune_key(key, seeds)
                results.append(result)
                self.progress.key_done(result)
                previous = result
        finally:
            self.progress.finish()
        return results

    def _record(self, key: Key, bh: int, m: Measurement, result: KeyResult,
                stored: dict[Config, TrialRecord]) -> TrialRecord:
        rate = tflops(key, bh, m.median_ms) if m.outcome == "ok" and m.median_ms else None
        trial = self.store.record_trial(self.run_id, key, m.config, m.outcome, median_ms=m.median_ms,
                                        tflops=rate, compile_s=m.compile_s, error=m.error)
        stored[m.config] = trial
        result.new_trials += 1
        result.outcomes[m.outcome] = result.outcomes.get(m.outcome, 0) + 1
        return trial

    def _tune_key(self, key: Key, seeds: Sequence[Config]) -> KeyResult:
        bh = self.batch_heads(key)
        result = KeyResult(key, bh, self.default(key))
        stored = self._stored(key)
        candidates = self._candidates(key, seeds)
        todo = [c for c in candidates if c not in stored]
        result.skipped = len(candidates) - len(todo)
        if not todo and self._winner(key) is not None:
            return self._finish_key(result, stored, timed=None, finished=True)  # an earlier run did it all
        # First-pass times of an earlier, interrupted run of this key compete with this run's.
        quick = {c: t.median_ms for c, t in stored.items() if t.outcome == "ok" and t.median_ms}
        best = min(quick.values(), default=math.inf)
        cutoff = self.settings.prune_ratio
        survivors: dict[Config, Measurement] = {}

        # First pass: a few repetitions each; far slower than the best so far is final.
        for m in self.bench.measure(key, bh, todo, careful=False):
            self.progress.advance(key)
            ok = m.outcome == "ok" and m.median_ms is not None
            # The default always survives: the speed-up over it compares two careful timings.
            if ok and (m.median_ms <= cutoff * best or m.config == result.default_config):
                survivors[m.config] = m
                quick[m.config] = m.median_ms
                best = min(best, m.median_ms)
            else:
                self._record(key, bh, m, result, stored)
            if self._stop():
                return self._finish_key(result, stored, timed=None, finished=False)

        # The fastest few get a careful timing, all together, and so does the default so that the
        # speed-up compares like with like; the other survivors keep their first-pass time.
        ranked = sorted(quick, key=lambda c: (quick[c], str(c)))
        careful = [c for c in ranked if quick[c] <= cutoff * best][:self.settings.careful_top]
        if result.default_config in quick and result.default_config not in careful:
            careful.append(result.default_config)
        for config, m in survivors.items():
            if config not in careful:
                self._record(key, bh, m, result, stored)
        timed: list[TrialRecord] = []
        for m in self.bench.measure(key, bh, careful, careful=True):
            self.progress.advance(key)
            timed.append(self._record(key, bh, m, result, stored))
        if self._stop() and len(timed) < len(careful):
            return self._finish_key(result, stored, timed=None, finished=False)
        return self._finish_key(result, stored, timed=timed, finished=True)

    def _winner(self, key: Key) -> Winner | None:
        """The stored winner of `key` for this kernel version. On a fleet database it may have been
        measured on another GPU of the same arch: the store keeps the faster one, so a finished key
        is not re-timed here just because another GPU's winner stands."""
        return next((w for w in self.store.winners(key.arch, op=key.op, dtype=key.dtype, head_dim=key.head_dim,
                                                   causal=key.causal)
                     if w.key == key and w.kernel_version == self.kernel_version), None)

    def _finish_key(self, result: KeyResult, stored: dict[Config, TrialRecord], *,
                    timed: list[TrialRecord] | None, finished: bool) -> KeyResult:
        """Close a key. `timed`: this run's careful trials, from which alone a winner is named (their
        times were taken side by side); None when the key stopped early or an earlier run finished it.
        `finished`: every candidate has its final time."""
        default = stored.get(result.default_config)
        if default is not None and default.outcome == "ok":
            result.default_ms = default.median_ms
        if timed is not None:
            ok = [t for t in timed if t.outcome == "ok" and t.median_ms is not None]
            result.complete = True
            if ok:
                result.winner = min(ok, key=lambda t: (t.median_ms, t.id))
                result.winner_stored = self.store.offer_winner(result.winner)
            return result
        winner = self._winner(result.key)
        result.complete = finished and winner is not None
        if winner is not None and winner.trial_id is not None:
            result.winner = next((t for t in self.store.trials(result.key) if t.id == winner.trial_id), None)
        return result
