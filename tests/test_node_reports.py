"""Issue 13.5: what a node reports is cleaned before the portal believes it.

A node certificate lets its holder send anything in its startup report and heartbeats; none
of it may break the registry, ``grid.nodes()``, ``grid-portal nodes``/``status`` or the status
page for anyone else. Pure tests of ``grid_portal.portal.reports`` first (with a hypothesis
property over any JSON-like input), then a real portal with an honest volunteer and a hostile
node (a real Dask worker under a node certificate of the portal's CA) sending fuzzed reports,
and fuzzed enrolment bodies over HTTPS.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import ssl
import subprocess
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from conftest import Portal, grid_portal_command, start_portal, start_volunteer, wait_for
from distributed.core import Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simnodes import MEMORY, WORKER_CONFIG, issue_node_certificates

from grid_portal.model import (
    Capacity,
    GpuInfo,
    NetworkInfo,
    Node,
    NodeState,
    Offer,
    StaticCapacity,
    Telemetry,
)
from grid_portal.portal.contributions import ContributionLedger
from grid_portal.portal.plugin import node_state
from grid_portal.portal.registry import NodeRegistry
from grid_portal.portal.reports import (
    MAX_CORES,
    NodeReports,
    clean_metrics,
    clean_startup,
    encoded_size,
)
from grid_portal.portal.status_page import build_status, render_html
from grid_portal.portal.tokens import TokenStore
from grid_portal.protocol import (
    MAX_GPUS,
    MAX_LABEL_LENGTH,
    MAX_LABELS,
    MAX_REPORT_BYTES,
    SANDBOX_LEVELS,
)
from grid_portal.render import nodes_table
from grid_portal.requirements.matching import node_attributes

NAN, INF = float("nan"), float("inf")
TEN_MB = "x" * (10 * 2**20)


def honest_startup() -> dict[str, Any]:
    """What a real volunteer's agent sends (grid_portal/node/agent.py ``_info``)."""
    capacity = StaticCapacity(
        cpu_model="AMD EPYC 9654",
        cores_physical=8,
        cores_logical=16,
        cpu_freq_mhz=3700.0,
        memory_total=64 * 2**30,
        disk_free=500 * 2**30,
        os="linux",
        os_release="6.8.0",
        arch="x86_64",
        python="3.11.7",
        gpus=[GpuInfo(0, "NVIDIA H200", 141 * 2**30, "9.0", "560.35", "GPU-1234")],
        network=NetworkInfo(bandwidth=1.1e9, rtt=0.0004, measured_at=1.78e9),
        packages={"numpy": "2.1.0", "torch": "2.5.1"},
    )
    return {
        "capacity": {**asdict(capacity), "cpu_benchmark": 1.7},
        "offer": asdict(Offer(cpus=4, memory=8 * 2**30, gpus=[0])),
        "labels": {"site": "B12", "public": "yes"},
        "sandbox": "bubblewrap",
    }


def honest_metrics(now: float = 1.78e9) -> dict[str, Any]:
    """What a real node's NodePlugin.telemetry sends."""
    data = asdict(
        Telemetry(
            time=now,
            cpu_percent=12.5,
            grid_cpu_percent=103.0,
            memory_used=3 * 2**30,
            memory_percent=20.0,
            running_tasks=2,
        )
    )
    data["gpus"] = [{"index": 0, "utilization": 80.0, "memory_used": 2**30, "temperature": 61.0}]
    data["policy"] = {"state": "paused", "reason": "owner busy"}
    data["network"] = {"bandwidth": 1e9, "rtt": 0.001, "measured_at": now}
    return data


# -- honest reports pass unchanged -------------------------------------------------------------
def test_an_honest_report_passes_unchanged_and_without_problems() -> None:
    info = honest_startup()
    cleaned, problems = clean_startup(info)
    assert problems == []
    assert cleaned == info
    metrics = honest_metrics()
    cleaned_metrics, problems = clean_metrics(metrics, now=1.78e9)
    assert problems == []
    assert cleaned_metrics == metrics


