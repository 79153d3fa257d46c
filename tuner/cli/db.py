"""Database commands: `show`, `export`, `import`, and `db path|migrate|vacuum`; `show --bundled`,
`export --bundle` and `import --from-bundled` for the winners shipped in the wheel (db.bundled).

None of them imports torch or triton, so they run on a machine that only holds the database.
Bad input (a bad file, URL, arch or dtype, or a database that is missing, locked, corrupt or of
another schema version) prints one line on stderr and exits with code 2, having written nothing.
"""
from __future__ import annotations

from pathlib import Path

import click

from ...db import bundled, exchange
from ...db.paths import default_url, sqlite_path
from ...db.text import mask_url
from ...db.store import Store, Winner, migrate_database
from ...db.types import Config, Key

from .common import (ARCH, DTYPE, HEAD_DIM, OP, causal_option, db_option, echo, echo_json, echo_json_array,
                     echo_table, handle_errors, json_option)
from .output import STDOUT, write_atomically


def _url(db_url: str | None) -> str:
    return db_url if db_url else default_url()


# --- show --------------------------------------------------------------------------------------

def _key_cells(k: Key) -> list[str]:
    n = str(k.seq_len) if k.seq_len == k.seq_len_kv else f"{k.seq_len}x{k.seq_len_kv}"
    return [k.arch, k.op, n, str(k.head_dim), k.dtype, "yes" if k.causal else "no",
            str(k.batch_heads) if k.batch_heads else "-", str(k.group), " ".join(k.feature_parts()) or "-"]


_KEY_HEADERS = ["arch", "op", "N", "D", "dtype", "causal", "B·H", "group", "features"]


def _row(w: Winner) -> list[str]:
    provider = provider_name(w.config)
    config = str(w.kernel_config or "") if provider != "kernel" else str(w.config)
    return [*_key_cells(w.key), provider, config, f"{w.median_ms:.4f}", "" if w.tflops is None else f"{w.tflops:.1f}",
            w.gpu_name, w.kernel_version[:12], w.measured_at.strftime("%Y-%m-%d %H:%M")]


_HEADERS = [*_KEY_HEADERS, "provider", "config (kernel)", "ms", "TFLOP/s", "GPU", "kernel", "measured (UTC)"]


def provider_name(config: Config) -> str:
    """Which implementation a stored config stands for: "kernel" or an SDPA backend (its `provider` knob)."""
    return str(config.extra_dict.get("provider", "kernel"))


def _show_recorded(db_url: str | None, arch: str | None, as_json: bool) -> None:
    with Store.open(_url(db_url), create=False) as store:
        if as_json:  # streamed: 200,000 recorded keys list in constant memory
            echo_json_array({**exchange.key_to_dict(r.key), "calls": r.calls, "first_seen": r.first_seen.isoformat(),
                             "last_seen": r.last_seen.isoformat()} for r in store.iter_recorded(arch))
            return
        recorded = store.recorded(arch)
        where = store.display_url
    if not recorded:
        echo(f"no recorded shapes in {where} (run the app with FLASHTUNE_RECORD=1)")
        return
    echo_table([*_KEY_HEADERS, "calls", "last seen (UTC)"],
               [[*_key_cells(r.key), str(r.calls), r.last_seen.strftime("%Y-%m-%d %H:%M")] for r in recorded],
               right=["N", "D", "B·H", "group", "calls"], title=f"{len(recorded)} recorded key(s) in {where}")


@click.command("show")
@db_option
@click.option("--arch", type=ARCH, default=None, help="Only this arch, e.g. sm_90.")
@click.option("--op", type=OP, default=None, help="Only this op (fwd, bwd or kvcache).")
@click.option("--dtype", type=DTYPE, default=None, help="Only this dtype (fp16, bf16, fp32, fp8).")
@click.option("--head-dim", type=HEAD_DIM, default=None, help="Only this head dim.")
@causal_option()
@click.option("--recorded", is_flag=True, help="List the keys apps ran under FLASHTUNE_RECORD=1 instead, most-called first.")
@click.option("--bundled", "show_bundled", is_flag=True,
              help="List the winners shipped with flashtune (every GPU model's bundle) instead of the database's.")
