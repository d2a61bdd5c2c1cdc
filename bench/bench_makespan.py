"""Scheduling efficiency: a sweep of unequal tasks on volunteers of unequal speed.

    python bench/bench_makespan.py [--tasks 200] [--seed 1] [--repeat 3]

Starts a real portal and three real volunteers labelled with a speed (``--label speed=S``):
a task of ``w`` seconds of work sleeps ``w / S`` on a node of speed ``S`` (sleep-based, so a
2-core machine can host many more "cores" than it has; each volunteer offers more CPUs than
the machine with ``--oversubscribe``). The sweep is submitted at once through ``Grid.map``
(what a job file's map stage becomes) and its makespan is compared with the lower bound:

    max(total work / total capacity, longest task / fastest speed)

where total capacity = sum over nodes of CPUs * speed. Target: makespan <= 1.15 x bound.
Results are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import start_portal, start_volunteer  # noqa: E402

# name -> (CPUs offered, speed)
NODES = {"fast": (4, 2.0), "steady": (4, 1.0), "slow": (4, 0.5)}


def sweep_task(work: float, speeds: dict[str, float]) -> tuple[str, float, float]:
    """``work`` seconds at speed 1; slower or faster on this node. Defined here, so Dask
    ships it by value; the speeds travel with it (the label is the node's own claim)."""
    import time as _time

    from distributed import get_worker

    name = str(get_worker().name)
    start = _time.time()
    _time.sleep(work / speeds.get(name, 1.0))
    return name, start, _time.time()


def lower_bound(works: list[float]) -> float:
    capacity = sum(cpus * speed for cpus, speed in NODES.values())
    fastest = max(speed for _, speed in NODES.values())
    return max(sum(works) / capacity, max(works) / fastest)


def run_once(grid, works: list[float], speeds: dict[str, float]) -> dict[str, float]:
    t0 = time.time()
    futures = grid.map(sweep_task, works, speeds=speeds)
    results = grid.gather(futures)
    makespan = max(end for _, _, end in results) - t0
    bound = lower_bound(works)
    per_node: dict[str, float] = {}
    for (name, start, end), _ in zip(results, works, strict=True):
        per_node[name] = per_node.get(name, 0.0) + (end - start)
    return {"makespan": makespan, "bound": bound, "ratio": makespan / bound, **per_node}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--min-work", type=float, default=0.2)
    parser.add_argument("--max-work", type=float, default=2.0)
    args = parser.parse_args()

    from grid_portal import Grid

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-makespan-"))
    portal = start_portal(tmp)
    runs = []
    try:
        for name, (cpus, speed) in NODES.items():
            start_volunteer(
                portal, tmp, name, "--cpus", str(cpus), "--memory", "1GB",
                "--label", f"speed={speed:g}", "--oversubscribe",
            )  # fmt: skip
        speeds = {name: speed for name, (_, speed) in NODES.items()}
        with Grid(portal.connection_file, start_embedded=False) as grid:
            grid.gather(grid.map(sweep_task, [0.05] * 24, speeds=speeds))  # warm up
            for _ in range(args.repeat):
                works = [rng.uniform(args.min_work, args.max_work) for _ in range(args.tasks)]
                runs.append(run_once(grid, works, speeds))
    finally:
        portal.stop()

    total_cpus = sum(c for c, _ in NODES.values())
    print(
        f"{args.tasks} tasks of {args.min_work:g}-{args.max_work:g} s of work on "
        f"{len(NODES)} volunteers, {total_cpus} CPUs, speeds "
        + ", ".join(f"{n}={s:g}x{c}" for n, (c, s) in NODES.items())
    )
    print("\n| run | makespan | lower bound | ratio (target <= 1.15) |\n|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        print(f"| {i} | {r['makespan']:.2f} s | {r['bound']:.2f} s | {r['ratio']:.3f}x |")
    ratios = [r["ratio"] for r in runs]
    print(f"| median | | | **{statistics.median(ratios):.3f}x** |")


if __name__ == "__main__":
    main()
