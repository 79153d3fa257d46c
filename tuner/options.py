"""The `tune` command's options as one value, and the keys they select.

The CLI (tuner.cli.tune) parses the command line into a `TuneOptions` once; the single-GPU run and
the fleet run (tuner.fleet.command) read that value and nothing of click's. What either finds wrong
with it (a group larger than every bucket, no recorded keys, GPUs or a job that do not fit) is a
`TuneError`: one line that the CLI prints before exiting with code 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import click

from ..db.types import FEATURE_DEFAULTS, FP8_DTYPE, Key

from .fleet.gpus import compile_share

if TYPE_CHECKING:
    from .priority import Ranked


class TuneError(Exception):
    """Why `tune` cannot go on with its options: bad input, GPUs or a job that do not fit them, an
    unusable database. One line; the CLI prints it and exits with code 2."""


@dataclass(frozen=True)
class FleetOptions:
    """`--gpus` ('all' or device indices), `--job NAME`, `--join NAME` and `--lease` (seconds): tuning on
    several GPUs or hosts through one claim queue in the database."""

    gpus: tuple[int, ...] | str | None = None
    job: str | None = None
    join: str | None = None
    lease_s: float | None = None

    @property
    def requested(self) -> bool:
        """Whether any fleet option was given (then `tune` runs as a fleet, tuner.fleet.command)."""
        return any(value is not None for value in (self.gpus, self.job, self.join))

    def refuse_dry_run(self) -> None:
        """`--dry-run` plans one arch's space without a GPU or database: TuneError for fleet options with it."""
        if self.requested or self.lease_s is not None:
            raise TuneError("--dry-run plans without GPUs or a database: drop --gpus, --job, --join and --lease")


@dataclass(frozen=True)
class TuneOptions:
    """What `tune` was asked to do: the key grid (or `recorded`: the app's recorded keys), the
    database, the run's limits and the fleet options.

    `ops` are the ops to tune, `--decode` already applied; kvcache keys take Nq from `q_lens` and
    their cache length from `kv_lens` (None: `seq`). `given` names the command-line parameters
    given explicitly (not left at their defaults): `--join` refuses options the job already holds.
    `softcap`, `window`, `sinks`, `alibi`, `mask` and `dropout` are the attention features every key of
    the grid has (`tune --softcap --window 4096 ...`; db.types.Key's fields).
    """

    arch: str | None
    seq: tuple[int, ...]
    head_dim: tuple[int, ...]
    dtype: tuple[str, ...]
    causal: tuple[bool, ...]
    batch_heads: tuple[int, ...]
    groups: tuple[int, ...]
    ops: tuple[str, ...]
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...] | None
    kernel_only: bool
    recorded: bool
    db_url: str | None
    budget_s: float | None
    dry_run: bool
    as_json: bool
    compile_threads: int | None  # None: this host's share (`compile_shares`)
    compile_procs: int | None
    trial_timeout_s: float
    fleet: FleetOptions = field(default_factory=FleetOptions)
    softcap: bool = False  # the grid's keys cap their scores (`tune --softcap`)
    given: frozenset[str] = frozenset()
    window: int = 0  # the grid's keys' sliding-window bucket (`tune --window W`); 0: none
    sinks: bool = False
    alibi: bool = False
    mask: str = "none"  # "bool" or "float": the grid's keys take an explicit mask (`tune --mask`)
    dropout: bool = False
    tokens: tuple[int, ...] = (32768,)  # total-token buckets of varlen keys (`tune --tokens`)
    page_sizes: tuple[int, ...] = ()  # kvcache keys' page sizes (`tune --page-size`); (): contiguous caches

    @property
    def features(self) -> dict[str, Any]:
        """The grid's attention features that are on, as Key keywords (`{"window": 4096, "sinks": True}`)."""
        values = {"window": self.window, "softcap": self.softcap, "sinks": self.sinks, "alibi": self.alibi,
                  "dropout": self.dropout, "mask": self.mask}
        return {name: value for name, value in values.items() if value != FEATURE_DEFAULTS[name]}

    def grid(self, arch: str) -> list[Key]:
        """The keys of the grid on `arch` (`grid_keys`)."""
        return grid_keys(arch, self.seq, self.head_dim, self.dtype, self.causal, self.batch_heads, self.groups,
                         self.ops, q_lens=self.q_lens, kv_lens=self.kv_lens, features=self.features,
                         tokens=self.tokens, page_sizes=self.page_sizes)

    def keys(self, arch: str) -> list[Key]:
        """The keys to tune on `arch`: the recorded ones, the largest estimated share of the app's
        attention time first (then tuned in that order: tuner.priority), or the grid's."""
        from .ops import with_parts

        # A composed key's parts (the training pair's fwd and bwd keys) come first, and are tuned too.
        return with_parts(recorded_keys(self.db_url, arch, self.ops) if self.recorded else self.grid(arch))

    def run_args(self) -> dict[str, Any]:
        """The options a run records in the database (its `args`)."""
        return {"seq": list(self.seq), "head_dim": list(self.head_dim), "dtype": list(self.dtype),
                "causal": list(self.causal), "batch_heads": list(self.batch_heads), "group": list(self.groups),
                "op": list(self.ops), "q_len": list(self.q_lens),
                "kv_len": None if self.kv_lens is None else list(self.kv_lens), "kernel_only": self.kernel_only,
                "recorded": self.recorded, "budget_s": self.budget_s, "softcap": self.softcap, "window": self.window,
                "sinks": self.sinks, "alibi": self.alibi, "mask": self.mask, "dropout": self.dropout,
                "tokens": list(self.tokens), "page_size": list(self.page_sizes)}

    def compile_shares(self, gpus: int = 1) -> tuple[int, int]:
        """(compile threads, compile-pool processes) of each of `gpus` benchmark workers on this host: as
        given, else the usable cores divided between the workers, which compile at the same time."""
        threads = self.compile_threads or compile_share(gpus)
        procs = compile_share(gpus) if self.compile_procs is None else self.compile_procs
        return threads, procs


