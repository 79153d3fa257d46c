"""The `jobs` command: where each fleet job stands, key by key (done, claimed by whom, pending).

Reads the database only (never creates it); imports neither torch nor triton, so it runs on any
machine that reaches the database.
"""
from __future__ import annotations

from typing import Any

import click

from ...db.jobs import JobKey, JobQueue, JobStatus
from ...db.paths import default_url
from ...db.store import Store

from .common import db_option, echo, echo_json, echo_table, handle_errors, json_option


def _worker(entry: JobKey) -> dict[str, Any] | None:
    w = entry.worker
    return None if w is None else {"host": w.host, "pid": w.pid, "gpu": w.gpu, "gpu_name": w.gpu_name or None}


def _as_json(status: JobStatus) -> dict[str, Any]:
    job = status.job
    return {"name": job.name, "arch": job.arch, "kernel_version": job.kernel_version, "lease_s": job.lease_s,
            "status": job.status, "host": job.host, "created_at": job.created_at.isoformat(),
            "finished_at": job.finished_at.isoformat() if job.finished_at else None, "options": dict(job.args),
            "counts": status.counts,
            "keys": [{"key": str(k.key), "op": k.key.op, "seq_len": k.key.seq_len, "seq_len_kv": k.key.seq_len_kv,
                      "head_dim": k.key.head_dim, "dtype": k.key.dtype, "causal": k.key.causal,
                      "batch_heads": k.key.batch_heads, "group": k.key.group, **k.key.features_on(), "state": k.state, "by": _worker(k),
                      "lease_left_s": None if k.lease_left_s is None else round(k.lease_left_s, 1),
                      "done_at": k.done_at.isoformat() if k.done_at else None, "claims": k.claims}
                     for k in status.keys]}


def _print(status: JobStatus) -> None:
    job, counts = status.job, status.counts
    echo(f"job {job.name} ({job.status}): {job.arch}, kernel {job.kernel_version[:12]}, lease {job.lease_s:g} s, "
               f"created {job.created_at:%Y-%m-%d %H:%M} UTC on {job.host}; {counts['done']} done, "
               f"{counts['claimed']} claimed, {counts['pending']} pending of {len(status.keys)} keys")
    rows = []
    for k in status.keys:
        if k.state == "done":
            note = f"{k.done_at:%H:%M:%S}" if k.done_at else ""
        elif k.state == "claimed":
            note = f"lease {k.lease_left_s:.0f}s left"
        else:
            note = "" if k.claims == 0 else f"claimed {k.claims}x before"
        rows.append([str(k.key), k.state, "" if k.worker is None else str(k.worker), note])
    echo_table(["key", "state", "by (host/pid/gpu)", "note"], rows)


@click.command("jobs")
@click.argument("name", required=False)
@db_option
@json_option
@handle_errors
def jobs(name: str | None, db_url: str | None, as_json: bool) -> None:
    """Fleet jobs (`tune --job`, `--join`, `--gpus`), newest first, or job NAME: each key done (by whom),
    claimed (by which host/pid/gpu, with the lease left) or pending."""
    with Store.open(db_url or default_url(), create=False) as store:
        statuses = JobQueue(store).status(name)
        where = store.display_url
    if as_json:
        echo_json([_as_json(s) for s in statuses])
        return
    if not statuses:
        echo(f"no jobs in {where}")
        return
    for i, status in enumerate(statuses):
        if i:
            echo("")
        _print(status)


def register(group: click.Group) -> None:
    """Add `jobs` to the CLI group."""
    group.add_command(jobs)
