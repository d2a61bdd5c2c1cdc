"""Issue 14, points 3 and 4: what a researcher's kernel opens from nodes.

Unit tests of the data-only unpickler (grid_portal.safe_pickle) and of the display sanitiser
(grid_portal.sanitize); then a real portal with two malicious volunteers, real processes
whose Python the test patches (a sitecustomize on their PYTHONPATH replaces the node's
``%%grid`` task): each returns a crafted pickle, pushes one, keeps one at the portal, raises a
crafted exception and displays ``<script>``. The pickles' ``__reduce__`` writes a marker line
with the process id of whoever opens them. From the untrusted node the kernel (this process,
an IPython shell as in test_magics) opens none of them and says why; from the trusted one it
opens them as before.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grid_portal.errors import RemoteError, UntrustedResult
from grid_portal.safe_pickle import Trust, loads_data, loads_exception
from grid_portal.sanitize import clean_html, inert_bundle


class WritesMarker:
    """The probe: unpickling it writes its process id into ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        code = f"import os; open({self.path!r}, 'a').write(str(os.getpid()) + '\\n')"
        return (exec, (code,))


# -- the unpickler --------------------------------------------------------------------------------
def test_plain_data_round_trips() -> None:
    import collections
    import datetime
    import decimal
    import fractions
    import uuid

    value = {
        "n": [1, 2.5, 3 + 4j, True, None, "text", b"bytes", bytearray(b"ba")],
        "t": (1, frozenset({2}), {3}, range(4), slice(1, 5)),
        "c": collections.OrderedDict(a=1),
        "d": collections.defaultdict(list, b=[1]),
        "q": collections.deque([1, 2]),
        "k": collections.Counter("abca"),
        "when": datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2026, 1, 2),
        "span": datetime.timedelta(seconds=5),
        "dec": decimal.Decimal("1.10"),
        "frac": fractions.Fraction(1, 3),
        "id": uuid.UUID(int=7),
    }
    for protocol in (2, 4, 5):
        assert loads_data(pickle.dumps(value, protocol=protocol)) == value


def test_numpy_arrays_come_back_and_object_dtype_does_not() -> None:
    np = pytest.importorskip("numpy")
    for array in (np.arange(12.0).reshape(3, 4), np.arange(6).reshape(2, 3).T, np.zeros(3, "i2")):
        for protocol in (2, 5):
            assert (loads_data(pickle.dumps(array, protocol=protocol)) == array).all()
    assert loads_data(pickle.dumps(np.float32(1.5))) == np.float32(1.5)
    with pytest.raises(UntrustedResult, match="object dtype"):
        loads_data(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(UntrustedResult, match="object dtype"):
        loads_data(pickle.dumps({"inside": [np.array([None], dtype=object)]}))


def test_pandas_frames_come_back() -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {
            "i": [1, 2],
            "s": ["x", "y"],
            "f": [1.5, None],
            "t": pd.to_datetime(["2026-01-01", "2026-02-01"]),
            "c": pd.Categorical(["a", "b"]),
        },
        index=pd.Index(["r1", "r2"]),
    )
    assert loads_data(pickle.dumps(frame)).equals(frame)
    series = pd.Series([1.0, 2.0], index=pd.date_range("2026-01-01", periods=2))
    assert loads_data(pickle.dumps(series)).equals(series)
    # An object column holding something else is refused by its contents.
    odd = pd.DataFrame({"o": [WritesMarker(Path("/nonexistent"))]})
    with pytest.raises(UntrustedResult, match="builtins.exec"):
        loads_data(pickle.dumps(odd))


def test_a_crafted_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    crafted = pickle.dumps(WritesMarker(marker))
    pickle.loads(pickle.dumps(WritesMarker(tmp_path / "control")))  # the probe does work
    assert (tmp_path / "control").exists()
    with pytest.raises(UntrustedResult) as refused:
        loads_data(crafted)
    assert refused.value.type_name == "builtins.exec"
    assert "builtins.exec" in str(refused.value) and "GRID_PORTAL_TRUST" in str(refused.value)
    with pytest.raises(UntrustedResult):
        loads_data(pickle.dumps({"nested": [1, WritesMarker(marker)]}))
    with pytest.raises(UntrustedResult, match="os.system|posix.system"):
        loads_data(b"cos\nsystem\n(S'true'\ntR.")  # protocol 0, by hand
    with pytest.raises(UntrustedResult):
        loads_exception(crafted)
    assert not marker.exists()


def test_functions_and_classes_are_refused() -> None:
    import cloudpickle

    def local(v: int) -> int:
        return v

    for value in (len, local, Trust, Path("/x")):
        with pytest.raises(UntrustedResult):
            loads_data(cloudpickle.dumps(value))


