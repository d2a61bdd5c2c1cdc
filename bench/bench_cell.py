"""Round trip of a trivial ``%%grid`` cell, against ipyparallel's ``%%px`` and raw Dask.

Run by hand from the repository root: ``python bench/bench_cell.py`` (needs ipyparallel, the
``bench`` extra). It starts, in a private temporary directory, a portal and one volunteer
(2 CPUs), and an ipyparallel cluster of two engines, all on this machine, then times in one
run, interleaved round by round so that load drifts hit every contender alike:

- ``%%grid`` on a trivial cell (``x = 1``): parse, ship, run in a child process on the node,
  bring ``x`` back;
- ``%%px`` on the same cell, on both engines (its default) and on one;
- ``Client.submit`` of the equivalent function with the Grid's own Dask client: no resources,
  no job annotations, no child process: Dask's floor on this portal;
- ``Grid.submit`` of it: resources and the job annotation;
- ``%%grid`` again with the client's batched-send interval (``client.scheduler_comm.interval``,
  10 ms by default in distributed) lowered to 2 ms and to 0; then with the portal's and the
  node's batched sends at 0 as well (set through ``run_on_scheduler``/``run``, for the
  measurement only), and raw ``Client.submit`` under the same settings.

Results go to docs/benchmarks.md. Medians and 90th percentiles of ``-n`` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Idle time before each timed call, as between notebook cells: otherwise a call pays for the
# previous one's batched messages (a released future waits up to 10 ms in the client's batch).
IDLE = 0.05


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "grid_portal.cli", *args]


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)  # polling for processes this script started
    raise SystemExit(f"timed out waiting for {what}")


def start_grid(home: Path, sandbox: str | None) -> tuple[list[subprocess.Popen[bytes]], str]:
    """A portal and one 2-CPU volunteer in ``home``; returns them and the connection file."""
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "JUPYTER_RUNTIME_DIR"):
        os.environ[var] = str(home / var.lower())
        (home / var.lower()).mkdir(mode=0o700, exist_ok=True)
    os.environ.pop("GRID_PORTAL_ADDRESS", None)
    data = home / "portal"
    log = open(home / "portal.log", "wb")  # noqa: SIM115 - lives as long as the portal
    portal = subprocess.Popen(
        _command(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "0",
            "--data-dir",
            str(data),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def info() -> dict[str, Any] | None:
        path = data / "portal.json"
        return json.loads(path.read_text()) if path.exists() else None

    portal_info = _wait(info, 30, "the portal")
    token = subprocess.run(
        _command("token", "create", "--data-dir", str(data)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    volunteer = subprocess.Popen(
        _command(
            "volunteer",
            portal_info["local_http"],
            "--token",
            token,
            "--name",
            "bench",
            "--state-dir",
            str(home / "volunteer"),
            "--cpus",
            "2",
            "--memory",
            "1GB",
        ),
        stdout=open(home / "volunteer.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return [volunteer, portal], str(data / "connection.json")


def _scheduler_intervals(dask_scheduler: Any, value: float) -> None:
    for stream in (*dask_scheduler.stream_comms.values(), *dask_scheduler.client_comms.values()):
        stream.interval = value


def _worker_interval(dask_worker: Any, value: float) -> None:
    dask_worker.batched_stream.interval = value


def stats(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"median {statistics.median(ms):6.2f} ms   p90 {p90:6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=40, help="rounds to time")
    parser.add_argument(
        "--sandbox",
        default=None,
        help="the volunteer's --sandbox (default: its own default); 'none' runs tasks in the "
        "worker, where a cell's output streams",
    )
    args = parser.parse_args()

    import ipyparallel as ipp
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from grid_portal.notebook.magics import magics_for

    home = Path(tempfile.mkdtemp(prefix="grid-bench-"))
    processes, connection = start_grid(home, args.sandbox)
    cluster = None
    try:
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "grid_portal")
        with capture_output():
            shell.run_line_magic("grid", f"connect {connection}")
        magics = magics_for(shell)
        assert magics is not None
        grid = magics.grid
        _wait(lambda: grid.capacity().nodes_online, 60, "the volunteer")

        cluster = ipp.Cluster(n=2, log_level=40)
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(2, timeout=60)
        rc.activate()  # %%px on all engines, blocking
        one = rc[0]
        one.block = True
        one.activate(suffix="one")  # %%pxone: a single engine

        def trivial_cell() -> dict[str, int]:
            x = 1
            return {"x": x}

        client = grid.client
        contenders: dict[str, Callable[[], Any]] = {
            "%%grid x = 1": lambda: shell.run_cell_magic("grid", "", "x = 1\n"),
            "%%px x = 1 (2 engines)": lambda: shell.run_cell_magic("px", "", "x = 1\n"),
            "%%px x = 1 (1 engine)": lambda: shell.run_cell_magic("pxone", "", "x = 1\n"),
            "Client.submit(f).result()": lambda: client.submit(trivial_cell, pure=False).result(),
            "Grid.submit(f).result()": lambda: grid.submit(trivial_cell).result(),
        }
        for fn in contenders.values():  # warm up: imports, connections, the node's spare child
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.n):
            for name, fn in contenders.items():
                time.sleep(IDLE)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

        def again(name: str, fn: Callable[[], Any]) -> None:
            times[name] = []
            for _ in range(3):
                fn()
            for _ in range(args.n):
                time.sleep(IDLE)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

        # What lowering Dask's batching intervals would buy (FIELD-NOTES): first only the
        # client's own comm (the Grid client could do that), then also the portal's and the
        # node's (their plugins could), set here from outside for the measurement only.
        for interval in (0.002, 0.0):
            client.scheduler_comm.interval = interval
            again(
                f"%%grid x = 1, client interval {interval * 1000:g} ms", contenders["%%grid x = 1"]
            )
        try:
            client.run_on_scheduler(_scheduler_intervals, value=0.0)
            client.run(_worker_interval, value=0.0)
        except Exception as exc:  # noqa: BLE001 - a portal that forbids run_on_scheduler
            print(f"(could not lower the portal's and node's intervals: {exc})")
        else:
            again("%%grid x = 1, all intervals 0", contenders["%%grid x = 1"])
            again(
                "Client.submit(f).result(), all intervals 0",
                contenders["Client.submit(f).result()"],
            )

        mode = args.sandbox or "default"
        print(f"{args.n} rounds, volunteer --sandbox {mode}, this machine: {os.cpu_count()} CPUs")
        for name, values in times.items():
            print(f"  {name:48s} {stats(values)}")
        grid_ms = statistics.median(times["%%grid x = 1"])
        raw_ms = statistics.median(times["Client.submit(f).result()"])
        print(f"  %%grid overhead over a raw Client.submit: {(grid_ms - raw_ms) * 1000:.2f} ms")
    finally:
        if cluster is not None:
            cluster.stop_cluster_sync()
        for process in processes:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
