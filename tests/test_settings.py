"""One configuration system for the portal and the volunteer: grid-portal.yaml in dask.config.

The packaged yaml matches its schema and every key is described and documented; a value set
through dask.config or a DASK_GRID_PORTAL__... variable reaches a real portal; flags win over
it, and a volunteer's file wins over the yaml; a wrong value is one clear line; no module
writes a moved default again; making the portal's plugin changes no global Dask setting.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import dask.config
import jsonschema
import pytest
from conftest import Portal, grid_portal_command, portal_with, wait_for

from grid_portal import settings
from grid_portal.cli import _volunteer_settings, build_parser
from grid_portal.errors import UsageError
from grid_portal.node.agent import VolunteerOptions
from grid_portal.node.policy import SETTING_KEYS
from grid_portal.portal.fairshare import FairShare
from grid_portal.portal.join_requests import JoinRequests
from grid_portal.portal.plugin import PortalPlugin
from grid_portal.portal.server import PortalConfig

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "grid_portal"
DOCS = ROOT / "docs" / "configuration.md"


# -- the yaml, the schema, the docs -----------------------------------------------------------
def test_the_packaged_yaml_is_valid_under_its_schema() -> None:
    schema = settings.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(settings.packaged_defaults()))
    assert not errors, [e.message for e in errors]
    settings.check()  # and what dask.config holds here (the yaml, registered) passes the check


def test_every_key_is_described_and_has_a_default() -> None:
    def walk(path: str, node: dict[str, Any]) -> None:
        assert str(node.get("description", "")).strip(), f"{path} has no description"
        for name, sub in node.get("properties", {}).items():
            walk(f"{path}.{name}", sub)

    walk("grid-portal", settings.schema()["properties"]["grid-portal"])
    defaults = settings.packaged_defaults()["grid-portal"]
    for key, _ in settings.leaf_keys():
        node: Any = defaults
        for part in key.split("."):
            assert part in node, f"grid-portal.yaml has no default for {key}"
            node = node[part]
    for name in settings.schema()["$defs"]:
        assert settings.schema()["$defs"][name].get("description"), name


def test_the_docs_list_every_key_as_the_schema_describes_it() -> None:
    text = DOCS.read_text()
    table = settings.settings_table_markdown()
    assert table in text, (
        "docs/configuration.md's settings table is out of date: paste "
        "`python -m grid_portal.settings` between its markers"
    )
    for key, _ in settings.leaf_keys():
        assert settings.env_name(key) in text, key
    assert "docs/configuration.md" in (ROOT / "README.md").read_text()


def test_the_volunteer_file_takes_every_volunteer_setting() -> None:
    names = {
        k.partition(".")[2].replace("-", "_")
        for k, _ in settings.leaf_keys()
        if k.startswith("volunteer.")
    }
    assert set(SETTING_KEYS) == names


# -- values reach the portal and the volunteer -----------------------------------------------
def test_a_dask_config_value_reaches_the_portal_and_volunteer_objects() -> None:
    with dask.config.set(
        {
            "grid-portal.portal.node-timeout": "42s",
            "grid-portal.portal.result-ttl": "2d",
            "grid-portal.volunteer.drain-timeout": "5m",
            "grid-portal.volunteer.telemetry-interval": 1.5,
        }
    ):
        config = PortalConfig(data_dir=Path("unused"))
        plugin = PortalPlugin()
        options = VolunteerOptions(cpus=1, memory=2**30)
    assert config.node_timeout == 42.0 and plugin.node_timeout == 42.0
    assert config.result_ttl == plugin.jobs.result_ttl == 2 * 86400.0
    assert options.drain_timeout == 300.0 and options.telemetry_interval == 1.5
    # Made outside the block: the packaged defaults again.
    assert PortalConfig(data_dir=Path("unused")).node_timeout == 15.0
    assert VolunteerOptions(cpus=1, memory=2**30).drain_timeout == 120.0


def test_the_fair_share_half_life_is_the_setting_unless_the_admin_set_one(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    assert FairShare(ledger).half_life == 86400.0  # the packaged 1d
    with dask.config.set({"grid-portal.portal.fair-share-half-life": "7d"}):
        assert FairShare(ledger).half_life == 7 * 86400.0
        FairShare(ledger).set_half_life(3600.0)  # `grid-portal fairshare --half-life 1h`
        assert FairShare(ledger).half_life == 3600.0  # kept in the ledger: it wins


def test_a_join_request_expires_after_the_configured_time(tmp_path: Path) -> None:
    from grid_portal.keys import make_key_and_csr
    from grid_portal.portal.security import CertificateAuthority

    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    book = JoinRequests(tmp_path / "ledger.sqlite")
    _, csr = make_key_and_csr("m")
    with dask.config.set({"grid-portal.portal.join-request-ttl": "2m"}):
        record, _ = book.create("m", "node", csr, ca.cert_pem, "10.0.0.9", now=1000.0)
    assert record.expires_at == 1000.0 + 120.0
    assert [r.id for r in book.list(now=1119.0)] == [record.id]
    assert book.list(now=1121.0) == []


def test_the_requester_is_told_when_its_join_request_expires() -> None:
    import time

    from grid_portal.joining import PendingJoin, _expires_in

    def told(expires_at: float) -> str:
        return _expires_in(PendingJoin("https://p", "", "id", "123456", "s", expires_at))

    assert told(time.time() + 120) == "2 minutes"  # a portal configured for 2m
    assert told(time.time() + 600) == "10 minutes"  # the packaged default
    assert told(0.0) == "10 minutes"  # an older portal's reply says nothing


def test_configure_jupyterhub_takes_the_configured_ports(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from grid_portal.portal.hub import configure_jupyterhub

    c = SimpleNamespace(
        JupyterHub=SimpleNamespace(services=[]), Spawner=SimpleNamespace(environment={})
    )
    with dask.config.set({"grid-portal.portal.http-port": 9443}):
        env = configure_jupyterhub(c, data_dir=tmp_path / "p", host="10.1.2.3")
    command = c.JupyterHub.services[0]["command"]
    flags = {flag: command[command.index(flag) + 1] for flag in ("--host", "--port", "--http-port")}
    assert flags["--host"] == "10.1.2.3" and flags["--port"] == "8786"
    assert flags["--http-port"] == "9443"
    assert env["GRID_PORTAL_URL"] == "https://10.1.2.3:9443"


def test_an_environment_variable_is_read_as_the_setting(tmp_path: Path) -> None:
    code = (
        "import grid_portal.settings as s; "
        "print(s.value('portal.node-timeout'), s.value('volunteer.reconnect-max'))"
    )
    env = {
        **os.environ,
        "DASK_GRID_PORTAL__PORTAL__NODE_TIMEOUT": "1m",
        "DASK_GRID_PORTAL__VOLUNTEER__RECONNECT_MAX": "7",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["60.0", "7.0"]


def test_a_flag_overrides_the_configuration() -> None:
    args = build_parser().parse_args(["serve", "--node-timeout", "3s"])
    with dask.config.set(
        {"grid-portal.portal.node-timeout": "9s", "grid-portal.portal.port": 1234}
    ):
        merged = settings.merged("portal", vars(args))
    assert merged["node_timeout"] == 3.0  # the flag
    assert merged["port"] == 1234  # no flag: the configuration


def test_no_configured_flag_has_a_default_of_its_own() -> None:
    """A flag's default is the setting (None in argparse), so it is written once, in the yaml."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    configured = [
        action
        for name in ("serve", "volunteer")
        for action in commands.choices[name]._actions
        if getattr(action, "config_key", None)
    ]
    assert len(configured) >= 9
    for action in configured:
        assert action.default is None, action.option_strings
        settings.value(action.config_key)  # names a real key


