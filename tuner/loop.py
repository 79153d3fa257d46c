"""The tuning loop: for each key, find the fastest correct candidate and store every trial and the winner.

Modelled on Triton's runtime/autotuner.py (prune, bench each config, keep the fastest), with what a
persistent, resumable tuner adds:

- candidates are the key's kernel configs from its op's space (tuner.ops: for the forward,
  tuner.ops.fwd's pointer kernel configs and the other variants', pruned before anything compiles;
  for the backward, tuner.ops.bwd's) plus the key's default config, ordered so
  that the winner of the neighbouring N (and then the default) is timed first; plus one config per
  torch SDPA backend (`providers`), which skips the first pass: it has no tiles to prune;
- a key whose sibling (the same key but for its B·Hq bucket) was tuned earlier in the run times
  only that sibling's fastest few kernel configs (`TuneSettings.sibling_top`), the default and the
  providers: buckets move the best tile a little, not across the whole space;
- a short first pass times every kernel candidate with a few repetitions and drops each config
  slower than `prune_ratio` times the best so far; the fastest survivors, the default and the
  providers are then timed carefully, together, the default first and twice (its two medians give
  the pass's noise);
- never slower than the default: a candidate wins only if it beats the default by more than the
  noise (at least `noise_floor`); otherwise the default is the stored winner. The stored kernel
  config (the dispatcher's fallback when an SDPA backend won) follows the same rule;
- every trial is stored (one commit each) as soon as its final measurement is known, so an
  interrupted run loses at most the survivors of the key in flight; a second run skips every
  config already stored for the same key, kernel version and GPU;
- the stop check (Ctrl-C, the time budget) runs after every trial;
- a key whose workload does not fit the GPU's free memory at its bucket's batch runs at the
  smaller batch the bench chose (`KeyResult.shrunk_from`), or, when not even one sequence fits,
  has `out_of_memory` trials and no winner: the run goes on with the next key.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from ..db.store import Store, TrialRecord, Winner
from ..db.types import Config, Key

from ..kernel.providers import provider_of

from .bench import tflops
from .measure import Bench, Measurement
from .ops.space import seeded_order


@dataclass(frozen=True)
class TuneSettings:
    """Knobs of the search."""

    prune_ratio: float = 1.3  # first pass: drop configs slower than this times the best so far
    careful_top: int = 6  # how many of the fastest survivors get the careful timing
    budget_s: float | None = None  # stop after the trial in flight once this much time has passed
    # The least relative margin by which a candidate must beat the default (and the floor under the
    # measured noise): two careful medians of one config on an H200 differ by up to ~1 %.
    noise_floor: float = 0.01
    sibling_top: int = 8  # kernel configs of an earlier sibling bucket's ranking a key times

    def __post_init__(self) -> None:
        if not self.prune_ratio > 1.0:
            raise ValueError(f"prune_ratio must be above 1, got {self.prune_ratio!r}")
        if self.careful_top < 1:
            raise ValueError(f"careful_top must be at least 1, got {self.careful_top!r}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(f"budget must be above zero seconds, got {self.budget_s!r}")
        if not 0 <= self.noise_floor < 1:
            raise ValueError(f"noise_floor must be from 0 to below 1, got {self.noise_floor!r}")
        if self.sibling_top < 1:
            raise ValueError(f"sibling_top must be at least 1, got {self.sibling_top!r}")


@dataclass
class KeyResult:
    """What tuning one key produced (this run and earlier runs of the same kernel on the same GPU)."""

    key: Key
    batch_heads: int  # B·Hq of the benchmark inputs (what the bench ran)
    default_config: Config
    winner: TrialRecord | None = None
    default_ms: float | None = None
    kernel_config: Config | None = None  # the best kernel config (the winner's, unless a provider won)
    noise: float | None = None  # the relative noise the winner had to beat the default by
    narrowed: bool = False  # timed a sibling bucket's top kernel configs only
    new_trials: int = 0
    skipped: int = 0  # configs already stored by an earlier run
    complete: bool = False
    winner_stored: bool = False
    outcomes: dict[str, int] = field(default_factory=dict)
    shrunk_from: int | None = None  # B·Hq asked for when the GPU's free memory made the bench run fewer

    def ran_on(self, m: Measurement) -> int:
        """The B·Hq `m` was measured on; a smaller one than asked is remembered as this key's."""
        if m.batch_heads is not None and m.batch_heads != self.batch_heads:
            self.shrunk_from = self.shrunk_from or self.batch_heads
            self.batch_heads = m.batch_heads
        return self.batch_heads

    @property
    def speedup(self) -> float | None:
        """Default config time over winner time."""
        if self.winner is None or self.winner.median_ms is None or self.default_ms is None:
            return None
        return self.default_ms / self.winner.median_ms

    @property
    def provider(self) -> str | None:
        """Which implementation won: "kernel" or an SDPA provider; None without a winner."""
        return None if self.winner is None else provider_of(self.winner.config)


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
    """Keys grouped by everything but N and the bucket, N ascending, then the buckets of one N
    ascending: neighbours seed each other, siblings share a ranking, compiles are shared."""
    return sorted(dict.fromkeys(keys), key=lambda k: (k.arch, k.op, k.head_dim, k.dtype, k.causal, k.group,
                                                       k.features, k.seq_len, k.seq_len_kv, k.batch_heads))


