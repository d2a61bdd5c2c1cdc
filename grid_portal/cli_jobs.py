"""``grid-portal submit | jobs | job | cancel | logs | schema | fairshare``: work on the grid.

``grid_portal.cli.build_parser`` calls ``register(subparsers)``. Like the rest of the CLI this
module imports nothing heavy at import time: each command imports what it needs when it runs.

Every command talks to the portal through the ``Grid`` client (``--portal CONNECTION_FILE``,
else as ``Grid()`` finds one). ``jobs``, ``job`` and ``logs`` also read the portal's ledger
file directly with ``--data-dir`` (the records survive a portal restart; the portal need not
run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from grid_portal.cli_certs import portal_ledger
from grid_portal.errors import GridError, NotFound
from grid_portal.units import counted, duration_arg

TASK_ROWS = 100  # tasks shown by `grid-portal job ID` unless --all-tasks


def register(subparsers: Any) -> None:
    """Add the job commands to ``grid-portal``'s subparsers."""
    p = subparsers.add_parser(
        "submit",
        help="run a job file (a multi-stage workflow) on the grid",
        description="Check a job file (see docs/job-format.md) and submit it. Every problem "
        "is reported before anything is submitted. Without --wait it returns at once; the job "
        "runs on, and `grid-portal job ID --fetch DIR` brings its outputs back later.",
    )
    p.add_argument("job_file", metavar="JOB", help="a .yaml, .yml or .json job file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one field first, e.g. --set stages.simulate.params.steps=2000 (repeatable)",
    )
    p.add_argument(
        "--wait", action="store_true", help="wait until it finishes and bring its outputs back"
    )
    p.add_argument(
        "--wait-for-nodes",
        action="store_true",
        help="queue stages that no connected node can run yet, instead of refusing them",
    )
    p.add_argument(
        "--output",
        type=Path,
        help="with --wait: where output files go (default: ./NAME-ID next to you)",
    )
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    _portal_option(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("jobs", help="your jobs: workflows, cells, graphs and maps")
    p.add_argument("--all", action="store_true", help="everyone's jobs (the portal's admin)")
    p.add_argument("--json", action="store_true", help="machine-readable records")
    _source_options(p)
    p.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser("job", help="one job: per-stage progress and where each task ran")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="machine-readable record")
    p.add_argument(
        "--all-tasks", action="store_true", help=f"list every task (default: first {TASK_ROWS})"
    )
    p.add_argument(
        "--fetch",
        type=Path,
        metavar="DIR",
        help="bring a finished workflow's outputs back into DIR (then the portal drops them)",
    )
    _source_options(p)
    p.set_defaults(func=cmd_job)

    p = subparsers.add_parser("cancel", help="cancel a job: queued tasks go, running ones stop")
    p.add_argument("job_id", metavar="ID")
    _portal_option(p)
    p.set_defaults(func=cmd_cancel)

    p = subparsers.add_parser("logs", help="what a job's shell and script tasks printed")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--stage", help="only this stage")
    p.add_argument("--item", type=int, help="only this map item (its index)")
    _source_options(p)
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser("schema", help="print the job file's JSON Schema")
    p.set_defaults(func=cmd_schema)

    p = subparsers.add_parser(
        "fairshare",
        help="each user's recent usage and priority; the admin sets half-life and quotas",
        description="Fair share: each user's usage (core-seconds, decaying with a half-life) "
        "sets how much of the grid their queued work gets. The portal's admin may change the "
        "half-life and give users quotas (most cores at once). A peer portal that borrows this "
        "portal's volunteers (grid-portal peers) counts as one user, peer:NAME: "
        "--quota peer:NAME=4 lends it at most four cores at once.",
    )
    p.add_argument("--half-life", type=duration_arg, help="e.g. 1d, 12h (admin)")
    p.add_argument(
        "--quota", action="append", default=[], metavar="USER=CORES", help="(admin, repeatable)"
    )
    p.add_argument(
        "--no-quota", action="append", default=[], metavar="USER", help="remove a quota (admin)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    _portal_option(p)
    p.set_defaults(func=cmd_fairshare)


def _portal_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--portal", help="a connection file (default: as Grid() finds one)")


def _source_options(p: argparse.ArgumentParser) -> None:
    _portal_option(p)
    p.add_argument(
        "--data-dir",
        type=Path,
        help="read the records from this portal's ledger file instead (the portal may be down)",
    )


def _grid(args: argparse.Namespace) -> Any:
    from grid_portal.client import Grid

    return Grid(args.portal, start_embedded=False, timeout=10)


def _console() -> Any:
    from rich.console import Console

    return Console()


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _took(start: float | None, end: float | None) -> str:
    from grid_portal.units import format_duration

    if not start:
        return "-"
    return format_duration(max(0.0, (end or time.time()) - start))


# -- submit ---------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    from grid_portal.jobs.workflow import load_workflow

    spec = load_workflow(args.job_file, args.overrides)  # every problem, before connecting
    console = _console()
    with _grid(args) as grid:
        shown: dict[str, int] = {"done": -1}

        def progress(job: Any) -> None:
            if job.tasks_done != shown["done"]:
                shown["done"] = job.tasks_done
                print(
                    f"  {job.tasks_done}/{job.tasks_total} tasks done"
                    + (f", {job.tasks_failed} failed" if job.tasks_failed else ""),
                    file=sys.stderr,
                    flush=True,
                )

        job = grid.run_workflow(
            spec, wait=args.wait, wait_for_nodes=args.wait_for_nodes, progress=progress
        )
        if not args.wait:
            if args.json:
                print(json.dumps(job.to_dict(), indent=2))
            else:
                print(
                    f"submitted job {job.id} ({job.name}): {spec.task_count()} tasks in "
                    f"{len(spec.stages)} stages.\n  progress: grid-portal job {job.id}\n"
                    f"  outputs:  grid-portal job {job.id} --fetch DIR (once it is done)"
                )
            return 0
        return _finish(grid, job, args.output or Path(f"{job.name}-{job.id}"), args.json, console)


def _finish(grid: Any, job: Any, dest: Path, as_json: bool, console: Any) -> int:
    """Report a finished workflow; bring its outputs back: all of them when it succeeded,
    those of the items that succeeded when some failed."""
    from grid_portal.jobs.workflow import (
        describe_outputs,
        failed_items,
        release_outputs,
        save_outputs,
        workflow_outputs,
    )
    from grid_portal.model import JobState

    written: list[Path] = []
    lines: list[str] = []
    if job.state in (JobState.DONE, JobState.FAILED):
        try:
            outputs = workflow_outputs(grid, job.id, partial=True)
        except NotFound:  # a job that failed as a whole (fail: job) keeps nothing
            outputs = {}
        failed = failed_items(outputs)
        written = save_outputs(outputs, dest)
        lines = describe_outputs(
            {s: v for s, v in outputs.items() if not isinstance(v, BaseException)}
        )
        lines += [
            f"{stage}{'' if item is None else f'[{item}]'}: failed: {type(e).__name__}: {e}"
            for stage, errors in failed.items()
            for item, e in errors.items()
        ]
        if outputs:
            release_outputs(grid, job.id)
    if as_json:
        data = job.to_dict()
        data["files"] = [str(p) for p in written]
        print(json.dumps(data, indent=2))
    else:
        print(f"job {job.id} ({job.name}): {job.state.value} in {_took(job.started, job.finished)}")
        for line in lines:
            print(f"  {line}")
        if written:
            print(f"  {counted(len(written), 'file')} saved in {dest}")
    if job.state is not JobState.DONE:
        raise GridError(
            f"job {job.id} {job.state.value}: {job.error or 'see grid-portal job ' + job.id}"
        )
    return 0


# -- reading jobs -------------------------------------------------------------------------------
_JOB_COLUMNS = (
    "id, name, owner, kind, state, submitted, started, finished, tasks_total, tasks_done, "
    "tasks_failed, nodes, error"
)


def _read_jobs(path: Path, job_id: str | None = None) -> list[dict[str, Any]]:
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        query = f"SELECT {_JOB_COLUMNS} FROM jobs"
        rows = (
            conn.execute(query + " WHERE id = ?", (job_id,)).fetchall()
            if job_id
            else conn.execute(query + " ORDER BY submitted").fetchall()
        )
    except sqlite3.OperationalError as exc:
        raise GridError(f"cannot read the jobs in {path}: {exc}") from None
    finally:
        conn.close()
    names = [c.strip() for c in _JOB_COLUMNS.split(",")]
    out = []
    for row in rows:
        record = dict(zip(names, row, strict=True))
        record["nodes"] = json.loads(record["nodes"] or "[]")
        out.append(record)
    return out


def cmd_jobs(args: argparse.Namespace) -> int:
    from grid_portal.model import Job

    if args.data_dir is not None:
        jobs = [Job.from_dict(j) for j in _read_jobs(portal_ledger(args))]
    else:
        with _grid(args) as grid:
            jobs = grid.jobs(everyone=args.all)
    if args.json:
        print(json.dumps([j.to_dict() for j in jobs], indent=2))
        return 0
    from rich.table import Table

    table = Table(title=counted(len(jobs), "job"))
    for column in ("id", "name", "kind", "owner", "state", "tasks", "nodes", "submitted", "took"):
        table.add_column(column, justify="right" if column == "tasks" else "left")
    for j in jobs:
        tasks = f"{j.tasks_done}/{j.tasks_total}" + (
            f" ({j.tasks_failed} failed)" if j.tasks_failed else ""
        )
        table.add_row(
            j.id,
            j.name,
            j.kind,
            j.owner,
            j.state.value,
            tasks,
            ", ".join(j.nodes[:4]) + (" ..." if len(j.nodes) > 4 else ""),
            _when(j.submitted),
            _took(j.started, j.finished),
        )
    _console().print(table)
    return 0


def _job_detail(args: argparse.Namespace) -> dict[str, Any]:
    if args.data_dir is not None:
        from grid_portal.portal.tasklog import item_paths, read_tasks, summarize_stages

        path = portal_ledger(args)
        found = _read_jobs(path, args.job_id)
        if not found:
            raise GridError(f"no job {args.job_id!r} in {args.data_dir}; see grid-portal jobs")
        tasks = read_tasks(path, args.job_id)
        return {
            "job": found[0],
            "stages": summarize_stages(tasks),
            "tasks": tasks,
            "items": item_paths(tasks),
        }
    with _grid(args) as grid:
        detail = grid.job_tasks(args.job_id)
    if detail is None:
        raise GridError(f"no job {args.job_id!r} of yours; see grid-portal jobs")
    return detail


def cmd_job(args: argparse.Namespace) -> int:
    if args.fetch is not None:
        return _fetch(args)
    detail = _job_detail(args)
    job, stages, tasks = detail["job"], list(detail["stages"]), list(detail["tasks"])
    items = list(detail.get("items") or ())  # pipelines: each item's path (an older portal: none)
    if args.json:
        print(json.dumps({"job": job, "stages": stages, "tasks": tasks, "items": items}, indent=2))
        return 0
    from rich.table import Table

    console = _console()
    console.print(
        f"[bold]{job['name']}[/bold] ({job['id']}, {job['kind']}, {job['owner']}): "
        f"{job['state']}, {job['tasks_done']}/{job['tasks_total']} tasks done"
        + (f", {job['tasks_failed']} failed" if job["tasks_failed"] else "")
        + f"; submitted {_when(job['submitted'])}, took {_took(job['started'], job['finished'])}",
        highlight=False,
    )
    if job.get("error"):
        console.print(f"error: {job['error']}", highlight=False, markup=False)
    for note in job.get("outvoted") or ():  # copies a replica majority set aside
        console.print(f"outvoted: {note}", highlight=False, markup=False)
    if stages:
        table = Table(title="stages")
        for column in ("stage", "tasks", "done", "running", "queued", "failed", "nodes"):
            table.add_column(column, justify="left" if column in ("stage", "nodes") else "right")
        for s in stages:
            table.add_row(
                s["stage"],
                str(s["tasks"]),
                str(s["done"]),
                str(s["running"]),
                str(s["queued"]),
                str(s["failed"] + s["cancelled"]),
                ", ".join(s["nodes"]),
            )
        console.print(table)
    if items:
        _print_items(console, items if args.all_tasks else items[:TASK_ROWS])
        if not args.all_tasks and len(items) > TASK_ROWS:
            print(f"... and {len(items) - TASK_ROWS} more items (--all-tasks)")
    shown = tasks if args.all_tasks else tasks[:TASK_ROWS]
    if shown:
        table = Table(title="tasks: where each ran")
        for column in ("stage", "item", "state", "node", "started", "took", "tries"):
            table.add_column(column)
        for t in shown:
            table.add_row(
                t["stage"],
                "" if t["item"] is None else str(t["item"]),
                t["state"],
                t["node"] or "-",
                _when(t["started"]),
                _took(t["started"], t["finished"]) if t["finished"] else "-",
                str(t["attempts"]),
            )
        console.print(table)
        if len(shown) < len(tasks):
            print(f"... and {len(tasks) - len(shown)} more (--all-tasks)")
    return 0


def _print_items(console: Any, items: list[dict[str, Any]]) -> None:
    """A pipeline's items: the stage each is in now, where, and its path so far."""
    from rich.table import Table

    from grid_portal.units import format_size

    table = Table(title="items: the stage each is in, and its path")
    for column in ("item", "stage", "state", "node", "path"):
        table.add_column(column)
    for entry in items:
        steps = []
        for step in entry["path"]:
            text = f"{step['stage']}@{step['node'] or '-'}"
            if step["state"] != "done":
                text += f" ({step['state']})"
            if step.get("moved"):
                text += f" [{format_size(step['moved'])} moved in]"
            steps.append(text)
        table.add_row(
            str(entry["item"]),
            entry["stage"],
            entry["state"],
            entry["node"] or "-",
            " -> ".join(steps),
        )
    console.print(table)


def _fetch(args: argparse.Namespace) -> int:
    with _grid(args) as grid:
        job = grid.get_job(args.job_id)
        if job is None:
            raise GridError(f"no job {args.job_id!r} of yours; see grid-portal jobs")
        if not job.state.finished:
            raise GridError(f"job {job.id} is {job.state.value}; fetch its outputs once it is done")
        return _finish(grid, job, args.fetch, getattr(args, "json", False), _console())


def cmd_cancel(args: argparse.Namespace) -> int:
    with _grid(args) as grid:
        job = grid.cancel(args.job_id)
    print(f"job {job.id} ({job.name}): {job.state.value}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    if args.data_dir is not None:
        from grid_portal.portal.tasklog import read_tasks

        if not _read_jobs(portal_ledger(args), args.job_id):
            raise GridError(f"no job {args.job_id!r} in {args.data_dir}; see grid-portal jobs")
        tasks = [
            t
            for t in read_tasks(portal_ledger(args), args.job_id)
            if (t["stdout"] or t["stderr"])
            and (args.stage is None or t["stage"] == args.stage)
            and (args.item is None or t["item"] == args.item)
        ]
    else:
        with _grid(args) as grid:
            logs = grid.job_logs(args.job_id, stage=args.stage, item=args.item)
        if logs is None:
            raise GridError(f"no job {args.job_id!r} of yours; see grid-portal jobs")
        tasks = logs
    if not tasks:
        print("no output was captured (only shell and script tasks' output is kept)")
        return 0
    for t in tasks:
        item = "" if t["item"] is None else f" [{t['item']}]"
        print(f"==> {t['stage']}{item} on {t['node'] or '?'} ({t['state']}) <==")
        for stream in ("stdout", "stderr"):
            text = t[stream]
            if text:
                print(f"--- {stream}")
                print(text, end="" if text.endswith("\n") else "\n")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from grid_portal.jobs.spec import job_schema

    print(json.dumps(job_schema(), indent=2))
    return 0


def cmd_fairshare(args: argparse.Namespace) -> int:
    from grid_portal.errors import UsageError

    changes: list[dict[str, Any]] = []
    if args.half_life is not None:
        changes.append({"half_life": args.half_life})
    for text in args.quota:
        user, sep, cores = text.partition("=")
        try:
            value = float(cores)
        except ValueError:
            value = -1.0
        if not sep or not user.strip() or value <= 0:
            raise UsageError(f"--quota {text!r}: write USER=CORES with CORES > 0, e.g. alice=8")
        changes.append({"user": user.strip(), "quota": value})
    changes.extend({"user": user, "clear_quota": True} for user in args.no_quota)
    with _grid(args) as grid:
        report = grid.fairshare()
        for change in changes:
            report = grid.set_fairshare(**change)  # UsageError, NotAllowed
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.table import Table

    from grid_portal.units import format_duration

    table = Table(title=f"fair share (usage half-life {format_duration(report['half_life'])})")
    for column in ("user", "usage (core-h)", "priority factor", "queued", "cores in use", "quota"):
        # A user's name is never cut short (a peer portal's, peer:HOST-PORT, is long).
        left = column == "user"
        table.add_column(column, justify="left" if left else "right", no_wrap=left, min_width=4)
    for user, u in report["users"].items():
        table.add_row(
            user,
            f"{u['usage'] / 3600:.3f}",
            f"{u['factor']:.2f}",
            str(u["queued"]),
            f"{u['running_cpus']:g}",
            "-" if u["quota"] is None else f"{u['quota']:g}",
        )
    _console().print(table)
    return 0
