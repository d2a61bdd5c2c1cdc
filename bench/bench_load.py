"""Load: many volunteers, many researchers at once; nothing lost, the API still quick.

    python bench/bench_load.py [--nodes 200] [--clients 20] [--tasks 1000] [--idle-seconds 20]

What runs: a real portal (``grid-portal serve``, mutual TLS) and a real Jupyter server with the
grid_portal extension, as processes, with private XDG/Jupyter dirs; ``--nodes`` simulated
volunteers (``tests/simnodes.py``: real Dask workers, 50 to a process, each with a node
certificate from the portal's CA and a real registration, without the volunteer agent); and
``--clients`` researchers, each a process of its own with its own client certificate.

Measured:
- how long the nodes take to join, and the portal process's CPU over ``--idle-seconds`` with
  all of them connected and nothing to do (heartbeats paced as a real volunteer's NodePlugin
  paces them, telemetry, the plugin's registry refresh), against a raw Dask scheduler with as
  many idle raw workers in the same run (issue 17). ``--idle-only`` measures just that,
  ``--runs`` times each, and prints medians and spread;
- the clients all submit ``--tasks`` tiny tasks (``Grid.map``) at the same moment and wait
  for them: wall time, tasks/s, the portal's CPU meanwhile; then every task's record in the
  ledger (``job_tasks``): exactly one per task, done, run once, and each job's counters;
- ``GET grid/api/nodes`` through the Jupyter server during the load, with the portal's
  registry padded to 1,000 nodes (as bench_api.py does): p50/p95/max.
Results are printed as a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from bench_api import fill_registry, get, percentile, start_jupyter, wait_listed  # noqa: E402
from conftest import researcher_connection, start_portal, wait_for  # noqa: E402  (private XDG/Jupyter dirs)
from simnodes import start_simulated_nodes, stop_simulated_nodes  # noqa: E402


def client_main(connection: str, index: int, tasks: int) -> None:
    """One researcher (a process of its own): wait for "go", submit, wait, report as JSON."""
    from gridtasks import plus_one

    from grid_portal import Grid

    grid = Grid(connection, start_embedded=False)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    start = time.perf_counter()
    with grid.job(f"load {index}") as job_id:
        futures = grid.map(plus_one, range(index * tasks, (index + 1) * tasks))
    submitted = time.perf_counter() - start
    values = grid.gather(futures)
    elapsed = time.perf_counter() - start
    ok = values == [v + 1 for v in range(index * tasks, (index + 1) * tasks)]
    grid.close()
    print(json.dumps({"job": job_id, "ok": ok, "submit_s": submitted, "elapsed_s": elapsed}))


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants. The portal is two
    processes (``grid-portal serve`` runs the scheduler in a child): count both."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def cpu_percent(pid: int, seconds: float) -> float:
    """CPU of a process and its children over ``seconds``, as a percentage of one core."""
    before = tree_cpu_seconds(pid)
    time.sleep(seconds)  # measuring an interval, not waiting for anything
    return 100.0 * (tree_cpu_seconds(pid) - before) / seconds


class Poller:
    """GET grid/api/nodes in a loop (keep-alive, like a browser) until stopped, and, on a thread
    of its own, a small portal call (``grid_capacity`` through a Grid of its own), to tell the
    portal's responsiveness from the Jupyter server's."""

    def __init__(self, port: int, token: str, connection: str) -> None:
        self.port, self.token, self.connection = port, token, connection
        self.times: list[float] = []
        self.version_times: list[float] = []  # the server's cheapest endpoint, for comparison
        self.portal_times: list[float] = []
        self.failures = 0
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self._rest, args=("nodes", self.times), daemon=True),
            threading.Thread(target=self._rest, args=("version", self.version_times), daemon=True),
            threading.Thread(target=self._portal, daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)

    def _rest(self, endpoint: str, times: list[float]) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stopped.is_set():
            start = time.perf_counter()
            status, _ = get(self.port, self.token, f"/grid/api/{endpoint}", conn)
            times.append(time.perf_counter() - start)
            self.failures += status != 200
            self.stopped.wait(0.05)  # a request every ~50 ms, as a few open sidebars make
        conn.close()

    def _portal(self) -> None:
        from grid_portal import Grid

        grid = Grid(self.connection, start_embedded=False)
        while not self.stopped.is_set():
            start = time.perf_counter()
            grid._call("grid_capacity")
            self.portal_times.append(time.perf_counter() - start)
            self.stopped.wait(0.05)
        grid.close()


def idle_portal_cpu(
    tmp: Path, nodes: int, seconds: float, runs: int, nice: int
) -> tuple[list[float], list[float]]:
    """The idle CPU of a portal with ``nodes`` idle volunteers (simulated, paced as real ones;
    the portal at its default settings), and of a raw Dask scheduler (defaults, plain TCP) with
    as many idle raw workers: ``runs`` windows of ``seconds`` each, in % of one core."""
    import socket

    import psutil

    names = [f"idle-{i:03d}" for i in range(nodes)]
    portal = start_portal(tmp / "idle-portal", "--telemetry-interval", "2")
    sims: list[subprocess.Popen[bytes]] = []
    try:
        sims = start_simulated_nodes(portal, tmp, names, mode="volunteer")
        for process in sims:
            psutil.Process(process.pid).nice(nice)
        with portal.grid() as admin:
            wait_for(lambda: admin.capacity().nodes_online >= nodes, timeout=300, what="nodes")
        time.sleep(10)  # let the joining settle (and heartbeats slow down) before measuring
        grid = [cpu_percent(portal.process.pid, seconds) for _ in range(runs)]
    finally:
        stop_simulated_nodes(sims)
        portal.stop()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1"]
        + ["--port", str(port), "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    raws: list[subprocess.Popen[bytes]] = []
    try:
        raws = start_simulated_nodes(None, tmp, names, mode="raw", scheduler=address)
        for process in raws:
            psutil.Process(process.pid).nice(nice)
        from distributed import Client

        with Client(address, timeout=60) as client:
            wait_for(
                lambda: client.run_on_scheduler(_count_workers) >= nodes,
                timeout=300,
                what="raw workers",
            )
        time.sleep(10)  # the same settling as above
        raw = [cpu_percent(scheduler.pid, seconds) for _ in range(runs)]
    finally:
        stop_simulated_nodes(raws)
        scheduler.terminate()
        scheduler.wait(30)
    return grid, raw


def _count_workers(dask_scheduler: Any) -> int:
    return len(dask_scheduler.workers)


def describe_runs(values: list[float]) -> str:
    """Median of the runs and their range, e.g. ``1.9 % (1.7-2.2, 5 runs)``."""
    return (
        f"{statistics.median(values):.2f} % of one core "
        f"({min(values):.2f}-{max(values):.2f}, {len(values)} runs)"
    )


def idle_rows(nodes: int, seconds: float, grid: list[float], raw: list[float]) -> list[Any]:
    target = 3.0
    met = "met" if statistics.median(grid) <= target else "NOT met"
    return [
        (
            f"portal CPU at idle, {nodes} idle volunteers, windows of {seconds:g} s "
            f"(target <= {target:g} %: {met})",
            describe_runs(grid),
        ),
        (f"raw Dask scheduler (defaults, tcp), {nodes} idle raw workers", describe_runs(raw)),
        (
            "ratio portal / raw Dask (medians)",
            f"{statistics.median(grid) / max(statistics.median(raw), 1e-9):.2f}x",
        ),
    ]


def run_poller(port: int, token: str, connection: str, seconds: float) -> Poller:
    poller = Poller(port, token, connection)
    poller.start()
    poller.stopped.wait(seconds)  # measuring for a while, not waiting for an event
    poller.stopped.set()
    poller.join(60)
    return poller


def describe_latency(times: list[float]) -> str:
    return (
        f"p50 {statistics.median(times) * 1000:.0f} ms, p95 {percentile(times, 0.95) * 1000:.0f} "
        f"ms, max {max(times) * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--registry", type=int, default=1000, help="nodes listed by GET nodes")
    parser.add_argument(
        "--nice-others",
        type=int,
        default=10,
        help="niceness of the simulated volunteers and researchers, which stand in for other "
        "machines: the portal and the Jupyter server keep the CPU they would have on their own "
        "(0: everything competes for this machine's cores alike)",
    )
    parser.add_argument(
        "--idle-only", action="store_true", help="measure only the idle portal against raw Dask"
    )
    parser.add_argument("--runs", type=int, default=5, help="--idle-only: windows measured")
    parser.add_argument("--client", nargs=3, help=argparse.SUPPRESS)  # connection index tasks
    args = parser.parse_args()
    if args.client:
        client_main(args.client[0], int(args.client[1]), int(args.client[2]))
        return
    if args.idle_only:
        tmp = Path(tempfile.mkdtemp(prefix="grid-bench-idle-"))
        grid, raw = idle_portal_cpu(tmp, args.nodes, args.idle_seconds, args.runs, args.nice_others)
        print(f"\n(volunteers at nice {args.nice_others})")
        print("\n| measurement | result |\n|---|---|")
        for name, value in idle_rows(args.nodes, args.idle_seconds, grid, raw):
            print(f"| {name} | {value} |")
        return

    from grid_portal import Grid
    from grid_portal.node.probe import probe_static

    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-load-"))
    portal = start_portal(tmp)
    rows: list[tuple[str, str]] = []
    nodes: list[subprocess.Popen[bytes]] = []
    clients: list[subprocess.Popen[str]] = []
    jupyter = None
    try:
        admin = Grid(portal.connection_file, start_embedded=False)
        names = [f"sim-{i:03d}" for i in range(args.nodes)]
        start = time.perf_counter()
        nodes = start_simulated_nodes(portal, tmp, names, per_process=50)
        import psutil

        for process in nodes:
            psutil.Process(process.pid).nice(args.nice_others)
        wait_for(
            lambda: admin.capacity().nodes_online >= args.nodes,
            timeout=300,
            what=f"{args.nodes} nodes online",
        )
        rows.append(
            (f"{args.nodes} simulated volunteers join", f"{time.perf_counter() - start:.1f} s")
        )
        print(rows[-1], flush=True)
        time.sleep(5)  # let the joining settle before measuring idle
        idle = cpu_percent(portal.process.pid, args.idle_seconds)
        rows.append(
            (
                f"portal CPU at idle, {args.nodes} volunteers, over {args.idle_seconds:g} s",
                f"{idle:.1f} % of one core",
            )
        )
        print(rows[-1], flush=True)

        # GET nodes as the sidebar makes it, with the registry at --registry nodes.
        import bench_api
        import cloudpickle

        cloudpickle.register_pickle_by_value(bench_api)  # the portal cannot import bench/
        capacity = json.loads(json.dumps(dataclasses.asdict(probe_static())))
        admin.client.run_on_scheduler(fill_registry, args.registry, capacity)
        jupyter, port, token = start_jupyter(tmp, portal.connection_file)
        wait_listed(port, token, args.registry)
        quiet = run_poller(port, token, portal.connection_file, 15.0)
        rows.append(
            (
                f"GET grid/api/nodes, {args.registry:,} nodes, {args.nodes} volunteers idle",
                f"{describe_latency(quiet.times)}; GET version: "
                f"{describe_latency(quiet.version_times)}; a portal call (grid_capacity): "
                f"{describe_latency(quiet.portal_times)}",
            )
        )
        print(rows[-1], flush=True)

        for i in range(args.clients):
            connection = researcher_connection(portal, tmp, f"user{i:02d}")
            clients.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--client", connection, str(i), str(args.tasks)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    preexec_fn=lambda: os.nice(args.nice_others),
                )
            )
        for c in clients:
            assert c.stdout is not None and c.stdout.readline().strip() == "ready"
        poller = Poller(port, token, portal.connection_file)
        poller.start()
        before = tree_cpu_seconds(portal.process.pid)
        start = time.perf_counter()
        for c in clients:  # go
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        reports = []
        for c in clients:
            out, _ = c.communicate(timeout=1800)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        wall = time.perf_counter() - start
        after = tree_cpu_seconds(portal.process.pid)
        poller.stopped.set()
        poller.join(60)
        total = args.clients * args.tasks
        busy = 100.0 * (after - before) / wall
        assert all(r["ok"] for r in reports), "a client got wrong results"
        rows.append(
            (
                f"{args.clients} clients x {args.tasks:,} tasks at once ({total:,} tasks)",
                f"{wall:.1f} s wall, {total / wall:.0f} tasks/s; slowest client "
                f"{max(r['elapsed_s'] for r in reports):.1f} s; portal CPU {busy:.0f} % of one core",
            )
        )
        print(rows[-1], flush=True)
        rows.append(
            (
                f"GET grid/api/nodes during that load, {args.registry:,} nodes "
                f"({len(poller.times)} requests, {poller.failures} not 200)",
                f"{describe_latency(poller.times)} (target p95 <= 20 ms); GET version: "
                f"{describe_latency(poller.version_times)}; a portal call (grid_capacity): "
                f"{describe_latency(poller.portal_times)}",
            )
        )
        print(rows[-1], flush=True)

        # The ledger: every task exactly once.
        rows_seen = done = once = 0
        for report in reports:
            job = wait_for(
                lambda r=report: (j := admin.get_job(r["job"])) and j.state.finished and j,
                timeout=120,
                what="each job to finish",
            )
            assert (job.tasks_total, job.tasks_done, job.tasks_failed) == (args.tasks,) * 2 + (0,)
            tasks = admin._call("grid_job_tasks", job_id=report["job"])["tasks"]
            assert len({t["key"] for t in tasks}) == len(tasks)
            rows_seen += len(tasks)
            done += sum(t["state"] == "done" for t in tasks)
            once += sum(t["attempts"] == 1 for t in tasks)
        rows.append(
            (
                "ledger (job_tasks) after the load",
                f"{rows_seen:,} rows for {total:,} tasks; {done:,} done; {once:,} ran exactly once",
            )
        )
        print(rows[-1], flush=True)
        assert rows_seen == done == once == total
        admin.close()
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        if jupyter is not None:
            jupyter.terminate()
            jupyter.wait(30)
        stop_simulated_nodes(nodes)
        portal.stop()

    print(f"\n(volunteers and researchers at nice {args.nice_others})")
    print("\n| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