def test_what_the_real_probe_and_sampler_report_passes_without_problems() -> None:
    from grid_portal.node.probe import TelemetrySampler, probe_static

    capacity = asdict(probe_static(gpus=[]))
    info = {"capacity": capacity, "offer": {"cpus": 1, "memory": 2**30, "gpus": []}}
    assert clean_startup({**info, "labels": {}, "sandbox": "none"})[1] == []
    sampler = TelemetrySampler(gpus=[], min_interval=0)
    try:
        sample = asdict(sampler.sample(running_tasks=1))
    finally:
        sampler.close()
    sample["policy"] = {"state": None, "reason": None}
    cleaned, problems = clean_metrics(sample)
    assert problems == [] and cleaned == sample


def test_the_sandbox_levels_are_the_nodes_own() -> None:
    from grid_portal.node.sandbox import LEVELS

    assert tuple(SANDBOX_LEVELS) == tuple(LEVELS)


# -- hostile reports are clamped, cut or dropped ---------------------------------------------------
def test_a_policy_that_is_not_a_mapping_is_no_policy() -> None:
    """The issue's attack: ``"policy": "x"`` made node_state raise for everyone."""
    cleaned, problems = clean_metrics({**honest_metrics(), "policy": "x"}, now=1.78e9)
    assert cleaned is not None and cleaned["policy"] == {"state": None, "reason": None}
    assert any("policy" in p for p in problems)
    ws = types.SimpleNamespace(status=Status.running, processing=set())
    assert node_state(ws, cleaned) == (NodeState.ONLINE, None)
    for policy in ({"state": "x"}, {"state": ["paused"]}, {"state": "paused", "reason": 7}):
        cleaned, _ = clean_metrics({**honest_metrics(), "policy": policy}, now=1.78e9)
        assert cleaned is not None
        assert cleaned["policy"]["state"] in (None, "paused")
        assert cleaned["policy"]["reason"] is None
    cleaned, _ = clean_metrics({"policy": {"state": "draining", "reason": "r" * 10_000}})
    assert cleaned is not None and node_state(ws, cleaned)[0] is NodeState.DRAINING
    assert len(cleaned["policy"]["reason"]) == 200


@pytest.mark.parametrize(
    ("value", "expected"),
    [(NAN, 1), (INF, 1), (-INF, 1), ("16", 1), (True, 1), (-5, 1), (10**30, MAX_CORES)],
)
def test_numbers_must_be_finite_and_are_clamped(value: Any, expected: int) -> None:
    """Not a finite number: the default (1 core); out of range: clamped."""
    info = honest_startup()
    info["capacity"]["cores_logical"] = value
    cleaned, problems = clean_startup(info)
    assert cleaned["capacity"]["cores_logical"] == expected
    assert any("cores_logical" in p for p in problems)


def test_telemetry_numbers_are_clamped() -> None:
    metrics = {
        **honest_metrics(),
        "cpu_percent": NAN,
        "memory_percent": 1e300,
        "memory_used": -1,
        "running_tasks": 2**70,
        "time": INF,
        "gpus": [{"index": 0, "utilization": -INF, "temperature": 1e9}, {"index": "zero"}, 5],
    }
    cleaned, problems = clean_metrics(metrics, now=1000.0)
    assert cleaned is not None
    assert cleaned["cpu_percent"] == 0.0 and cleaned["memory_percent"] == 100.0
    assert cleaned["memory_used"] == 0 and cleaned["running_tasks"] == 1_000_000
    assert cleaned["time"] == 1000.0
    assert cleaned["gpus"] == [
        {"index": 0, "utilization": None, "memory_used": None, "temperature": 200.0}
    ]
    assert len(problems) >= 6
    assert all(isinstance(p, str) and len(p) < 200 for p in problems)
    # A clock far ahead is clamped to a day ahead of the portal's.
    assert clean_metrics({"time": 1e10}, now=1000.0)[0]["time"] == 1000.0 + 86400.0  # type: ignore[index]