@json_option
@handle_errors
def show(db_url: str | None, arch: str | None, op: str | None, dtype: str | None,
         head_dim: int | None, causal: tuple[bool, ...], recorded: bool, show_bundled: bool, as_json: bool) -> None:
    """List the stored winners (which provider won each key), with --recorded the recorded shapes, or with
    --bundled the winners shipped with flashtune."""
    if recorded and show_bundled:
        raise ValueError("--recorded and --bundled list different things: pass one")
    if recorded:
        _show_recorded(db_url, arch, as_json)
        return
    if show_bundled:
        _show_bundled(arch, op, dtype, head_dim, causal, as_json)
        return
    with Store.open(_url(db_url), create=False) as store:
        winners = store.winners(arch, op=op, dtype=dtype, head_dim=head_dim,
                                causal=causal[0] if len(causal) == 1 else None)
        where = store.display_url
    if as_json:
        echo_json([exchange.winner_to_dict(w) for w in winners])
        return
    if not winners:
        echo(f"no winners in {where} match")
        return
    echo_table(_HEADERS, [_row(w) for w in winners], right=["N", "D", "B·H", "group", "ms", "TFLOP/s"],
               title=f"{len(winners)} winner(s) in {where}")


def _installed_versions() -> dict[str, str]:
    # The versions are hashed from the package's sources with ast: no torch is imported.
    from ...kernel.version import OP_VERSIONS

    return dict(OP_VERSIONS)


def _bundled_winners(files: list[Path]) -> list[tuple[Path, Winner]]:
    """Every winner of `files`, validated as `flashtune import` validates a file (each op's shared-memory fit)."""
    from ...kernel.ops import smem_need

    return [(path, w) for path in files for w in bundled.read_bundle(path, strict=True, smem=smem_need)]


def _show_bundled(arch: str | None, op: str | None, dtype: str | None, head_dim: int | None,
                  causal: tuple[bool, ...], as_json: bool) -> None:
    where = bundled.bundle_dir()
    versions = _installed_versions()
    rows = [(path, w) for path, w in _bundled_winners(bundled.bundle_files(where))
            if (arch is None or w.key.arch == arch) and (op is None or w.key.op == op)
            and (dtype is None or w.key.dtype == dtype) and (head_dim is None or w.key.head_dim == head_dim)
            and (len(causal) != 1 or w.key.causal == causal[0])]
    if as_json:
        echo_json([{**exchange.winner_to_dict(w), "source": "bundled", "file": path.name,
                    "stale": bundled.stale_reason(w, versions) is not None} for path, w in rows])
        return
    if not rows:
        echo(f"no bundled winners in {where} match")
        return
    stale = 0
    lines = []
    for _, w in rows:
        row = _row(w)
        if bundled.stale_reason(w, versions) is not None:
            stale += 1
            row[-2] += " (stale)"
        lines.append(row)
    note = f"; {stale} stale, not used (regenerate: {bundled.REGENERATE})" if stale else ""
    echo_table(_HEADERS, lines, right=["N", "D", "B·H", "group", "ms", "TFLOP/s"],
               title=f"{len(rows)} bundled winner(s) in {where}{note}")


# --- export / import ---------------------------------------------------------------------------

@click.command("export")
@db_option
@click.option("--arch", type=ARCH, default=None, help="Only this arch, e.g. sm_90.")
@click.option("--dtype", type=DTYPE, default=None, help="Only this dtype (fp16, bf16, fp32, fp8).")
@click.option("-o", "--output", default=STDOUT, metavar="FILE",
              help="Write here, replacing a regular file through a temporary one (a symlink is followed); "
                   "- or nothing: stdout.")
@click.option("--bundle", "bundle", default=None, metavar="DIR", type=click.Path(path_type=Path, file_okay=False),
              help="Write one bundle file per GPU model the winners were measured on into DIR, named for the "
                   "model (h100-80gb-hbm3.json): the files shipped in the wheel (db/bundled/).")
