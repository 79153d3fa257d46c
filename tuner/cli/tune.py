"""The `tune` command: tune keys on the GPU present and store every trial and winner, or plan with --dry-run.

Bad input (ranges, head dims, dtypes, budget, an --arch other than the GPU's, no GPU, an unusable
database) prints one line on stderr and exits with code 2 before anything is written. Ctrl-C stops
after the trial in flight (exit code 130); `--budget` stops the same way (exit code 0); running the
same command again resumes.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

import click

from ...db.types import MASKS, MAX_BATCH_HEADS, MAX_GROUP, MAX_WINDOW, Key, normalize_op
from ..fleet.gpus import parse_gpus
from ..options import FleetOptions, TuneError, TuneOptions
from ..ranges import parse_int, parse_seq_lens

from .common import (ARCH, DURATION, SEQ_LENS, CliError, Parsed, Progress, count, db_option, echo_json, echo_table,
                     fmt_num, geomean, json_option, key_options)

if TYPE_CHECKING:
    from ..fleet.command import FleetRun

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_BATCH_HEADS = "16,64,256"  # one sequence of 16 heads, a small batch, a full training batch


def parse_batch_heads(text: str) -> list[int]:
    """B·Hq buckets written like --seq ('16..256' doubles, comma lists); each a power of two."""
    try:
        values = parse_seq_lens(text)
    except ValueError as error:  # the same forms as --seq: its messages, about buckets
        message = str(error)
        for was, now in (("sequence-length list", "B·Hq list"), ("sequence lengths", "B·Hq buckets"),
                         ("sequence length", "B·Hq bucket"), ("lengths", "buckets")):
            message = message.replace(was, now)
        raise ValueError(message) from None
    for value in values:
        if value & (value - 1) or value > MAX_BATCH_HEADS:
            raise ValueError(f"{value} is not a bucket: B·Hq buckets are powers of two from 1 to {MAX_BATCH_HEADS}")
    return values


def parse_groups(text: str) -> list[int]:
    """A comma list of GQA groups (Hq / Hkv), each from 1 to MAX_GROUP; repeats dropped."""
    return list(dict.fromkeys(parse_int(item, 1, MAX_GROUP) for item in str(text).split(",")))


def parse_ops(text: str) -> list[str]:
    """A comma list of ops ('fwd', 'bwd', 'fwd,bwd'); repeats dropped."""
    return list(dict.fromkeys(normalize_op(item.strip()) for item in str(text).split(",")))


def parse_window(text: str) -> int:
    """A sliding window's key bucket: a power of two from 1 to MAX_WINDOW (db.types.window_bucket's values)."""
    value = parse_int(text, 1, MAX_WINDOW)
    if value & (value - 1):
        raise ValueError(f"{value} is not a window bucket: a power of two from 1 to {MAX_WINDOW} (the key rounds a "
                         "window's total size left + 1 + right to one)")
    return value


FEATURE_OPTIONS = ("softcap", "window", "sinks", "alibi", "mask", "dropout")  # the grid's attention features
BATCH_HEADS = Parsed(parse_batch_heads, "RANGE")
WINDOW = Parsed(parse_window, "W")
GROUPS = Parsed(parse_groups, "G[,G...]")
OPS_LIST = Parsed(parse_ops, "OP[,OP...]")
GPUS = Parsed(parse_gpus, "all|I[,I...]")


def tunable_ops(ops: Sequence[str]) -> list[str]:
    """`ops` when the tuner has a spec for each (tuner.ops), else a CliError naming the ones it has."""
    from ..ops import OPS

    missing = [op for op in ops if op not in OPS]
    if missing:
        raise CliError(f"--op: the tuner cannot time {', '.join(missing)} yet; it times {', '.join(OPS)}")
    return list(ops)


def _dry_run(options: TuneOptions) -> None:
    """Plan without a GPU: the grid's space per op, head dim and dtype; or, with --recorded (read from
    the database for the planned arch), each recorded key and the size of its candidate list."""
    options.fleet.refuse_dry_run()
    if options.recorded:
        if options.arch is None:
            raise CliError("--recorded --dry-run: give --arch (e.g. --arch sm_90) to plan recorded keys")
        from ..options import recorded_ranking

        _plan_recorded(_planned_gpu(options.arch), recorded_ranking(options.db_url, options.arch, options.ops),
                       options)
        return
    keys_count = len(options.keys("sm_90"))  # a composed key's parts included
    _plan_grid(_planned_gpu(options.arch), keys_count, options)


def _planned_gpu(arch: str | None) -> Any:
    """The GPU here when it is of `arch` (or `arch` is None), else the arch table's plan of `arch`."""
    from ..gpu import NoGpuError, detect_gpu, planned_gpu

    try:
        here = detect_gpu()
    except NoGpuError:
        here = None
    if arch is None:
        if here is None:
            raise CliError("no GPU here: give --arch (e.g. --arch sm_86) to plan with --dry-run")
        return here
    return here if here is not None and here.arch == arch else planned_gpu(arch)