def test_ten_megabyte_strings_drop_the_report_and_cost_little() -> None:
    for where in ("cpu_model", "os"):
        info = honest_startup()
        info["capacity"][where] = TEN_MB
        start = time.perf_counter()
        cleaned, problems = clean_startup(info)
        assert time.perf_counter() - start < 0.05
        assert cleaned == {} and problems == [
            f"report dropped: larger than {MAX_REPORT_BYTES} bytes"
        ]
    cleaned, problems = clean_metrics({**honest_metrics(), "policy": {"reason": TEN_MB}})
    assert cleaned is None and "larger than" in problems[0]
    # Under the size limit, long text is cut, not dropped.
    info = honest_startup()
    info["capacity"]["cpu_model"] = "y" * 5000
    info["labels"] = {"k" * 1000: "v" * 1000}
    cleaned, problems = clean_startup(info)
    assert cleaned["capacity"]["cpu_model"] == "y" * 256
    assert cleaned["labels"] == {"k" * MAX_LABEL_LENGTH: "v" * MAX_LABEL_LENGTH}
    assert problems


def test_deep_nesting_drops_the_report() -> None:
    deep: Any = 1
    for _ in range(200_000):
        deep = [deep]
    assert clean_startup({"capacity": {}, "x": deep}) == (
        {},
        ["report dropped: nested deeper than 16"],
    )
    assert clean_metrics({"gpus": deep})[0] is None


@pytest.mark.parametrize("report", [[], "x", 7, b"grid", ["capacity"], NAN, object()])
def test_a_report_that_is_not_a_mapping_is_dropped(report: Any) -> None:
    cleaned, problems = clean_startup(report)
    assert cleaned == {} and len(problems) == 1 and "not a mapping" in problems[0]
    cleaned_metrics, problems = clean_metrics(report)
    assert cleaned_metrics is None and "not a mapping" in problems[0]
    # No report at all is not a problem: a plain worker sends none.
    assert clean_startup(None) == ({}, []) and clean_metrics(None) == (None, [])


def test_labels_gpus_and_text_are_bounded_and_printable() -> None:
    info = honest_startup()
    info["labels"] = {f"k{i}": "v" for i in range(1000)} | {"bad": 1}
    info["capacity"]["gpus"] = [{"index": i, "name": "g"} for i in range(1000)]
    info["capacity"]["cpu_model"] = "evil\x1b[2J\u202etxt\n\x00"
    info["capacity"]["packages"] = {"numpy": ["2"], "x": "1"}
    info["offer"] = {"cpus": 2.7, "memory": 2**30, "gpus": [0, 0, -1, "1", 3]}
    info["sandbox"] = "root"
    info["unknown"] = {"anything": 1}
    cleaned, problems = clean_startup(info)
    assert len(cleaned["labels"]) == MAX_LABELS
    assert len(cleaned["capacity"]["gpus"]) == MAX_GPUS
    assert cleaned["capacity"]["cpu_model"] == "evil[2Jtxt"
    assert cleaned["capacity"]["packages"] == {"x": "1"}
    assert cleaned["offer"] == {"cpus": 2, "memory": 2**30, "gpus": [0, 3]}
    assert cleaned["sandbox"] is None and "unknown" not in cleaned
    assert len(problems) <= 13  # bounded for one log line
    # An offer without CPUs or memory is dropped: the portal uses Dask's own counts.
    assert "offer" not in clean_startup({"offer": {"cpus": "many", "memory": 1}})[0]


def test_node_reports_logs_each_node_once_per_interval_and_cleans_each_heartbeat_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    reports = NodeReports(
        logging.getLogger("test.reports"), log_interval=60, clock=lambda: clock[0]
    )
    raw = {"policy": "x"}
    with caplog.at_level(logging.WARNING, "test.reports"):
        first = reports.metrics("mallory", "tls://m:1", raw)
        assert reports.metrics("mallory", "tls://m:1", raw) is first  # cached by identity
        for _ in range(100):
            reports.metrics("mallory", "tls://m:1", {"policy": "x"})
        reports.startup("mallory\n[fake] log line", [])
        clock[0] = 61.0
        reports.metrics("mallory", "tls://m:1", {"policy": "y"})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert all("\n" not in line for line in lines)
    assert "policy: str, not a mapping" in lines[0]
    clock[0] = 10_000.0
    reports.metrics("other", "tls://o:1", None)
    assert set(reports._metrics) == {"tls://o:1"}  # departed nodes are forgotten


# -- the property: any JSON-like input gives what every reader accepts ------------------------------
def _text(max_size: int = 20) -> st.SearchStrategy[str]:
    return st.text(st.characters(exclude_categories=["Cs"]), max_size=max_size)


