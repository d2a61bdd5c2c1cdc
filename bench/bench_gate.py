"""What the role checks cost per call (grid_portal/guard.py), measured in-process.

    python bench/bench_gate.py

Every request and stream message that reaches the portal's scheduler or a volunteer's worker
is checked: the caller's identity is read from its TLS certificate, then the protocol table
and (for some ops) ownership are consulted. This times those steps alone, over 100,000 calls,
median of 5 runs; bench/bench_versions.py measures the same checks end to end against the
code before them (a %%grid cell, Grid.submit, Grid.map).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from grid_portal.guard import Gate, caller_identity
from grid_portal.protocol import SCHEDULER_HANDLERS, SCHEDULER_STREAM_OPS

CALLS = 100_000
PEERCERT = {
    "subject": (
        (("organizationName", "Grid Portal"),),
        (("organizationalUnitName", "client"),),
        (("commonName", "alice"),),
    ),
    "serialNumber": "ABCDEF0123",
}


class _TLSComm:
    """What the gate reads of a Dask TLS comm: its peer's certificate."""

    extra_info = {"peercert": PEERCERT}
    peer_address = "tls://127.0.0.1:1"


def per_call_us(fn: Callable[[], object]) -> float:
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(CALLS):
            fn()
        runs.append((time.perf_counter() - started) / CALLS * 1e6)
    return statistics.median(runs)


def main() -> None:
    gate = Gate("portal", SCHEDULER_HANDLERS, SCHEDULER_STREAM_OPS, is_revoked=lambda _: False)
    comm = _TLSComm()
    identity = caller_identity(comm)
    rows = [
        ("identity read from the TLS certificate", per_call_us(lambda: caller_identity(comm))),
        ("verdict on a request (grid_nodes)", per_call_us(
            lambda: gate.verdict("call", identity, "grid_nodes", {}))),
        ("verdict on a stream message (update-graph)", per_call_us(
            lambda: gate.verdict("stream", identity, "update-graph", {}, {"client": "c"}))),
    ]  # fmt: skip
    print("| step | µs per call |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