@handle_errors
def export(db_url: str | None, arch: str | None, dtype: str | None, output: str, bundle: Path | None) -> None:
    """Write the winners as a versioned JSON exchange file (with --bundle, one file per GPU model)."""
    with Store.open(_url(db_url), create=False) as store:
        document = exchange.export_winners(store, arch=arch, dtype=dtype)
    if bundle is not None:
        if output != STDOUT:
            raise ValueError("--bundle writes one file per GPU model into its directory: leave out -o")
        _export_bundles(document, bundle)
        return
    text = exchange.dump_document(document)
    if output == STDOUT:
        click.echo(text, nl=False)
        return
    write_atomically(output, text, "-o")
    echo(f"exported {len(document.winners)} winner(s) to {output}", err=True)


def _export_bundles(document: exchange.ExportDocument, directory: Path) -> None:
    """One exchange file per GPU model of `document`'s winners, named by bundled.file_name."""
    models: dict[str, list[dict]] = {}
    for winner in document.winners:
        models.setdefault(winner["provenance"]["gpu_name"], []).append(winner)
    names: dict[str, str] = {}
    for gpu in models:
        name = bundled.file_name(gpu)
        if name in names:
            raise ValueError(f"GPU models {names[name]!r} and {gpu!r} would share the bundle file {name}")
        names[name] = gpu
    if not models:
        raise ValueError("no winners to bundle (check --db, --arch and --dtype)")
    directory.mkdir(parents=True, exist_ok=True)
    for name, gpu in sorted(names.items()):
        part = document.model_copy(update={"winners": models[gpu]})
        write_atomically(str(directory / name), exchange.dump_document(part), "--bundle")
        echo(f"bundled {len(models[gpu])} winner(s) of {gpu} into {directory / name}", err=True)


def _print_report(report: exchange.ImportReport, verbose: bool) -> None:
    head = "would add" if report.dry_run else "added"
    echo(f"{head} {len(report.added)}, "
               f"{'would replace' if report.dry_run else 'replaced'} {len(report.replaced)}, "
               f"kept {len(report.kept)}, conflicts {len(report.conflicts)} "
               f"(policy {report.policy}{'; dry run, nothing written' if report.dry_run else ''})")
    groups = [("conflict", report.conflicts)]
    if verbose:
        groups = [("add", report.added), ("replace", report.replaced), ("keep", report.kept), *groups]
    for label, items in groups:
        for item in items:
            new = str(item.incoming.config)
            old = f" (stored {item.existing.config})" if item.existing else ""
            echo(f"  {label:8} {item.key}  {new}{old}: {item.reason}")


@click.command("import")
@db_option
@click.argument("file", type=click.Path(path_type=Path), required=False)
@click.option("--from-bundled", "from_bundled", is_flag=True,
              help="Import the winners shipped with flashtune instead of a file (all GPU models' bundles, or "
                   "those named by --gpu); stale ones (another kernel version) are left out.")
@click.option("--gpu", "gpus", multiple=True, metavar="MODEL",
              help="With --from-bundled: only this GPU model's bundle (its name, e.g. 'NVIDIA H100 80GB HBM3', "
                   "or its file, h100-80gb-hbm3); repeatable.")
@click.option("--policy", type=click.Choice(list(exchange.POLICIES)), default="faster",
              show_default=True,
              help="faster: keep the faster time when both were measured on the same GPU model "
                   "(else keep the stored one and report a conflict); newer: keep the later "
                   "measurement; replace: take the file's; keep: only add new keys.")
@click.option("--dry-run", is_flag=True, help="Print what would be added, replaced and kept; write nothing.")
@json_option
@click.option("-v", "--verbose", is_flag=True, help="List every winner, not only the conflicts.")
@handle_errors
def import_(db_url: str | None, file: Path | None, from_bundled: bool, gpus: tuple[str, ...], policy: str,
            dry_run: bool, as_json: bool, verbose: bool) -> None:
    """Merge an exchange file (or with --from-bundled, the winners shipped with flashtune) into the database
    (validated as a whole first, one transaction)."""
    from ...kernel.ops import smem_need

    if from_bundled == (file is not None):
        raise ValueError("name a FILE to import, or --from-bundled (not both)")
    if gpus and not from_bundled:
        raise ValueError("--gpu picks bundles: it goes with --from-bundled")
    if from_bundled:
        winners, source = _from_bundled(gpus)
    else:
        # Validated before the database is even opened, each config against its own op's shared-memory model.
        winners, source = exchange.read_document(file, smem=smem_need), str(file)
    url = _url(db_url)
    path = sqlite_path(url)
    if dry_run and path is not None and not path.exists():
        # Nothing to compare with, and a dry run must not create the file.
        report, _ = exchange.plan_import(winners, {}, policy, dry_run=True, source=source)
    else:
        with Store.open(url, create=not dry_run) as store:
            report = exchange.merge(store, winners, policy=policy, dry_run=dry_run, source=source)
    if as_json:
        echo_json(report.to_dict())
    else:
        _print_report(report, verbose or dry_run)


