"""The figures of `flashtune plot`: a benchmark sweep against N, and a BLOCK_M × BLOCK_N heatmap of trials.

matplotlib is optional (the `plot` extra) and imported only when a figure is drawn; without it
PlotDependencyError says how to install it. Bad data raises ValueError naming the problem; a
directory that cannot be written raises OSError.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ...db.store import TrialRecord
from ...db.types import Key
from .results import BASELINES, TUNED, BenchRow

INSTALL_HINT = "pip install matplotlib (from a flashtune checkout: pip install '.[plot]')"
METRICS: dict[str, str] = {
    "latency": "median time per call (ms)",
    "speedup": "flashtune speed-up (baseline time / flashtune time)",
    "tflops": "TFLOP/s",
}
_OUTCOME_SHORT = {"out_of_resources": "OOR", "compile_error": "compile\nerror", "wrong_result": "wrong",
                  "crashed": "crash", "timeout": "timeout",
                  "out_of_memory": "OOM"}


class PlotDependencyError(ImportError):
    """matplotlib is not installed."""


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; PlotDependencyError when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotDependencyError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return plt


def _group_name(head_dim: int, dtype: str, causal: bool) -> str:
    return f"d{head_dim}_{dtype}_{'causal' if causal else 'full'}"


def _series(rows: Sequence[BenchRow], where: str) -> dict[str, list[BenchRow]]:
    by_provider: dict[str, list[BenchRow]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    for row in rows:
        if (row.provider, row.seq_len) in seen:
            raise ValueError(f"{where}: two rows for {row.provider} at N={row.seq_len}; plot one "
                             "benchmark run per CSV")
        seen.add((row.provider, row.seq_len))
        if row.status == "ok":
            by_provider[row.provider].append(row)
    return {p: sorted(rs, key=lambda r: r.seq_len) for p, rs in by_provider.items()}


def _axes(plt: Any, title: str, ylabel: str, seqs: Sequence[int], *, log_y: bool) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(seqs), [str(n) for n in seqs])
    ax.minorticks_off()
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _subtitle(rows: Sequence[BenchRow]) -> str:
    gpus = sorted({r.gpu for r in rows if r.gpu})
    tokens = sorted({r.batch * r.seq_len for r in rows})
    heads = sorted({r.heads for r in rows})
    shape = f"B·N={tokens[0]}" if len(tokens) == 1 else "B·N varies"
    shape += f", H={heads[0]}" if len(heads) == 1 else ", H varies"
    return f"{shape}{' on ' + ', '.join(gpus) if gpus else ''}"


def sweep_figures(rows: Sequence[BenchRow], out_dir: str | Path) -> list[Path]:
    """Latency, speed-up and TFLOP/s against N (log-x, one line per provider), one PNG per metric
    and (head_dim, dtype, causal) group; returns the files written.

    ValueError when no row ran ('ok'), or a group holds two rows for one provider and N.
    """
    if not any(r.status == "ok" for r in rows):
        raise ValueError("no row of the CSV has status 'ok': nothing to plot")
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[int, str, bool], list[BenchRow]] = defaultdict(list)
    for row in rows:
        groups[row.group].append(row)
    written = []
    for (head_dim, dtype, causal), group_rows in sorted(groups.items()):
        name = _group_name(head_dim, dtype, causal)
        series = _series(group_rows, name)
        if not series:
            continue
        seqs = sorted({r.seq_len for rs in series.values() for r in rs})
        title = f"attention forward, D={head_dim}, {dtype}, {'causal' if causal else 'non-causal'}\n" \
                f"{_subtitle(group_rows)}"
        for metric, log_y in (("latency", True), ("tflops", False)):
            fig, ax = _axes(plt, title, METRICS[metric], seqs, log_y=log_y)
            for provider, rs in series.items():
                ys = [r.median_ms if metric == "latency" else r.tflops for r in rs]
                ax.plot([r.seq_len for r in rs], ys, marker="o", label=provider,
                        linewidth=2.4 if provider == TUNED else 1.4)
            written.append(_save(plt, fig, ax, out / f"{metric}_{name}.png"))
        tuned = series.get(TUNED, [])
        lines = {b: [(r.seq_len, r.speedups[b]) for r in tuned if b in r.speedups] for b in BASELINES}
        lines = {b: pts for b, pts in lines.items() if pts}
        if lines:
            fig, ax = _axes(plt, title, METRICS["speedup"], seqs, log_y=False)
            # Speed-ups over the unfused math backend dwarf the others: a log2 axis keeps 0.8x and 1.3x apart.
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%.3gx"))
            ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
            for baseline, pts in lines.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"vs {baseline}")
            written.append(_save(plt, fig, ax, out / f"speedup_{name}.png"))
    return written


def _cells(trials: Sequence[TrialRecord]) -> dict[tuple[int, int], TrialRecord]:
    """The best trial per (block_m, block_n): the fastest ok one, else any failed one."""
    cells: dict[tuple[int, int], TrialRecord] = {}
    for t in trials:
        cell = (t.config.block_m, t.config.block_n)
        best = cells.get(cell)
        if best is None or (t.outcome == "ok" and (best.outcome != "ok" or t.median_ms < best.median_ms)):
            cells[cell] = t
    return cells


def heatmap_name(key: Key) -> str:
    """File name of the heatmap of `key`."""
    return f"heatmap_{key.arch}_n{key.seq_len}_d{key.head_dim}_{key.dtype}_{'causal' if key.causal else 'full'}.png"


def heatmap_figure(trials: Sequence[TrialRecord], key: Key, out_dir: str | Path) -> Path:
    """A BLOCK_M × BLOCK_N heatmap of the best trial time per cell (warps and stages written in the
    cell; failed-only cells marked with their outcome); returns the PNG written.

    ValueError when `trials` holds none of `key`'s ok trials.
    """
    trials = [t for t in trials if t.key == key]
    if not any(t.outcome == "ok" for t in trials):
        raise ValueError(f"no successful trial for {key} to plot")
    plt = pyplot()
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = _cells(trials)
    ms_rows = sorted({m for m, _ in cells})
    ns = sorted({n for _, n in cells})
    grid = np.full((len(ms_rows), len(ns)), np.nan)
    for (m, n), t in cells.items():
        if t.outcome == "ok":
            grid[ms_rows.index(m), ns.index(n)] = t.median_ms
    best = min((t for t in cells.values() if t.outcome == "ok"), key=lambda t: t.median_ms)
    fig, ax = plt.subplots(figsize=(1.6 * len(ns) + 3, 1.0 * len(ms_rows) + 2.2))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label="best median time (ms)")
    ax.set_xticks(range(len(ns)), [str(n) for n in ns])
    ax.set_yticks(range(len(ms_rows)), [str(m) for m in ms_rows])
    ax.set_xlabel("BLOCK_N")
    ax.set_ylabel("BLOCK_M")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2
    for (m, n), t in cells.items():
        y, x = ms_rows.index(m), ns.index(n)
        if t.outcome == "ok":
            text = f"{t.median_ms:.3g}\nw{t.config.num_warps} s{t.config.num_stages}"
            color = "white" if t.median_ms > middle else "black"
        else:
            text, color = _OUTCOME_SHORT.get(t.outcome, t.outcome), "dimgray"
        ax.text(x, y, text, ha="center", va="center", fontsize=8, color=color,
                fontweight="bold" if t is best else "normal")
    ax.add_patch(plt.Rectangle((ns.index(best.config.block_n) - 0.5, ms_rows.index(best.config.block_m) - 0.5),
                               1, 1, fill=False, edgecolor="red", linewidth=2))
    gpus = ", ".join(sorted({t.gpu_name for t in trials}))
    tflops = f", {best.tflops:.0f} TFLOP/s" if best.tflops and math.isfinite(best.tflops) else ""
    ax.set_title(f"{key} on {gpus}\nbest {best.config}: {best.median_ms:.4g} ms{tflops} "
                 f"({len(trials)} trials)", fontsize=9)
    fig.tight_layout()
    path = out / heatmap_name(key)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