def test_a_module_comes_back_only_if_this_process_imported_it() -> None:
    import sys

    import cloudpickle

    assert loads_data(cloudpickle.dumps(sys)) is sys  # `import sys` in a cell

    class Unimported:
        def __reduce__(self) -> tuple[Any, ...]:
            return (cloudpickle.cloudpickle.subimport, ("antigravity",))

    with pytest.raises(UntrustedResult, match="module antigravity"):
        loads_data(pickle.dumps(Unimported()))
    assert "antigravity" not in sys.modules


def test_builtin_exceptions_are_rebuilt() -> None:
    import cloudpickle

    exc = loads_exception(cloudpickle.dumps(ZeroDivisionError("division by zero")))
    assert isinstance(exc, ZeroDivisionError) and str(exc) == "division by zero"
    with pytest.raises(UntrustedResult):
        loads_exception(cloudpickle.dumps(RemoteError("E", "v")))


def test_trust_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRID_PORTAL_TRUST", "lab-1, lab-2")
    trust = Trust(["mine"])
    assert "mine" in trust and "lab-2" in trust and "other" not in trust
    assert trust.all(["mine", "lab-1"]) and not trust.all(["mine", "other"]) and not trust.all([])
    assert Trust("*", env=False).all(["anyone"])
    assert not Trust(env=False)


# -- the sanitiser --------------------------------------------------------------------------------
def test_html_loses_scripts_handlers_and_remote_resources() -> None:
    html = clean_html(
        '<b onclick="steal()">bold</b><script>steal()</script>'
        '<img src="https://evil.example/x.png"><img src="data:image/png;base64,AAAA">'
        '<a href="javascript:steal()">j</a><a href="#here">f</a><a href="/api/contents">r</a>'
        "<iframe src='https://evil.example'></iframe><object data='x'></object><embed src='x'>"
        '<link rel="stylesheet" href="https://evil.example/s.css">'
        "<style>body{background:url(https://evil.example/b)}</style>"
        '<div style="background:url(https://evil.example/c)">d</div><table><tr><td>1</td></tr>'
    )
    for gone in ("script", "steal", "onclick", "evil.example", "iframe", "object", "embed"):
        assert gone not in html
    assert "<link" not in html and "<style" not in html and "/api/contents" not in html
    assert "<b>bold</b>" in html and 'src="data:image/png;base64,AAAA"' in html
    assert 'href="#here"' in html and "<td>1</td>" in html


def test_a_bundle_keeps_only_inert_types_and_says_what_went() -> None:
    data, metadata = inert_bundle(
        {
            "text/plain": "plain",
            "text/html": "<p>ok</p><script>x()</script>",
            "image/png": "iVBORw0KGgo=",
            "application/json": {"a": 1},
            "application/javascript": "x()",
            "application/vnd.jupyter.widget-view+json": {"model_id": "m"},
        },
        {"image/png": {"width": 10}, "application/javascript": {"x": 1}},
    )
    assert data["text/html"] == "<p>ok</p>" and data["application/json"] == {"a": 1}
    assert "application/javascript" not in data and metadata == {"image/png": {"width": 10}}
    assert data["text/plain"].startswith("plain\n[grid: application/javascript, ")
    assert "do not trust" in data["text/plain"]
    only, _ = inert_bundle({"application/javascript": "x()"})
    assert list(only) == ["text/plain"] and "application/javascript" in only["text/plain"]