def test_the_volunteer_file_overrides_the_yaml_and_a_flag_overrides_the_file(
    tmp_path: Path,
) -> None:
    config = tmp_path / "volunteer.toml"
    config.write_text('drain_timeout = "5m"\nreconnect_max = 12\n')
    args = build_parser().parse_args(
        [
            "volunteer",
            "https://portal.invalid:8788",
            "--config",
            str(config),
            "--reconnect-max",
            "4s",
        ]
    )
    timings = _volunteer_settings(args)["timings"]
    assert timings["drain_timeout"] == 300.0  # the file, over the yaml's 2m
    assert timings["reconnect_max"] == 4.0  # the flag, over the file
    assert timings["network_refresh"] == 1800.0  # neither: the yaml
    assert timings["lend_bound"] == 10.0  # the yaml's, also for --lend-to-peers' bound
    flagged = build_parser().parse_args(["volunteer", "https://p.invalid", "--lend-bound", "3s"])
    assert _volunteer_settings(flagged)["timings"]["lend_bound"] == 3.0
    assert timings["worker_dask"] == settings.get("volunteer.worker-dask")


def test_the_volunteer_file_adds_to_the_workers_dask_settings(tmp_path: Path) -> None:
    config = tmp_path / "volunteer.toml"
    config.write_text(
        'worker_dask = { "distributed.admin.system-monitor.interval" = "7s", '
        '"distributed.worker.profile.cycle" = "2s" }\n'
    )
    args = build_parser().parse_args(["volunteer", "https://p.invalid", "--config", str(config)])
    worker_dask = _volunteer_settings(args)["timings"]["worker_dask"]
    assert worker_dask["distributed.admin.system-monitor.interval"] == "7s"  # the file's
    assert worker_dask["distributed.worker.profile.cycle"] == "2s"  # added by the file
    assert worker_dask["distributed.admin.tick.interval"] == "1s"  # the yaml's, kept
    config.write_text('worker_dask = "quiet"\n')
    with pytest.raises(UsageError, match="worker_dask.*a table of Dask settings"):
        _volunteer_settings(args)