def _from_bundled(gpus: tuple[str, ...]) -> tuple[list[Winner], str]:
    """The current winners of the bundles named by `gpus` (all when none), and the source to report; one model
    per arch, since the database keys winners by arch, not by model."""
    where = bundled.bundle_dir()
    files = bundled.bundle_files(where)
    if gpus:
        # A model's name or its file's (with or without .json): a file's stem is its own file name's slug.
        wanted = {bundled.file_name(g.removesuffix(bundled.SUFFIX)) for g in gpus}
        chosen = [f for f in files if f.name in wanted]
        missing = sorted(wanted - {f.name for f in chosen})
        if missing:
            raise ValueError(f"no bundle {', '.join(missing)} in {where} (it holds "
                             f"{', '.join(f.name for f in files) or 'none'})")
        files = chosen
    if not files:
        raise ValueError(f"no bundled winners in {where}: nothing to import")
    versions = _installed_versions()
    winners: list[Winner] = []
    models: dict[str, set[str]] = {}
    stale = 0
    for _, w in _bundled_winners(files):
        models.setdefault(w.key.arch, set()).add(w.gpu_name)
        if bundled.stale_reason(w, versions) is None:
            winners.append(w)
        else:
            stale += 1
    for arch, names in sorted(models.items()):
        if len(names) > 1:
            raise ValueError(f"the bundles hold {arch} winners of {len(names)} GPU models ({', '.join(sorted(names))}): "
                             "the database keys winners by arch, so pick one with --gpu")
    if stale:
        echo(f"left out {stale} stale bundled winner(s) (another kernel version; regenerate: {bundled.REGENERATE})",
             err=True)
    return winners, f"bundled:{','.join(f.name for f in files)}"


# --- db path | migrate | vacuum ----------------------------------------------------------------

@click.group("db")
def db_group() -> None:
    """Where the database is, and its upkeep."""


@db_group.command("path")
@db_option
@handle_errors
def db_path(db_url: str | None) -> None:
    """Print the database file (SQLite) or URL (password masked) that commands use."""
    url = _url(db_url)
    path = sqlite_path(url)
    echo(str(path) if path is not None else mask_url(url))


@db_group.command("migrate")
@db_option
@click.option("--repair", is_flag=True,
              help="Clear keys that name a deleted row (a winner's trial, a trial's run) and remove job rows "
                   "whose job is gone, in the same transaction, instead of refusing to migrate.")
@handle_errors
def db_migrate(db_url: str | None, repair: bool) -> None:
    """Create the tables, or bring an older schema up to this version's."""
    url = _url(db_url)
    old, new = migrate_database(url, repair=repair, report=lambda change: echo(f"repaired: {change}"))
    if old is None:
        echo(f"created schema version {new} in {mask_url(url)}")
    elif old == new:
        echo(f"{mask_url(url)} is already at schema version {new}")
    else:
        echo(f"migrated {mask_url(url)} from schema version {old} to {new}")


@db_group.command("vacuum")
@db_option
@handle_errors
def db_vacuum(db_url: str | None) -> None:
    """Reclaim free space and refresh the query planner's statistics."""
    url = _url(db_url)
    path = sqlite_path(url)
    before = path.stat().st_size if path is not None and path.exists() else None
    with Store.open(url, create=False) as store:
        store.vacuum()
    if before is not None and path is not None:
        echo(f"vacuumed {path}: {before} -> {path.stat().st_size} bytes")
    else:
        echo(f"vacuumed {mask_url(url)}")


def register(group: click.Group) -> None:
    """Add this module's commands to the CLI group."""
    for command in (show, export, import_, db_group):
        group.add_command(command)
