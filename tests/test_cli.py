"""The command line: bad input gets one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Portal, grid_portal_command, start_portal, start_volunteer, wait_for

from grid_portal.portal.security import ca_pin
from grid_portal.portal.tokens import TokenStore


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        grid_portal_command(*args), capture_output=True, text=True, timeout=timeout
    )


def assert_clear_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "no message on stderr"
    message = lines[-1]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_teaches_and_imports_no_dask() -> None:
    result = run("--help")
    assert result.returncode == 0
    for word in ("serve", "volunteer", "token", "nodes", "status"):
        assert word in result.stdout
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, grid_portal, grid_portal.cli; "
            "print('distributed' in sys.modules or 'dask' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.strip() == "False"
    assert "--token" in run("volunteer", "--help").stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--cpus", "0"), ("--cpus 0", "at least 1")),
        (("--cpus", "100000"), ("logical CPUs", "--oversubscribe")),
        (("--memory", "10XB"), ("unknown unit 'XB'",)),
        (("--memory", "100PB"), ("memory", "--oversubscribe")),
        (("--gpus", "3"), ("GPU",)),
    ],
)
def test_bad_volunteer_options_are_refused_before_contacting_anyone(
    args: tuple[str, ...], fragments: tuple[str, ...], tmp_path: Path
) -> None:
    token = "gpt_" + "ab" * 24 + "_" + "cd" * 16
    result = run(
        "volunteer", "https://127.0.0.1:9", "--token", token, "--state-dir", str(tmp_path), *args
    )
    assert_clear_error(result, *fragments)


def test_malformed_token_is_refused(tmp_path: Path) -> None:
    result = run(
        "volunteer", "https://127.0.0.1:9", "--token", "hello", "--state-dir", str(tmp_path)
    )
    assert_clear_error(result, "not a Grid Portal join token")


def test_portal_that_is_down_or_wrong(portal: Portal, tmp_path: Path) -> None:
    token = portal.token()
    down = f"https://127.0.0.1:{_free_port()}"
    assert_clear_error(
        run("volunteer", down, "--token", token, "--state-dir", str(tmp_path)),
        "cannot reach the portal",
    )
    assert_clear_error(
        run("volunteer", "http://127.0.0.1:1", "--token", token, "--state-dir", str(tmp_path)),
        "HTTPS only",
    )
    # Another portal's URL: its CA does not match the token's pin; the token is not sent.
    other = start_portal(tmp_path / "other")
    try:
        assert_clear_error(
            run("volunteer", other.http, "--token", token, "--state-dir", str(tmp_path)),
            "not the portal this token belongs to",
        )
    finally:
        other.stop()


def test_wrong_expired_and_used_up_tokens_are_refused(portal: Portal, tmp_path: Path) -> None:
    pin = portal.token().rsplit("_", 1)[1]
    assert pin == ca_pin(
        json.loads((portal.data_dir / "portal.json").read_text())["ca_fingerprint"]
    )
    wrong = "gpt_" + "0" * 48 + "_" + pin
    assert_clear_error(
        run("volunteer", portal.http, "--token", wrong, "--state-dir", str(tmp_path / "a")),
        "refused",
        "not known to this portal",
    )
    store = TokenStore(portal.data_dir / "ledger.sqlite")
    expired = store.create(ttl=60, uses=None, pin=pin, now=0).text
    assert_clear_error(
        run("volunteer", portal.http, "--token", expired, "--state-dir", str(tmp_path / "b")),
        "expired",
    )
    once = portal.token("--uses", "1")
    start_volunteer(portal, tmp_path, "first", "--cpus", "1", "--memory", "1GB", token=once)
    assert_clear_error(
        run("volunteer", portal.http, "--token", once, "--state-dir", str(tmp_path / "c")),
        "used up",
    )


def test_token_commands(portal: Portal) -> None:
    created = run(
        "token",
        "create",
        "--ttl",
        "2h",
        "--uses",
        "3",
        "--note",
        "lab B12",
        "--data-dir",
        str(portal.data_dir),
    )
    assert created.returncode == 0 and created.stdout.startswith("gpt_")
    listing = run("token", "list", "--data-dir", str(portal.data_dir))
    assert "lab B12" in listing.stdout
    assert created.stdout.strip().split("_")[1] not in listing.stdout  # never the secret
    assert_clear_error(
        run("token", "create", "--ttl", "soon", "--data-dir", str(portal.data_dir)), "duration"
    )
    assert_clear_error(
        run("token", "create", "--data-dir", str(portal.data_dir / "nope")), "no portal"
    )


def test_nodes_and_status_commands(portal: Portal, tmp_path: Path) -> None:
    start_volunteer(portal, tmp_path, "desk", "--cpus", "1", "--memory", "1GB")
    table = run("nodes", "--portal", portal.connection_file)
    assert table.returncode == 0 and "desk" in table.stdout and "online" in table.stdout
    status = run("status", "--portal", portal.connection_file)
    assert "1 nodes online" in status.stdout
    totals = json.loads(run("status", "--json", "--portal", portal.connection_file).stdout)
    assert totals["cores_total"] == 1
    missing = run("nodes", "--portal", str(tmp_path / "missing.json"))
    assert_clear_error(missing, "no connection file")


def test_volunteer_rejoins_after_the_portal_restarts(tmp_path: Path) -> None:
    ports = ("--port", str(_free_port()), "--http-port", str(_free_port()))
    portal = start_portal(tmp_path, *ports)
    volunteer = start_volunteer(portal, tmp_path, "faithful", "--cpus", "1", "--memory", "1GB")
    portal.process.kill()
    portal.process.wait()
    restarted = start_portal(tmp_path, *ports)
    try:
        with restarted.grid() as grid:
            wait_for(
                lambda: any(n.name == "faithful" and n.online for n in grid.nodes()),
                timeout=60,
                what="the volunteer to rejoin by itself",
            )
        assert volunteer.process.poll() is None
    finally:
        volunteer.kill()
        restarted.stop()
        portal.stop()


def test_a_worker_without_a_certificate_is_refused(portal: Portal) -> None:
    code = (
        "import asyncio\n"
        "from distributed import Security, Worker\n"
        "async def main():\n"
        # It trusts the portal's CA but has no certificate of its own to show.
        f"    security = Security(tls_ca_file={str(portal.data_dir / 'ca' / 'ca.pem')!r}, "
        "require_encryption=True)\n"
        f"    w = Worker({portal.scheduler!r}, security=security, death_timeout=3)\n"
        "    try:\n"
        "        await w\n"
        "    except Exception as e:\n"
        "        print('REFUSED', type(e).__name__)\n"
        "        return\n"
        "    print('JOINED')\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert "REFUSED" in result.stdout, result.stdout + result.stderr
    with portal.grid() as grid:
        assert grid.nodes() == []


def test_revoked_node_is_disconnected_at_once_and_cannot_rejoin(
    portal: Portal, tmp_path: Path
) -> None:
    volunteer = start_volunteer(portal, tmp_path, "rogue", "--cpus", "1", "--memory", "1GB")
    result = run("nodes", "revoke", "rogue", "--portal", portal.connection_file)
    assert result.returncode == 0, result.stderr
    assert "revoked rogue" in result.stdout
    with portal.grid() as grid:
        wait_for(lambda: grid.node("rogue").state.value == "offline", what="rogue disconnected")
        assert grid.node("rogue").reason == "revoked"
        # The volunteer keeps trying to rejoin; the portal keeps refusing it.
        wait_for(
            lambda: "revoked by the portal" in portal.log.read_text(),
            timeout=60,
            what="a refused rejoin",
        )
        assert not grid.client.scheduler_info()["workers"]
    assert_clear_error(
        run("nodes", "revoke", "nobody", "--portal", portal.connection_file),
        "no node named 'nobody'",
    )
    volunteer.kill()


def test_a_client_certificate_cannot_join_as_a_worker(portal: Portal) -> None:
    """An admin or researcher certificate is not a node's: it may not run a worker."""
    code = (
        "import asyncio, json\n"
        "from distributed import Worker\n"
        "from grid_portal.connection import Connection\n"
        f"conn = Connection.load({portal.connection_file!r})\n"
        "async def main():\n"
        "    w = Worker(conn.scheduler, security=conn.security(), name='impostor', death_timeout=5)\n"
        "    try:\n"
        "        await w\n"
        "    except Exception as e:\n"
        "        print('REFUSED', e)\n"
        "        return\n"
        "    print('JOINED')\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert "REFUSED" in result.stdout, result.stdout + result.stderr
    assert "only enrolled volunteer nodes" in portal.log.read_text()


def test_an_incompatible_machine_is_refused_before_its_token_is_spent(portal: Portal) -> None:
    import ssl
    import urllib.error
    import urllib.request

    from grid_portal.keys import make_key_and_csr

    ping = json.loads(
        urllib.request.urlopen(
            f"{portal.http}/api/ping", context=ssl._create_unverified_context()
        ).read()
    )
    assert {"python", "dask", "distributed", "cloudpickle"} <= set(ping["versions"])
    token = portal.token("--uses", "1")
    _, csr = make_key_and_csr("old-laptop")
    old = {**ping["versions"], "distributed": "2020.1.0"}
    request = urllib.request.Request(
        f"{portal.http}/api/enrol",
        data=json.dumps(
            {"token": token, "csr": csr, "name": "old-laptop", "versions": old}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=ssl._create_unverified_context())
    assert refused.value.code == 403
    message = json.loads(refused.value.read())["error"]
    assert "distributed 2020.1.0 here" in message and "pip install" in message
    # The token was not spent: a matching machine can still use it.
    (record,) = [
        t for t in TokenStore(portal.data_dir / "ledger.sqlite").list() if t.uses_total == 1
    ]
    assert record.uses_left == 1


def test_a_researcher_logs_in_with_a_client_token(portal: Portal, tmp_path: Path) -> None:
    token = portal.token("--for", "client")
    output = tmp_path / "alice.json"
    result = run("login", portal.http, "--token", token, "--name", "alice", "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert output.stat().st_mode & 0o777 == 0o600
    from grid_portal import Grid

    with Grid(str(output), start_embedded=False) as grid:
        assert grid.whoami() == {"role": "client", "name": "alice"}
    status = run("status", "--portal", str(output))
    assert status.returncode == 0 and "nodes online" in status.stdout
    # A volunteer's token does not make a researcher.
    assert_clear_error(
        run("login", portal.http, "--token", portal.token(), "--output", str(tmp_path / "x.json")),
        "for volunteer machines",
    )


def test_lab_runs_the_jupyterlab_of_its_own_interpreter(tmp_path: Path) -> None:
    import jupyterlab

    # Another Python's `jupyter`, first on the PATH: grid-portal lab must not run it.
    marker = tmp_path / "wrong-jupyter-ran"
    fake = tmp_path / "bin" / "jupyter"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {marker}\necho 0.0.0-wrong\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        grid_portal_command("lab", "--version"), capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result
    assert result.stdout.strip() == jupyterlab.__version__
    assert not marker.exists()


def test_a_new_name_in_a_state_dir_that_holds_another_node_is_refused_with_advice(
    portal: Portal, tmp_path: Path
) -> None:
    start_volunteer(portal, tmp_path, "alpha", "--cpus", "1", "--memory", "1GB")
    token = portal.token()  # one use
    state = tmp_path / "state-alpha"  # where start_volunteer keeps alpha's certificate
    result = run(
        "volunteer", portal.http, "--token", token, "--name", "beta", "--state-dir", str(state),
        "--cpus", "1", "--memory", "1GB",
    )  # fmt: skip
    assert_clear_error(result, "'alpha'", "leave out --name", f"--state-dir {state}-beta")
    # The advice works, and the token was not spent on the refusal.
    start_volunteer(portal, tmp_path, "beta", "--cpus", "1", "--memory", "1GB", token=token)
    with portal.grid() as grid:
        assert {n.name for n in grid.nodes() if n.online} == {"alpha", "beta"}


def test_the_name_a_node_asked_for_still_means_it_after_the_portal_changed_it(
    tmp_path: Path,
) -> None:
    from grid_portal.errors import UsageError
    from grid_portal.node.agent import enrol

    pin = "cd" * 16
    token = "gpt_" + "ab" * 24 + "_" + pin
    saved = tmp_path / pin / "node.json"
    saved.parent.mkdir()
    paths = {"scheduler": "tls://127.0.0.1:9", "ca": "ca.pem", "cert": "c.pem", "key": "k.pem"}
    # Enrolled as "laptop", named "laptop-2" by the portal (another laptop came first).
    saved.write_text(json.dumps({"name": "laptop-2", "requested_name": "laptop", **paths}))
    for name in ("laptop", "laptop-2"):
        assert enrol("https://127.0.0.1:9", token, name, tmp_path).name == "laptop-2"
    with pytest.raises(UsageError, match="--state-dir"):
        enrol("https://127.0.0.1:9", token, "laptop-3", tmp_path)
    # No --name: whatever this state dir enrolled as.
    assert enrol("https://127.0.0.1:9", token, "host", tmp_path, name_given=False).name == (
        "laptop-2"
    )
    # A file from before the asked-for name was kept.
    saved.write_text(json.dumps({"name": "my-laptop-2", **paths}))
    assert enrol("https://127.0.0.1:9", token, "my laptop", tmp_path).name == "my-laptop-2"
    with pytest.raises(UsageError, match="--state-dir"):
        enrol("https://127.0.0.1:9", token, "desk", tmp_path)