def _feature_key(arch: str, op: str, features: Mapping[str, Any]) -> Key:
    """A key of `op` with the grid's `features` that SDPA's backends compete for unless the features or the op
    rule them out (a kvcache key of one query: one whose query sees the whole cache)."""
    return Key(arch, op, 1 if op == "kvcache" else 1024, 64, "float16", False, seq_len_kv=1024, **features)


def _sdpa_plan(arch: str, op: str, features: Mapping[str, Any], kernel_only: bool) -> list[str]:
    """The SDPA provider configs, as text, that compete for the grid's keys of `op` with `features`."""
    from ..session import key_providers

    return [str(c) for c in key_providers(_feature_key(arch, op, features), kernel_only)]


def _planned_providers(options: TuneOptions, arch: str) -> tuple[bool, list[str]]:
    """Whether torch SDPA's backends compete for any op planned (with the grid's features), and their configs
    as text."""
    providers = {c: None for op in options.ops for c in _sdpa_plan(arch, op, options.features, options.kernel_only)}
    return bool(providers), list(providers)


def _plan_grid(gpu: Any, keys_count: int, options: TuneOptions) -> None:
    """The space per op, head dim and dtype on `gpu`, with estimates and drop counts."""
    from ..ops import op_spec
    from ..ops.kvcache import NOMINAL

    features = options.features
    with_sdpa, providers = _planned_providers(options, gpu.arch)
    groups = []
    for op in options.ops:
        spec = op_spec(op)
        for head_dim in options.head_dim:
            for dtype in options.dtype:
                entries = spec.plan(head_dim, dtype, gpu)
                over = sum(1 for c in entries if c.dropped_by and c.dropped_by.startswith("smem"))
                kept = [{"config": str(c.config), "smem": c.smem} for c in entries if c.kept]
                # The op's other kernel variants (the forward's TMA kernel, sm_90 on): causal keys'
                # list, the superset: what the op's space adds to its base plan.
                base = {c.config for c in entries if c.kept}
                causal_key = Key(gpu.arch, op, options.seq[0], head_dim, dtype, True, **features)
                if op == "kvcache":  # its plan is the nominal decode key's space: the same key, causal
                    causal_key = Key(gpu.arch, op, head_dim=head_dim, dtype=dtype, causal=True, **NOMINAL, **features)
                variants = [{"config": str(c), "smem": spec.smem(c, head_dim, dtype, gpu.arch)}
                            for c in spec.space(causal_key, gpu) if c not in base]
                groups.append({"op": op, "head_dim": head_dim, "dtype": dtype, "configs": kept,
                               "space": len(entries), "dropped_smem": over,
                               "dropped_other": len(entries) - len(kept) - over, "variants": variants,
                               "sdpa_providers": with_sdpa and bool(_sdpa_plan(gpu.arch, op, features, False))})
    if options.as_json:
        echo_json({"arch": gpu.arch, "gpu": gpu.name, "smem_limit": gpu.smem_limit, "keys": keys_count,
                   "features": features, "providers": providers, "groups": groups})
        return
    shown = Key(gpu.arch, "fwd", 1, 64, "float16", False, **features).feature_parts()
    click.echo(f"{gpu.arch} ({gpu.name}), shared memory limit {gpu.smem_limit // 1024} KB per block; "
               f"{keys_count} keys" + (f" with {', '.join(shown)}" if shown else "")
               + f"; SDPA providers: {', '.join(providers) or 'none'}")
    for g in groups:
        what = f"{g['op']} D={g['head_dim']} {g['dtype']}"
        click.echo(f"\n{what}: {len(g['configs'])} of {g['space']} configs kept "
                   f"({g['dropped_smem']} over the shared-memory limit, {g['dropped_other']} by tile rules)"
                   + ("" if g["sdpa_providers"] or options.kernel_only else "; no SDPA providers for these keys"))
        echo_table(["config", "smem KB"], [[c["config"], f"{c['smem'] / 1024:.1f}"] for c in g["configs"]],
                   right=["smem KB"])
        if op_spec(g["op"]).parts:
            click.echo(f"{what}: the default shown; the kernel candidates are composed from the tuned trials of "
                       f"its {' and '.join(op_spec(g['op']).parts)} keys, tuned first")
        click.echo(f"{what}: {len(g['variants'])} other kernel-variant configs (the forward's "
                   f"tensor-descriptor (TMA) kernel on archs with TMA)")
        if g["variants"]:
            echo_table(["config", "smem KB"], [[c["config"], f"{c['smem'] / 1024:.1f}"] for c in g["variants"]],
                       right=["smem KB"])


