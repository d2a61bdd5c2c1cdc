"""The grid's REST and live API, end to end: GET nodes latency, and websocket bytes per second.

    python bench/bench_api.py [--nodes 1000 10000] [--requests 60] [--ws-seconds 20]

What runs: a real portal (``grid-portal serve``, mutual TLS) and a real Jupyter server with the
grid_portal extension, both as processes, with private XDG/Jupyter dirs. The portal's node
registry is filled with simulated volunteers through ``run_on_scheduler`` (``NodeRegistry.join``
with a real probe's capacity, an offer, labels and a telemetry sample, so each record has the
size of a real one). No volunteer processes: the registry is the data the API serves.

Measured:
- ``GET grid/api/nodes`` as a browser makes it (HTTP keep-alive, token header), sequentially:
  p50/p95/max latency and response size, for each registry size. The first request starts the
  extension's live feed (one long poll of the portal, through Grid and Dask's TLS comm); its
  mirror answers the requests timed here, once it lists every node. The handler's path when
  the mirror is not running (``Grid._call("grid_nodes")`` through the portal, plus JSON
  encoding, without HTTP) is timed too.
- the same ``GET nodes`` while 1,000 nodes report every 2 s.
- the events websocket with 1,000 nodes each reporting every 2 s (the portal's registry is
  updated on a scheduler-side timer, 1/20 of the nodes every 100 ms): bytes and messages per
  second received by one client after its snapshot.
Results are printed as a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import start_portal, wait_for  # noqa: E402  (private XDG/Jupyter dirs)

# -- run on the portal's scheduler (pickled by value: this module is __main__) ----------------


def fill_registry(count: int, capacity: dict[str, Any], dask_scheduler: Any = None) -> int:
    """Make the registry hold ``count`` simulated nodes (joining or dropping as needed)."""
    registry = dask_scheduler.plugins["grid-portal"].registry
    now = time.time()
    for i in range(len(registry.nodes), count):
        name = f"sim-{i:05d}"
        registry.join(
            name=name,
            address=f"tls://10.{i // 65536}.{i // 256 % 256}.{i % 256}:40000",
            capacity=capacity,
            offer={"cpus": 4, "memory": 8_000_000_000, "gpus": []},
            labels={"room": f"B{i % 20}", "site": "bench"},
        )
        registry.update(
            f"tls://10.{i // 65536}.{i // 256 % 256}.{i % 256}:40000",
            state=registry.nodes[name].state,
            reason=None,
            telemetry=_telemetry(now, i),
            used_resources={},
        )
    extra = list(registry.nodes.values())[count:]
    for record in extra:
        if record.address is not None:
            registry.leave(record.address)
    if extra:  # forgotten as offline nodes are after their retention time
        registry.forget_stale(now=time.time() + registry.offline_retention + 1)
    return len(registry.nodes)


def _telemetry(now: float, i: int) -> dict[str, Any]:
    return {
        "time": now,
        "cpu_percent": float(i % 97),
        "grid_cpu_percent": float(i % 13),
        "memory_used": 2_000_000_000 + i * 4096,
        "memory_percent": 25.0 + i % 50,
        "running_tasks": i % 3,
        "gpus": [],
        "policy": {"state": None, "reason": None},
    }


async def start_reporting(every: float, dask_scheduler: Any = None) -> int:
    """Each simulated node sends fresh telemetry once per ``every`` s, spread evenly."""
    from tornado.ioloop import PeriodicCallback

    registry = dask_scheduler.plugins["grid-portal"].registry
    records = list(registry.nodes.values())
    slices = 20
    state = {"tick": 0}

    def tick() -> None:
        now = time.time()
        part = state["tick"] % slices
        state["tick"] += 1
        for i, record in enumerate(records[part::slices]):
            if record.address is None:
                continue
            registry.update(
                record.address,
                state=record.state,
                reason=None,
                telemetry=_telemetry(now, i + state["tick"]),
                used_resources={},
            )

    callback = PeriodicCallback(tick, every * 1000 / slices)
    callback.start()
    dask_scheduler._bench_reporting = callback
    return len(records)


def stop_reporting(dask_scheduler: Any = None) -> None:
    callback = getattr(dask_scheduler, "_bench_reporting", None)
    if callback is not None:
        callback.stop()


# -- the Jupyter server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_jupyter(tmp: Path, connection_file: str) -> tuple[subprocess.Popen[bytes], int, str]:
    token = secrets.token_hex(16)
    port = free_port()
    config_dir = tmp / "jupyter-config"
    config_dir.mkdir()
    (config_dir / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "ServerApp": {
                    "jpserver_extensions": {"grid_portal": True},
                    "allow_unauthenticated_access": False,
                    "open_browser": False,
                    "port": port,
                    "port_retries": 0,
                    "ip": "127.0.0.1",
                    "root_dir": str(tmp),
                    "allow_root": True,
                },
                "IdentityProvider": {"token": token},
                "GridPortal": {"address": connection_file},
            }
        )
    )
    log = open(tmp / "jupyter.log", "wb")  # noqa: SIM115 - lives as long as the server
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config_dir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server"], stdout=log, stderr=subprocess.STDOUT, env=env
    )

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError((tmp / "jupyter.log").read_text())
        try:
            status, _ = get(port, token, "/api/status")
        except OSError:
            return False
        return status == 200

    wait_for(up, timeout=60, what="the Jupyter server")
    return process, port, token


def get(port: int, token: str, path: str, conn: http.client.HTTPConnection | None = None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers={"Authorization": f"token {token}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


# -- measurements ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_listed(port: int, token: str, count: int) -> int:
    """Wait until GET nodes lists ``count`` nodes; returns the response's size in bytes.

    The first request also starts the extension's live feed, whose mirror answers the next.
    """

    def complete() -> int:
        status, body = get(port, token, "/grid/api/nodes")
        assert status == 200, body[:500]
        return len(body) if len(json.loads(body)["nodes"]) == count else 0

    return wait_for(complete, timeout=120, what=f"GET nodes to list {count} nodes")


def time_get_nodes(port: int, token: str, requests: int, count: int) -> dict[str, float]:
    size = wait_listed(port, token, count)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        status, body = get(port, token, "/grid/api/nodes", conn)
        times.append(time.perf_counter() - start)
        assert status == 200
    conn.close()
    return {
        "p50": statistics.median(times) * 1000,
        "p95": percentile(times, 0.95) * 1000,
        "max": max(times) * 1000,
        "bytes": size,
    }


def time_grid_nodes(grid: Any, requests: int) -> float:
    """What the handler does when the live feed's mirror is not running: ask the portal for
    every node and encode the answer (the HTTP part is left out)."""
    times = []
    for _ in range(max(5, requests // 3)):
        start = time.perf_counter()
        json.dumps({"nodes": grid._call("grid_nodes")}, separators=(",", ":"))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def websocket_rate(port: int, token: str, seconds: float) -> dict[str, float]:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    request = HTTPRequest(
        f"ws://127.0.0.1:{port}/grid/api/events", headers={"Authorization": f"token {token}"}
    )
    ws = await websocket_connect(request)
    snapshot = await ws.read_message()
    assert snapshot is not None and json.loads(snapshot)["type"] == "snapshot"
    received = messages = nodes = 0
    kinds: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            text = await asyncio.wait_for(ws.read_message(), remaining)
        except TimeoutError:
            break
        assert text is not None, "the websocket closed"
        received += len(text.encode())
        messages += 1
        message = json.loads(text)
        kinds[message["type"]] = kinds.get(message["type"], 0) + 1
        nodes += len(message.get("nodes", []))
    ws.close()
    return {
        "snapshot_bytes": len(snapshot.encode()),
        "bytes_per_s": received / seconds,
        "messages_per_s": messages / seconds,
        "node_updates_per_s": nodes / seconds,
        "kinds": kinds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--ws-nodes", type=int, default=1000)
    parser.add_argument("--ws-every", type=float, default=2.0)
    parser.add_argument("--ws-seconds", type=float, default=20.0)
    args = parser.parse_args()

    import dataclasses

    from grid_portal import Grid
    from grid_portal.node.probe import probe_static

    capacity = json.loads(json.dumps(dataclasses.asdict(probe_static())))
    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-api-"))
    portal = start_portal(tmp)
    jupyter = None
    rows: list[tuple[str, str]] = []
    try:
        grid = Grid(portal.connection_file, start_embedded=False)
        jupyter, port, token = start_jupyter(tmp, portal.connection_file)
        for count in args.nodes:
            grid.client.run_on_scheduler(fill_registry, count, capacity)
            result = time_get_nodes(port, token, args.requests, count)
            direct = time_grid_nodes(grid, args.requests)
            rows.append(
                (
                    f"GET nodes, {count:,} nodes ({result['bytes'] / 1e6:.1f} MB JSON)",
                    f"p50 {result['p50']:.0f} ms, p95 {result['p95']:.0f} ms, "
                    f"max {result['max']:.0f} ms (without the mirror, portal + JSON alone: "
                    f"{direct:.0f} ms)",
                )
            )
            print(rows[-1], flush=True)

        grid.client.run_on_scheduler(fill_registry, args.ws_nodes, capacity)
        wait_listed(port, token, args.ws_nodes)
        grid.client.run_on_scheduler(start_reporting, args.ws_every)
        try:
            rate = asyncio.run(websocket_rate(port, token, args.ws_seconds))
            busy = time_get_nodes(port, token, args.requests, args.ws_nodes)
        finally:
            grid.client.run_on_scheduler(stop_reporting)
        rows.append(
            (
                f"events websocket, {args.ws_nodes:,} nodes reporting every {args.ws_every:g} s",
                f"{rate['bytes_per_s'] / 1000:.0f} kB/s in {rate['messages_per_s']:.1f} "
                f"messages/s ({rate['node_updates_per_s']:.0f} node updates/s; snapshot "
                f"{rate['snapshot_bytes'] / 1e6:.2f} MB; {rate['kinds']})",
            )
        )
        print(rows[-1], flush=True)
        rows.append(
            (
                f"GET nodes, {args.ws_nodes:,} nodes while they report every {args.ws_every:g} s",
                f"p50 {busy['p50']:.0f} ms, p95 {busy['p95']:.0f} ms, max {busy['max']:.0f} ms",
            )
        )
        print(rows[-1], flush=True)
        grid.close()
    finally:
        if jupyter is not None:
            jupyter.terminate()
            jupyter.wait(30)
        portal.stop()

    print("\n| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