def _same_group(a: Key, b: Key) -> bool:
    return (a.arch, a.op, a.head_dim, a.dtype, a.causal, a.group, a.features) == (
        b.arch, b.op, b.head_dim, b.dtype, b.causal, b.group, b.features)


def sibling_class(key: Key) -> Key:
    """What keys that differ only in their B·Hq bucket have in common (the key with bucket 0)."""
    return dataclasses.replace(key, batch_heads=0)


class Tuner:
    """Runs the loop for a list of keys against a Bench and a Store.

    `space(key)`: the kernel configs; `default(key)`: the default config; `providers(key)`: the SDPA
    provider configs (none with --kernel-only); `batch_heads(key)`: B·Hq of the benchmark inputs.
    """

    def __init__(self, store: Store, run_id: int, bench: Bench, *, kernel_version: str | Mapping[str, str],
                 gpu_name: str,
                 space: Callable[[Key], Sequence[Config]], default: Callable[[Key], Config],
                 batch_heads: Callable[[Key], int], providers: Callable[[Key], Sequence[Config]] = lambda k: (),
                 settings: TuneSettings = TuneSettings(), progress: Progress | None = None,
                 should_stop: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.run_id, self.bench = store, run_id, bench
        # One version for every op, or op -> the version of that op's compiled code.
        self.kernel_version, self.gpu_name = kernel_version, gpu_name
        self.space, self.default, self.batch_heads = space, default, batch_heads
        self.providers = providers
        self.settings = settings
        self.progress = progress or _NoProgress()
        self._should_stop = should_stop
        self._clock = clock
        self._started = clock()
        self._rankings: dict[Key, list[Config]] = {}  # sibling class -> ok kernel configs, fastest first
        self.stop_reason: str | None = None  # 'interrupted' | 'budget' once the loop stopped early

    def _stop(self) -> bool:
        if self.stop_reason is None:
            if self._should_stop():
                self.stop_reason = "interrupted"
            elif self.settings.budget_s is not None and self._clock() - self._started >= self.settings.budget_s:
                self.stop_reason = "budget"
        return self.stop_reason is not None

    def _version(self, key: Key) -> str:
        """The kernel version that `key`'s trials and winner are stored under."""
        return self.kernel_version if isinstance(self.kernel_version, str) else self.kernel_version[key.op]

    def _stored(self, key: Key) -> dict[Config, TrialRecord]:
        rows = self.store.trials(key, kernel_version=self._version(key), gpu_name=self.gpu_name)
        return {t.config: t for t in rows}

    def _candidates(self, key: Key, seeds: Sequence[Config],
                    ranking: Sequence[Config] | None) -> tuple[list[Config], list[Config]]:
        """(kernel configs in timing order, provider configs). With a sibling's `ranking`, only its
        fastest `sibling_top` kernel configs and the default."""
        default = self.default(key)
        if ranking is not None:
            kernel = list(dict.fromkeys([*ranking[:self.settings.sibling_top], default]))
        else:
            kernel = list(dict.fromkeys([*self.space(key), default]))
        taken = set(kernel)
        providers = [p for p in dict.fromkeys(self.providers(key)) if p not in taken]
        return seeded_order(kernel, [*seeds, default]), providers

    def plan_counts(self, keys: Sequence[Key]) -> int:
        """Trials the run expects to measure (first pass plus careful), for the progress bar."""
        total = 0
        seen: set[Key] = set(self._rankings)
        for key in keys:
            sibling = sibling_class(key)
            narrowed = sibling in seen  # an earlier sibling's top configs and the default
            seen.add(sibling)
            kernel, providers = self._candidates(key, [], None)
            stored = set(self._stored(key))
            todo = len(set(kernel) - stored)
            if narrowed:
                todo = min(todo, self.settings.sibling_top + 1)
            total += todo + (min(self.settings.careful_top + 1, todo) if todo else 0)
            total += len(set(providers) - stored)
        return total

    def run(self, keys: Iterable[Key], *, keep_order: bool = False) -> list[KeyResult]:
        """Tune `keys` in tuning order (or in the order given, with `keep_order`: `tune --recorded`
        tunes the largest share of the app's attention time first); returns one result per key reached (all of them unless stopped)."""
        ordered = list(dict.fromkeys(keys)) if keep_order else tuning_order(keys)
        self.progress.start(self.plan_counts(ordered))
        results: list[KeyResult] = []
        previous: KeyResult | None = None
        try:
            for key in ordered:
                if self._stop():
                    break
                seeds = []
                if previous is not None and _same_group(previous.key, key):
                    best = previous.kernel_config or (previous.winner.config if previous.winner else None)
                    if best is not None:
                        seeds.append(best)
                result = self._tune_key(key, seeds)
                results.append(result)
                self.progress.key_done(result)
                previous = result
        finally:
            self.progress.finish()
        return results

    def _record(self, key: Key, bh: int, m: Measurement, result: KeyResult,
                stored: dict[Config, TrialRecord]) -> TrialRecord:
        bh = result.ran_on(m)  # the rate of the batch the bench ran
        rate = tflops(key, bh, m.median_ms) if m.outcome == "ok" and m.median_ms else None
        trial = self.store.record_trial(self.run_id, key, m.config, m.outcome, median_ms=m.median_ms,
                                        tflops=rate, compile_s=m.compile_s, error=m.error,
                                        kernel_version=self._version(key))
        stored[m.config] = trial
        result.new_trials += 1
        result.outcomes[m.outcome] = result.outcomes.get(m.outcome, 0) + 1
        return trial

    def _tune_key(self, key: Key, seeds: Sequence[Config]) -> KeyResult:
        bh = self.batch_heads(key)
        result = KeyResult(key, bh, self.default(key))
        stored = self._stored(key)
        ranking = self._rankings.get(sibling_class(key))
        result.narrowed = ranking is not None
        kernel, providers = self._candidates(key, seeds, ranking)
        # Memory depends on what else holds the GPU: an earlier run's out_of_memory is tried again.
        retry = {c for c, t in stored.items() if t.outcome == "out_of_memory"}
        todo = [c for c in kernel if c not in stored or c in retry]
        todo_providers = [p for p in providers if p not in stored or p in retry]
        result.skipped = len(kernel) + len(providers) - len(todo) - len(todo_providers)
        if not todo and not todo_providers and self._winner(key) is not None:
            return self._finish_key(result, stored, timed=None, finished=True)  # an earlier run did it all
        # First-pass times of an earlier, interrupted run of this key compete with this run's.
        provider_set = set(providers)
        quick = {c: t.median_ms for c, t in stored.items()
                 if t.outcome == "ok" and t.median_ms and c not in provider_set}
        best = min(quick.values(), default=math.inf)
        cutoff = self.settings.prune_ratio
        survivors: dict[Config, Measurement] = {}

        # First pass (kernel configs only): a few repetitions each; far slower than the best so far is final.
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

        # The fastest few get a careful timing, all together, with the default (first: the bench
        # times the first config twice for the noise) and the SDPA providers (not yet failed), so
        # that every comparison is between times taken side by side; the other survivors keep
        # their first-pass time.
        ranked = sorted(quick, key=lambda c: (quick[c], str(c)))
        careful = [c for c in ranked if quick[c] <= cutoff * best][:self.settings.careful_top]
        if result.default_config in quick:
            careful = [result.default_config, *(c for c in careful if c != result.default_config)]
        careful += [p for p in providers if p not in stored or stored[p].outcome in ("ok", "out_of_memory")]
        for config, m in survivors.items():
            if config not in careful:
                self._record(key, bh, m, result, stored)
        timed: list[TrialRecord] = []
        noise: float | None = None
        for m in self.bench.measure(key, bh, careful, careful=True):
            self.progress.advance(key)
            timed.append(self._record(key, bh, m, result, stored))
            noise = m.noise if m.noise is not None else noise
        result.noise = max(self.settings.noise_floor, noise or 0.0)
        if self._stop() and len(timed) < len(careful):
            return self._finish_key(result, stored, timed=None, finished=False)
        return self._finish_key(result, stored, timed=timed, finished=True)

    def _winner(self, key: Key) -> Winner | None:
        """The stored winner of `key` for this kernel version. On a fleet database it may have been
        measured on another GPU of the same arch: the store keeps the faster one, so a finished key
        is not re-timed here just because another GPU's winner stands."""
        return next((w for w in self.store.winners(key.arch, op=key.op, dtype=key.dtype, head_dim=key.head_dim,
                                                   causal=key.causal)
                     if w.key == key and w.kernel_version == self._version(key)), None)

    def _remember_ranking(self, result: KeyResult, stored: dict[Config, TrialRecord]) -> None:
        """The key's ok kernel configs, fastest first, for its later sibling buckets (from a full
        candidate list only: a narrowed key's ranking is a subset of its sibling's)."""
        sibling = sibling_class(result.key)
        if result.narrowed or sibling in self._rankings:
            return
        ok = [t for c, t in stored.items() if t.outcome == "ok" and t.median_ms and provider_of(c) == "kernel"]
        if ok:
            self._rankings[sibling] = [t.config for t in sorted(ok, key=lambda t: (t.median_ms, str(t.config)))]

    def _finish_key(self, result: KeyResult, stored: dict[Config, TrialRecord], *,
                    timed: list[TrialRecord] | None, finished: bool) -> KeyResult:
        """Close a key. `timed`: this run's careful trials, from which alone a winner is named (their
        times were taken side by side); None when the key stopped early or an earlier run finished it.
        `finished`: every candidate has its final time."""
        default = stored.get(result.default_config)
        if default is not None and default.outcome == "ok":
            result.default_ms = default.median_ms
        if finished:
            self._remember_ranking(result, stored)
        if timed is not None:
            ok = [t for t in timed if t.outcome == "ok" and t.median_ms is not None]
            result.complete = True
            noise = result.noise if result.noise is not None else self.settings.noise_floor
            base = next((t for t in ok if t.config == result.default_config), None)
            winner = beats_default(ok, base, noise)
            kernel = beats_default([t for t in ok if provider_of(t.config) == "kernel"], base, noise)
            result.kernel_config = kernel.config if kernel is not None else None
            if winner is not None:
                result.winner = winner
                result.winner_stored = self.store.offer_winner(winner, kernel_config=result.kernel_config)
            return result
        winner = self._winner(result.key)
        result.complete = finished and winner is not None
        if winner is not None:
            result.kernel_config = winner.kernel_config
            if winner.trial_id is not None:
                result.winner = next((t for t in self.store.trials(result.key) if t.id == winner.trial_id), None)
        return result


def beats_default(trials: Sequence[TrialRecord], default: TrialRecord | None, noise: float) -> TrialRecord | None:
    """The fastest of `trials` if it beats `default` by more than `noise` (relative), else `default`:
    a difference within the noise of the pass that measured both is no reason to leave the default.
    Without a default time, simply the fastest (None when there is none)."""
    best = min(trials, key=lambda t: (t.median_ms, t.id), default=None)
    if default is None or default.median_ms is None:
        return best
    if best is not None and best.median_ms is not None and best.median_ms * (1 + noise) < default.median_ms:
        return best
    return default
