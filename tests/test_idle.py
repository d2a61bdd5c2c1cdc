"""An idle volunteer is cheap for its owner and still live for the grid (issue 17).

Behaviour, not time: an idle node slows its heartbeats and is still listed with fresh
telemetry; a change on the node reaches ``grid.nodes()`` without waiting for work; work brings
Dask's heartbeat interval back; an idle node that is killed or frozen goes offline within the
portal's node timeout. The CPU figures themselves are measured by bench/bench_core.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from conftest import Portal, start_volunteer, wait_for

from grid_portal import settings
from grid_portal.node.agent import policy_needs
from grid_portal.node.plugin import telemetry_changed
from grid_portal.node.policy import policy_from_options
from grid_portal.node.probe import TelemetrySampler

# The packaged idle heartbeat interval (grid-portal.volunteer.idle-heartbeat-interval).
IDLE_HEARTBEAT_INTERVAL = settings.value("volunteer.idle-heartbeat-interval")

# What the admin's client.run sends is pickled by value: the node need not import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

NODE_TIMEOUT = settings.value("portal.node-timeout")  # the portal's default


def _pacing(dask_worker: Any) -> dict[str, float]:
    """On the node (through the admin's client.run): its heartbeat timer."""
    return {"heartbeat": dask_worker.periodic_callbacks["heartbeat"].callback_time / 1000}


def _report_network(bandwidth: float, dask_worker: Any = None) -> None:
    """On the node: what the agent does after re-measuring its link to the portal."""
    dask_worker.plugins["grid-node"].network = {
        "bandwidth": bandwidth,
        "rtt": 0.001,
        "measured_at": time.time(),
    }


def _heartbeat_of(grid: Any, name: str) -> float:
    node = grid.node(name)
    assert node is not None and node.online and node.address, node
    return grid.client.run(_pacing, workers=[node.address])[node.address]["heartbeat"]


# -- the pieces, in process -------------------------------------------------------------------
def test_telemetry_changed_ignores_noise_and_sees_what_matters():
    base = {
        "time": 1.0,
        "cpu_percent": 20.0,
        "grid_cpu_percent": 0.0,
        "memory_percent": 40.0,
        "running_tasks": 0,
        "policy": {"state": None, "reason": None},
        "gpus": [{"index": 0, "utilization": 0.0, "memory_used": 2**30, "temperature": 40.0}],
    }
    same = {**base, "time": 9.0, "cpu_percent": 23.0, "memory_percent": 40.4}
    assert telemetry_changed(None, base)
    assert not telemetry_changed(base, same)
    assert telemetry_changed(base, {**base, "cpu_percent": 45.0})
    assert telemetry_changed(base, {**base, "running_tasks": 1})
    assert telemetry_changed(base, {**base, "policy": {"state": "paused", "reason": "owner"}})
    assert telemetry_changed(base, {**base, "network": {"bandwidth": 1e6}})
    hot = [{**base["gpus"][0], "temperature": 60.0}]
    assert telemetry_changed(base, {**base, "gpus": hot})
    assert telemetry_changed(base, {**base, "gpus": []})


def test_rules_read_only_what_they_need():
    assert policy_needs(None) == frozenset()
    assert policy_needs(policy_from_options()) == frozenset()  # a bare volunteer reads nothing
    assert policy_needs(policy_from_options(hours="18:00-08:00")) == frozenset()
    assert policy_needs(policy_from_options(max_owner_load=50)) == {"load"}
    assert policy_needs(policy_from_options(pause_on_battery=True)) == {"sensors"}
    assert policy_needs(policy_from_options(idle_only=True)) == {"load", "sensors"}


def test_sampler_lists_processes_again_when_tasks_run(tmp_path: Path):
    # The sampled process starts a CPU-bound child after the first listing. While no task
    # runs the list is reused (relist_interval); once a task runs it is read again.
    go = tmp_path / "go"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.05)\n"
            "subprocess.run([sys.executable, '-c', 'while True: pass'])",
        ],
        start_new_session=True,
    )
    try:
        sampler = TelemetrySampler(
            gpus=[], min_interval=0, process=psutil.Process(parent.pid), relist_interval=3600
        )
        go.touch()
        wait_for(lambda: psutil.Process(parent.pid).children(), what="the busy child")
        time.sleep(0.5)  # a measuring window for cpu_percent, not a synchronisation
        assert sampler.sample(running_tasks=0).grid_cpu_percent < 50
        sampler.sample(running_tasks=1)  # lists the child (its first reading is a baseline)

        def busy() -> bool:
            time.sleep(0.2)  # a measuring window again
            return sampler.sample(running_tasks=1).grid_cpu_percent > 50

        wait_for(busy, timeout=15, what="the child's CPU to count")
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)


