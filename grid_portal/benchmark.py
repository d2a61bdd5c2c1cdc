"""A short, fixed CPU micro-benchmark, so that volunteers' credit is comparable (as in BOINC).

A volunteer runs it once at start (about 0.2 s of one core) and reports the score in its
startup capacity as ``capacity["cpu_benchmark"]``; the portal multiplies the core-hours a node
gave by its score (``grid_portal.portal.contributions``). A score of 1.0 is the reference
machine; a core twice as fast scores about 2.0.

It lives outside ``node/`` and ``portal/`` because both must agree on it and neither may import
the other (docs/architecture.md, rules). It imports nothing heavy.

The work is plain Python integer and float arithmetic: it measures what most grid tasks written
in Python see (one core's interpreter speed), not peak FLOPS. It is timed in CPU time of this
process, so a machine busy with other work is not scored lower for it.
"""

from __future__ import annotations

import time

BENCHMARK_FIELD = "cpu_benchmark"  # the key in a node's startup ``capacity``
# Chunks per CPU second on the reference machine (a 2026 cloud vCPU, CPython 3.11), where the
# score is 1.0.
REFERENCE_RATE = 30000.0
MIN_SCORE, MAX_SCORE = 0.05, 20.0  # a reported score is clamped to this range by the portal


def _chunk(seed: int) -> float:
    """A fixed amount of mixed integer and float work."""
    x = seed
    acc = 0.0
    for i in range(1, 200):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        acc += (x % 1000) * 0.001 / i
    return acc


def cpu_benchmark(duration: float = 0.2) -> float:
    """This core's speed relative to the reference machine (1.0), measured for ``duration`` s.

    Stops after ``duration`` seconds of CPU time, or five times that of wall time when the
    process is starved.
    """
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    chunks = 0
    sink = 0.0
    while True:
        for _ in range(20):
            sink += _chunk(chunks)
            chunks += 1
        cpu = time.process_time() - start_cpu
        if cpu >= duration or time.perf_counter() - start_wall >= 5 * duration:
            break
    if sink < 0:  # never true; keeps the work from looking unused
        chunks += 1
    return round(chunks / max(cpu, 1e-6) / REFERENCE_RATE, 3)


def clamp_score(value: object) -> float:
    """A reported score as a number the portal will use: 1.0 when absent or not a number."""
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 1.0
    if score != score or score <= 0:  # NaN or nonsense
        return 1.0
    return min(MAX_SCORE, max(MIN_SCORE, score))
