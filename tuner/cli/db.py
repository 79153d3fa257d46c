"""Database commands: `show`, `export`, `import`, and `db path|migrate|vacuum`.

None of them imports torch or triton, so they run on a machine that only holds the database.
Bad input (a bad file, URL, arch or dtype, or a database that is missing, locked, corrupt or of
another schema version) prints one line on stderr and exits with code 2, having written nothing.
"""
from __future__ import annotations

from pathlib import Path

import click

from ...db import exchange
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
@click.option("--dtype", type=DTYPE, default=None, help="Only this dtype (fp16, bf16, fp32).")
@click.option("--head-dim", type=HEAD_DIM, default=None, help="Only this head dim.")
@causal_option()
@click.option("--recorded", is_flag=True, help="List the keys apps ran under FLASHTUNE_RECORD=1 instead, most-called first.")
@json_option
@handle_errors
def show(db_url: str | None, arch: str | None, op: str | None, dtype: str | None,
         head_dim: int | None, causal: tuple[bool, ...], recorded: bool, as_json: bool) -> None:
    """List the stored winners (which provider won each key), or with --recorded the recorded shapes."""
    if recorded:
        _show_recorded(db_url, arch, as_json)
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


# --- export / import ---------------------------------------------------------------------------

@click.command("export")
@db_option
@click.option("--arch", type=ARCH, default=None, help="Only this arch, e.g. sm_90.")
@click.option("--dtype", type=DTYPE, default=None, help="Only this dtype (fp16, bf16, fp32).")
@click.option("-o", "--output", default=STDOUT, metavar="FILE",
              help="Write here, replacing a regular file through a temporary one (a symlink is followed); "
                   "- or nothing: stdout.")
@handle_errors
def export(db_url: str | None, arch: str | None, dtype: str | None, output: str) -> None:
    """Write the winners as a versioned JSON exchange file."""
    with Store.open(_url(db_url), create=False) as store:
        document = exchange.export_winners(store, arch=arch, dtype=dtype)
    text = exchange.dump_document(document)
    if output == STDOUT:
        click.echo(text, nl=False)
        return
    write_atomically(output, text, "-o")
    echo(f"exported {len(document.winners)} winner(s) to {output}", err=True)


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
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--policy", type=click.Choice(list(exchange.POLICIES)), default="faster",
              show_default=True,
              help="faster: keep the faster time when both were measured on the same GPU model "
                   "(else keep the stored one and report a conflict); newer: keep the later "
                   "measurement; replace: take the file's; keep: only add new keys.")
@click.option("--dry-run", is_flag=True, help="Print what would be added, replaced and kept; write nothing.")
@json_option
@click.option("-v", "--verbose", is_flag=True, help="List every winner, not only the conflicts.")
@handle_errors
def import_(db_url: str | None, file: Path, policy: str, dry_run: bool, as_json: bool,
            verbose: bool) -> None:
    """Merge an exchange file into the database (validated as a whole first, one transaction)."""
    from ...kernel.ops import smem_need

    # Validated before the database is even opened, each config against its own op's shared-memory model.
    winners = exchange.read_document(file, smem=smem_need)
    url = _url(db_url)
    path = sqlite_path(url)
    if dry_run and path is not None and not path.exists():
        # Nothing to compare with, and a dry run must not create the file.
        report, _ = exchange.plan_import(winners, {}, policy, dry_run=True, source=str(file))
    else:
        with Store.open(url, create=not dry_run) as store:
            report = exchange.merge(store, winners, policy=policy, dry_run=dry_run, source=str(file))
    if as_json:
        echo_json(report.to_dict())
    else:
        _print_report(report, verbose or dry_run)


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
