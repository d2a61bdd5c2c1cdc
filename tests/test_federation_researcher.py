"""A researcher's one Grid over several portals (issue 20 points 4 and 5, researcher side).

Two real portals, each with a real volunteer, as processes on loopback; the researcher logs
in to both with the real CLI and uses them from one ``Grid(portals=[...])``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Portal,
    grid_portal_command,
    researcher_connection,
    start_portal,
    start_volunteer,
    wait_for,
)

from grid_portal import Grid
from grid_portal.errors import ConnectionFailed, Unsatisfiable
from grid_portal.federated import PortalWarning


def login(portal: Portal, name: str) -> None:
    token = portal.token("--for", "client")
    out = subprocess.run(
        grid_portal_command("login", portal.http, "--token", token, "--as", name),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"kept as portal '{name}'" in out.stdout


@pytest.fixture(scope="module")
def two_portals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("federation")
    # The logins are this module's: in the session's config dir they would outlive the
    # portals, and a later test with nothing configured would find them (Grid() uses the
    # last login) and wait on a portal that is gone.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CONFIG_HOME", str(tmp / "config"))
        portals = {name: start_portal(tmp / name) for name in ("fed-a", "fed-b")}
        try:
            volunteers = {
                name: start_volunteer(p, tmp / name, f"{name}-vol", "--cpus", "1")
                for name, p in portals.items()
            }
            for name, p in portals.items():
                login(p, name)
            yield {"tmp": tmp, "portals": portals, "volunteers": volunteers}
        finally:
            for p in portals.values():
                p.stop()


def test_login_keeps_each_portal(two_portals: dict[str, Any]) -> None:
    from grid_portal.portals import saved

    kept = saved()
    assert {"fed-a", "fed-b"} <= set(kept)
    a, b = (json.loads(kept[n].read_text()) for n in ("fed-a", "fed-b"))
    assert a["scheduler"] == two_portals["portals"]["fed-a"].scheduler
    assert b["scheduler"] == two_portals["portals"]["fed-b"].scheduler
    assert a["ca"] != b["ca"]  # each portal's own CA, kept apart
    assert kept["fed-a"].stat().st_mode & 0o777 == 0o600


def test_sweep_spreads_over_both_portals_in_order(two_portals: dict[str, Any]) -> None:
    from gridtasks import slow_square

    with Grid(portals=["fed-a", "fed-b"], timeout=20) as grid:
        assert set(grid.portals) == {"fed-a", "fed-b"}
        n = 60
        sweep = grid.map(slow_square, range(n), [0.05] * n)
        assert grid.gather(sweep) == [i * i for i in range(n)]
        ran = sweep.by_portal()
        assert set(ran) == {"fed-a", "fed-b"}, ran  # both portals ran part of it
        assert sum(ran.values()) == n  # every item once
        # One item's own future, as with one portal.
        assert sweep[7].result() == 49 and sweep[7].portal in ran

        nodes = grid.nodes()
        by_portal = {n.portal: n.name for n in nodes if n.online}
        assert by_portal == {"fed-a": "fed-a-vol", "fed-b": "fed-b-vol"}
        assert [n.portal for n in nodes] == sorted(n.portal for n in nodes)  # grouped
        capacity = grid.capacity()
        assert set(capacity.portals) == {"fed-a", "fed-b"}
        assert capacity.cores_total == sum(c.cores_total for c in capacity.portals.values())
        assert capacity.nodes_online == 2
        assert capacity.to_dict()["portals"]["fed-b"]["nodes_online"] == 1


def test_submit_goes_to_a_portal_that_fits(two_portals: dict[str, Any]) -> None:
    from gridtasks import where_and_what

    with Grid(portals="fed-a,fed-b", timeout=20) as grid:
        node, value = grid.submit(where_and_what, 5, where='name == "fed-b-vol"').result(60)
        assert (node, value) == ("fed-b-vol", 5)
        with pytest.raises(Unsatisfiable) as refused:
            grid.submit(where_and_what, 1, where='name == "nowhere"')
        text = str(refused.value)
        assert "fed-a" in text and "fed-b" in text and "no portal has a node" in text


def test_key_names_per_item_are_refused_over_portals(two_portals: dict[str, Any]) -> None:
    from gridtasks import plus_one

    from grid_portal.errors import UsageError

    with Grid(portals=["fed-a", "fed-b"], timeout=20) as grid:
        with pytest.raises(UsageError, match=r"key= does not go with a Grid over several"):
            grid.map(plus_one, [1, 2], key=["k1", "k2"])
        # One portal's own Grid still takes them.
        futures = grid.portals["fed-a"].map(plus_one, [1, 2], key=["fed-k1", "fed-k2"])
        assert grid.portals["fed-a"].gather(futures) == [2, 3]


def test_a_missing_portal_name_says_how_to_log_in() -> None:
    with pytest.raises(Exception, match="no portal is saved as 'nosuch'.*grid-portal login"):
        Grid(portals=["nosuch"])


def _connection_copy(portal: Portal, tmp: Path, user: str, **changes: str) -> str:
    path = Path(researcher_connection(portal, tmp, user))
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return str(path)


def test_an_unreachable_portal_warns_and_the_other_works(
    two_portals: dict[str, Any], tmp_path: Path
) -> None:
    from gridtasks import slow_square

    b = two_portals["portals"]["fed-b"]
    # A portal that is not running: nothing listens at its address any more.
    down = _connection_copy(b, tmp_path, "dora", scheduler="tls://127.0.0.1:9")
    with pytest.warns(PortalWarning, match=r"portal 'down' .*cannot be reached.*other portals"):
        grid = Grid(portals={"fed-a": "fed-a", "down": down}, timeout=3)
    with grid:
        assert list(grid.portals) == ["fed-a"]
        assert grid.gather(grid.map(slow_square, range(40))) == [i * i for i in range(40)]
        assert {n.portal for n in grid.nodes()} == {"fed-a"}


def test_a_portal_whose_ca_changed_warns(two_portals: dict[str, Any], tmp_path: Path) -> None:
    a, b = two_portals["portals"]["fed-a"], two_portals["portals"]["fed-b"]
    # The CA saved at login is not the one portal b answers with now.
    moved = _connection_copy(b, tmp_path, "carl", ca=str(a.data_dir / "ca" / "ca.pem"))
    with pytest.warns(PortalWarning, match=r"'moved' now answers with another certificate"):
        grid = Grid(portals={"fed-a": "fed-a", "moved": moved}, timeout=3)
    grid.close()


def test_a_revoked_certificate_warns(two_portals: dict[str, Any], tmp_path: Path) -> None:
    b = two_portals["portals"]["fed-b"]
    revoked = researcher_connection(b, tmp_path, "rita")
    out = subprocess.run(
        grid_portal_command("certs", "revoke", "rita", "--data-dir", str(b.data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr

    said: list[str] = []

    def refused() -> bool:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                Grid(portals={"fed-a": "fed-a", "gone": revoked}, timeout=3).close()
            except ConnectionFailed:
                return False
        said[:] = [str(w.message) for w in seen]
        return any("'gone' refused your certificate" in m for m in said)

    # The portal re-reads its revocations each second.
    try:
        wait_for(refused, timeout=30, what="portal b to refuse the revoked certificate")
    except AssertionError:
        raise AssertionError(f"warned instead: {said}") from None


def test_an_expired_certificate_warns(two_portals: dict[str, Any], tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    from grid_portal.portal.security import CertificateAuthority, write_private

    b = two_portals["portals"]["fed-b"]
    path = Path(researcher_connection(b, tmp_path, "eve"))
    ca = CertificateAuthority.load_or_create(b.data_dir / "ca")
    past = datetime.now(timezone.utc) - timedelta(days=4)
    cert, key = ca.issue("eve", role="client", not_before=past, not_after=past + timedelta(days=1))
    (tmp_path / "eve.pem").write_text(cert)
    write_private(tmp_path / "eve-key.pem", key)
    with pytest.warns(PortalWarning, match=r"'old': your certificate expired 3 days ago"):
        grid = Grid(portals={"fed-a": "fed-a", "old": str(path)}, timeout=3)
    grid.close()


def test_all_portals_unusable_is_one_error(two_portals: dict[str, Any], tmp_path: Path) -> None:
    b = two_portals["portals"]["fed-b"]
    down = _connection_copy(b, tmp_path, "dan", scheduler="tls://127.0.0.1:9")
    with pytest.raises(ConnectionFailed, match="none of the portals can be used.*'down'"):
        Grid(portals={"down": down}, timeout=2)


def test_a_map_cell_in_a_real_kernel_runs_over_both_portals(two_portals: dict[str, Any]) -> None:
    import os

    from jupyter_client.manager import KernelManager

    env = dict(os.environ, GRID_PORTAL_PORTALS="fed-a,fed-b")  # every Grid() in it: both
    env.pop("GRID_PORTAL_ADDRESS", None)
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    shown: list[str] = []

    def hook(msg: dict) -> None:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            shown.append(content["text"])
        elif msg["msg_type"] == "error":
            shown.append("\n".join(content["traceback"]))

    try:
        kc.wait_for_ready(timeout=60)
        for code in (
            "%load_ext grid_portal",
            "%%grid --map x in range(12)\nsquare = x * x\nprint('ran', x)",
            "print('squares', square)",
        ):
            reply = kc.execute_interactive(code, timeout=180, output_hook=hook)
            assert reply["content"]["status"] == "ok", "".join(shown)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    text = "".join(shown)
    assert f"squares {[x * x for x in range(12)]}" in text, text
    assert all(f"ran {x}" in text for x in range(12)), text
    with Grid(portals=["fed-a", "fed-b"], timeout=20) as grid:
        cells = {
            name: {j.id for j in member.jobs() if j.kind == "cell" and j.tasks_done}
            for name, member in grid.portals.items()
        }
    assert cells["fed-a"] & cells["fed-b"], cells  # one job id, a part at each portal


def test_a_plain_grid_beside_one_over_portals_keeps_its_speed(
    two_portals: dict[str, Any],
) -> None:
    """Dask's ``wait`` ran on the process's default client: once a Grid over portals had made
    its first portal's client the default, a plain Grid's sweep waited for its probe through
    that other client and saw it end up to 4 s late, each time."""
    import time

    from gridtasks import plus_one

    a = two_portals["portals"]["fed-a"]
    with (
        Grid(a.connection_file, start_embedded=False) as plain,
        Grid(portals=["fed-a", "fed-b"], timeout=20),  # its first client is the default
    ):
        plain.gather(plain.map(plus_one, range(100)))  # warm
        started = time.monotonic()
        for _ in range(3):
            assert plain.gather(plain.map(plus_one, range(100))) == list(range(1, 101))
        took = time.monotonic() - started
    assert took < 4.0, f"three sweeps of 100 tiny items took {took:.1f} s"


def test_the_jupyter_servers_grid_stays_on_one_portal(
    two_portals: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Jupyter server's own Grid (jobs, the live feed, cells) is on one portal, so
    GRID_PORTAL_PORTALS (for kernels) leaves it on the portal logged in to last; the sidebar
    lists the other portals' nodes through GET portals (tests/test_sidebar_portals.py)."""
    import asyncio

    from grid_portal.jupyter.service import GridPortal

    monkeypatch.setenv("GRID_PORTAL_PORTALS", "fed-a,fed-b")

    async def listed() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        service = GridPortal()
        try:
            return await service.run(lambda grid: (grid.portals, grid.nodes(as_dict=True)))
        finally:
            await service.close()

    portals, nodes = asyncio.run(listed())
    assert len(portals) == 1
    assert [n["name"] for n in nodes if n["state"] != "offline"] == ["fed-b-vol"]
    assert all("portal" not in n for n in nodes)


def test_a_sweep_moves_off_a_portal_whose_volunteer_stopped(
    two_portals: dict[str, Any], tmp_path: Path
) -> None:
    """Last: it stops portal b's volunteer."""
    from gridtasks import slow_square

    with Grid(portals=["fed-a", "fed-b"], timeout=20) as grid:
        n = 40
        sweep = grid.map(slow_square, range(n), [0.25] * n, batch=2)
        member_b = grid.portals["fed-b"]

        def b_running() -> bool:
            return any(j.state.value == "running" for j in member_b.jobs())

        wait_for(b_running, timeout=60, what="portal b to run part of the sweep")
        two_portals["volunteers"]["fed-b"].kill(signal.SIGKILL)
        assert grid.gather(sweep) == [i * i for i in range(n)]
        assert sum(sweep.by_portal().values()) == n
        assert sweep.moved >= 1  # what portal b held when it lost its node ran on a
        assert sweep.by_portal().get("fed-a", 0) > n // 2
    shutil.rmtree(tmp_path, ignore_errors=True)
