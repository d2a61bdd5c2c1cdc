"""Issue 14: nobody runs anybody else's bytes, between volunteers.

A real portal and three real volunteers over mutual TLS: ``honest`` (sandboxed, as volunteers
run by default), ``friend`` (honest too) and ``evil``, a volunteer whose Python the test patches
(a sitecustomize on its PYTHONPATH): its worker answers every ``get_data`` with a crafted pickle
whose ``__reduce__`` writes a marker line naming the process that opened it. A task on the
honest node that needs a value held by the evil one fails with a clear refusal, and the marker
is never written; a dependency moving between two honest nodes gives the same result as on a
LocalCluster. Unit tests of the grid's own serialization family come first.
"""

from __future__ import annotations

import asyncio
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grid_portal.node import inbound
from grid_portal.payload import OpaqueResult, RefusedData


class WritesMarker:
    """The probe: unpickling it appends its process id and command line to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        code = (
            f"import os; open({self.path!r}, 'a').write('%d %s\\n' % (os.getpid(), "
            "open('/proc/self/cmdline').read().replace('\\0', ' ')))"
        )
        return (exec, (code,))


# -- the family, in this process ------------------------------------------------------------------
def test_the_node_family_carries_results_raw_and_data_as_data(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    result = OpaqueResult(pickle.dumps({"x": 1}))
    header, frames = inbound.node_dumps(result)
    assert frames == [result.data] and header == {"grid": "opaque"}
    assert inbound.node_loads(header, frames) == result
    for value in ({"a": [1, 2.5, "s", b"b"]}, np.arange(6.0), [OpaqueResult(b"z"), 3]):
        loaded = inbound.node_loads(*inbound.node_dumps(value))
        assert pickle.dumps(loaded) == pickle.dumps(value)
    refused = inbound.node_loads(*inbound.node_dumps(RefusedData("why")))
    assert type(refused) is RefusedData and refused.reason == "why"

    marker = tmp_path / "marker"
    crafted = inbound.node_loads({"grid": "data"}, [pickle.dumps(WritesMarker(marker))])
    assert type(crafted) is RefusedData and "builtins.exec" in crafted.reason
    assert "nothing in it ran" in crafted.reason
    with pytest.raises(PermissionError, match="builtins.exec"):
        from grid_portal.payload import opened

        opened(crafted)
    assert not marker.exists()


# -- end to end -----------------------------------------------------------------------------------
# The evil volunteer's own Python, patched: every value it hands another node is a crafted
# pickle in Dask's own pickle family, whatever family the other node asked for.
EVIL_NODE = """
import builtins, pickle

CODE = (
    "import os; open(%r, 'a').write('%%d %%s\\\\n' %% (os.getpid(), "
    "open('/proc/self/cmdline').read().replace('\\\\0', ' ')))" % {marker!r}
)


class Crafted:
    def __reduce__(self):
        return (builtins.exec, (CODE,))


def _patch():
    import distributed.worker
    from distributed.protocol.serialize import Serialized

    honest = distributed.worker.to_serialize

    def to_serialize(value):
        if isinstance(value, (int, str)) or value is None:
            return honest(value)
        return Serialized({{"serializer": "pickle"}}, [pickle.dumps(Crafted(), protocol=5)])

    distributed.worker.to_serialize = to_serialize


_patch()
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from conftest import start_portal, start_volunteer

    tmp = tmp_path_factory.mktemp("inbound")
    portal = start_portal(tmp)
    marker = tmp / "marker"
    patched = tmp / "site-evil"
    patched.mkdir()
    (patched / "sitecustomize.py").write_text(EVIL_NODE.format(marker=str(marker)))
    path = os.pathsep.join([str(patched), os.environ.get("PYTHONPATH", "")])
    common = ("--cpus", "1", "--memory", "1GB")
    start_volunteer(portal, tmp, "honest", *common, "--label", "who=honest")
    start_volunteer(portal, tmp, "friend", *common, "--label", "who=friend", "--sandbox", "none")
    start_volunteer(
        portal,
        tmp,
        "evil",
        *common,
        "--label",
        "who=evil",
        "--sandbox",
        "none",  # the attacker's own machine: it runs whatever it likes anyway
        prefix=("env", f"PYTHONPATH={path}"),
    )
    grid = portal.grid()
    yield portal, grid, marker
    grid.close()
    portal.stop()