def test_a_volunteers_worker_runs_with_its_dask_settings(tmp_path: Path) -> None:
    """The agent sends its settings to its worker process: grid-portal.volunteer.worker-dask
    (with the file's additions), under which the worker runs, what the worker needs not
    overridden; the node plugin's idle heartbeat and memory pause."""
    config = tmp_path / "volunteer.toml"
    config.write_text(
        'worker_dask = { "distributed.admin.system-monitor.interval" = "7s", '
        '"distributed.worker.daemon" = true }\n'
        'idle_heartbeat_interval = "3s"\nmemory_pause = 0.9\n'
    )
    node = ("n", "--cpus", "1", "--memory", "1GB", "--sandbox", "none", "--config", str(config))
    keys = (
        "distributed.admin.system-monitor.interval",  # the file's
        "distributed.admin.tick.interval",  # the packaged yaml's
        "distributed.worker.profile.enabled",
        "distributed.worker.daemon",  # the worker's need: the file cannot turn it on
    )
    with portal_with(tmp_path, node) as portal, portal.grid() as grid:
        seen = [grid.submit(dask.config.get, key).result(timeout=60) for key in keys]
        address = grid.node("n").address
        plugin = grid.client.run(
            lambda dask_worker: (
                dask_worker.plugins["grid-node"].idle_heartbeat_interval,
                dask_worker.plugins["grid-node"].memory_pause_fraction,
            ),
            workers=[address],
        )[address]
    assert seen == ["7s", "1s", False, False]
    assert list(plugin) == [3.0, 0.9]


def test_a_sandboxed_volunteers_node_runs_with_the_files_idle_and_linger_times(
    tmp_path: Path,
) -> None:
    """idle-after reaches the node plugin and job-linger the task executor (which exists only
    with a sandbox), in the volunteer's real worker process, from the volunteer's file."""
    config = tmp_path / "volunteer.toml"
    config.write_text('idle_after = "7s"\njob_linger = "3s"\n')
    node = ("n", "--cpus", "1", "--memory", "1GB", "--sandbox", "process", "--config", str(config))
    with portal_with(tmp_path, node) as portal, portal.grid() as grid:
        address = grid.node("n").address
        seen = grid.client.run(
            lambda dask_worker: (
                dask_worker.plugins["grid-node"].idle_after,
                dask_worker.plugins["grid-node"].executor.job_linger,
            ),
            workers=[address],
        )[address]
    assert list(seen) == [7.0, 3.0]
    assert (settings.value("volunteer.idle-after"), settings.value("volunteer.job-linger")) == (
        5.0,
        10.0,
    )  # the packaged ones, which the file changed


def test_the_contribution_flush_interval_is_the_setting() -> None:
    from grid_portal.portal.contributions import ContributionsPlugin

    assert ContributionsPlugin(None, PortalPlugin()).flush_interval == 5.0
    with dask.config.set({"grid-portal.portal.contribution-flush-interval": "30s"}):
        assert ContributionsPlugin(None, PortalPlugin()).flush_interval == 30.0


