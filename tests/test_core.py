"""The grid core end to end: a real portal and real volunteers as processes on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Portal, grid_portal_command, start_volunteer, wait_for
from gridtasks import burn, plus_one, slow_square, where_and_what

from grid_portal.errors import Unsatisfiable
from grid_portal.model import NodeState


def _nodes_json(portal: Portal) -> list[dict]:
    out = subprocess.run(
        grid_portal_command("nodes", "--json", "--portal", portal.connection_file),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_two_volunteers_join_with_their_capacity_and_live_telemetry(
    portal: Portal, tmp_path: Path
) -> None:
    start_volunteer(
        portal, tmp_path, "small", "--cpus", "1", "--memory", "1GB", "--label", "room=B12"
    )
    start_volunteer(portal, tmp_path, "large", "--cpus", "2", "--memory", "2GB")

    records = {r["name"]: r for r in _nodes_json(portal)}
    assert set(records) == {"small", "large"}
    assert records["small"]["offer"]["cpus"] == 1
    assert records["small"]["offer"]["memory"] == 1_000_000_000
    assert records["large"]["offer"]["cpus"] == 2
    assert records["large"]["offer"]["memory"] == 2_000_000_000
    assert records["small"]["labels"] == {"room": "B12"}
    capacity = records["large"]["capacity"]
    assert capacity["cores_logical"] >= 1 and capacity["memory_total"] > 0
    assert capacity["os"] == "linux" and capacity["python"]
    assert capacity["gpus"] == []  # no GPU here, and no warning about it
    assert capacity["network"]["rtt"] is not None and capacity["network"]["bandwidth"] > 0

    with portal.grid() as grid:
        nodes = {n.name: n for n in grid.nodes()}
        assert nodes["small"].offer.cpus == 1 and nodes["large"].offer.cpus == 2
        assert all(n.state is NodeState.ONLINE for n in nodes.values())
        totals = grid.capacity()
        assert totals.nodes_online == 2 and totals.cores_total == 3

        # Telemetry changes when a node is loaded.
        wait_for(lambda: grid.node("small").telemetry is not None, what="first telemetry")
        future = grid.submit(burn, 6.0, cpus=1, workers=["small"], allow_other_workers=False)

        def loaded() -> bool:
            node = grid.node("small")
            t = node.telemetry
            return (
                node.state is NodeState.BUSY
                and t is not None
                and t.grid_cpu_percent > 50
                and t.running_tasks == 1
            )

        wait_for(loaded, timeout=15, what="the small node to report its load")
        assert grid.capacity().cores_free == 2  # one of three cores taken
        assert future.result(timeout=30) == "small"
        assert len(grid.node("small").history) >= 2


def test_a_task_needing_two_cpus_runs_only_where_two_are_offered(
    portal: Portal, tmp_path: Path
) -> None:
    start_volunteer(portal, tmp_path, "one", "--cpus", "1", "--memory", "1GB")
    start_volunteer(portal, tmp_path, "two", "--cpus", "2", "--memory", "1GB")
    with portal.grid() as grid:
        futures = [grid.submit(where_and_what, i, 0.2, cpus=2) for i in range(6)]
        results = grid.gather(futures)
        assert [value for _, value in results] == list(range(6))
        assert {where for where, _ in results} == {"two"}

        # Nothing offers a GPU: refused at once, naming what the largest node offers.
        started = time.monotonic()
        with pytest.raises(
            Unsatisfiable,
            match=r"no node on the grid offers 1 CPU, 1 GPU.*largest offers 2 CPUs, 0 GPUs",
        ):
            grid.submit(where_and_what, 1, gpus=1)
        assert time.monotonic() - started < 5

        # The largest offer is kept: seconds old, it still accepts at once and is renewed in
        # the background; a refusal always asks the portal again (a node may have just joined).
        aged = time.monotonic() - 10
        grid._largest = (aged, {"CPU": 2, "GPU": 0, "MEMORY": 1e9})
        grid.check(grid.requirement(cpus=2))
        wait_for(lambda: grid._largest[0] > aged + 5, timeout=10, what="the offer renewed")
        grid._largest = (time.monotonic(), {"CPU": 1, "GPU": 0, "MEMORY": 1e9})
        grid.check(grid.requirement(cpus=2))  # refused by the kept copy, accepted afresh


def test_killed_volunteer_goes_offline_and_its_task_reruns_elsewhere(
    portal: Portal, tmp_path: Path
) -> None:
    doomed = start_volunteer(portal, tmp_path, "doomed", "--cpus", "1", "--memory", "1GB")
    start_volunteer(portal, tmp_path, "survivor", "--cpus", "1", "--memory", "1GB")
    with portal.grid() as grid:
        future = grid.submit(where_and_what, 42, 4.0, workers=["doomed"], allow_other_workers=True)
        wait_for(
            lambda: grid.node("doomed").state is NodeState.BUSY, what="the task to start on doomed"
        )
        doomed.kill(signal.SIGKILL)
        where, value = future.result(timeout=60)
        assert (where, value) == ("survivor", 42)
        wait_for(lambda: grid.node("doomed").state is NodeState.OFFLINE, what="doomed offline")
        node = grid.node("doomed")
        assert node.last_seen is not None and node.last_seen <= time.time()


def test_a_task_cancelled_as_it_starts_never_runs_on(portal: Portal, tmp_path: Path) -> None:
    """A cancel can reach the node while the task's process is still being readied; the task
    must not start then, or it runs on (here for two minutes) and holds the node's one slot."""
    start_volunteer(portal, tmp_path, "solo", "--cpus", "1", "--memory", "1GB")
    with portal.grid() as grid:
        for attempt in range(3):  # the cancel lands at another moment of the start each time
            doomed = grid.submit(slow_square, attempt, 120, workers=["solo"])
            wait_for(lambda: grid.node("solo").state is NodeState.BUSY, what="the start")
            doomed.cancel()
            after = grid.submit(plus_one, attempt, workers=["solo"])
            assert after.result(timeout=30) == attempt + 1


