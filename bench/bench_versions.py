"""What this checkout costs against an earlier revision, measured side by side in one run.

    python bench/bench_versions.py [--base REV] [-n 40] [--map 2000] [--maps 5]

For the zero-trust issues: the role checks on every call (grid_portal/guard.py), the opaque
payloads and the data-only unpickler must cost little on the two things researchers feel, a
trivial ``%%grid`` cell and ``Grid.map`` throughput. The base revision is checked out in a git
worktree; each side (base, this checkout) runs its own portal, volunteer and kernel in its own
process (bench/version_driver.py), and the two are timed in turn, call by call, so that a drift
in the machine's load hits both alike. Prints a Markdown table for docs/benchmarks.md: medians
with the 10th-90th percentile spread, and the ratio this / base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "bench" / "version_driver.py"


class Side:
    """One checkout's grid, driven through its driver's stdin and stdout."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(DRIVER)],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._read()
        if line != "ready":
            raise RuntimeError(f"{name}: the driver did not start ({line!r})")

    def _read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the driver exited (code {self.process.wait()})")
        return line.strip()

    def time(self, command: str) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return float(json.loads(self._read()))

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def worktree(rev: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"grid-portal-bench-{rev}"
    if not (path / "grid_portal").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True)
    return path


def spread(times: list[float], scale: float = 1000.0) -> str:
    ordered = sorted(times)
    lo, hi = ordered[len(ordered) // 10], ordered[(len(ordered) * 9) // 10]
    return f"{statistics.median(ordered) * scale:.2f} ({lo * scale:.2f}-{hi * scale:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="7dfd47c", help="the revision to compare against")
    parser.add_argument(
        "--this", default=None, help="a revision to measure instead of this checkout"
    )
    parser.add_argument("-n", type=int, default=40, help="timed cells and submits per side")
    parser.add_argument("--map", type=int, default=2000, help="tiny tasks per Grid.map")
    parser.add_argument("--maps", type=int, default=5, help="timed maps per side")
    args = parser.parse_args()

    base = Side(f"base {args.base}", worktree(args.base))
    this = Side("this checkout", worktree(args.this) if args.this else ROOT)
    sides = (base, this)
    try:
        times: dict[tuple[str, str], list[float]] = {}
        for command, rounds in (
            ("cell", args.n),
            ("submit", args.n),
            (f"map {args.map}", args.maps),
        ):
            for _ in range(rounds):
                for side in sides:
                    times.setdefault((side.name, command), []).append(side.time(command))
    finally:
        for side in sides:
            side.close()

    print(
        f"| measure (median, 10th-90th percentile) | base {args.base} | this checkout | this / base |"
    )
    print("|---|---|---|---|")
    for command, label in (
        ("cell", "trivial `%%grid` cell, ms"),
        ("submit", "`Grid.submit` round trip, ms"),
    ):
        a, b = times[(base.name, command)], times[(this.name, command)]
        ratio = statistics.median(b) / statistics.median(a)
        print(f"| {label} | {spread(a)} | {spread(b)} | {ratio:.2f}x |")
    key = f"map {args.map}"
    a = [args.map / t for t in times[(base.name, key)]]
    b = [args.map / t for t in times[(this.name, key)]]
    ratio = statistics.median(b) / statistics.median(a)
    print(
        f"| `Grid.map` of {args.map} tiny tasks, tasks/s | {spread(a, 1)} | {spread(b, 1)} "
        f"| {ratio:.2f}x |"
    )


if __name__ == "__main__":
    main()