def test_a_bad_duration_in_the_volunteer_file_names_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "volunteer.toml"
    config.write_text('drain_timeout = "soon"\n')
    args = build_parser().parse_args(["volunteer", "https://p.invalid", "--config", str(config)])
    with pytest.raises(UsageError, match=r"volunteer\.toml.*soon"):
        _volunteer_settings(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_settings_from_the_environment_reach_a_started_portal_and_its_flags_win(
    tmp_path: Path,
) -> None:
    env_port, flag_port, http_port = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "DASK_GRID_PORTAL__PORTAL__HOST": "127.0.0.1",
        "DASK_GRID_PORTAL__PORTAL__PORT": str(env_port),
        "DASK_GRID_PORTAL__PORTAL__HTTP_PORT": str(http_port),
    }
    data_dir, log = tmp_path / "portal", tmp_path / "portal.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            grid_portal_command("serve", "--data-dir", str(data_dir), "--port", str(flag_port)),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready() -> dict[str, Any] | None:
        assert process.poll() is None, log.read_text()
        path = data_dir / "portal.json"
        info = json.loads(path.read_text()) if path.exists() else {}
        return info if info.get("pid") == process.pid else None

    info = wait_for(ready, timeout=60, what="the portal to start")
    portal = Portal(data_dir=data_dir, process=process, info=info, log=log)
    try:
        assert info["local_http"] == f"https://127.0.0.1:{http_port}"  # the environment's
        assert info["scheduler"] == f"tls://127.0.0.1:{flag_port}"  # the flag's, not the env's
        # Both answer there, over TLS with the portal's own CA.
        ca = ssl.create_default_context(cafile=str(data_dir / "ca" / "ca.pem"))
        with urllib.request.urlopen(f"{info['local_http']}/api/ping", context=ca, timeout=30) as r:
            assert r.status == 200
        admin = json.loads((data_dir / "connection.json").read_text())
        ca.load_cert_chain(admin["cert"], admin["key"])
        raw = socket.create_connection(("127.0.0.1", flag_port), timeout=30)
        with ca.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.getpeercert() is not None
    finally:
        portal.stop()