def _on(node: str) -> str:
    return f'labels.who == "{node}"'


def test_a_dependency_moves_between_two_nodes_as_before(site: Any) -> None:
    from gridtasks import plus_one as inc
    from gridtasks import total

    _, grid, _ = site
    first = grid.submit(inc, 41, where=_on("friend"))
    second = grid.submit(inc, first, where=_on("honest"))
    both = grid.submit(total, [first, second], where=_on("honest"))
    assert (second.result(timeout=60), both.result(timeout=60)) == (43, 85)

    # Dask's own client, through grid.client: the same values as on a LocalCluster.
    import dask

    np = pytest.importorskip("numpy")

    @dask.delayed
    def make(n: int) -> Any:
        return np.arange(n, dtype="f8")

    @dask.delayed
    def norm(a: Any) -> float:
        return float((a**2).sum())

    from grid_portal.protocol import WHERE_ANNOTATION

    with dask.annotate(resources={"CPU": 1}, **{WHERE_ANNOTATION: _on("friend")}):
        made = make(1000)
    with dask.annotate(resources={"CPU": 1}, **{WHERE_ANNOTATION: _on("honest")}):
        value = norm(made)
    assert grid.client.compute(value).result(timeout=60) == norm(make(1000)).compute(
        scheduler="sync"
    )


def test_a_scattered_object_reaches_its_task_and_a_plain_value_stays_plain(site: Any) -> None:
    from fractions import Fraction

    from gridtasks import plus_one as inc

    _, grid, _ = site
    [friend] = [n.address for n in grid.nodes() if n.name == "friend"]
    [half] = grid.client.scatter([Fraction(1, 2)], workers=[friend])
    assert grid.submit(inc, half, where=_on("honest")).result(timeout=60) == Fraction(3, 2)
    blob = grid.client.scatter(b"bytes", hash=False, workers=[friend])
    assert grid.client.gather(blob) == b"bytes"


def test_a_node_never_opens_what_a_patched_node_sends_it(site: Any) -> None:
    from gridtasks import plus_one as inc

    _, grid, marker = site
    held = grid.submit(inc, 1, where=_on("evil"))
    needs_it = grid.submit(inc, held, where=_on("honest"))
    with pytest.raises(PermissionError) as refused:
        needs_it.result(timeout=60)
    text = str(refused.value)
    assert "builtins.exec" in text and "nothing in it ran" in text, text
    assert not marker.exists(), marker.read_text()


def test_a_request_carrying_a_pickle_runs_nothing_on_a_node(site: Any, tmp_path: Path) -> None:
    """A node's certificate sends the honest worker get_data with a crafted pickle in a field,
    in Dask's pickle family and as a ToPickle field: Dask reads both before the gate sees the
    op. Neither runs."""
    from conftest import researcher_connection
    from distributed.comm import connect
    from distributed.core import send_recv
    from distributed.protocol import to_serialize
    from distributed.protocol.serialize import ToPickle

    from grid_portal.connection import Connection

    portal, grid, _ = site
    marker = tmp_path / "marker"
    security = Connection.load(
        Path(researcher_connection(portal, tmp_path, "stolen-node", role="node"))
    ).security()
    [honest] = [n for n in grid.nodes() if n.name == "honest"]

    async def attack() -> list[Any]:
        answers = []
        for field in (to_serialize(WritesMarker(marker)), ToPickle(WritesMarker(marker))):
            comm = await connect(honest.address, **security.get_connection_args("worker"))
            try:
                answers.append(await send_recv(comm, op="get_data", keys=[], who=field))
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a refusal too
                answers.append(exc)
            finally:
                await comm.close()
        return answers

    answers = asyncio.run(attack())
    # The field in Dask's pickle family was read as a refusal, and get_data answered; the
    # pickled field was refused while the message was read.
    assert answers[0] == {"status": "OK", "data": {}}, answers
    assert isinstance(answers[1], Exception) and "builtins.exec" in str(answers[1]), answers
    assert not marker.exists(), marker.read_text()
