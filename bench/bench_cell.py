"""Round trip of a trivial ``%%grid`` cell, against ipyparallel's ``%%px`` and raw Dask.

Run by hand from the repository root: ``python bench/bench_cell.py`` (needs ipyparallel, the
``bench`` extra). It starts, in a private temporary directory, a portal and one volunteer
(2 CPUs), and an ipyparallel cluster of two engines, all on this machine, then times in one
run, interleaved round by round so that load drifts hit every contender alike:

- ``%%grid`` on a trivial cell (``x = 1``): parse, ship, run in a child process on the node,
  bring ``x`` back; and the same with the Grid client's copy of the largest offer made 10 s
  old (as for cells run seconds apart: renewed in the background) and forgotten (the first
  cell, or one more than 60 s after the last: a round trip to fetch it);
- ``%%px`` on the same cell, on both engines (its default) and on one;
- ``Client.submit`` of the equivalent function with the Grid's own Dask client: no resources,
  no job annotations, no child process: Dask's floor on this portal;
- ``Grid.submit`` of it: resources and the job annotation;
- then, interleaved round by round with the defaults, ``%%grid`` and ``Client.submit`` with the
  client's batched-send interval (``client.scheduler_comm.interval``, 10 ms by default in
  distributed) at 0, and with the portal's and the node's batched sends at 0 as well (set
  through ``run_on_scheduler``/``run``, for the measurement only; ``--as admin`` only: a
  researcher may not).

The kernel connects as a researcher (a role-client certificate the portal's ledger knows) by
default, so that every role and ownership check a researcher's call meets is on the timed path.

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
            *(("--sandbox", sandbox) if sandbox else ()),
        ),
        stdout=open(home / "volunteer.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return [volunteer, portal], str(data / "connection.json")


def as_researcher(home: Path, portal: subprocess.Popen[bytes]) -> str:
    """A researcher's connection file for the portal in ``home`` (the tests' helper: a
    role-client certificate from its CA, recorded in its ledger as enrolment records one)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import Portal, researcher_connection

    data = home / "portal"
    info = json.loads((data / "portal.json").read_text())
    return researcher_connection(
        Portal(data, portal, info, home / "portal.log"), home, "bench-user"
    )


def _scheduler_intervals(dask_scheduler: Any, workers: float, clients: float) -> dict[str, float]:
    """Set the portal's batched-send intervals (to workers, to clients); returns the old ones."""
    old = {"workers": 0.005, "clients": 0.002}
    for stream in dask_scheduler.stream_comms.values():
        old["workers"] = stream.interval
        stream.interval = workers
    for stream in dask_scheduler.client_comms.values():
        old["clients"] = stream.interval
        stream.interval = clients
    return old


def _worker_interval(dask_worker: Any, value: float) -> float:
    old = dask_worker.batched_stream.interval
    dask_worker.batched_stream.interval = value
    return old