WIRE_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | _text()
    | st.binary(max_size=10)
)
KEYS = [
    "capacity", "offer", "labels", "sandbox", "gpus", "index", "name", "cpus", "memory",
    "cores_logical", "memory_total", "network", "packages", "policy", "state", "reason", "time",
    "cpu_percent", "running_tasks", "bandwidth", "cpu_benchmark", "grid_memory_used",
]  # fmt: skip
WIRE = st.recursive(
    WIRE_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | _text(8), children, max_size=4)
    ),
    max_leaves=20,
)
ANY = st.recursive(
    WIRE_SCALARS | st.integers() | _text(300) | st.just("x" * 70_000),
    lambda children: (
        st.lists(children, max_size=5)
        | st.tuples(children, children)
        | st.dictionaries(st.sampled_from(KEYS) | st.integers() | _text(8), children, max_size=5)
    ),
    max_leaves=30,
)


def _near(fields: dict[str, st.SearchStrategy[Any]], other: st.SearchStrategy[Any]) -> Any:
    return st.fixed_dictionaries({}, optional=fields) | other


def _numbers() -> st.SearchStrategy[Any]:
    return st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()


def _reports(other: st.SearchStrategy[Any]) -> tuple[Any, Any]:
    num = _numbers() | other
    gpu = _near({"index": num, "name": _text() | other, "memory_total": num}, other)
    startup = _near(
        {
            "capacity": _near(
                {
                    "cores_logical": num,
                    "memory_total": num,
                    "cpu_model": _text(300) | other,
                    "gpus": st.lists(gpu, max_size=3) | other,
                    "network": _near({"bandwidth": num, "rtt": num}, other),
                    "packages": st.dictionaries(_text(), _text() | other, max_size=3) | other,
                    "cpu_benchmark": num,
                },
                other,
            ),
            "offer": _near(
                {"cpus": num, "memory": num, "gpus": st.lists(num, max_size=3) | other}, other
            ),
            "labels": st.dictionaries(_text(), _text() | other, max_size=4) | other,
            "sandbox": st.sampled_from(SANDBOX_LEVELS) | other,
            "extra": other,
        },
        other,
    )
    metrics = _near(
        {
            "time": num,
            "cpu_percent": num,
            "grid_cpu_percent": num,
            "memory_used": num,
            "memory_percent": num,
            "running_tasks": num,
            "gpus": st.lists(gpu, max_size=3) | other,
            "policy": _near(
                {
                    "state": st.sampled_from([None, "paused", "draining", "x"]) | other,
                    "reason": _text(300) | other,
                },
                other,
            ),
            "network": _near({"bandwidth": num, "rtt": num, "measured_at": num}, other),
            "grid_memory_used": num,
        },
        other,
    )
    return startup, metrics


WIRE_STARTUP, WIRE_METRICS = _reports(WIRE)
ANY_STARTUP, ANY_METRICS = _reports(ANY)


def readers_accept(startup: Any, metrics: list[Any]) -> None:
    """Everything the portal and its faces do with a node's reports works on the cleaned ones."""
    info, problems = clean_startup(startup)
    assert isinstance(info, dict) and all(isinstance(p, str) for p in problems)
    assert encoded_size(info) <= MAX_REPORT_BYTES
    registry = NodeRegistry(sample_interval=0.0)
    registry.join(
        name="n",
        address="tls://n:1",
        capacity=info.get("capacity") or {},
        offer=info.get("offer") or {"cpus": 1, "memory": 0, "gpus": []},
        labels=info.get("labels") or {},
        sandbox=info.get("sandbox"),
    )
    registry.join("honest", "tls://h:1", {}, {"cpus": 1, "memory": 1, "gpus": []})
    ws = types.SimpleNamespace(status=Status.running, processing=set())
    for i, raw in enumerate(metrics):
        cleaned, problems = clean_metrics(raw, now=1000.0 + i)
        assert cleaned is None or isinstance(cleaned, dict)
        assert encoded_size(cleaned) <= MAX_REPORT_BYTES
        state, reason = node_state(ws, cleaned)
        registry.update(
            "tls://n:1", state=state, reason=reason, telemetry=cleaned, used_resources={}
        )
    listed = registry.list(history=True)
    json.dumps(listed, allow_nan=False)
    json.dumps(registry.capacity(), allow_nan=False)
    registry.largest_offer()
    nodes = [Node.from_dict(n) for n in listed]  # what grid.nodes() does with them
    for node in nodes:
        node_attributes(node)  # requirement matching
    from rich.console import Console

    Console(file=io.StringIO(), width=200).print(nodes_table(nodes))
    Capacity.from_dict(registry.capacity())
    ledger = ContributionLedger(None)
    ledger.seen("n", info.get("labels") or {}, info.get("capacity") or {})
    status = build_status(
        types.SimpleNamespace(registry=registry), types.SimpleNamespace(ledger=ledger)
    )
    json.dumps(status, allow_nan=False)
    render_html(status)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(startup=ANY_STARTUP | ANY, metrics=st.lists(ANY_METRICS | ANY, min_size=1, max_size=3))
