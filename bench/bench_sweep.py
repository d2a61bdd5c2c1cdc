"""Sweep throughput (issue 17, target 3): batched Grid.map against Dask's Client.map.

    python bench/bench_sweep.py [--items 10000] [--repeat 3]

Starts a real portal (mutual TLS) with one real volunteer (2 CPUs), and a plain-tcp
LocalCluster of the same shape (one worker, two threads, Dask's default settings), then
measures in one run, each contender ``--repeat`` times in turn (so drift in the machine's load
hits all alike), from the call to the last result gathered:

- N tiny items: ``Grid.map`` (batched, the default), ``Grid.map(batch=1)`` (one task per
  item), ``Client.map`` on the portal (the Grid's own client), ``Client.map`` on the raw
  LocalCluster; items/s, median and spread, and the ratio to the raw LocalCluster;
- items of 1 ms, 10 ms and 100 ms of CPU: ``Grid.map`` batched and ``batch=1``, against what
  two CPUs could do at best.
Results are printed as Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import start_portal, start_volunteer  # noqa: E402


def inc(x: int) -> int:
    return x + 1


def spin(x: int, seconds: float) -> int:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return x


def rate(run: Callable[[], list[Any]], n: int) -> float:
    t0 = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - t0
    assert len(out) == n
    return n / elapsed


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # progress, and what a killed run got so far


def summary(rates: list[float]) -> str:
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from grid_portal import Grid

    n, cpus = args.items, args.cpus
    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-sweep-"))
    portal = start_portal(tmp)
    rows: list[tuple[str, str]] = []
    timed: list[tuple[str, str]] = []
    try:
        start_volunteer(portal, tmp, "bench", "--cpus", str(cpus), "--memory", "2GB")
        grid = Grid(portal.connection_file, start_embedded=False)
        with (
            LocalCluster(
                n_workers=1, threads_per_worker=cpus, dashboard_address=None, protocol="tcp"
            ) as cluster,
            Client(cluster) as raw,
        ):
            contenders: dict[str, Callable[[], list[Any]]] = {
                "Grid.map (batched)": lambda: grid.gather(grid.map(inc, range(n))),
                "Grid.map(batch=1)": lambda: grid.gather(grid.map(inc, range(n), batch=1)),
                "Client.map on the portal (the Grid's client)": lambda: grid.client.gather(
                    grid.client.map(inc, range(n), pure=False)
                ),
                "Client.map on a raw LocalCluster (tcp, defaults)": lambda: raw.gather(
                    raw.map(inc, range(n), pure=False)
                ),
            }
            for run in contenders.values():  # warm up connections, task processes, caches
                run()
            rates: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.repeat):
                for name, run in contenders.items():
                    rates[name].append(rate(run, n))
                    note(f"{name}: {rates[name][-1]:,.0f} items/s")
            raw_median = statistics.median(
                rates["Client.map on a raw LocalCluster (tcp, defaults)"]
            )
            for name, own in rates.items():
                ratio = statistics.median(own) / raw_median
                rows.append((f"{n:,} tiny items, {name}", f"{summary(own)} items/s, {ratio:.1f}x"))
        for seconds, count in ((0.001, 2000), (0.01, 400), (0.1, 60)):
            best = cpus / seconds
            batched, single = [], []
            for _ in range(args.repeat):
                batched.append(
                    rate(
                        lambda c=count, s=seconds: grid.gather(grid.map(spin, range(c), [s] * c)),
                        count,
                    )
                )
                single.append(
                    rate(
                        lambda c=count, s=seconds: grid.gather(
                            grid.map(spin, range(c), [s] * c, batch=1)
                        ),
                        count,
                    )
                )
            label = f"{count:,} items of {seconds * 1000:g} ms"
            note(f"{label}: batched {batched}, batch=1 {single}")
            timed.append(
                (
                    label,
                    f"{summary(batched)} | {summary(single)} | {best:,.0f} "
                    f"| {statistics.median(batched) / best:.0%}",
                )
            )
        grid.close()
    finally:
        portal.stop()
    print(f"Medians of {args.repeat} runs (min-max); ratio to Client.map on the raw LocalCluster\n")
    print("| measure | items/s |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\n| items | Grid.map batched | Grid.map(batch=1) | best on 2 CPUs | batched/best |")
    print("|---|---|---|---|---|")
    for name, value in timed:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