# -- end to end: a malicious volunteer -----------------------------------------------------------
# The volunteer's own Python, patched: this module on its PYTHONPATH replaces the %%grid task.
# A cell names what the node does with a word in its source.
MALICIOUS_NODE = """
import builtins, pickle

MARKER = {marker!r}
CODE = "import os; open(%r, 'a').write(str(os.getpid()) + '\\\\n')" % MARKER


class Crafted:
    def __reduce__(self):
        return (builtins.exec, (CODE,))


class CraftedError(Exception):
    def __reduce__(self):
        return (builtins.exec, (CODE,))


def _patch():
    from grid_portal import isolation
    from grid_portal.jobs import cell_task
    from grid_portal.jobs.cell import CellFailed

    honest = cell_task.run_cell_task

    @isolation.self_isolating
    def run_cell_task(payload, request):
        source = pickle.loads(payload)["source"]
        if "EVIL_" not in source:
            return honest(payload, request)
        from distributed import get_worker

        worker = get_worker()
        crafted = pickle.dumps(Crafted())
        html = "<b>shown</b><script>document.title = 'owned'</script>"
        display = {{"text/html": html, "application/javascript": "alert(1)", "text/plain": "p"}}
        events = [
            {{"k": "started", "node": worker.name, "seq": 0}},
            {{"k": "display", "d": display, "m": {{}}, "seq": 1}},
        ]
        outcome = {{
            "node": worker.name, "elapsed": 0.01, "events": events, "has_value": True,
            "outputs": {{"stolen": crafted, "honest": pickle.dumps(42)}}, "value": crafted,
        }}
        if "EVIL_RETURN" in source:  # too big to push: the kernel gathers it through Dask
            return [Crafted(), b"x" * 400_000]
        if "EVIL_PUSH" in source:  # small: pushed with the task's completion
            return Crafted()
        if "EVIL_RAISE" in source:  # Dask pickles the task's exception
            raise CraftedError("boom")
        if "EVIL_CELL_ERROR" in source:  # the cell's own error, as the cell task reports it
            outcome["error"] = {{
                "ename": "ValueError", "evalue": "bad", "pickled": crafted,
                "lines": ["Traceback (most recent call last):", "ValueError: bad"],
            }}
            raise CellFailed("ValueError: bad", outcome)
        if "EVIL_KEEP" in source:  # kept at the portal, for %grid result after a restart
            emit = cell_task._emitter(worker, True)
            emit("store_result", {{"job_id": request["job_id"], "data": crafted}})
            outcome["kept"] = True
        return outcome

    cell_task.run_cell_task = run_cell_task

    # A cell sent to this node's lease (a kernel's cell session): crafted bytes as its result.
    from grid_portal.jobs import cell_lease_task

    honest_run_one = cell_lease_task._run_one

    def _run_one(worker, lease, node, item, *args):
        if "EVIL_LEASED" not in pickle.loads(item["payload"])["source"]:
            return honest_run_one(worker, lease, node, item, *args)
        crafted = {{"lease": lease.key, "cell": item["cell"], "kind": "result", "state": "ok"}}
        cell_lease_task.send(worker, {{**crafted, "data": pickle.dumps(Crafted())}})

    cell_lease_task._run_one = _run_one

    # Dask's worker pickles a task's exception (and checks that it loads back); this node
    # sends its own bytes instead.
    import distributed.worker
    from distributed import protocol

    honest_error_message = distributed.worker.error_message

    def error_message(e, *args, **kwargs):
        msg = honest_error_message(e, *args, **kwargs)
        if isinstance(e, CraftedError):
            msg["exception"] = protocol.to_serialize(pickle.dumps(Crafted()))
        return msg

    distributed.worker.error_message = error_message


_patch()
"""


@pytest.fixture(scope="module")
def grid_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from conftest import start_portal, start_volunteer

    tmp = tmp_path_factory.mktemp("untrusted")
    portal = start_portal(tmp)
    markers = {}
    for name in ("evil", "friend"):
        site = tmp / f"site-{name}"
        site.mkdir()
        markers[name] = tmp / f"marker-{name}"
        (site / "sitecustomize.py").write_text(MALICIOUS_NODE.format(marker=str(markers[name])))
        path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
        start_volunteer(
            portal,
            tmp,
            name,
            "--cpus",
            "1",
            "--memory",
            "1GB",
            "--label",
            f"who={name}",
            "--sandbox",
            "none",  # the attacker's own machine: it runs whatever it likes anyway
            prefix=("env", f"PYTHONPATH={path}"),
        )
    yield portal, markers
    portal.stop()


@pytest.fixture(scope="module")
def shell(grid_site: Any) -> Iterator[Any]:
    from conftest import magic_shell

    from grid_portal.notebook.magics import magics_for

    portal, _ = grid_site
    with magic_shell(portal) as ip:
        # Cells as Dask tasks, which the node's patched cell task answers; its lease is
        # attacked by a test of its own, which turns the kernel's cell session on.
        magics_for(ip).grid.cells.idle = 0
        yield ip


def run(shell: Any, source: str) -> tuple[Any, Any]:
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        result = shell.run_cell(source)
    return result, captured


def kernel_ran(marker: Path) -> bool:
    """Whether this process (the kernel) opened a probe: its pid is in the marker."""
    lines = marker.read_text().split() if marker.exists() else []
    return str(os.getpid()) in lines


def cell_on(node: str, body: str, options: str = "") -> str:
    return f'%%grid --where labels.who == "{node}" {options}\n{body}\n'


