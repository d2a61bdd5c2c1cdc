"""Hostile input: oversized bodies and cells, deep nesting, huge maps, enrolment floods.

Each is refused with a clear error before any work exists: no job is created, no token is
spent. One portal (no volunteer: nothing here may reach one) serves the whole module; the
enrolment flood gets a portal of its own, as its rate limit is per portal process.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Portal, grid_portal_command, start_portal
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

from grid_portal.errors import UsageError
from grid_portal.jobs.cell import MAX_CELL_BYTES
from grid_portal.jobs.spec import MAX_DOCUMENT_BYTES, SpecError
from grid_portal.keys import make_key_and_csr
from grid_portal.portal.http import MAX_BODY
from grid_portal.portal.jobs import MAX_SPEC_BYTES
from grid_portal.portal.tokens import TokenStore

pytest_plugins = ("pytest_jupyter.jupyter_server",)

HUGE_MAP = {
    "name": "huge",
    "stages": [{"name": "a", "run": "m:f", "map": {"range": {"stop": 10**12}}}],
}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    portal = start_portal(tmp_path_factory.mktemp("hostile"))
    yield portal
    portal.stop()


@pytest.fixture
def no_new_jobs(target: Portal) -> Iterator[None]:
    """The test must leave the portal's job list as it found it."""
    with target.grid() as grid:
        before = [j.id for j in grid.jobs(everyone=True)]
        yield
        assert [j.id for j in grid.jobs(everyone=True)] == before, "a job was created"


# -- the REST API (Jupyter server extension) -----------------------------------------------


@pytest.fixture
def jp_server_config(target: Portal) -> Config:
    return Config(
        {
            "ServerApp": {
                "jpserver_extensions": {"grid_portal": True, "jupyter_server_terminals": False}
            },
            "GridPortal": {"address": target.connection_file},
        }
    )


@pytest.fixture
def post_job(jp_fetch: Any, jp_asyncio_loop: Any) -> Callable[[bytes], tuple[int, dict]]:
    async def fetch(body: bytes) -> Any:
        # Called inside the loop: tornado makes its Future at call time, and an earlier test
        # may have left this thread with no current event loop (asyncio.run() clears it).
        return await jp_fetch("grid", "api", "jobs", method="POST", body=body, raise_error=False)

    def post(body: bytes) -> tuple[int, dict]:
        response = jp_asyncio_loop.run_until_complete(fetch(body))
        return response.code, json.loads(response.body)

    return post


def test_rest_bodies_too_big_deep_or_huge_are_refused(
    post_job: Callable[[bytes], tuple[int, dict]], no_new_jobs: None
) -> None:
    status, body = post_job(b" " * (MAX_DOCUMENT_BYTES + 1))
    assert status == 413 and f"at most {MAX_DOCUMENT_BYTES:,}" in body["message"]

    status, body = post_job(b"[" * 200_000 + b"]" * 200_000)  # deeper than any parser allows
    assert status == 400 and "not valid JSON" in body["message"]

    deep = {"name": "x", "stages": [{"name": "a", "run": "m:f", "params": {"x": nested(40)}}]}
    status, body = post_job(json.dumps(deep).encode())
    assert status == 400 and "nested more than 32 levels" in body["message"]

    start = time.perf_counter()
    status, body = post_job(json.dumps(HUGE_MAP).encode())
    assert status == 400 and "1,000,000,000,000 tasks" in body["message"]
    assert time.perf_counter() - start < 5  # counted, never expanded


# -- the Python API and the CLI --------------------------------------------------------------


def test_specs_too_deep_or_huge_are_refused_by_every_front_end(
    target: Portal, tmp_path: Path, no_new_jobs: None
) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(9)
    )
    with target.grid() as grid:
        with pytest.raises(SpecError, match="1,000,000,000,000 tasks"):
            grid.run_workflow(HUGE_MAP)
        with pytest.raises(SpecError, match="too large"):
            grid.run_workflow(bomb)
        with pytest.raises(SpecError, match="nested more than 32 levels"):
            grid.run_workflow("name: x\nstages: " + "[" * 60 + "]" * 60)
        # The ledger keeps a job's spec for resubmission: not an arbitrary amount of it.
        with pytest.raises(UsageError, match=f"at most {MAX_SPEC_BYTES:,}"):
            grid.register_job("big", "big", "workflow", spec={"x": "y" * MAX_SPEC_BYTES})
    job_file = tmp_path / "huge.yaml"
    job_file.write_text(json.dumps(HUGE_MAP))
    out = subprocess.run(
        grid_portal_command("submit", str(job_file), "--portal", target.connection_file),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "1,000,000,000,000 tasks" in out.stderr and "Traceback" not in out.stderr


def test_a_huge_cell_is_refused_before_anything_is_sent(target: Portal, no_new_jobs: None) -> None:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "grid_portal")
    try:
        with capture_output():
            shell.run_line_magic("grid", f"connect {target.connection_file}")
        shell.user_ns["blob"] = b"x" * (MAX_CELL_BYTES + 10_000_000)
        with pytest.raises(IPythonUsageError, match=r"would send 210\.0 MB to the grid \(blob "):
            shell.run_cell_magic("grid", "", "len(blob)")
    finally:
        shell.user_ns.pop("blob", None)
        shell.run_line_magic("unload_ext", "grid_portal")


# -- enrolment ----------------------------------------------------------------------------------


def test_an_oversized_enrolment_is_refused(target: Portal) -> None:
    status, body = target.enrol(b"{" + b" " * (MAX_BODY + 1) + b"}")
    assert (status, body) == (413, {"error": "request too large"})


def test_enrolment_is_rate_limited_and_spends_no_token(portal: Portal) -> None:
    token = portal.token("--uses", "1")
    statuses = [portal.enrol(b"not json")[0] for _ in range(30)]
    assert statuses == [400] * 30
    _, csr = make_key_and_csr("flood")
    status, body = portal.enrol(json.dumps({"token": token, "csr": csr, "name": "x"}).encode())
    assert status == 429 and "too many enrolment attempts" in body["error"]
    (record,) = TokenStore(portal.data_dir / "ledger.sqlite").list()
    assert record.uses_left == 1  # refused before the token was looked at