def test_a_bad_setting_stops_serve_with_one_line_naming_it(tmp_path: Path) -> None:
    env = {**os.environ, "DASK_GRID_PORTAL__PORTAL__NODE_TIMEOUT": "soon"}
    result = subprocess.run(
        grid_portal_command("serve", "--data-dir", str(tmp_path / "p")),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in (
        "grid-portal.portal.node-timeout",
        "'soon'",
        "a duration such as",
        "DASK_GRID_PORTAL__PORTAL__NODE_TIMEOUT",
        "docs/configuration.md",
    ):
        assert fragment in lines[0]
    assert not (tmp_path / "p").exists()  # nothing was started


@pytest.mark.parametrize(
    ("setting", "value", "fragments"),
    [
        ("grid-portal.portal.port", 70000, ("grid-portal.portal.port", "0 to 65535")),
        ("grid-portal.volunteer.drain-timeout", "0s", ("drain-timeout", "more than 0")),
        ("grid-portal.portal.node-timout", "3s", ("unknown key 'node-timout'", "node-timeout")),
        ("grid-portal.portal.host", 5, ("grid-portal.portal.host", "5 is not of type 'string'")),
    ],
)
def test_a_bad_value_names_the_key_and_the_fix(
    setting: str, value: Any, fragments: tuple[str, ...]
) -> None:
    with dask.config.set({setting: value}), pytest.raises(UsageError) as caught:
        settings.check()
    for fragment in (*fragments, "docs/configuration.md"):
        assert fragment in str(caught.value)


# -- Dask's own settings ----------------------------------------------------------------------
def test_making_the_portal_plugin_changes_no_dask_setting() -> None:
    before = copy.deepcopy(dask.config.config)
    PortalPlugin()
    assert dask.config.config == before


def test_the_scheduler_process_settings_leave_an_operators_own_dask_value() -> None:
    import distributed  # noqa: F401 - registers Dask's defaults, as the scheduler process has

    wanted = settings.get("portal.scheduler-dask")
    steal = "distributed.scheduler.work-stealing-interval"
    before = copy.deepcopy(dask.config.config)
    try:
        with dask.config.set({steal: "2s"}):
            chosen = settings.apply_dask_settings(wanted)
            assert dask.config.get(steal) == "2s" and steal not in chosen
        assert dask.config.get(steal) != "50ms"  # Dask's own default is back
        chosen = settings.apply_dask_settings(wanted)
        assert dask.config.get(steal) == wanted[steal] == "50ms" and steal in chosen
        assert dask.config.get("distributed.admin.tick.interval") == "1s"
    finally:  # the whole process's settings, as they were (set() changes them in place)
        dask.config.config.clear()
        dask.config.config.update(before)


# -- each default written once --------------------------------------------------------------
# Names that held a moved default in code (parameters, fields, constants): none may get a
# literal default again; the value lives in grid-portal.yaml.
MOVED_NAMES = {
    "telemetry_interval",
    "node_timeout",
    "offline_retention",
    "result_ttl",
    "result_expiry_interval",
    "sample_interval",
    "sample_retention",
    "death_timeout",
    "reconnect_max",
    "drain_timeout",
    "network_refresh",
    "half_life",
    "worker_dask",
    "idle_heartbeat_interval",
    "memory_pause",
    "memory_pause_fraction",
    "lend_bound",
    "http_port",
    "idle_after",
    "job_linger",
    "flush_interval",
}
MOVED_CONSTANTS = {
    "RESULT_EXPIRY_INTERVAL",
    "DEFAULT_RESULT_TTL",
    "DEFAULT_SAMPLE_INTERVAL",
    "DEFAULT_OFFLINE_RETENTION",
    "QUIET_SCHEDULER_CONFIG",
    "STEAL_INTERVAL",
    "STEAL_INTERVAL_KEY",
    "OUTPUT_TTL",
    "SAMPLE_INTERVAL",
    "SAMPLE_RETENTION",
    "QUIET_WORKER_CONFIG",
    "DEFAULT_HALF_LIFE",
    "REQUEST_TTL",
    "START_TIMEOUT",
    "IDLE_HEARTBEAT_INTERVAL",
    "MEMORY_PAUSE_FRACTION",
    "IDLE_AFTER",
    "JOB_LINGER",
}
# The Dask settings grid-portal.yaml gives the scheduler and the worker: written there alone.
MOVED_DASK_KEYS = {
    key
    for section, name in (("portal", "scheduler-dask"), ("volunteer", "worker-dask"))
    for key in settings.packaged_defaults()["grid-portal"][section][name]
}


def _literal(node: ast.AST | None) -> bool:
    """A value written in place (``2.0``, ``"2s"``, ``7 * 86400.0``), not None or a name."""
    if isinstance(node, ast.Constant):
        return node.value is not None
    return isinstance(node, (ast.BinOp, ast.UnaryOp))


def _hard_coded_defaults(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            pairs = list(
                zip(args.args[len(args.args) - len(args.defaults) :], args.defaults, strict=True)
            )
            pairs += [
                (a, d)
                for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
                if d is not None
            ]
            found += [f"{where} {a.arg}" for a, d in pairs if a.arg in MOVED_NAMES and _literal(d)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            if (name in MOVED_NAMES and _literal(node.value)) or name in MOVED_CONSTANTS:
                found.append(f"{where} {name}")
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in MOVED_CONSTANTS:
                    found.append(f"{where} {target.id}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            first = node.args[0] if node.args else None
            name = first.value if isinstance(first, ast.Constant) else None
            if not isinstance(name, str):
                continue
            getter = node.func.attr == "get" and len(node.args) == 2
            if getter and name in MOVED_NAMES and _literal(node.args[1]):
                found.append(f"{where} .get({name!r}, ...)")
            if (
                node.func.attr == "add_argument"
                and name.lstrip("-").replace("-", "_") in MOVED_NAMES
            ):
                for kw in node.keywords:
                    if kw.arg == "default" and _literal(kw.value):
                        found.append(f"{where} {name} default")
        elif isinstance(node, ast.Constant) and node.value in MOVED_DASK_KEYS:
            found.append(f"{where} the Dask setting {node.value}")
    return found


def test_no_module_hard_codes_a_moved_default() -> None:
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _hard_coded_defaults(path)]
    assert not found, "defaults written outside grid-portal.yaml:\n" + "\n".join(found)


def test_the_check_above_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(telemetry_interval: float = 2.0): ...\n"
        "class C:\n    node_timeout: float = 15.0\n"
        "RESULT_EXPIRY_INTERVAL = 3600.0\n"
        "x = {}.get('death_timeout', 30.0)\n"
        "p.add_argument('--drain-timeout', default=120.0)\n"
        "QUIET = {'distributed.admin.tick.interval': '1s'}\n"
        "def fairness(half_life=86400.0): ...\n"
    )
    assert len(_hard_coded_defaults(bad)) == 7


# -- the Jupyter side: traitlets, with the environment as the trait's default -------------------
def test_the_jupyter_server_reads_its_address_from_a_trait_whose_default_is_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from traitlets.config import Config

    from grid_portal.jupyter.discovered import portal_configured
    from grid_portal.jupyter.service import GridPortal

    monkeypatch.setenv("GRID_PORTAL_ADDRESS", str(tmp_path / "from-env.json"))
    assert GridPortal().address == str(tmp_path / "from-env.json")
    assert portal_configured(GridPortal().address)
    configured = Config({"GridPortal": {"address": str(tmp_path / "configured.json")}})
    assert GridPortal(config=configured).address == str(tmp_path / "configured.json")
    monkeypatch.delenv("GRID_PORTAL_ADDRESS")
    assert GridPortal().address is None