def test_any_report_cleans_to_what_every_reader_accepts(startup: Any, metrics: list[Any]) -> None:
    readers_accept(startup, metrics)


def test_the_worst_reports_clean_to_what_every_reader_accepts() -> None:
    worst: list[Any] = [
        {"policy": "x"},
        {"capacity": {"gpus": [{"index": 0, "name": None, "memory_total": NAN}] * 100}},
        {"labels": {"[/]": "[/]", "public": "yes", "site": "[bold]x[/]"}},
        {"offer": {"cpus": 10**40, "memory": INF, "gpus": list(range(1000))}},
        {"capacity": {"network": {"bandwidth": -1, "rtt": "fast"}, "packages": {"a": {"b": 1}}}},
        {"labels": {"\u202e" * 64: "x"}, "sandbox": ["none"]},
        {"capacity": {"cpu_model": "\U0001f600" * 256}, "labels": {"\U0001f600" * 128: "é" * 128}},
    ]
    for report in worst:
        readers_accept(report, [report, honest_metrics(), {"time": "now"}, None, []])
    # Sixty-four labels of four-byte characters: over the limit in bytes once cleaned.
    big = {"labels": {f"{i:02}" + "\U0001f600" * 126: "\U0001f600" * 128 for i in range(64)}}
    cleaned, problems = clean_startup(big)
    assert encoded_size(cleaned) <= MAX_REPORT_BYTES and problems


# -- a real portal, an honest volunteer and a hostile node ------------------------------------------
HONEST_LABELS = {"site": "B12", "public": "yes", "room": "[/]"}


class HostileNode:
    """A real Dask worker under a node certificate of the portal's CA, in a thread of this
    process, whose startup report and heartbeats say whatever the test wants."""

    def __init__(self, portal: Portal, tmp: Path, name: str) -> None:
        from grid_portal.portal.security import tls_security

        certs = tmp / "hostile-certs"
        issue_node_certificates(portal.data_dir, [name], certs)
        self.security = tls_security(
            str(portal.data_dir / "ca" / "ca.pem"), certs / f"{name}.pem", certs / f"{name}-key.pem"
        )
        self.scheduler = portal.scheduler
        self.name = name
        self.startup: Any = None
        self.metrics: Any = None
        self.worker: Any = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> Any:
        import dask
        from distributed import Worker

        with dask.config.set(WORKER_CONFIG):
            worker = Worker(
                self.scheduler,
                security=self.security,
                nthreads=1,
                memory_limit=0,
                resources={"CPU": 1, "MEMORY": MEMORY},
                name=self.name,
                host="127.0.0.1",
                dashboard=False,
                death_timeout=30,
            )
            worker.startup_information["grid"] = lambda _w: self.startup
            worker.metrics["grid"] = lambda _w: self.metrics
            await worker
        return worker

    def join(self, startup: Any) -> None:
        """(Re)register with this startup report."""
        self.leave()
        self.startup = startup
        self.worker = self._call(self._start())

    def leave(self) -> None:
        if self.worker is not None:
            self._call(self.worker.close(reason="test"))
            self.worker = None

    def beat(self, metrics: Any) -> None:
        """Send one heartbeat carrying ``metrics``; returns once the portal has it."""
        self.metrics = metrics
        self._call(self.worker.heartbeat())

    def close(self) -> None:
        try:
            self.leave()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def hostile_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Portal, HostileNode]]:
    tmp = tmp_path_factory.mktemp("reports")
    portal = start_portal(tmp)
    node = None
    try:
        labels = [x for k, v in HONEST_LABELS.items() for x in ("--label", f"{k}={v}")]
        start_volunteer(portal, tmp, "honest", "--cpus", "1", "--memory", "1GB", *labels)
        with portal.grid() as grid:
            wait_for(
                lambda: (n := grid.node("honest")) is not None and n.telemetry is not None,
                timeout=30,
                what="the honest volunteer's telemetry",
            )
        node = HostileNode(portal, tmp, "mallory")
        node.join(honest_startup())
        yield portal, node
    finally:
        if node is not None:
            node.close()
        portal.stop()