# -- a real portal and real volunteers --------------------------------------------------------
def test_idle_volunteer_slows_down_stays_live_and_speeds_up_for_work(
    portal: Portal, tmp_path: Path
):
    start_volunteer(portal, tmp_path, "quiet", "--cpus", "1", "--memory", "1GB")
    with portal.grid() as grid:
        # Idle: heartbeats slow down to the idle interval...
        wait_for(
            lambda: _heartbeat_of(grid, "quiet") >= IDLE_HEARTBEAT_INTERVAL,
            timeout=30,
            what="the idle node's heartbeats to slow down",
        )
        # ...and the node is still listed with telemetry that keeps coming.
        first = wait_for(lambda: grid.node("quiet").telemetry, what="telemetry")
        assert first.cpu_percent is not None and first.memory_used > 0
        wait_for(
            lambda: grid.node("quiet").telemetry.time > first.time,
            timeout=3 * IDLE_HEARTBEAT_INTERVAL,
            what="fresh telemetry from the idle node",
        )
        assert _heartbeat_of(grid, "quiet") >= IDLE_HEARTBEAT_INTERVAL  # still idle

        # A change on the node (the agent re-measured the network) is sent by itself, while
        # the node stays idle.
        address = grid.node("quiet").address
        grid.client.run(_report_network, 123456.0, workers=[address])
        wait_for(
            lambda: grid.node("quiet").capacity.network.bandwidth == 123456.0,
            timeout=2 * IDLE_HEARTBEAT_INTERVAL,
            what="the changed telemetry to reach the portal",
        )
        assert _heartbeat_of(grid, "quiet") >= IDLE_HEARTBEAT_INTERVAL  # and stays idle

        # Work arrives: Dask's own heartbeat interval comes back while it runs.
        from gridtasks import where_and_what

        future = grid.submit(where_and_what, 1, 20.0)
        wait_for(
            lambda: _heartbeat_of(grid, "quiet") < IDLE_HEARTBEAT_INTERVAL,
            timeout=15,
            what="heartbeats to speed up for work",
        )
        wait_for(
            lambda: (grid.node("quiet").telemetry.running_tasks or 0) >= 1,
            timeout=10,
            what="the running task in the node's telemetry",
        )
        assert future.result(timeout=60) == ("quiet", 1)
        # Idle again: slow again.
        wait_for(
            lambda: _heartbeat_of(grid, "quiet") >= IDLE_HEARTBEAT_INTERVAL,
            timeout=30,
            what="heartbeats to slow down after the work",
        )


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_idle_volunteer_goes_offline_within_the_node_timeout(
    portal: Portal, tmp_path: Path, how: str
):
    volunteer = start_volunteer(portal, tmp_path, "doomed", "--cpus", "1", "--memory", "1GB")
    with portal.grid() as grid:
        wait_for(
            lambda: _heartbeat_of(grid, "doomed") >= IDLE_HEARTBEAT_INTERVAL,
            timeout=30,
            what="the idle node's heartbeats to slow down",
        )
        # The sandbox starts the worker in a session of its own: signal every process group
        # of the volunteer's tree (agent, sandbox, worker, task processes) at once.
        root = psutil.Process(volunteer.process.pid)
        groups = {os.getpgid(p.pid) for p in [root, *root.children(recursive=True)]}
        t0 = time.monotonic()
        # Killed: the machine dies. Frozen: it hangs (or its cable is pulled), the connection
        # stays open and only the missing heartbeats tell.
        for group in groups:
            os.killpg(group, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        try:
            wait_for(
                lambda: grid.node("doomed").state == "offline",
                timeout=NODE_TIMEOUT + 10,
                interval=0.2,
                what="the node to go offline",
            )
            elapsed = time.monotonic() - t0
            # Within the node timeout, give or take one refresh of a loaded test machine.
            assert elapsed <= NODE_TIMEOUT + 2.0, elapsed
        finally:
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
            volunteer.process.wait(30)
