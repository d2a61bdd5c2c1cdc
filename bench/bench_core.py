"""Grid core benchmarks: Grid vs a raw distributed.Client on the same TLS cluster.

    python bench/bench_core.py [--tasks 10000] [--rounds 200]

Starts a real portal (TLS) with one real volunteer, then measures in one run:
- round trip of a trivial task: Grid.submit vs Client.submit on the same cluster, and a
  plain-tcp LocalCluster with the same worker shape (what TLS costs);
- throughput of N tiny tasks: Grid.map vs Client.map (same cluster);
- the idle CPU of the volunteer's processes (agent + nanny + worker), in % of one core.
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


def idle_cpu(pid: int, seconds: float) -> float:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    before = sum(sum(p.cpu_times()[:2]) for p in procs)
    time.sleep(seconds)  # measuring idle cost: the point is to wait
    after = sum(sum(p.cpu_times()[:2]) for p in procs)
    return 100 * (after - before) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=30)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from grid_portal import Grid

    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-"))
    portal = start_portal(tmp)
    try:
        volunteer = start_volunteer(portal, tmp, "bench", "--cpus", "2", "--memory", "2GB")
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
        rows.append(
            (
                f"idle volunteer CPU over {args.idle_seconds:.0f} s (agent + nanny + worker)",
                f"{idle_cpu(volunteer.process.pid, args.idle_seconds):.2f} % of one core",
            )
        )
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