def grid_keys(arch: str, seqs: Sequence[int], head_dims: Sequence[int], dtypes: Sequence[str],
              causals: Sequence[bool], batch_heads: Sequence[int], groups: Sequence[int],
              ops: Sequence[str] = ("fwd",), *, q_lens: Sequence[int] = (1,),
              kv_lens: Sequence[int] | None = None, features: Mapping[str, Any] | None = None,
              tokens: Sequence[int] = (32768,), page_sizes: Sequence[int] = ()) -> list[Key]:
    """The keys of the grid for each of `ops`; a bucket smaller than its group (B·Hq below Hq) is no
    workload and is left out (TuneError naming --group when that leaves nothing). kvcache keys take
    Nq from `q_lens` and the cache length from `kv_lens` (default: `seqs`); a causal one with more
    queries than cached keys is left out (bottom-right causal would give query 0 no key), and with
    `page_sizes` each is a paged key of every page size. Packed keys (varlen, varlen_bwd) take their
    longest document from `seqs`, their total tokens from `tokens` (bucketed; those below the longest
    document are left out) and Hq from `batch_heads`. `features`: the attention features every key has
    (Key keywords); a key whose sliding window covers every key (no call has such a key:
    tuner.ops.mods.nominal_window) is left out, TuneError naming --window when that leaves nothing, and
    TuneError for features an op's keys do not take (a mask or dropout for kvcache; ALiBi too for varlen)."""
    from ..db.types import bucket
    from .ops.mods import VARLEN_OPS, nominal_window, op_takes

    features = dict(features or {})
    fp8 = FP8_DTYPE
    if fp8 in dtypes and (features or "fwd" not in ops):
        raise TuneError("--dtype fp8: fp8 keys are plain forward keys (--op fwd, no attention features): the fp8 "
                        "kernel is an inference forward without score modifiers")
    for op in dict.fromkeys(ops):
        takes, api = op_takes(op)
        other = [name for name in features if name not in takes]
        if other:
            raise TuneError(f"--{' and --'.join(other)}: {op} keys ({api}) take no {' or '.join(other)}; "
                            "tune them without it")

    def lengths(op: str) -> list[tuple[int, int]]:
        if op != "kvcache":
            return [(n, n) for n in seqs]
        return [(nq, nk) for nq in q_lens for nk in (kv_lens or seqs)]

    def layouts(op: str, n: int) -> list[dict[str, int]]:
        if op in VARLEN_OPS:
            return [{"tokens": t} for t in dict.fromkeys(bucket(t) for t in tokens) if t >= n]
        if op == "kvcache" and page_sizes:
            return [{"page_size": p} for p in page_sizes]
        return [{}]

    def windowed(causal: bool, seq_k: int) -> bool:
        try:
            nominal_window(features["window"], causal, seq_k)
        except ValueError:
            return False
        return True

    keys = [Key(arch, op, n, d, dt, c, seq_len_kv=n_kv, batch_heads=bh, group=g, **features, **layout)
            for op in ops for d in head_dims for dt in dtypes for c in causals for g in groups
            for n, n_kv in lengths(op) for bh in batch_heads for layout in layouts(op, n)
            if bh >= g and not (op == "kvcache" and c and n > n_kv) and not (dt == fp8 and op != "fwd")]
    if not keys:
        raise TuneError(f"--group: every group ({', '.join(map(str, groups))}) is larger than every B·Hq "
                        f"bucket ({', '.join(map(str, batch_heads))}); B·Hq is at least Hq (or, for varlen keys, "
                        "every --tokens is below every --seq)")
    if features.get("window"):
        keys = [key for key in keys if windowed(key.causal, key.seq_len_kv)]
        if not keys:
            raise TuneError(f"--window {features['window']}: a window that wide covers every key of every "
                            "sequence length given (no window at all); give longer sequences or a smaller window")
    return keys


