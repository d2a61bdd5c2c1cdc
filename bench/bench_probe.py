"""Cost of the volunteer's probe: one telemetry sample, and the static probe.

Run by hand from the repository root: ``python bench/bench_probe.py`` once the package is
installed (``pip install -e .``), else ``PYTHONPATH=. python bench/bench_probe.py``. Results go
to docs/benchmarks.md. The number that matters is the share of a core the telemetry costs at the
rate the sampler allows (one fresh sample per ``min_interval``, 2 s by default): the budget for a
volunteer's idle cost is 0.5 % of a core, and an idle Dask worker with quiet settings already
uses about 0.3 %.
"""

from __future__ import annotations

import argparse
import statistics
import time

from grid_portal.node.probe import TelemetrySampler, installed_packages, probe_static


def _mean_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.fmean(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="telemetry samples to time")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    args = parser.parse_args()

    sampler = TelemetrySampler(min_interval=0)  # every GPU NVML sees, no caching
    gpus = len(sampler.sample().gpus)  # also a warm-up: first reads, lazy imports
    # Process CPU time, not wall time: that is what the volunteer pays (waiting on I/O is free).
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(args.n):
        sampler.sample()
    cpu_ms = (time.process_time() - cpu_start) / args.n * 1000
    wall_ms = (time.perf_counter() - wall_start) / args.n * 1000
    sampler.close()
    share = cpu_ms / 1000 / args.every * 100

    print(f"TelemetrySampler(min_interval=0).sample(), mean of {args.n}:")
    print(f"  {wall_ms:.3f} ms wall, {cpu_ms:.3f} ms CPU, {gpus} GPU(s)")
    print(f"  one sample per {args.every:g} s: {share:.4f} % of a core (budget 0.5 %)")
    print(f"installed_packages(): {_mean_ms(installed_packages, 20):.2f} ms")
    print(f"probe_static(): {_mean_ms(probe_static, 5):.2f} ms (once per start)")


if __name__ == "__main__":
    main()