def _plan_recorded(gpu: Any, ranking: Sequence[Any], options: TuneOptions) -> None:
    """Each recorded key, in the order `tune --recorded` tunes them (tuner.priority: the largest
    estimated share of the app's attention time first), with its calls, that share and the number of
    its kernel configs and providers on `gpu`."""
    from ..ops import op_spec
    from ..session import key_providers, session_space

    _, providers = _planned_providers(options, gpu.arch)
    rows = [{**_key_fields(r.key), "calls": r.calls, "time_share": r.share,
             "kernel_configs": len(session_space(r.key, gpu)),
             "providers": len(key_providers(r.key, options.kernel_only))} for r in ranking]
    if options.as_json:
        echo_json({"arch": gpu.arch, "gpu": gpu.name, "smem_limit": gpu.smem_limit, "keys": len(rows),
                   "providers": providers, "recorded": rows})
        return
    click.echo(f"{gpu.arch} ({gpu.name}): {len(rows)} recorded keys, the largest estimated share of the "
               f"attention time first; SDPA providers: {', '.join(providers) or 'none'}")
    echo_table(["key", "calls", "time share", "kernel configs", "providers"],
               [[r["key"], str(r["calls"]), f"{100 * r['time_share']:.1f}%", str(r["kernel_configs"]),
                 str(r["providers"])] for r in rows],
               right=["calls", "time share", "kernel configs", "providers"])
    composed = sorted({r["op"] for r in rows if op_spec(r["op"]).parts})
    for op in composed:
        click.echo(f"{op} keys: their {' and '.join(op_spec(op).parts)} keys are tuned first, and their kernel "
                   "candidates composed from those trials (counted here before them)")


def _key_fields(key: Key) -> dict[str, Any]:
    return {"key": str(key), "op": key.op, "seq_len": key.seq_len, "seq_len_kv": key.seq_len_kv, "head_dim": key.head_dim,
            "dtype": key.dtype, "causal": key.causal, "batch_heads": key.batch_heads, "group": key.group,
            **key.features_on()}