def recorded_keys(db_url: str | None, arch: str, ops: Sequence[str] = ("fwd",)) -> list[Key]:
    """The keys of `ops` the database has recorded for `arch`, the largest estimated share of the app's
    attention time first (`recorded_ranking`)."""
    return [r.key for r in recorded_ranking(db_url, arch, ops)]


def recorded_ranking(db_url: str | None, arch: str, ops: Sequence[str] = ("fwd",)) -> list["Ranked"]:
    """The recorded keys of `ops` for `arch` (Store.recorded) with their calls and estimated share of
    the attention time, largest first (tuner.priority). Keys of other archs and other ops are skipped
    with a note on stderr; none left is a TuneError."""
    from ..db.errors import StoreError
    from ..db.store import Store
    from .priority import by_attention_time

    try:
        with Store.open(db_url, create=False) as store:
            recorded = store.recorded()
    except (StoreError, ValueError) as error:
        raise TuneError(error) from None
    entries, other = [], []
    for entry in recorded:
        if entry.key.arch == arch and entry.key.op in ops:
            entries.append((entry.key, entry.calls))
        else:
            other.append(entry.key)
    from .ops import OPS

    what = arch if set(ops) >= set(OPS) else f"{arch} {','.join(ops)}"
    if not entries:
        raise TuneError(f"--recorded: no recorded {what} keys in the database ({len(other)} of other archs "
                        "or ops); run the app with FLASHTUNE_RECORD=1 on this GPU first")
    if other:
        shown = ", ".join(map(str, other[:3])) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        unselected = sorted({k.op for k in other if k.arch == arch})
        hint = f" (--op {','.join([*ops, *unselected])} tunes those of {arch} too)" if unselected else ""
        click.echo(f"note: skipping {len(other)} recorded key(s) not for {what}: {shown}{hint}", err=True)
    return by_attention_time(entries)