def test_sigterm_mid_task_lets_the_task_finish_then_leaves(portal: Portal, tmp_path: Path) -> None:
    leaving = start_volunteer(portal, tmp_path, "leaving", "--cpus", "1", "--memory", "1GB")
    start_volunteer(portal, tmp_path, "staying", "--cpus", "1", "--memory", "1GB")
    with portal.grid() as grid:
        future = grid.submit(where_and_what, 7, 3.0, workers=["leaving"], allow_other_workers=True)
        wait_for(lambda: grid.node("leaving").state is NodeState.BUSY, what="task on leaving")
        leaving.process.send_signal(signal.SIGTERM)
        assert future.result(timeout=60) == ("leaving", 7)  # it finished where it started
        assert leaving.process.wait(60) == 0
        assert "Left the grid" in leaving.output()
        wait_for(lambda: grid.node("leaving").state is NodeState.OFFLINE, what="leaving offline")
        assert future.result() == ("leaving", 7)  # its result moved, nothing lost


def test_secrets_never_appear_in_logs_or_node_records(portal: Portal, tmp_path: Path) -> None:
    token = portal.token()
    volunteer = start_volunteer(
        portal, tmp_path, "quiet", "--cpus", "1", "--memory", "1GB", token=token
    )
    secret = token.split("_")[1]
    key = (tmp_path / "state-quiet").rglob("node-key.pem")
    key_text = next(key).read_text()
    key_body = key_text.splitlines()[1]
    records = json.dumps(_nodes_json(portal))
    for text in (records, volunteer.output(), portal.log.read_text()):
        assert secret not in text
        assert key_body not in text
    for path in [
        *portal.data_dir.rglob("*key*.pem"),
        *(tmp_path / "state-quiet").rglob("*key*.pem"),
    ]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert (portal.data_dir / "connection.json").stat().st_mode & 0o777 == 0o600


def test_the_network_to_the_portal_is_measured_again_now_and_then(
    portal: Portal, tmp_path: Path
) -> None:
    start_volunteer(
        portal, tmp_path, "roamer", "--cpus", "1", "--memory", "1GB", "--network-refresh", "2s"
    )
    with portal.grid() as grid:
        first = grid.node("roamer").capacity.network.measured_at
        assert first is not None
        wait_for(
            lambda: grid.node("roamer").capacity.network.measured_at > first,
            timeout=60,
            what="a fresh measurement of bandwidth and round trip",
        )
        assert grid.node("roamer").capacity.network.bandwidth > 0