class _TuneProgress:
    """The tuning loop's progress events (tuner.loop.Progress) on the shared bar: trials are its units,
    and each finished key is a line in a log."""

    def __init__(self, keys: int) -> None:
        self._keys = keys
        self._bar: Progress | None = None

    def start(self, total: int) -> None:
        self._bar = Progress("tuning", total, items=self._keys)

    def advance(self, key: Key, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(n, str(key))

    def key_done(self, result: Any) -> None:
        if self._bar is not None:
            w = result.winner
            best = f"{w.config} {w.median_ms:.3f} ms" if w is not None else "no winner"
            if w is None and result.outcomes.get("out_of_memory"):
                best += " (out of memory)"
            self._bar.item_done(f"{result.key}: {best}; {result.new_trials} new, {result.skipped} stored"
                                + _shrunk_note(result.batch_heads, result.shrunk_from))

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _shrunk_note(batch_heads: int, shrunk_from: int | None) -> str:
    """What a key's line says when the bench ran it on fewer sequences than its bucket (free memory)."""
    return "" if shrunk_from is None else f"; ran at B·Hq {batch_heads} of {shrunk_from} (GPU memory)"


def _tbps(key: Key, batch_heads: int, ms: float | None) -> float | None:
    """TB/s of a memory-bound op's call (its OpSpec's bytes) that took `ms`; None for other ops."""
    from ..ops import op_spec

    moved = op_spec(key.op).bytes
    return moved(key, batch_heads) / (ms * 1e-3) / 1e12 if moved is not None and ms else None


def _summary(results: Sequence[Any]) -> dict[str, Any]:
    rows = []
    for r in results:
        w = r.winner
        rows.append({**_key_fields(r.key), "bench_batch_heads": r.batch_heads, "shrunk_from": r.shrunk_from,
                     "winner": str(w.config) if w else None, "provider": r.provider,
                     "default_won": w is not None and w.config == r.default_config,
                     "kernel_config": str(r.kernel_config) if r.kernel_config else None,
                     "median_ms": w.median_ms if w else None, "tflops": w.tflops if w else None,
                     "tbps": _tbps(r.key, r.batch_heads, w.median_ms) if w else None,
                     "default": str(r.default_config), "default_ms": r.default_ms, "speedup": r.speedup,
                     "noise": r.noise, "narrowed": r.narrowed, "new_trials": r.new_trials, "skipped": r.skipped,
                     "complete": r.complete, "winner_stored": r.winner_stored, "outcomes": r.outcomes})
    return {"keys": rows, "geomean_speedup": geomean(r["speedup"] for r in rows)}


def _print_summary(summary: dict[str, Any]) -> None:
    def winner(r: dict[str, Any]) -> str:
        if r["winner"] is None:
            return "-"
        return "default" if r["default_won"] else r["winner"] if r["provider"] == "kernel" else r["provider"]

    def key(r: dict[str, Any]) -> str:
        shrunk = f" (B·Hq {r['bench_batch_heads']})" if r.get("shrunk_from") else ""
        return r["key"] + shrunk + ("" if r["complete"] else " (partial)")

    def noise(r: dict[str, Any]) -> str:
        return "-" if r.get("noise") is None else f"{100 * r['noise']:.1f}%"

    rows = [[key(r), winner(r), fmt_num(r["median_ms"], ".4f"), fmt_num(r["tflops"], ".1f"), r["default"],
             fmt_num(r["speedup"], ".2f"), noise(r)]
            for r in summary["keys"]]
    headers = ["key", "winner", "ms", "TFLOP/s", "default", "speed-up", "noise"]
    right = ["ms", "TFLOP/s", "speed-up", "noise"]
    if any(r.get("tbps") for r in summary["keys"]):  # memory-bound ops (decode): bandwidth is the figure
        headers.insert(4, "TB/s")
        right.append("TB/s")
        for row, r in zip(rows, summary["keys"]):
            row.insert(4, fmt_num(r.get("tbps"), ".2f"))
    echo_table(headers, rows, right=right)
    if summary["geomean_speedup"]:
        click.echo(f"geomean speed-up over the default config: {summary['geomean_speedup']:.2f}x")


def fleet_options(func: F) -> F:
    """Add the fleet options; the command receives them as `gpus`, `job`, `join` and `lease_s`."""
    for option in reversed([
        click.option("--gpus", "gpus", type=GPUS, default=None,
                     help="Tune on several GPUs of this host: 'all' or a comma list of indices; one benchmark "
                          "worker per GPU, keys dealt through one claim queue in --db."),
        click.option("--job", "job", metavar="NAME", default=None,
                     help="Make the keys fleet job NAME in --db and work on it; other hosts add their GPUs "
                          "with --join NAME (PostgreSQL)."),
        click.option("--join", "join", metavar="NAME", default=None,
                     help="Work on fleet job NAME of the PostgreSQL --db: its keys, options and lease."),
        click.option("--lease", "lease_s", type=DURATION, default=None,
                     help="With --job/--gpus: a claim its worker stops renewing (killed, powered off) is taken "
                          "over after this long [default: 60s]."),
    ]):
        func = option(func)
    return func


@click.command("tune", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashtune")
@click.option("--arch", type=ARCH, default=None, help="GPU arch (sm_86, sm_90, ...); must be the GPU's unless --dry-run.")
@key_options(many=True, seq_default="128..4096", head_dim_default="64,128", dtype_default="fp16,bf16")
@click.option("--batch-heads", type=BATCH_HEADS, default=DEFAULT_BATCH_HEADS, show_default=True,
              help="B·Hq buckets, powers of two, written like --seq: each key is timed at its own.")
@click.option("--group", "groups", type=GROUPS, default="1", show_default=True,
              help="GQA groups Hq/Hkv, a comma list: each key is timed with real GQA inputs.")
@click.option("--op", "ops", type=OPS_LIST, default="fwd", show_default=True,
              help="Ops to tune, a comma list: fwd (the forward), bwd (the fused backward), kvcache "
                   "(attention_kvcache's split-KV decode; see --decode), train (the forward+backward pair), "
                   "varlen and varlen_bwd (attention_varlen's packed forward and backward; see --tokens). "
                   "With --recorded: which recorded ops to tune (default: all of them).")
@click.option("--softcap", is_flag=True,
              help="Tune keys with logit softcapping (attention(softcap=...), Gemma 2; timed with a cap of 1).")
@click.option("--window", type=WINDOW, default=None,
              help="Tune keys with a sliding window of this bucket, a power of two (the key's W: the window's "
                   "total size left + 1 + right, rounded; timed with a span of W, the last W keys when causal). "
                   "Keys whose sequences are too short for such a window are left out.")
@click.option("--sinks", is_flag=True, help="Tune keys with attention sinks (one learnt logit per head).")
@click.option("--alibi", is_flag=True, help="Tune keys with ALiBi (timed with the standard slopes of the heads).")
@click.option("--mask", type=click.Choice([m for m in MASKS if m != "none"]), default=None,
              help="Tune keys with an explicit attention mask of this kind (attn_mask; timed with a random "
                   "(B, 1, N, N) mask: key padding and hidden blocks, or a float bias).")
@click.option("--dropout", is_flag=True,
              help="Tune keys with dropout (a training call's; timed with p = 0.1). The feature options combine; "
                   "kvcache keys take no --mask or --dropout.")
@click.option("--tokens", "tokens", type=SEQ_LENS, default="32768", show_default=True,
              help="Total tokens of packed keys (--op varlen,varlen_bwd: attention_varlen), written like --seq, "
                   "each rounded to a power of two; --seq gives their longest document and --batch-heads their Hq.")
@click.option("--page-size", "page_sizes", type=SEQ_LENS, default=None,
              help="Page sizes of paged kvcache keys (attention_kvcache with a block_table), powers of two from "
                   "16, written like --seq; each kvcache key is timed on shuffled pages of each size.")
@click.option("--decode", is_flag=True,
              help="Tune decode keys (--op kvcache, attention_kvcache): --q-len queries against a cache of "
                   "--kv-len keys; added to an explicit --op.")
@click.option("--kv-len", "kv_lens", type=SEQ_LENS, default=None,
              help="Cache lengths of kvcache keys, written like --seq (default: the --seq lengths).")
@click.option("--q-len", "q_lens", type=SEQ_LENS, default=None,
              help="Queries per sequence of kvcache keys, written like --seq (default: 1).")
@click.option("--kernel-only", is_flag=True, help="Time the kernel's configs only, not torch SDPA's backends.")
@click.option("--recorded", is_flag=True,
              help="Tune the keys the app recorded (FLASHTUNE_RECORD=1), the largest estimated share of its "
                   "attention time first, instead of a grid.")
@db_option
@click.option("--budget", type=DURATION, default=None, help="Stop cleanly after this long (90s, 10m, 1h); run again to resume.")
@click.option("--dry-run", is_flag=True, help="List the space and the estimated shared memory; no GPU needed.")
@json_option
@click.option("--compile-threads", type=count(1, 256), default=None,
              help="Configs the benchmark worker first-launches at once (default: CPU cores, at most 16; "
                   "with --gpus, divided between the GPUs).")
@click.option("--compile-procs", type=count(0, 256), default=None,
              help="Processes of the compile pool that compiles each batch before the worker runs it "
                   "(default: CPU cores, at most 16; with --gpus, divided between the GPUs; 0: no pool, the "
                   "worker compiles in its threads).")
@click.option("--trial-timeout", type=DURATION, default="180s", show_default=True,
              help="A trial silent for this long is recorded as timeout.")
@fleet_options
def tune(**params: Any) -> None:
    """Find the fastest correct candidate (kernel config or torch SDPA backend) per key on this GPU and store it;
    a candidate must beat the default config by more than the measured noise, else the default is stored."""
    options = _options(params)
    try:
        if options.dry_run:
            _dry_run(options)
        elif options.fleet.requested:  # several GPUs or hosts: one claim queue (tuner.fleet)
            from ..fleet.command import tune_fleet
            _report_fleet(tune_fleet(options), options.as_json)
        else:
            _tune(options)
    except TuneError as error:
        raise CliError(error) from None


def _options(params: Mapping[str, Any]) -> TuneOptions:
    """The command's parameters as one value, --decode applied; CliError for ops the tuner cannot time."""
    ops = tunable_ops(_with_decode(params["ops"], params["decode"], params["kv_lens"], params["q_lens"]))
    ctx = click.get_current_context()
    given = frozenset(name for name in params
                      if (source := ctx.get_parameter_source(name)) is not None
                      and source.name not in ("DEFAULT", "DEFAULT_MAP"))
    if params["recorded"] and "ops" not in given and not params["decode"]:
        from ..ops import OPS

        ops = list(OPS)  # what the app recorded, whatever its ops: its forward, training and decode calls
    features = [f"--{name}" for name in FEATURE_OPTIONS if name in given]
    if params["recorded"] and features:
        raise CliError(f"{', '.join(features)}: --recorded tunes the recorded keys, each with its own features; "
                       "these options give a grid's keys theirs")
    gpus = params["gpus"]
    kv_lens = params["kv_lens"]
    return TuneOptions(
        arch=params["arch"], seq=tuple(params["seq"]), head_dim=tuple(params["head_dim"]),
        dtype=tuple(params["dtype"]), causal=tuple(params["causal"]), batch_heads=tuple(params["batch_heads"]),
        groups=tuple(params["groups"]), ops=tuple(ops), q_lens=tuple(params["q_lens"] or [1]),
        kv_lens=None if kv_lens is None else tuple(kv_lens), kernel_only=params["kernel_only"],
        recorded=params["recorded"], db_url=params["db_url"], budget_s=params["budget"],
        dry_run=params["dry_run"], as_json=params["as_json"], compile_threads=params["compile_threads"],
        compile_procs=params["compile_procs"], trial_timeout_s=params["trial_timeout"],
        fleet=FleetOptions(gpus=gpus if gpus is None or isinstance(gpus, str) else tuple(gpus), job=params["job"],
                           join=params["join"], lease_s=params["lease_s"]),
        given=given, softcap=params["softcap"], window=params["window"] or 0, sinks=params["sinks"],
        alibi=params["alibi"], mask=params["mask"] or "none", dropout=params["dropout"],
        tokens=tuple(params["tokens"]), page_sizes=_page_sizes(params["page_sizes"], ops))


def _page_sizes(sizes: list[int] | None, ops: Sequence[str]) -> tuple[int, ...]:
    """--page-size's values; CliError for a size that is not a power of two from 16, or without kvcache keys."""
    if sizes is None:
        return ()
    if "kvcache" not in ops:
        raise CliError("--page-size shapes paged decode keys: add --decode (or --op kvcache)")
    from ...kernel.checks import MIN_PAGE_SIZE

    bad = [p for p in sizes if p < MIN_PAGE_SIZE or p & (p - 1)]
    if bad:
        raise CliError(f"--page-size {bad[0]}: a page size is a power of two from {MIN_PAGE_SIZE}")
    return tuple(dict.fromkeys(sizes))


def _with_decode(ops: list[str], decode: bool, kv_lens: list[int] | None, q_lens: list[int] | None) -> list[str]:
    """The ops to tune once --decode is applied: kvcache alone when --op was left at its default,
    else added to the --op list. CliError for --kv-len/--q-len without kvcache keys to shape."""
    if decode:
        explicit = click.get_current_context().get_parameter_source("ops") is not click.core.ParameterSource.DEFAULT
        ops = [*ops, "kvcache"] if explicit else ["kvcache"]
        ops = list(dict.fromkeys(ops))
    if "kvcache" not in ops and (kv_lens is not None or q_lens is not None):
        raise CliError("--kv-len and --q-len shape decode keys: add --decode (or --op kvcache)")
    return ops


def _tune(options: TuneOptions) -> None:
    """Tune the keys on the GPU present, then print the summary; exit code 130 when interrupted."""
    from ...db.errors import StoreError

    from ..interrupt import stop_on_ctrl_c
    from ..loop import TuneSettings
    from ..session import SessionError, session_gpu, tuning_session
    from ..worker import WorkerError

    threads, procs = options.compile_shares()
    started = time.monotonic()
    with stop_on_ctrl_c("the trial in flight") as stop:
        try:
            gpu = session_gpu(options.arch)
            keys = options.keys(gpu.arch)
            with tuning_session(options.db_url, options.run_args(), gpu=gpu, compile_threads=threads,
                                compile_procs=procs, trial_timeout_s=options.trial_timeout_s,
                                kernel_only=options.kernel_only) as session:
                results = session.tune(keys, settings=TuneSettings(budget_s=options.budget_s),
                                       progress=_TuneProgress(len(keys)), should_stop=stop,
                                       keep_order=options.recorded)
        except (SessionError, WorkerError, StoreError, ValueError) as error:
            raise CliError(error) from None
    if session.finish_error:
        click.echo(session.finish_error, err=True)
    summary = _summary(results)
    summary.update(run_id=session.run_id, status=session.status, elapsed_s=round(time.monotonic() - started, 1),
                   worker_restarts=getattr(session.bench, "restarts", 0), gpu=asdict(session.gpu),
                   keys_planned=len(keys))
    if options.as_json:
        echo_json(summary)
    else:
        _print_summary(summary)
        if session.status != "done":
            click.echo(f"stopped ({session.status}) after {len(results)} of {len(keys)} keys; "
                       "run the same command again to resume", err=True)
    if session.status == "interrupted":
        sys.exit(130)


def _report_fleet(run: "FleetRun", as_json: bool) -> None:
    """The fleet run's summary: a table and a line per job for people, or JSON; exit code 130 when interrupted."""
    if run.finished:
        message = f"job {run.jobs[0]} is finished: every key is done, nothing to tune"
        if as_json:
            echo_json({"job": run.jobs[0], "status": "done", "keys": [], "message": message})
        else:
            click.echo(message, err=True)
        return
    summary = _summary(run.results)
    summary.update(status=run.status, elapsed_s=run.elapsed_s, jobs=run.jobs, keys_planned=run.keys_planned,
                   gpus=run.gpus)
    if as_json:
        echo_json(summary)
    else:
        _print_summary(summary)
        per_gpu = ", ".join(f"gpu{g['index']} {g['keys']} keys" for g in summary["gpus"])
        click.echo(f"job {', '.join(summary['jobs'])}: {len(run.results)} keys tuned here ({per_gpu}) in "
                   f"{summary['elapsed_s']:.0f} s", err=True)
        if run.status != "done":
            click.echo(f"stopped ({run.status}); run the same command again to resume", err=True)
    if run.status == "interrupted":
        sys.exit(130)


def register(group: click.Group) -> None:
    """Add `tune` to the CLI group."""
    group.add_command(tune)
