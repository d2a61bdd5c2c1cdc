"""One Grid over two portals against one portal.

    python bench/bench_federation.py [--items 2000] [--repeat 3] [--trips 40] [--lent-only]

Starts two real portals (mutual TLS), each with one real volunteer (``--cpus`` each), and
measures in one run, each contender ``--repeat`` times in turn (so drift in the machine's load
hits all alike), from the call to the last result gathered:

- a sweep of ``--items`` items (tiny ``inc``, and 1 ms asleep each, ``slow_square``) by
  ``Grid.map`` on portal A alone and by ``Grid(portals=[A, B]).map`` over both;
- the round trip of one task (``submit(...).result()``): on A's and on B's volunteer through a
  plain Grid of each, and through the Grid over both (``where`` names the node), in a shuffled
  order each round.
- the round trip a task on a volunteer lent by B to A adds over one on A's own volunteer
  (portal peering: B's volunteer runs with ``--lend-to-peers``, A links with ``grid-portal
  peers add``): ``submit(...).result()`` through A's plain Grid, ``where`` picking the node,
  ``--trips`` of each in a shuffled order, ``--repeat`` rounds (``--lent-only``: this alone).
Medians with the range over the repeats; results printed as Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import start_portal, start_volunteer  # noqa: E402
from gridtasks import plus_one as inc  # noqa: E402 - importable on the volunteers too
from gridtasks import slow_square  # noqa: E402


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # progress, and what a killed run got so far


def seconds(run: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def summary(values: list[float], scale: float = 1.0, fmt: str = "{:,.0f}") -> str:
    v = [x * scale for x in values]
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--trips", type=int, default=40)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--lent-only", action="store_true", help="only the lent round trip")
    args = parser.parse_args()
    if args.lent_only:
        lent_round_trip(args)
        return

    from grid_portal import Grid

    n = args.items
    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-federation-"))
    portals = {name: start_portal(tmp / name) for name in ("a", "b")}
    try:
        for name, p in portals.items():
            start_volunteer(p, tmp / name, f"{name}-vol", "--cpus", str(args.cpus))
        one = Grid(portals["a"].connection_file, start_embedded=False)
        both = Grid(portals={name: p.connection_file for name, p in portals.items()})
        sweeps: dict[str, Callable[[], Any]] = {
            "tiny, one portal": lambda: one.gather(one.map(inc, range(n))),
            "tiny, two portals": lambda: both.gather(both.map(inc, range(n))),
            "1 ms, one portal": lambda: one.gather(one.map(slow_square, range(n), [0.001] * n)),
            "1 ms, two portals": lambda: both.gather(both.map(slow_square, range(n), [0.001] * n)),
        }
        for run in sweeps.values():  # warm-up: task processes, imports
            run()
        times: dict[str, list[float]] = {k: [] for k in sweeps}
        spread: list[dict[str, int]] = []
        for r in range(args.repeat):
            for label, run in sweeps.items():
                times[label].append(seconds(run))
                note(f"run {r}: {label}: {times[label][-1]:.2f} s")
            sweep = both.map(slow_square, range(n), [0.001] * n)
            both.gather(sweep)
            spread.append(sweep.by_portal())

        other = Grid(portals["b"].connection_file, start_embedded=False)
        trips: dict[str, Callable[[], Any]] = {
            "A's volunteer, plain Grid of A": lambda: one.submit(inc, 1).result(),
            "B's volunteer, plain Grid of B": lambda: other.submit(inc, 1).result(),
            "A's volunteer, Grid over A and B": lambda: both.submit(
                inc, 1, where='name == "a-vol"'
            ).result(),
            "B's volunteer, Grid over A and B": lambda: both.submit(
                inc, 1, where='name == "b-vol"'
            ).result(),
        }
        for run in trips.values():
            run()
        trip_times: dict[str, list[float]] = {k: [] for k in trips}
        order = list(trips)
        for _ in range(args.trips):
            random.shuffle(order)  # no kind always first after a pause, or always last
            for label in order:
                trip_times[label].append(seconds(trips[label]))
        other.close()
        one.close()
        both.close()
    finally:
        for p in portals.values():
            p.stop()

    print(f"\n| {n:,} items | one portal (s) | two portals (s) | two / one |")
    print("|---|---|---|---|")
    for kind in ("tiny", "1 ms"):
        a, b = times[f"{kind}, one portal"], times[f"{kind}, two portals"]
        ratio = statistics.median(b) / statistics.median(a)
        print(f"| {kind} | {summary(a, fmt='{:.2f}')} | {summary(b, fmt='{:.2f}')} | {ratio:.2f} |")
    print(f"\nItems per portal in the two-portal 1 ms sweeps: {spread}")
    print(f"\n| one task's round trip ({args.trips} each) | median ms (min–max) | p90 ms |")
    print("|---|---|---|")
    for label, values in trip_times.items():
        p90 = sorted(values)[int(0.9 * (len(values) - 1))] * 1000
        print(f"| {label} | {summary(values, 1000, '{:.1f}')} | {p90:.1f} |")


def lent_round_trip(args: argparse.Namespace) -> None:
    """A task on a volunteer B lends to A against one on A's own volunteer, through A."""
    import subprocess

    from conftest import grid_portal_command, wait_for

    from grid_portal import Grid

    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-lent-"))
    portals = {name: start_portal(tmp / name) for name in ("a", "b")}
    try:
        start_volunteer(portals["a"], tmp / "a", "a-vol", "--cpus", str(args.cpus))
        lend = ["--cpus", str(args.cpus), "--lend-to-peers"]
        start_volunteer(portals["b"], tmp / "b", "b-vol", *lend)
        token = portals["b"].token("--for", "peer")
        a_dir = str(portals["a"].data_dir)
        subprocess.run(
            grid_portal_command("peers", "add", portals["b"].http, "--token", token, "--as", "b")
            + ["--data-dir", a_dir],
            check=True,
            capture_output=True,
        )
        grid = Grid(portals["a"].connection_file, start_embedded=False)
        wait_for(
            lambda: any(n.name == "b-vol@b" and n.online for n in grid.nodes()),
            timeout=120,
            what="B's volunteer to be lent to A",
        )
        trips: dict[str, Callable[[], Any]] = {
            "A's own volunteer": lambda: grid.submit(inc, 1, where='name == "a-vol"').result(),
            "B's volunteer lent to A": lambda: grid.submit(inc, 1, where='site == "b"').result(),
        }
        for run in trips.values():
            run()
        rounds: dict[str, list[float]] = {k: [] for k in trips}
        every: dict[str, list[float]] = {k: [] for k in trips}
        order = list(trips)
        for r in range(args.repeat):
            times: dict[str, list[float]] = {k: [] for k in trips}
            for _ in range(args.trips):
                random.shuffle(order)
                for label in order:
                    times[label].append(seconds(trips[label]))
            for label, values in times.items():
                rounds[label].append(statistics.median(values))
                every[label].extend(values)
            note(f"round {r}: " + ", ".join(f"{k} {rounds[k][-1] * 1000:.1f} ms" for k in trips))
        grid.close()
    finally:
        for p in portals.values():
            p.stop()
    print(
        f"\n| one task through A ({args.repeat} rounds of {args.trips}) | median of the rounds' "
        "medians, ms (min–max) | p90 of all, ms |"
    )
    print("|---|---|---|")
    for label, values in rounds.items():
        p90 = sorted(every[label])[int(0.9 * (len(every[label]) - 1))] * 1000
        print(f"| {label} | {summary(values, 1000, '{:.1f}')} | {p90:.1f} |")
    own, lent = rounds["A's own volunteer"], rounds["B's volunteer lent to A"]
    added = [b - a for a, b in zip(own, lent, strict=True)]
    print(f"\nAdded by lending, per round: {summary(added, 1000, '{:+.1f}')} ms")


if __name__ == "__main__":
    main()
