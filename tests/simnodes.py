"""Simulated volunteers for load tests and benchmarks: many real Dask workers per process.

Each simulated node is a real ``distributed.Worker`` that joins the portal over mutual TLS
with a node certificate of its own, issued by the portal's CA under the node's name (the
portal admits a worker only as the name in its certificate), and registers with the same
``grid`` startup information a real volunteer's NodePlugin sends, so the portal lists it with
its capacity. What is left out is the volunteer agent, its policy and its sandbox: a real
volunteer costs a process tree per machine, which 200 of would not fit on the 2 cores the
tests run on.

    python tests/simnodes.py --scheduler tls://127.0.0.1:8786 --ca CA.pem --certs DIR NAME...

starts the named nodes (``DIR/NAME.pem`` and ``DIR/NAME-key.pem``), prints ``ready`` once
all have joined and runs until its stdin closes or it gets SIGTERM.

``mode``: "sim" (the above: Dask's heartbeats, no telemetry), "volunteer" (also a real
volunteer's NodePlugin, so heartbeats and telemetry are paced as a real idle volunteer's; its
telemetry is a steady made-up sample, since 200 nodes sampling one machine would all see the
same swings at once), or "raw" (plain Dask workers over plain TCP, for a raw Dask scheduler:
what the portal's idle cost is compared with, issue 17).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MEMORY = 2 * 2**30  # what each simulated node offers

# The quiet settings of a real volunteer's worker (grid_portal/node/worker.py), and no memory
# monitor: the workers share one process, whose memory is no single node's.
WORKER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "distributed.worker.memory.terminate": False,
}


def issue_node_certificates(data_dir: Path, names: Iterable[str], out: Path) -> None:
    """Certificates for ``names`` from the portal's CA, as enrolment would give them."""
    from grid_portal.portal.security import CertificateAuthority, write_private

    ca = CertificateAuthority.load_or_create(data_dir / "ca")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        cert, key = ca.issue(name, role="node")
        (out / f"{name}.pem").write_text(cert)
        write_private(out / f"{name}-key.pem", key)


def start_simulated_nodes(
    portal: Any,
    tmp: Path,
    names: list[str],
    per_process: int = 50,
    mode: str = "sim",
    scheduler: str | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start ``names`` as simulated nodes, ``per_process`` to a process; returns once every
    process said all its nodes joined. ``mode`` "raw": plain workers of the raw Dask
    scheduler at ``scheduler`` (``portal`` unused)."""
    if mode == "raw":
        assert scheduler is not None
        where = ["--scheduler", scheduler, "--mode", "raw"]
    else:
        certs = tmp / "sim-certs"
        issue_node_certificates(portal.data_dir, names, certs)
        where = [
            *("--scheduler", portal.scheduler, "--mode", mode),
            *("--ca", str(portal.data_dir / "ca" / "ca.pem"), "--certs", str(certs)),
        ]
    processes = []
    for start in range(0, len(names), per_process):
        chunk = names[start : start + per_process]
        log = open(tmp / f"sim-{mode}-{start:04d}.log", "wb")  # noqa: SIM115 - the child keeps it
        processes.append(
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), *where, *chunk],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        )
    for process in processes:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the child's nodes joined, or it died
        if line.strip() != b"ready":
            stop_simulated_nodes(processes)
            raise AssertionError(f"simulated nodes did not start; see {tmp}/sim-*.log")
    return processes


def stop_simulated_nodes(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            if process.stdin is not None:
                process.stdin.close()  # the child's cue to close its workers
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _info(name: str) -> dict[str, Any]:
    """What a volunteer's NodePlugin sends at registration (the ``grid`` key)."""
    return {
        "capacity": {"cpu_model": "simulated", "cores_logical": 1, "memory_total": MEMORY},
        "offer": {"cpus": 1, "memory": MEMORY, "gpus": []},
        "labels": {"simulated": "yes"},
        "sandbox": None,
    }


def _volunteer_plugin(info: dict[str, Any]) -> Any:
    """A real volunteer's NodePlugin whose telemetry is a steady made-up sample."""
    import time

    from grid_portal.node.plugin import NodePlugin

    class SimulatedNodePlugin(NodePlugin):
        def _sample(self, worker: Any) -> dict[str, Any]:
            running = len(worker.state.executing)
            return {
                "time": time.time(),
                "cpu_percent": 5.0,
                "grid_cpu_percent": 100.0 * running,
                "memory_used": MEMORY // 4,
                "memory_percent": 25.0,
                "running_tasks": running,
                "gpus": [],
                "policy": {"state": self.state, "reason": self.reason},
            }

    # A simulated node shares its process with many: it never pauses for memory (0).
    return SimulatedNodePlugin(info, gpus=[], memory_pause_fraction=0)


async def _run(
    scheduler: str, ca: str | None, certs: Path | None, names: list[str], mode: str = "sim"
) -> None:
    import dask
    from distributed import Worker

    from grid_portal.portal.security import tls_security

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.buffer.read1(1 << 16) or stop.set())
    with dask.config.set(WORKER_CONFIG):
        workers = []
        for name in names:
            info = _info(name)
            worker = Worker(
                scheduler,
                security=None
                if mode == "raw"
                else tls_security(ca, certs / f"{name}.pem", certs / f"{name}-key.pem"),
                nthreads=1,
                memory_limit=0,
                resources={"CPU": 1, "MEMORY": MEMORY},
                name=name,
                host="127.0.0.1",
                dashboard=False,
                death_timeout=180,  # 50 TLS handshakes at once on a loaded machine
                plugins={_volunteer_plugin(info)} if mode == "volunteer" else (),
            )
            if mode == "sim":
                worker.startup_information["grid"] = lambda _worker, info=info: info
            workers.append(worker)
        await asyncio.gather(*workers)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await stop.wait()
        await asyncio.gather(*(w.close(timeout=10) for w in workers), return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--mode", choices=("sim", "volunteer", "raw"), default="sim")
    parser.add_argument("--ca")
    parser.add_argument("--certs", type=Path)
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    asyncio.run(_run(args.scheduler, args.ca, args.certs, args.names, args.mode))


if __name__ == "__main__":
    main()
