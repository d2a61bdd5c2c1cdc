"""``grid-portal ledger``, ``grid-portal classroom token`` and ``serve --jupyterhub`` options.

Kept apart from ``cli.py`` (which only calls `register` and `add_serve_options`) and as light
as it: nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from grid_portal.cli_certs import portal_ledger


# -- grid-portal serve --jupyterhub ------------------------------------------------------------
def add_serve_options(p: argparse.ArgumentParser) -> None:
    """The JupyterHub options of ``grid-portal serve``."""
    hub = p.add_argument_group("JupyterHub (a classroom: see docs/classroom.md)")
    hub.add_argument(
        "--jupyterhub",
        action="store_true",
        help="run as a JupyterHub service: Hub users enrol as themselves (POST /api/hub/enrol)",
    )
    hub.add_argument(
        "--hub-api-url",
        metavar="URL",
        help="the Hub's API, e.g. http://127.0.0.1:8081/hub/api (default: $JUPYTERHUB_API_URL, "
        "which the Hub sets for a managed service)",
    )
    hub.add_argument(
        "--teacher-group",
        action="append",
        default=[],
        metavar="GROUP",
        help="members of this Hub group are teachers: they see and cancel everyone's jobs and "
        "set quotas (repeatable)",
    )
    hub.add_argument(
        "--no-hub-admin-teachers",
        dest="hub_admin_teachers",
        action="store_false",
        help="Hub admins are not teachers unless in a teacher group (default: they are)",
    )


def hub_settings(args: argparse.Namespace) -> Any:
    """A ``HubSettings`` for ``serve --jupyterhub``, else None."""
    if not getattr(args, "jupyterhub", False):
        return None
    from grid_portal.portal.hub import HubSettings

    return HubSettings.from_env(
        api_url=args.hub_api_url,
        teacher_groups=args.teacher_group,
        admins_are_teachers=args.hub_admin_teachers,
    )


# -- grid-portal ledger / classroom --------------------------------------------------------------
def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ledger",
        help="what each volunteer gave (CPU-hours, GPU-hours, tasks, credit), jobs per day",
        description="Print the portal's ledger as its public status page shows it: capacity, "
        "jobs per day and each volunteer's contribution, with a credit weighted by each "
        "machine's benchmark. Reads the ledger file in the portal's data dir, so it works "
        "while the portal is down.",
    )
    p.add_argument("--data-dir", type=Path, help="the portal's data dir")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the same records as /status.json")
    fmt.add_argument("--csv", action="store_true", help="contributions as CSV")
    p.add_argument(
        "--names",
        action="store_true",
        help="name every volunteer (the public page names only those who chose public=yes)",
    )
    p.set_defaults(func=cmd_ledger)

    p = subparsers.add_parser("classroom", help="JupyterHub classrooms: join tokens for lab PCs")
    csub = p.add_subparsers(dest="classroom_command", metavar="ACTION")
    t = csub.add_parser(
        "token",
        help="(a teacher, in a Hub server) print the one command that joins a lab machine",
        description="In a JupyterHub server of a teacher: ask the class portal for a join "
        "token and print the command to run on each lab machine.",
    )
    t.add_argument("--uses", type=int, default=None, help="machines it may join (default: any)")
    t.add_argument("--ttl", default="8h", help="how long it is valid (default 8h)")
    t.set_defaults(func=cmd_classroom_token)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def ledger_report(path: Path, reveal: bool = False) -> dict[str, Any]:
    """The ledger's records in the shape of ``/status.json`` (capacity: the last sample)."""
    import time

    from grid_portal.portal.contributions import ContributionLedger, public_rows, totals_of

    ledger = ContributionLedger(path)
    try:
        now = time.time()
        rows = public_rows(ledger.contributors(), reveal=reveal)
        history = ledger.history(now - 86400.0)
        return {
            "generated": now,
            "capacity": dict(ledger.samples[-1]) if ledger.samples else None,
            "capacity_history": history,
            "jobs_per_day": ledger.jobs_per_day(14, now),
            "contributions": rows,
            "totals": totals_of(rows),
        }
    finally:
        assert ledger.conn is not None
        ledger.conn.close()


def cmd_ledger(args: argparse.Namespace) -> int:
    report = ledger_report(portal_ledger(args), reveal=args.names)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if args.csv:
        from grid_portal.portal.contributions import to_csv

        print(to_csv(report["contributions"]), end="")
        return 0
    from datetime import datetime

    from rich.console import Console
    from rich.table import Table

    console = Console()
    cap = report["capacity"]
    if cap:
        when = datetime.fromtimestamp(cap["time"]).strftime("%Y-%m-%d %H:%M")
        console.print(
            f"Capacity at {when}: {cap['nodes_online']} nodes online, "
            f"{cap['cores_free']:g} of {cap['cores_total']:g} cores free, "
            f"{cap['gpus_free']:g} of {cap['gpus_total']:g} GPUs free, "
            f"{cap['tasks_running']} tasks running"
        )
    jobs = Table("day", "jobs", "failed", title="Jobs finished per day (UTC)")
    for d in report["jobs_per_day"]:
        jobs.add_row(d["day"], str(d["jobs"]), str(d["failed"]))
    console.print(jobs)
    table = Table(
        "volunteer", "site", "CPU-hours", "GPU-hours", "tasks", "failed", "credit", "benchmark",
        title="Contributions",
    )  # fmt: skip
    for r in report["contributions"]:
        table.add_row(
            r["volunteer"],
            r["site"] or "",
            f"{r['cpu_hours']:.3f}",
            f"{r['gpu_hours']:.3f}",
            str(r["tasks"]),
            str(r["tasks_failed"]),
            f"{r['credit']:.3f}",
            f"{r['benchmark']:.2f}",
        )
    t = report["totals"]
    table.add_row(
        f"{t['volunteers']} volunteers",
        "",
        f"{t['cpu_hours']:.3f}",
        f"{t['gpu_hours']:.3f}",
        str(t["tasks"]),
        "",
        f"{t['credit']:.3f}",
        "",
        style="bold",
    )
    console.print(table)
    return 0


def cmd_classroom_token(args: argparse.Namespace) -> int:
    from grid_portal.errors import UsageError
    from grid_portal.hubconnect import request_node_token
    from grid_portal.units import parse_duration

    if args.uses is not None and args.uses < 1:
        raise UsageError(f"--uses {args.uses}: give 1 or more, or leave it out for any number")
    reply = request_node_token(uses=args.uses, ttl=parse_duration(args.ttl))
    print("On each lab machine, run:\n")
    print(f"  {reply['command']}\n")
    print(
        "Each machine then lends its spare cores to the class until stopped (Ctrl-C); add "
        "--label site=ROOM to group them on the status page."
    )
    return 0