def _get(portal: Portal, path: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(portal.data_dir / "ca" / "ca.pem"))
    ctx.check_hostname = False
    with urllib.request.urlopen(portal.http + path, context=ctx, timeout=10) as response:
        return response.status, response.read()


def everyone_else_is_fine(portal: Portal, grid: Any, hostile_listed: bool = True) -> None:
    """``grid.nodes()``, ``grid.capacity()`` and the status page answer, and show the honest
    volunteer as it is."""
    nodes = {n.name: n for n in grid.nodes()}
    honest = nodes["honest"]
    assert honest.state in (NodeState.ONLINE, NodeState.BUSY), honest
    assert honest.labels == HONEST_LABELS
    assert honest.offer.cpus == 1 and honest.offer.memory == 10**9
    assert honest.telemetry is not None and honest.capacity.cores_logical >= 1
    if hostile_listed:
        mallory = nodes["mallory"]
        assert isinstance(mallory.state, NodeState) and mallory.offer.cpus <= MAX_CORES
        assert encoded_size(mallory.to_dict()) < 4 * MAX_REPORT_BYTES
    capacity = grid.capacity()
    assert capacity.nodes_online >= 1 and capacity.cores_total >= 1
    status, body = _get(portal, "/status.json")
    page = json.loads(body)
    assert status == 200
    named = {n["name"]: n for n in page["nodes"]["named"]}
    assert named["honest"]["site"] == "B12" and named["honest"]["cpus"] == 1
    status, html = _get(portal, "/status")
    assert status == 200 and b"B12" in html


def cli(portal: Portal, *args: str) -> str:
    result = subprocess.run(
        grid_portal_command(*args, "--portal", portal.connection_file),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def the_cli_is_fine(portal: Portal) -> None:
    nodes = {n["name"]: n for n in json.loads(cli(portal, "nodes", "--json"))}
    assert nodes["honest"]["labels"] == HONEST_LABELS and nodes["honest"]["state"] == "online"
    assert "honest" in cli(portal, "nodes")
    assert "nodes online" in cli(portal, "status")


WORST_HEARTBEATS: list[Any] = [
    {**honest_metrics(), "policy": "x"},  # the issue's attack
    {"policy": {"state": ["paused"], "reason": {"a": 1}}, "time": "now", "gpus": "all"},
    {"cpu_percent": NAN, "memory_used": -(2**63), "running_tasks": 2**64 - 1, "time": INF},
    {"network": {"bandwidth": "fast"}, "gpus": [{"index": -1}, None, {"index": 2**63}]},
    {"policy": {"state": "draining", "reason": "[/]\x1b[2J" * 50}},
    {"junk": "z" * 2**20},  # a megabyte
    [1, 2, 3],
    "x",
]


def test_a_hostile_node_breaks_nothing_for_anyone_else(
    hostile_grid: tuple[Portal, HostileNode],
) -> None:
    portal, node = hostile_grid
    with portal.grid() as grid:
        # The issue's attack first: a heartbeat with "policy": "x".
        for metrics in WORST_HEARTBEATS:
            node.beat(metrics)
            everyone_else_is_fine(portal, grid)
        node.beat({**honest_metrics(), "policy": "x"})
        the_cli_is_fine(portal)
        mallory = grid.node("mallory")
        assert mallory is not None and mallory.state is NodeState.ONLINE

        @settings(
            max_examples=30,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(metrics=WIRE_METRICS | WIRE)
        def fuzz_heartbeats(metrics: Any) -> None:
            node.beat(metrics)
            everyone_else_is_fine(portal, grid)

        start = time.monotonic()
        fuzz_heartbeats()
        assert time.monotonic() - start < 60
        # An honest heartbeat is believed again: the node's own state, clamped.
        node.beat(honest_metrics(now=time.time()))
        wait_for(
            lambda: (
                (m := grid.node("mallory")) is not None
                and m.state is NodeState.PAUSED
                and m.reason == "owner busy"
            ),
            timeout=10,
            what="the honest heartbeat to be believed",
        )
    log = portal.log.read_text(errors="replace")
    assert "node mallory sent a bad heartbeat" in log
    # Rate-limited: one line per node per interval, however many bad heartbeats.
    assert log.count("node mallory sent a bad heartbeat") == 1
    assert "Traceback" not in log


# -- enrolment bodies -----------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _text(50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_text(10), children, max_size=4)
    ),
    max_leaves=15,
)