def stats(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"median {statistics.median(ms):6.2f} ms   p90 {p90:6.2f} ms"


def timed(fn: Callable[[], Any], before: Callable[[], Any] | None = None) -> float:
    """One call after IDLE seconds of quiet (and ``before``, untimed)."""
    if before is not None:
        before()
    time.sleep(IDLE)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=40, help="rounds to time")
    parser.add_argument(
        "--sandbox",
        default=None,
        help="the volunteer's --sandbox (default: its own default, bubblewrap where it works)",
    )
    parser.add_argument(
        "--as",
        dest="identity",
        choices=("researcher", "admin"),
        default="researcher",
        help="whose certificate the kernel uses (default: a researcher's, as in a classroom or "
        "a shared grid; the portal's admin may also change the portal's and node's batching "
        "intervals for the study at the end)",
    )
    args = parser.parse_args()

    import ipyparallel as ipp
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from grid_portal.notebook.magics import magics_for

    home = Path(tempfile.mkdtemp(prefix="grid-bench-"))
    processes, connection = start_grid(home, args.sandbox)
    _wait(lambda: Path(connection).exists(), 30, "the portal's connection file")
    if args.identity == "researcher":
        connection = as_researcher(home, processes[1])
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

        def age_offer() -> None:
            # The Grid client accepts a request at once against the largest offer, which it
            # keeps fresh for 5 s and, up to 60 s old, renews in the background while using
            # it: cells run seconds apart, as people run them, take no round trip for it.
            if grid._largest is not None:
                grid._largest = (time.monotonic() - 10, grid._largest[1])

        def forget_offer() -> None:
            grid._largest = None  # the first cell, or one more than 60 s after the last

        client = grid.client
        grid_cell = lambda: shell.run_cell_magic("grid", "", "x = 1\n")  # noqa: E731
        raw = lambda: client.submit(trivial_cell, pure=False).result()  # noqa: E731
        contenders: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {
            "%%grid x = 1": (grid_cell, None),
            "%%grid x = 1, cells 10 s apart": (grid_cell, age_offer),
            "%%grid x = 1, cells > 60 s apart": (grid_cell, forget_offer),
            "%%px x = 1 (2 engines)": (lambda: shell.run_cell_magic("px", "", "x = 1\n"), None),
            "%%px x = 1 (1 engine)": (lambda: shell.run_cell_magic("pxone", "", "x = 1\n"), None),
            "Client.submit(f).result()": (raw, None),
            "Grid.submit(f).result()": (lambda: grid.submit(trivial_cell).result(), None),
        }
        for fn, _ in contenders.values():  # warm up: imports, connections, the node's child
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.n):  # round by round, so that load drifts hit every one alike
            for name, (fn, before) in contenders.items():
                times[name].append(timed(fn, before))

        # What lowering Dask's batching intervals buys a single call after a pause
        # (FIELD-NOTES): first only the client's own comm (the Grid client could set that),
        # then also the portal's and the node's (their plugins could), set from outside for
        # the measurement only. Interleaved with the defaults, round by round.
        default_client = client.scheduler_comm.interval
        try:
            portal_default = client.run_on_scheduler(_scheduler_intervals, workers=0, clients=0)
            client.run_on_scheduler(_scheduler_intervals, **portal_default)
            node_default = next(iter(client.run(_worker_interval, value=0).values()))
            client.run(_worker_interval, value=node_default)
        except Exception as exc:  # noqa: BLE001 - a researcher may not (run with --as admin)
            print(f"(could not change the portal's and node's intervals: {exc})")
            portal_default, node_default = None, None

        def setting(client_s: float, portal: dict[str, float] | None, node: float | None):
            def apply() -> None:
                client.scheduler_comm.interval = client_s
                if portal is not None and node is not None:
                    client.run_on_scheduler(_scheduler_intervals, **portal)
                    client.run(_worker_interval, value=node)

            return apply

        settings = {
            "default intervals": setting(default_client, portal_default, node_default),
            "client interval 0": setting(0.0, portal_default, node_default),
        }
        if portal_default is not None:
            settings["all intervals 0"] = setting(0.0, {"workers": 0, "clients": 0}, 0.0)
        study: dict[str, list[float]] = {}
        for _ in range(args.n):
            for label, apply in settings.items():
                apply()
                for what, fn in (("%%grid x = 1", grid_cell), ("Client.submit", raw)):
                    study.setdefault(f"{what}, {label}", []).append(timed(fn))
        settings["default intervals"]()

        mode = args.sandbox or "default"
        print(
            f"{args.n} rounds, volunteer --sandbox {mode}, the kernel as the {args.identity}, "
            f"this machine: {os.cpu_count()} CPUs"
        )
        for name, values in times.items():
            print(f"  {name:48s} {stats(values)}")
        grid_ms = statistics.median(times["%%grid x = 1"])
        raw_ms = statistics.median(times["Client.submit(f).result()"])
        px_ms = statistics.median(times["%%px x = 1 (2 engines)"])
        print(f"  %%grid overhead over a raw Client.submit: {(grid_ms - raw_ms) * 1000:.2f} ms")
        print(f"  %%grid / %%px (2 engines): {grid_ms / px_ms:.2f}x")
        print("Batched-send intervals, a single call after 50 ms of quiet (interleaved):")
        for name, values in study.items():
            print(f"  {name:48s} {stats(values)}")
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
