"""`flashtune plot`: a `flashtune bench --csv` file against N, or one key's tuning trials as a heatmap.

Bad input (a CSV that is missing, not a regular file, too large, not UTF-8, empty or malformed; a key
with no trials; an output directory that cannot be written; an unusable database) prints one line
on stderr and exits with code 2. A missing matplotlib is exit code 1, naming the `plot` extra.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import click

from .common import ARCH, CliError, db_option, echo, echo_json, json_option, key_options


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise CliError(f"cannot write to --out {path}: {error.strerror or error}") from None
    return path


def _draw(draw: Callable[[], Path | list[Path]], out: Path) -> list[Path]:
    """Run a figure function (it returns the paths written) into `out`, its errors as the CLI's."""
    from ..benchmarking.plots import PlotDependencyError

    _writable_dir(out)
    try:
        written = draw()
    except PlotDependencyError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise CliError(f"cannot write to --out {out}: {error.strerror or error}") from None
    return written if isinstance(written, list) else [written]


def _heatmap(out: Path, db_url: str | None, arch: str | None, seq: int | None, head_dim: int | None,
             dtype: str | None, causal: bool, kernel_version: str) -> list[Path]:
    from ...db.errors import StoreError
    from ...db.store import Store
    from ...db.types import Key

    missing = [name for name, value in (("--arch", arch), ("--seq", seq), ("--head-dim", head_dim),
                                        ("--dtype", dtype)) if value is None]
    if missing:
        raise CliError(f"--heatmap needs {', '.join(missing)} (the key whose trials to draw)")
    key = Key(arch, "fwd", seq, head_dim, dtype, causal)  # type: ignore[arg-type]
    from ...kernel.version import op_version

    version = op_version(key.op) if kernel_version == "current" else kernel_version
    try:
        with Store.open(db_url, create=False) as store:
            where = store.display_url
            trials = store.trials(key) if version == "any" else store.trials(key, kernel_version=version)
            others = 0 if trials or version == "any" else len(store.trials(key))
    except (StoreError, ValueError) as error:
        raise CliError(error) from None
    if not any(t.outcome == "ok" for t in trials):
        what = "no trials" if not trials else f"no successful trial among {len(trials)}"
        hint = (f"; {others} trial(s) of other kernel versions: pass --kernel-version any" if others
                else "; run `tune` for it, or check `flashtune show`")
        scope = "" if version == "any" else f" with kernel version {version}"
        raise CliError(f"{what} for {key}{scope} in {where}{hint}")
    from ..benchmarking.plots import heatmap_figure

    return _draw(lambda: heatmap_figure(trials, key, out), out)


def _sweep(csv_file: str, out: Path) -> list[Path]:
    from ..benchmarking.plots import sweep_figures
    from ..benchmarking.results import read_csv

    try:
        rows = read_csv(csv_file)
    except ValueError as error:
        raise CliError(error) from None

    def draw() -> list[Path]:
        try:
            return sweep_figures(rows, out)
        except ValueError as error:
            raise CliError(f"{csv_file}: {error}") from None

    return _draw(draw, out)


@click.command("plot")
@click.argument("csv_file", required=False, metavar="[CSV]")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("plots"), show_default=True,
              help="Directory for the PNG files (created if missing).")
@click.option("--heatmap", is_flag=True, help="Draw a BLOCK_M × BLOCK_N heatmap of one key's trials instead.")
@click.option("--arch", type=ARCH, default=None, help="Heatmap: the key's arch, e.g. sm_90.")
@key_options(many=False, causal_default="no-causal")
@click.option("--kernel-version", default="current", show_default=True,
              help="Heatmap: trials of this kernel version; 'current' is this checkout's, 'any' all.")
@db_option
@json_option
def plot(csv_file: str | None, out_dir: Path, heatmap: bool, arch: str | None, seq: int | None,
         head_dim: int | None, dtype: str | None, causal: bool, kernel_version: str, db_url: str | None,
         as_json: bool) -> None:
    """Plot a `flashtune bench --csv` file against N, or (--heatmap) one key's tuning trials."""
    if heatmap:
        if csv_file is not None:
            raise CliError("give either a CSV file or --heatmap, not both")
        written = _heatmap(out_dir, db_url, arch, seq, head_dim, dtype, causal, kernel_version)
    elif csv_file is None:
        raise CliError("give the CSV written by `flashtune bench --csv FILE`, or --heatmap with a key")
    else:
        written = _sweep(csv_file, out_dir)
    if as_json:
        echo_json([str(path) for path in written])
    else:
        for path in written:
            echo(path)


def register(group: click.Group) -> None:
    """Add `plot` to the CLI group."""
    group.add_command(plot)