def test_fuzzed_enrolment_bodies_are_refused_with_4xx_and_spend_no_token(
    hostile_grid: tuple[Portal, HostileNode],
) -> None:
    """Complements tests/test_hostile.py (oversized bodies, floods): any body, never a 500.
    Fewer bodies than the enrolment rate limit (30 a minute), so that each is really read."""
    portal, _ = hostile_grid
    token = portal.token("--uses", "1")
    field = (
        st.sampled_from([token, "", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"]) | JSON_VALUES
    )
    bodies = (
        st.fixed_dictionaries(
            {"token": field, "csr": field},
            optional={"name": field, "versions": st.dictionaries(_text(10), JSON_VALUES) | field},
        ).map(lambda d: json.dumps(d).encode())
        | JSON_VALUES.map(lambda v: json.dumps(v).encode())
        | st.binary(max_size=200)
    )
    seen: list[int] = []

    @settings(
        max_examples=22,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=bodies)
    def fuzz(body: bytes) -> None:
        status, reply = portal.enrol(body)
        seen.append(status)
        assert 400 <= status < 500, (status, reply, body[:200])
        assert isinstance(reply, dict) and isinstance(reply.get("error"), str)

    fuzz()
    assert seen.count(429) < len(seen)  # the bodies were read, not only rate-limited
    (record,) = [
        t for t in TokenStore(portal.data_dir / "ledger.sqlite").list() if t.uses_total == 1
    ]
    assert record.uses_left == 1
    assert _get(portal, "/api/ping")[0] == 200
    with portal.grid() as grid:
        everyone_else_is_fine(portal, grid, hostile_listed=False)


# -- startup reports (last: the hostile node leaves and rejoins for each) ----------------------
WORST_STARTUPS: list[Any] = [
    {"capacity": "x", "offer": [], "labels": "public=yes", "sandbox": {"level": "none"}},
    {
        "labels": {"[/]": "[/]", "public": "yes", "site": "\x1b[2J" + "s" * 1000},
        "offer": {"cpus": -3},
    },
    {"capacity": {"gpus": [{"index": 0, "memory_total": INF}] * 200, "cpu_benchmark": 1e300}},
    {"capacity": {"cpu_model": "m" * 2**20}},
    "not a report",
]


def test_a_hostile_startup_report_breaks_nothing_for_anyone_else(
    hostile_grid: tuple[Portal, HostileNode],
) -> None:
    portal, node = hostile_grid

    def rejoin(startup: Any) -> None:
        node.join(startup)
        node.beat(honest_metrics(now=time.time()))

    with portal.grid() as grid:
        for startup in WORST_STARTUPS:
            rejoin(startup)
            # A node leaving (here, to rejoin) must not disconnect anyone else either.
            everyone_else_is_fine(portal, grid)
            mallory = grid.node("mallory")
            assert mallory is not None and mallory.online
        the_cli_is_fine(portal)

        @settings(
            max_examples=8,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(startup=WIRE_STARTUP | WIRE)
        def fuzz_startup(startup: Any) -> None:
            rejoin(startup)
            everyone_else_is_fine(portal, grid)

        fuzz_startup()
        rejoin(honest_startup())
        mallory = grid.node("mallory")
        assert mallory is not None and mallory.labels == {"site": "B12", "public": "yes"}
        assert mallory.capacity.gpus[0].name == "NVIDIA H200"
    assert "node mallory sent a bad startup report" in portal.log.read_text(errors="replace")
