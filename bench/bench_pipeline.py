"""Pipelines (issue 16): items streaming through stages against barriers between stages.

    python bench/bench_pipeline.py [--items 100] [--repeat 5]

Starts a real portal and three real volunteers of unequal speed: ``fast`` (speed 2) and
``slow`` (speed 0.5) labelled ``role=cpu``, and ``mid`` (speed 1) labelled ``role=mid``, each
offering 4 CPUs. A task of ``w`` seconds of work sleeps ``w / S`` on a node of speed ``S``
(sleep-based, as bench_makespan.py, so a 2-core machine can host the 12 "cores"). The job:

    decode  (0.2 s of work per item)   where role == "cpu"   map over 100 items
    encode  (0.4 s)                    where role == "mid"   map: {each: decode}
    verify  (0.1 s)                    where role == "cpu"   map: {each: encode}

run as a pipeline (``each``) and with barriers (``each`` with ``stream: false``: today's
behaviour, where a map stage that needs a map stage waits for all of it). Measured from
submission: the makespan (the last item verified) and the time to the first finished item,
from the tasks' own start and end times. The pipeline's lower bound is the busiest group of
nodes plus what cannot overlap it: ``max(first decode + encode work / mid's capacity + first
verify, (decode + verify work) / the cpu nodes' capacity, one item's fastest path)``.
Targets: makespan <= 1.1x the lower bound; first item done within 2x one item's fastest path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import start_portal, start_volunteer, wait_for  # noqa: E402

# name -> (CPUs offered, speed, role)
NODES = {"fast": (4, 2.0, "cpu"), "slow": (4, 0.5, "cpu"), "mid": (4, 1.0, "mid")}
WORK = {"decode": 0.2, "encode": 0.4, "verify": 0.1}
ROLE = {"decode": "cpu", "encode": "mid", "verify": "cpu"}


def spec(items: int, stream: bool, speeds: dict[str, float]) -> dict[str, Any]:
    stages: list[dict[str, Any]] = [
        {
            "name": "decode",
            "run": "gridtasks:pipe_work",
            "map": {"range": {"stop": items}, "as": "item"},
            "params": {"work": WORK["decode"], "speeds": speeds},
            "where": 'labels.role == "cpu"',
        }
    ]
    for name, previous in (("encode", "decode"), ("verify", "encode")):
        stages.append(
            {
                "name": name,
                "run": "gridtasks:pipe_work",
                "map": {"each": previous, **({} if stream else {"stream": False})},
                "params": {"work": WORK[name], "speeds": speeds},
                "where": f'labels.role == "{ROLE[name]}"',
            }
        )
    return {"name": f"bench-{'pipeline' if stream else 'barriers'}", "stages": stages}


def capacity(role: str) -> float:
    return sum(c * s for c, s, r in NODES.values() if r == role)


def fastest(role: str) -> float:
    return max(s for _, s, r in NODES.values() if r == role)


def one_path() -> float:
    return sum(WORK[stage] / fastest(ROLE[stage]) for stage in WORK)


def lower_bound(items: int) -> float:
    first_decode = WORK["decode"] / fastest("cpu")
    last_verify = WORK["verify"] / fastest("cpu")
    mid = first_decode + items * WORK["encode"] / capacity("mid") + last_verify
    cpu = items * (WORK["decode"] + WORK["verify"]) / capacity("cpu")
    return max(mid, cpu, one_path())


def run_once(grid: Any, items: int, stream: bool, speeds: dict[str, float]) -> dict[str, float]:
    from grid_portal.jobs.workflow import release_outputs, workflow_outputs

    t0 = time.time()
    job = grid.run_workflow(spec(items, stream, speeds), wait=True)
    assert job.state.value == "done", job.error
    outputs = workflow_outputs(grid, job.id)["verify"]
    release_outputs(grid, job.id)
    ends = [o["path"][-1][2] for o in outputs]
    return {"makespan": max(ends) - t0, "first": min(ends) - t0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from grid_portal import Grid

    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-pipeline-"))
    portal = start_portal(tmp)
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    try:
        for name, (cpus, speed, role) in NODES.items():
            start_volunteer(
                portal, tmp, name, "--cpus", str(cpus), "--memory", "1GB",
                "--label", f"speed={speed:g}", "--label", f"role={role}", "--oversubscribe",
                wait=False,
            )  # fmt: skip
        speeds = {name: speed for name, (_, speed, _) in NODES.items()}
        with Grid(portal.connection_file, start_embedded=False) as grid:
            wait_for(
                lambda: {n.name for n in grid.nodes() if n.online} >= set(NODES),
                timeout=90,
                what="the volunteers",
            )
            run_once(grid, 12, True, speeds)  # warm up
            for _ in range(args.repeat):  # in turn, so drift in load hits both alike
                for stream in (True, False):
                    runs[stream].append(run_once(grid, args.items, stream, speeds))
    finally:
        portal.stop()

    bound, path = lower_bound(args.items), one_path()
    print(
        f"{args.items} items through decode/encode/verify "
        + "/".join(f"{WORK[s]:g}" for s in WORK)
        + " s of work; nodes "
        + ", ".join(f"{n} ({r}, {c} CPUs, speed {s:g})" for n, (c, s, r) in NODES.items())
        + f"; lower bound {bound:.2f} s, one item's fastest path {path:.2f} s\n"
    )
    print("| form | makespan, median (min-max) | / lower bound | first item done | / one path |")
    print("|---|---|---|---|---|")
    for stream, label in ((True, "pipeline (`each`)"), (False, "barriers (`stream: false`)")):
        spans = [r["makespan"] for r in runs[stream]]
        firsts = [r["first"] for r in runs[stream]]
        m, f = statistics.median(spans), statistics.median(firsts)
        print(
            f"| {label} | {m:.2f} s ({min(spans):.2f}-{max(spans):.2f}) | {m / bound:.3f}x | "
            f"{f:.2f} s ({min(firsts):.2f}-{max(firsts):.2f}) | {f / path:.2f}x |"
        )


if __name__ == "__main__":
    main()