def test_a_leased_cell_from_an_untrusted_node_runs_nothing_in_the_kernel(
    grid_site: Any, shell: Any
) -> None:
    from conftest import wait_for

    from grid_portal.notebook.magics import magics_for

    _, markers = grid_site
    session = magics_for(shell).grid.cells
    session.idle = 60.0
    try:
        run(shell, cell_on("evil", "1"))  # the usual way; the kernel asks for a lease there
        wait_for(lambda: session.lease is not None and session.lease.ready, what="the lease")
        sent = session.cells_sent
        result, captured = run(shell, cell_on("evil", "EVIL_LEASED = 1"))
        assert session.cells_sent == sent + 1, "the cell did not go to the lease"
        assert isinstance(result.error_in_exec, UntrustedResult), captured.stdout
        shown = captured.stdout + captured.stderr
        assert "builtins.exec" in shown and "GRID_PORTAL_TRUST" in shown, shown
    finally:
        session.idle = 0
        session.release()
    assert not kernel_ran(markers["evil"])


def test_an_untrusted_node_runs_nothing_in_the_kernel_and_gets_a_clear_refusal(
    grid_site: Any, shell: Any
) -> None:
    from grid_portal.notebook.magics import magics_for

    _, markers = grid_site
    marker = markers["evil"]
    grid = magics_for(shell).grid
    assert "evil" not in grid.trust

    # Returns a crafted pickle (gathered by Dask), and pushes one.
    for word in ("EVIL_RETURN", "EVIL_PUSH"):
        result, captured = run(shell, cell_on("evil", f"{word} = 1"))
        assert isinstance(result.error_in_exec, UntrustedResult), (word, captured.stdout)
        shown = captured.stdout + captured.stderr
        assert "builtins.exec" in shown and "GRID_PORTAL_TRUST" in shown, shown

    # Variables, the value and the display of a well-formed result.
    result, captured = run(shell, cell_on("evil", "EVIL_OUTPUTS = 1"))
    assert result.error_in_exec is None, captured.stdout + captured.stderr
    assert shell.user_ns["honest"] == 42 and "stolen" not in shell.user_ns
    assert "stolen was not loaded" in captured.stderr and "builtins.exec" in captured.stderr
    assert "the cell's value was not loaded" in captured.stderr
    [shown] = [o.data for o in captured.outputs if "text/html" in o.data]
    assert shown["text/html"] == "<b>shown</b>" and "application/javascript" not in shown
    assert "application/javascript removed" in shown["text/plain"]

    # The cell's own exception, and an exception Dask pickles.
    result, captured = run(shell, cell_on("evil", "EVIL_CELL_ERROR = 1"))
    assert isinstance(result.error_in_exec, RemoteError) and "ValueError: bad" in captured.stdout
    result, captured = run(shell, cell_on("evil", "EVIL_RAISE = 1"))
    assert result.error_in_exec is not None and "not opened" in captured.stdout, captured.stdout

    # A kept --bg result, fetched as after a kernel restart.
    handle = shell.run_cell_magic("grid", '--where labels.who == "evil" --bg', "EVIL_KEEP = 1")
    handle.wait()
    magics_for(shell).jobs.clear()  # this kernel forgets the handle: as after a restart
    result, captured = run(shell, f"%grid result {handle.job_id}")
    assert isinstance(result.error_in_exec, UntrustedResult), captured.stdout

    # Through Grid.submit: a result that is not data, from the same node.
    def make_probe(path: str) -> Any:
        class Probe:
            def __reduce__(self) -> Any:
                code = f"import os; open({path!r}, 'a').write(str(os.getpid()) + '\\n')"
                return (exec, (code,))

        return Probe()

    future = grid.submit(make_probe, str(marker), where='labels.who == "evil"')
    with pytest.raises(UntrustedResult, match="node evil"):
        future.result(timeout=60)
    assert grid.submit(sum, [1, 2], where='labels.who == "evil"').result(timeout=60) == 3

    assert not kernel_ran(marker)


def test_a_trusted_node_works_as_today(grid_site: Any, shell: Any) -> None:
    from grid_portal.notebook.magics import magics_for

    _, markers = grid_site
    marker = markers["friend"]
    grid = magics_for(shell).grid
    grid.trust.add("friend")
    try:
        result, captured = run(shell, cell_on("friend", "EVIL_OUTPUTS = 1"))
        assert result.error_in_exec is None, captured.stdout + captured.stderr
        assert "stolen" in shell.user_ns and "not loaded" not in captured.stderr
        [shown] = [o.data for o in captured.outputs if "text/html" in o.data]
        assert "<script>" in shown["text/html"] and "application/javascript" in shown
        assert kernel_ran(marker)  # opened with plain pickle, as before this issue

        marker.unlink()
        run(shell, cell_on("friend", "EVIL_PUSH = 1"))
        assert kernel_ran(marker)

        marker.unlink()
        result, captured = run(shell, cell_on("friend", "EVIL_CELL_ERROR = 1"))
        assert kernel_ran(marker)
    finally:
        grid.trust.discard("friend")
