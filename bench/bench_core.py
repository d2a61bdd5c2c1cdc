"""Grid core benchmarks: Grid vs a raw distributed.Client on the same TLS cluster.

    python bench/bench_core.py [--tasks 10000] [--rounds 200]
    python bench/bench_core.py --idle-only [--idle-seconds 30] [--idle-runs 5]

Starts a real portal (TLS) with one real volunteer, then measures in one run:
- round trip of a trivial task: Grid.submit vs Client.submit on the same cluster, and a
  plain-tcp LocalCluster with the same worker shape (what TLS costs);
- throughput of N tiny tasks: Grid.map vs Client.map (same cluster);
- the idle CPU of the volunteer's whole process tree (agent, sandbox, worker, spare task
  process), in % of one core, against an idle raw ``dask worker`` (defaults: nanny + worker)
  on a raw ``dask scheduler`` in the same run (issue 17: target <= 0.3 %). ``--idle-only``
  measures only that: ``--idle-runs`` windows each, after ``--settle`` seconds, as medians
  and spread.
Results are printed as a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import start_portal, start_volunteer  # noqa: E402


def inc(x: int) -> int:
    return x + 1


def round_trips(submit, rounds: int) -> float:
    return interleaved_round_trips([submit], rounds)[0]


def interleaved_round_trips(submits, rounds: int) -> list[float]:
    """Median round trip of each submit function, timed round by round in turn, so that a
    drift in the machine's load hits every contender alike."""
    for submit in submits:
        for i in range(20):  # warm up connections and caches
            submit(inc, i).result()
    times: list[list[float]] = [[] for _ in submits]
    for i in range(rounds):
        for submit, own in zip(submits, times, strict=True):
            t0 = time.perf_counter()
            submit(inc, i).result()
            own.append(time.perf_counter() - t0)
    return [statistics.median(own) for own in times]


def throughput(map_, gather, n: int) -> float:
    gather(map_(inc, range(200)))  # warm up
    t0 = time.perf_counter()
    gather(map_(inc, range(n)))
    return n / (time.perf_counter() - t0)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and everything under it (read again each time:
    the sandbox starts processes of its own)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue  # ended meanwhile
        total += times.user + times.system
    return total


def idle_cpu(pid: int, seconds: float) -> float:
    before = tree_cpu_seconds(pid)
    time.sleep(seconds)  # measuring idle cost: the point is to wait
    return 100 * (tree_cpu_seconds(pid) - before) / seconds


def idle_runs(pid: int, seconds: float, runs: int) -> list[float]:
    return [idle_cpu(pid, seconds) for _ in range(runs)]


def describe_runs(values: list[float]) -> str:
    return (
        f"{statistics.median(values):.2f} % of one core "
        f"({min(values):.2f}-{max(values):.2f}, {len(values)} runs)"
    )


def raw_dask_idle(seconds: float, runs: int, settle: float) -> list[float]:
    """An idle raw ``dask worker`` (default settings: a nanny and its worker) on a raw
    ``dask scheduler``, plain TCP: the CPU of the worker's whole tree."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1"]
        + ["--port", str(port), "--no-dashboard"],
        start_new_session=True,
        **quiet,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}"]
        + ["--host", "127.0.0.1"],
        start_new_session=True,
        **quiet,
    )
    try:
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        time.sleep(settle)  # settling before measuring idle cost
        return idle_runs(worker.pid, seconds, runs)
    finally:
        for process in (worker, scheduler):
            process.terminate()
            process.wait(30)


def idle_rows(volunteer_pid: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The idle volunteer against an idle raw Dask worker, measured one after the other."""
    time.sleep(args.settle)  # settling (heartbeats slow down once nothing ran for a while)
    grid = idle_runs(volunteer_pid, args.idle_seconds, args.idle_runs)
    raw = raw_dask_idle(args.idle_seconds, args.idle_runs, args.settle)
    met = "met" if statistics.median(grid) <= 0.3 else "NOT met"
    window = f"windows of {args.idle_seconds:g} s after {args.settle:g} s settling"
    return [
        (
            f"idle volunteer, whole process tree, {window} (target <= 0.3 %: {met})",
            describe_runs(grid),
        ),
        ("idle raw `dask worker` (defaults: nanny + worker), same windows", describe_runs(raw)),
        (
            "ratio volunteer / raw Dask worker (medians)",
            f"{statistics.median(grid) / max(statistics.median(raw), 1e-9):.2f}x",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--idle-runs", type=int, default=1, help="idle windows measured")
    parser.add_argument("--settle", type=float, default=20, help="seconds before idle windows")
    parser.add_argument("--idle-only", action="store_true", help="only the idle measurement")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from grid_portal import Grid

    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-"))
    portal = start_portal(tmp, "--telemetry-interval", "2")  # the portal's default
    try:
        volunteer = start_volunteer(portal, tmp, "bench", "--cpus", "2", "--memory", "2GB")
        if args.idle_only:
            rows = idle_rows(volunteer.process.pid, args)
            portal.stop()
            print("| measure | result |\n|---|---|")
            for name, value in rows:
                print(f"| {name} | {value} |")
            return
        grid = Grid(portal.connection_file, start_embedded=False)
        raw = Client(portal.scheduler, security=grid.connection.security())
        rows = []
        grid_rt, raw_rt = interleaved_round_trips(
            [grid.submit, lambda f, *a: raw.submit(f, *a, pure=False)], args.rounds
        )
        rows.append(("round trip, Grid.submit (TLS)", f"{grid_rt * 1000:.2f} ms"))
        rows.append(("round trip, Client.submit (same TLS cluster)", f"{raw_rt * 1000:.2f} ms"))
        rows.append(("ratio Grid / Client (target <= 1.1)", f"{grid_rt / raw_rt:.2f}x"))
        grid_tp = throughput(grid.map, grid.gather, args.tasks)
        raw_tp = throughput(lambda f, it: raw.map(f, it, pure=False), raw.gather, args.tasks)
        rows.append((f"{args.tasks} tiny tasks, Grid.map", f"{grid_tp:.0f} tasks/s"))
        rows.append(
            (f"{args.tasks} tiny tasks, Client.map (same cluster)", f"{raw_tp:.0f} tasks/s")
        )
        rows.append(("ratio Grid / Client (target >= 0.95)", f"{grid_tp / raw_tp:.2f}x"))
        raw.close()
        grid.close()
        rows.extend(idle_rows(volunteer.process.pid, args))
        with (
            LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster,
            Client(cluster) as plain,
        ):
            tcp_rt = round_trips(lambda f, *a: plain.submit(f, *a, pure=False), args.rounds)
            rows.append(
                (
                    "round trip, Client.submit on plain tcp LocalCluster",
                    f"{tcp_rt * 1000:.2f} ms",
                )
            )
            rows.append(("TLS cost (TLS / tcp, raw clients)", f"{raw_rt / tcp_rt:.2f}x"))
    finally:
        portal.stop()
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
