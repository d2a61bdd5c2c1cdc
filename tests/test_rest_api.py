"""The Jupyter server extension: REST + websocket API under grid/api/, against a real portal.

The Jupyter server runs in this process (pytest-jupyter); the portal and volunteers are real
processes. pytest-asyncio runs async tests on a loop of its own, which is not the loop the
Jupyter server lives on, so these tests are plain functions that drive the server's loop
(``run``), and anything blocking (schemathesis) runs on a thread while that loop serves it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Portal,
    grid_portal_command,
    portal_with,
    researcher_connection,
    start_volunteer,
    wait_for,
)
from gridtasks import two_stage_pipeline, where_and_what
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from tornado.httpclient import HTTPClientError, HTTPResponse
from tornado.websocket import WebSocketClientConnection
from traitlets.config import Config

import grid_portal
from grid_portal.connection import Connection, pid_alive
from grid_portal.embedded import stop_embedded_portal
from grid_portal.jupyter.openapi import openapi_document

pytest_plugins = ("pytest_jupyter.jupyter_server",)
pytestmark = pytest.mark.filterwarnings(
    "error::jupyter_server.utils.JupyterServerAuthWarning"  # no auth warnings, ever
)

TELEMETRY_INTERVAL = 0.5  # what conftest's start_portal configures
DOC = openapi_document()
_REGISTRY = Registry().with_resource("urn:grid-api", DRAFT202012.create_resource(DOC))


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    """One real portal with one real volunteer for the whole module."""
    tmp = tmp_path_factory.mktemp("rest-api")
    with portal_with(tmp, ("alpha", "--cpus", "1", "--memory", "1GB")) as portal:
        yield portal


@pytest.fixture
def grid_settings(request: pytest.FixtureRequest, grid: Portal) -> dict[str, Any]:
    """``c.GridPortal`` for this test's server; tests parametrize it indirectly."""
    param = getattr(request, "param", None)
    if param == "dead":
        return request.getfixturevalue("dead_settings")
    if param == "researcher":  # a server whose portal certificate is a researcher's
        return {"address": researcher_connection(grid, request.getfixturevalue("tmp_path"), "rita")}
    return param if param is not None else {"address": grid.connection_file}


@pytest.fixture
def allow_unauthenticated(request: pytest.FixtureRequest) -> bool:
    """``ServerApp.allow_unauthenticated_access``: False unless a test parametrizes it."""
    return bool(getattr(request, "param", False))


@pytest.fixture
def jp_server_config(grid_settings: dict[str, Any], allow_unauthenticated: bool) -> Config:
    return Config(
        {
            "ServerApp": {
                # Terminals (which pytest-jupyter adds) warn about their own auth: leave them out.
                "jpserver_extensions": {"grid_portal": True, "jupyter_server_terminals": False},
                "allow_unauthenticated_access": allow_unauthenticated,
                "reraise_server_extension_failures": True,  # a broken extension fails loudly
            },
            "GridPortal": grid_settings,
        }
    )


@pytest.fixture
def run(jp_asyncio_loop: asyncio.AbstractEventLoop) -> Callable[[Any], Any]:
    """Run a coroutine on the Jupyter server's loop (which serves requests meanwhile)."""
    return jp_asyncio_loop.run_until_complete


class Api:
    """``grid/api/...`` requests as the token-holding user; answers (status, JSON body)."""

    def __init__(self, fetch: Any, run: Callable[[Any], Any]) -> None:
        self.fetch, self.run = fetch, run

    def __call__(
        self, *parts: str, method: str = "GET", body: Any = None, **kwargs: Any
    ) -> tuple[int, Any]:
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        response: HTTPResponse = self.run(
            self.fetch(
                "grid",
                "api",
                *parts,
                method=method,
                body=body,
                raise_error=False,
                allow_nonstandard_methods=True,
                **kwargs,
            )
        )
        assert response.headers.get("Content-Type", "").startswith("application/json")
        return response.code, json.loads(response.body or b"null")


@pytest.fixture
def api(jp_fetch: Any, run: Callable[[Any], Any]) -> Api:
    return Api(jp_fetch, run)


def conforms(path: str, method: str, status: int, body: Any) -> None:
    """The status is documented for the operation and the body matches its schema."""
    responses = DOC["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered undocumented {status}: {body}"
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    valid(body, schema)


def valid(instance: Any, schema: dict[str, Any]) -> None:
    text = json.dumps(schema).replace('"#/components/', '"urn:grid-api#/components/')
    Draft202012Validator(json.loads(text), registry=_REGISTRY).validate(instance)


def event_conforms(message: dict[str, Any]) -> None:
    valid(message, DOC["x-events"]["messages"][message["type"]])


# -- the endpoints ------------------------------------------------------------------------------


def test_nodes_capacity_version_and_openapi(api: Api, grid: Portal) -> None:
    status, body = api("nodes")
    conforms("/nodes", "GET", status, body)
    alpha = next(n for n in body["nodes"] if n["name"] == "alpha")
    assert alpha["offer"] == {"cpus": 1, "memory": 1_000_000_000, "gpus": []}
    assert alpha["state"] in ("online", "busy") and alpha["history"] == []

    # One node carries its history: wait for the volunteer's second sample.
    def detail() -> Any:
        status, body = api("nodes", "alpha")
        return (status, body) if len(body.get("history", [])) >= 2 else None

    status, node = wait_for(detail, timeout=10, what="alpha's telemetry history")
    conforms("/nodes/{name}", "GET", status, node)
    assert node["telemetry"]["time"] >= node["history"][0]["time"]

    status, body = api("capacity")
    conforms("/capacity", "GET", status, body)
    assert body["nodes_online"] >= 1 and body["cores_total"] >= 1

    status, body = api("version")
    conforms("/version", "GET", status, body)
    assert body == {"version": grid_portal.__version__, "api": 1}

    status, body = api("openapi.json")
    conforms("/openapi.json", "GET", status, body)
    from openapi_spec_validator import validate

    validate(body)
    assert body["servers"] == [{"url": "/a%40b/grid/api"}]  # pytest-jupyter's base URL


def test_nodes_answer_304_while_unchanged_and_the_new_list_once_changed(
    jp_fetch: Any, run: Callable[[Any], Any], grid: Portal
) -> None:
    def get(etag: str | None = None) -> HTTPResponse:
        headers = {"If-None-Match": etag} if etag else {}
        return run(jp_fetch("grid", "api", "nodes", headers=headers, raise_error=False))

    first = get()
    assert first.code == 200 and first.headers["Etag"]

    def unchanged() -> tuple[str, HTTPResponse] | None:
        # Volunteers report every 0.5 s here: ask again at once with the ETag just seen.
        latest = get()
        again = get(latest.headers["Etag"])
        return (latest.headers["Etag"], again) if again.code == 304 else None

    etag, not_modified = wait_for(unchanged, timeout=20, what="a 304 for an unchanged list")
    assert not_modified.body == b""

    def changed() -> HTTPResponse | None:
        response = get(etag)
        return response if response.code == 200 else None

    # The next telemetry changes the list: the full list again, under a new ETag.
    response = wait_for(changed, timeout=20, what="the list to change")
    assert response.headers["Etag"] != etag
    assert any(n["name"] == "alpha" for n in json.loads(response.body)["nodes"])


def test_unknown_things_are_404_with_a_json_message(api: Api) -> None:
    status, body = api("nodes", "no-such-node")
    conforms("/nodes/{name}", "GET", status, body)
    assert status == 404 and "no-such-node" in body["message"]
    for method in ("GET", "DELETE"):
        status, body = api("jobs", "no-such-job", method=method)
        conforms("/jobs/{job_id}", method, status, body)
        assert status == 404 and "no-such-job" in body["message"]
    status, body = api("no", "such", "endpoint")
    assert status == 404 and "no such endpoint" in body["message"]
    status, body = api("nodes", method="PUT", body="{}")
    assert status == 405 and body["message"]


def test_jobs_are_the_users_own_and_cancel_works(api: Api, grid: Portal) -> None:
    with grid.grid() as client:
        me = client.whoami()["name"]
        # Queued for good (no node offers 2 CPUs), so cancelling it leaves no busy thread.
        with client.job("waits for a big node") as job_id:
            future = client.submit(where_and_what, 1, cpus=2, wait=True)
        # Someone else's job, made through the admin connection on their behalf.
        client._call("grid_job_create", job_id="mallory-1", name="theirs", owner="mallory")

        def listed() -> Any:
            status, body = api("jobs")
            return body if any(j["id"] == job_id for j in body["jobs"]) else None

        body = wait_for(listed, timeout=10, what="the job to be listed")
        conforms("/jobs", "GET", 200, body)
        assert {j["owner"] for j in body["jobs"]} == {me}
        assert "mallory-1" not in {j["id"] for j in body["jobs"]}
        assert body["others"]["queued"] >= 1
        status, body = api("whoami")
        conforms("/whoami", "GET", status, body)
        assert (body["user"], body["role"], body["staff"]) == (me, "admin", True)
        # The portal's admin (a class's teachers) may ask for everyone's.
        status, body = api("jobs", params={"everyone": "true"})
        conforms("/jobs", "GET", status, body)
        assert {job_id, "mallory-1"} <= {j["id"] for j in body["jobs"]}
        status, body = api("jobs", params={"everyone": "maybe"})
        conforms("/jobs", "GET", status, body)
        assert status == 400 and "true or false" in body["message"]

        status, job = api("jobs", job_id)
        conforms("/jobs/{job_id}", "GET", status, job)
        assert (job["id"], job["name"], job["owner"]) == (job_id, "waits for a big node", me)

        # Another user's job is as unknown to us as a job that does not exist.
        for method in ("GET", "DELETE"):
            status, body = api("jobs", "mallory-1", method=method)
            assert status == 404, body
        assert client.get_job("mallory-1").state.value == "queued"  # not cancelled

        status, job = api("jobs", job_id, method="DELETE")
        conforms("/jobs/{job_id}", "DELETE", status, job)
        assert job["state"] == "cancelled"
        wait_for(lambda: future.status == "cancelled", timeout=10, what="the task to be dropped")
        client.cancel("mallory-1")


@pytest.mark.parametrize("grid_settings", ["researcher"], indirect=True)
def test_only_the_admin_lists_everyones_jobs(api: Api) -> None:
    status, body = api("whoami")
    conforms("/whoami", "GET", status, body)
    assert body["user"] == "rita" and not body["staff"], body
    status, body = api("jobs", params={"everyone": "true"})
    conforms("/jobs", "GET", status, body)
    assert status == 403 and "leave out everyone=true" in body["message"]
    status, body = api("jobs")
    assert status == 200 and all(j["owner"] == "rita" for j in body["jobs"])


def test_submitting_a_spec_checks_it_then_runs_it(api: Api) -> None:
    status, body = api("jobs", method="POST", body='{"name": "x", "stages": [')
    conforms("/jobs", "POST", status, body)
    assert status == 400 and "not valid JSON" in body["message"]

    status, body = api("jobs", method="POST", body=[1, 2])
    assert status == 400 and "JSON object" in body["message"]

    bad = {"name": "x", "stages": [{"name": "a", "run": "gridtasks:burn", "retires": 2}]}
    status, body = api("jobs", method="POST", body=bad)
    conforms("/jobs", "POST", status, body)
    assert status == 400
    assert body["problems"][0]["path"] == "stages[0].retires", body
    assert "retries" in body["problems"][0]["message"] and "stages[0].retires" in body["message"]

    missing = {"name": "x", "stages": [{"name": "a", "run": "gridtasks:no_such_function"}]}
    status, body = api("jobs", method="POST", body=missing)
    conforms("/jobs", "POST", status, body)
    assert status == 400 and body["problems"][0]["path"] == "stages[0].run", body

    good = {"name": "ok", "stages": [{"name": "a", "run": "gridtasks:burn", "args": [0.1]}]}
    status, body = api("jobs", method="POST", body=good, params={"dry_run": "true"})
    conforms("/jobs", "POST", status, body)
    assert (status, body) == (200, {"name": "ok", "stages": 1, "tasks": 1})

    # No node offers a GPU: refused at once, unless the job may wait for such a node.
    gpu = {
        "name": "gpu",
        "stages": [{"name": "a", "run": "gridtasks:burn", "resources": {"gpus": 1}}],
    }
    status, body = api("jobs", method="POST", body=gpu, params={"dry_run": "1"})
    conforms("/jobs", "POST", status, body)
    assert status == 409 and "GPU" in body["message"]
    status, body = api(
        "jobs", method="POST", body=gpu, params={"dry_run": "1", "wait_for_nodes": "true"}
    )
    assert status == 200, body
    status, body = api("jobs", method="POST", body=good, params={"dry_run": "maybe"})
    assert status == 400 and "dry_run" in body["message"]

    status, job = api("jobs", method="POST", body=good)
    conforms("/jobs", "POST", status, job)
    assert status == 201 and (job["name"], job["kind"]) == ("ok", "workflow")

    def done() -> Any:
        status, body = api("jobs", job["id"])
        return body if status == 200 and body["state"] == "done" else None

    finished = wait_for(done, timeout=30, what="the submitted workflow to finish")
    assert finished["nodes"] == ["alpha"]


def run_to_the_end(api: Api, spec: dict[str, Any], state: str = "done") -> dict[str, Any]:
    """Submit a workflow through the API and wait until it ends in ``state``; its Job."""
    status, job = api("jobs", method="POST", body=spec)
    assert status == 201, job

    def ended() -> Any:
        status, body = api("jobs", job["id"])
        return body if status == 200 and body["state"] == state else None

    return wait_for(ended, timeout=60, what=f"the workflow to be {state}")


def test_a_workflows_logs_as_the_cli_shows_them(api: Api, grid: Portal) -> None:
    spec = {
        "name": "says",
        "stages": [
            {
                "name": "say",
                "run": {"shell": "echo hello {n} && echo oops {n} >&2"},
                "map": {"over": [0, 1, 2], "as": "n"},
            }
        ],
    }
    job = run_to_the_end(api, spec)
    status, body = api("jobs", job["id"], "logs")
    conforms("/jobs/{job_id}/logs", "GET", status, body)
    assert sorted(t["item"] for t in body["tasks"]) == [0, 1, 2]
    for t in body["tasks"]:
        assert (t["stage"], t["node"], t["state"]) == ("say", "alpha", "done")
        assert t["stdout"].strip() == f"hello {t['item']}"
        assert t["stderr"].strip() == f"oops {t['item']}"
    status, body = api("jobs", job["id"], "logs", params={"stage": "say", "item": "1"})
    conforms("/jobs/{job_id}/logs", "GET", status, body)
    assert [t["stdout"].strip() for t in body["tasks"]] == ["hello 1"]
    status, body = api("jobs", job["id"], "logs", params={"stage": "nothing"})
    assert (status, body["tasks"]) == (200, [])
    status, body = api("jobs", job["id"], "logs", params={"item": "one"})
    conforms("/jobs/{job_id}/logs", "GET", status, body)
    assert status == 400 and "whole number" in body["message"]

    not_yours_is_unknown(api, grid, "logs")


def test_a_running_pipelines_items_say_their_stage_and_node(api: Api) -> None:
    """GET jobs/{id}/tasks of a pipeline: per item, the stage it is in and where it runs,
    while it runs and once done (the sidebar's job view draws this)."""
    spec = two_stage_pipeline("pipe", items=3, seconds=0.6)
    status, job = api("jobs", method="POST", body=spec)
    assert status == 201, job

    def items_under_way() -> Any:
        status, body = api("jobs", job["id"], "tasks")
        conforms("/jobs/{job_id}/tasks", "GET", status, body)
        assert status == 200 and body["job"]["state"] in ("queued", "running"), body
        running = [i for i in body["items"] if i["state"] == "running"]
        return body if running and len(body["items"]) == 3 else None

    body = wait_for(items_under_way, timeout=30, interval=0.05, what="an item running")
    for entry in body["items"]:
        assert [step["stage"] for step in entry["path"]] == ["decode", "encode"], entry
        if entry["state"] == "running":  # given to alpha, the one node
            assert entry["node"] == "alpha" and entry["stage"] in ("decode", "encode"), entry
        elif entry["state"] == "queued":  # waiting for a node
            assert entry["node"] is None, entry
    assert body["items"][0]["state"] != "done"  # items under way come first

    def finished() -> Any:
        status, body = api("jobs", job["id"], "tasks")
        return body if status == 200 and body["job"]["state"] == "done" else None

    body = wait_for(finished, timeout=60, what="the pipeline to finish")
    conforms("/jobs/{job_id}/tasks", "GET", 200, body)
    assert body["items_truncated"] is False
    assert [(i["item"], i["stage"], i["state"], i["node"]) for i in body["items"]] == [
        (n, "encode", "done", "alpha") for n in range(3)
    ]
    for entry in body["items"]:
        path = [(step["stage"], step["node"], step["moved"]) for step in entry["path"]]
        assert path == [("decode", "alpha", 0), ("encode", "alpha", 0)], entry


def not_yours_is_unknown(api: Api, grid: Portal, what: str) -> None:
    """Another user's job is as unknown as a job that does not exist: 404, never 500."""
    with grid.grid() as client:
        client._call("grid_job_create", job_id=f"mallory-{what}", name="theirs", owner="mallory")
        try:
            for job_id in (f"mallory-{what}", "no-such-job"):
                status, body = api("jobs", job_id, what)
                conforms(f"/jobs/{{job_id}}/{what}", "GET", status, body)
                assert status == 404, body
        finally:
            client.cancel(f"mallory-{what}")


def test_a_workflows_outputs_as_the_cli_brings_them(
    api: Api, grid: Portal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files, values and an unopened object, each by name, as data: even a server whose Grid
    trusts every node never unpickles what a node made (the probe would leave a mark)."""
    monkeypatch.setenv("GRID_PORTAL_TRUST", "*")  # the server's Grid, made on first use
    marks_dir = tmp_path / "marks"
    spec = {
        "name": "brings",
        "stages": [
            {
                "name": "pages",
                "run": {
                    "shell": "mkdir -p out && echo hello {n} > out/f{n}.txt && "
                    "echo '<script>alert(1)</script>' > out/p{n}.html"
                },
                "map": {"over": [0, 1], "as": "n"},
                "outputs": ["out/*"],
            },
            {"name": "total", "run": "gridtasks:wf_seed", "params": {"base": 7}},
            {"name": "probe", "run": "test_opaque_results:make_probe", "args": [str(marks_dir)]},
        ],
    }
    job = run_to_the_end(api, spec)
    status, body = api("jobs", job["id"], "outputs")
    conforms("/jobs/{job_id}/outputs", "GET", status, body)
    by_name = {o["name"]: o for o in body["outputs"]}
    for n in (0, 1):
        entry = by_name[f"out/f{n}.txt"]
        assert (entry["kind"], entry["stage"], entry["item"]) == ("file", "pages", n)
        assert entry["content_type"] == "text/plain" and entry["size"] == len(f"hello {n}\n")
        assert by_name[f"pages[{n}]"]["kind"] == "value"  # the item's value: its files' names
    assert (by_name["total"]["kind"], by_name["total"]["item"]) == ("value", None)
    assert by_name["probe"]["kind"] == "unopened" and by_name["probe"]["type"] == "builtins.exec"

    def raw(name: str) -> HTTPResponse:
        return api.run(
            api.fetch("grid", "api", "jobs", job["id"], "outputs", name, raise_error=False)
        )

    response = raw("out/f1.txt")
    assert (response.code, response.body) == (200, b"hello 1\n")
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers["X-Grid-SHA256"] == by_name["out/f1.txt"]["sha256"]
    page = raw("out/p0.html")  # a page a node made is a download, never rendered here
    assert page.code == 200 and page.headers["Content-Type"] == "text/html"
    assert page.headers["Content-Disposition"] == 'attachment; filename="p0.html"'
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Content-Security-Policy"].startswith("sandbox")
    value = raw("total")
    assert value.code == 200 and value.headers["Content-Type"] == "application/json"
    assert json.loads(value.body) == 7
    assert json.loads(raw("pages[1]").body) == ["out/f1.txt", "out/p1.html"]
    for name, expected in (("probe", 409), ("nothing", 404)):
        status, body = api("jobs", job["id"], "outputs", name)
        conforms("/jobs/{job_id}/outputs/{name}", "GET", status, body)
        assert status == expected, body
    assert "not plain data" in api("jobs", job["id"], "outputs", "probe")[1]["message"]
    assert not marks_dir.exists(), "the Jupyter server unpickled what a node sent"
    # Reading them keeps them held: the CLI can still fetch them.
    fetched = subprocess.run(
        grid_portal_command(
            "job", job["id"], "--fetch", str(tmp_path / "got"), "--portal", grid.connection_file
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (tmp_path / "got" / "out" / "f0.txt").read_text() == "hello 0\n", fetched.stderr

    not_yours_is_unknown(api, grid, "outputs")
    with grid.grid() as client:  # a job still running has no outputs yet
        client.register_job("mine-running", "mine", "workflow")
        try:
            status, body = api("jobs", "mine-running", "outputs")
            conforms("/jobs/{job_id}/outputs", "GET", status, body)
            assert status == 409 and "once it is done" in body["message"], body
        finally:
            client.cancel("mine-running")


# -- authentication ------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "nodes"),
    ("GET", "nodes/alpha"),
    ("GET", "capacity"),
    ("GET", "jobs"),
    ("POST", "jobs"),
    ("GET", "jobs/x"),
    ("DELETE", "jobs/x"),
    ("GET", "jobs/x/logs"),
    ("GET", "jobs/x/outputs"),
    ("GET", "jobs/x/outputs/out/a.txt"),
    ("GET", "version"),
    ("GET", "whoami"),
    ("GET", "volunteer"),
    ("GET", "openapi.json"),
    ("GET", "events"),
    ("OPTIONS", "nodes"),
    ("GET", "elsewhere"),
    ("HEAD", "nodes"),
]


@pytest.mark.parametrize(
    "allow_unauthenticated", [False, True], indirect=True, ids=["strict-server", "lax-server"]
)
def test_nothing_answers_without_authentication(
    allow_unauthenticated: bool,
    http_server_client: Any,
    jp_base_url: str,
    jp_ws_fetch: Any,
    run: Any,
) -> None:
    """Even a server that lets unauthenticated requests through elsewhere refuses them here."""

    def fetch(method: str, path: str, headers: dict[str, str]) -> int:
        response = run(
            http_server_client.fetch(
                f"{jp_base_url}grid/api/{path}",
                method=method,
                headers=headers,
                body="{}" if method == "POST" else None,
                raise_error=False,
                allow_nonstandard_methods=True,
            )
        )
        return response.code

    for headers in ({}, {"Authorization": "token not-the-token"}):
        for method, path in ENDPOINTS:
            assert fetch(method, path, headers) == 403, (method, path, headers)
    assert fetch("GET", "../../grid", {}) == 403  # grid/ itself
    with pytest.raises(HTTPClientError) as refused:
        run(jp_ws_fetch("grid", "api", "events", headers={"Authorization": "token nope"}))
    assert refused.value.code == 403


def test_writes_need_xsrf_when_authenticated_by_cookie(
    http_server_client: Any, jp_base_url: str, jp_auth_header: dict[str, str], run: Any
) -> None:
    def fetch(method: str, path: str, headers: dict[str, str]) -> HTTPResponse:
        return run(
            http_server_client.fetch(
                f"{jp_base_url}grid/api/{path}",
                method=method,
                headers=headers,
                body="{}" if method == "POST" else None,
                raise_error=False,
            )
        )

    # A token-authenticated request leaves a login cookie, as a browser would hold.
    login = fetch("GET", "version", dict(jp_auth_header))
    cookie = "; ".join(c.split(";")[0] for c in login.headers.get_list("Set-Cookie"))
    assert fetch("GET", "version", {"Cookie": cookie}).code == 200

    for method, path in (("DELETE", "jobs/x"), ("POST", "jobs")):
        refused = fetch(method, path, {"Cookie": cookie})
        assert refused.code == 403 and "_xsrf" in json.loads(refused.body)["message"]
        xsrf = {"Cookie": f"{cookie}; _xsrf=abc123", "X-XSRFToken": "abc123"}
        assert fetch(method, path, xsrf).code in (400, 404)  # past auth, into the handler


# -- the live feed -------------------------------------------------------------------------------


def _next_message(ws: WebSocketClientConnection, run: Any, timeout: float = 10) -> dict:
    text = run(asyncio.wait_for(ws.read_message(), timeout))
    assert text is not None, "the events websocket closed"
    message = json.loads(text)
    event_conforms(message)
    return message


def _until(ws: WebSocketClientConnection, run: Any, predicate: Any, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = _next_message(ws, run, timeout=deadline - time.monotonic())
        found = predicate(message)
        if found:
            return found, time.time()
    raise AssertionError("the events websocket did not report it in time")


def test_events_push_nodes_joining_and_leaving_and_own_jobs(
    jp_ws_fetch: Any, api: Api, run: Any, grid: Portal, tmp_path: Path
) -> None:
    ws = run(jp_ws_fetch("grid", "api", "events"))
    snapshot = _next_message(ws, run)
    assert snapshot["type"] == "snapshot"
    assert "alpha" in {n["name"] for n in snapshot["nodes"]}
    assert snapshot["capacity"]["nodes_online"] >= 1

    def node_in(name: str, state: str | None = None) -> Callable[[dict], Any]:
        def find(message: dict) -> Any:
            if message["type"] != "nodes":
                return None
            return next(
                (
                    n
                    for n in message["nodes"]
                    if n["name"] == name and (state is None or n["state"] == state)
                ),
                None,
            )

        return find

    beta = start_volunteer(grid, tmp_path, "beta", "--cpus", "1", "--memory", "1GB", wait=False)
    joined, seen_at = _until(ws, run, node_in("beta"), timeout=30)
    assert seen_at - joined["joined"] <= 2 * TELEMETRY_INTERVAL
    # GET nodes, answered from the same live mirror while it runs, already has it.
    status, body = api("nodes")
    conforms("/nodes", "GET", status, body)
    assert {"alpha", "beta"} <= {n["name"] for n in body["nodes"]}

    late = run(jp_ws_fetch("grid", "api", "events"))  # a late client starts from a snapshot
    late_snapshot = _next_message(late, run)
    assert late_snapshot["type"] == "snapshot"
    assert "beta" in {n["name"] for n in late_snapshot["nodes"]}
    assert late_snapshot["version"] >= snapshot["version"]
    late.close()

    beta.kill(signal.SIGKILL)
    gone, seen_at = _until(ws, run, node_in("beta", "offline"))
    assert seen_at - gone["last_seen"] <= 2 * TELEMETRY_INTERVAL

    # Jobs: this user's changes arrive as deltas; other users' jobs never do.
    with grid.grid() as client:
        client._call("grid_job_create", job_id="mallory-2", name="theirs", owner="mallory")
        client.register_job("mine-1", "mine", "workflow")
        message, _ = _until(ws, run, lambda m: m if m["type"] == "jobs" else None)
        assert [j["id"] for j in message["jobs"]] == ["mine-1"]
        assert message["removed"] == []
        client.cancel("mine-1")
        client.cancel("mallory-2")
    ws.close()


# -- the portal unreachable ---------------------------------------------------------------------


def _dead_portal_connection(grid: Portal, tmp: Path) -> str:
    """A connection file to a port nobody listens on, with valid certificates."""
    import socket

    conn = Connection.load(Path(grid.connection_file))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conn.scheduler = f"tls://127.0.0.1:{port}"
    path = tmp / "dead.json"
    conn.save(path)
    return str(path)


@pytest.fixture
def dead_settings(grid: Portal, tmp_path: Path) -> dict[str, Any]:
    return {"address": _dead_portal_connection(grid, tmp_path), "connect_timeout": 1.0}


@pytest.mark.parametrize(
    "grid_settings",
    [{"address": "/nonexistent/connection.json"}, "dead"],
    indirect=True,
    ids=["missing-connection-file", "nobody-listening"],
)
def test_an_unreachable_portal_is_503_with_a_message(
    grid_settings: dict[str, Any], api: Api, jp_ws_fetch: Any, run: Any
) -> None:
    async def nodes_and_version() -> tuple[Any, Any, bool]:
        nodes = asyncio.ensure_future(api.fetch("grid", "api", "nodes", raise_error=False))
        version = await api.fetch("grid", "api", "version")
        # The server answered while it was still trying the portal for the other request:
        # connecting runs on a thread, not on the event loop.
        pending = not nodes.done()
        return await nodes, version, pending

    nodes, version, pending = run(nodes_and_version())
    assert version.code == 200
    body = json.loads(nodes.body)
    conforms("/nodes", "GET", nodes.code, body)
    assert nodes.code == 503
    message = body["message"].lower()
    assert "/nonexistent/connection.json" in message or "is it running" in message
    if grid_settings.get("connect_timeout"):  # the case where connecting takes a while
        assert pending
    ws = run(jp_ws_fetch("grid", "api", "events"))
    message = _next_message(ws, run)
    assert message["type"] == "error" and message["message"]
    ws.close()


# -- fuzzing the whole API ----------------------------------------------------------------------


def test_schemathesis_finds_no_server_errors(
    api: Api, jp_auth_header: dict[str, str], http_server_client: Any, jp_base_url: str, run: Any
) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    status, document = api("openapi.json")
    schema = schemathesis.openapi.from_dict(document)
    base = f"http://127.0.0.1:{http_server_client.get_http_port()}{jp_base_url}grid/api"
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
    seen: dict[str, set[int]] = {}

    def fuzz_one(operation: Any) -> None:
        label = operation.label

        @settings(
            max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            if label == "POST /jobs":
                # Random specs must not run random code on the test volunteer: check only.
                case.query = {**(case.query or {}), "dry_run": "true"}
            response = case.call(base_url=base, headers=dict(jp_auth_header), timeout=20)
            seen.setdefault(label, set()).add(response.status_code)
            assert response.status_code < 500, (
                f"{label} answered {response.status_code}: {response.text}"
            )
            case.validate_response(response, checks=checks)

        check()

    def fuzz() -> None:
        for result in schema.get_all_operations():
            fuzz_one(result.ok())

    run(asyncio.to_thread(fuzz))
    print("statuses seen:", {k: sorted(v) for k, v in sorted(seen.items())})
    assert len(seen) == sum(len(ops) for ops in document["paths"].values())


# -- the embedded portal ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid_settings",
    [{"address": None, "embedded_cpus": 4096}, {"address": None, "embedded_memory": "1PB"}],
    indirect=True,
)
def test_a_mistake_in_the_servers_grid_settings_is_answered_on_every_call(
    grid_settings: dict[str, Any], api: Api, jp_serverapp: Any
) -> None:
    """More CPUs or memory than the machine has, in c.GridPortal: the extension still loads
    (the server re-raises extension failures here), and every call says what to fix, with no
    embedded portal started for a volunteer that could never join it."""
    (setting,) = (name for name in grid_settings if name != "address")
    for _ in range(2):
        status, body = api("capacity")
        assert status == 503, body
        assert body["message"].startswith(f"GridPortal.{setting} is "), body
        assert "but this machine has" in body["message"], body
        assert "restart the server" in body["message"], body
    assert jp_serverapp.web_app.settings["grid_portal"].embedded_pid is None


@pytest.mark.parametrize(
    "grid_settings",
    [{"address": None, "embedded_cpus": 1, "embedded_memory": "1GB"}],
    indirect=True,
)
def test_with_nothing_configured_the_embedded_portal_starts_and_stops_with_the_server(
    grid_settings: dict[str, Any], api: Api, jp_serverapp: Any, run: Any
) -> None:
    try:
        status, body = api("capacity", request_timeout=90)  # the first use starts it
        assert status == 200, body

        def local_node() -> Any:
            _, body = api("nodes")
            return next((n for n in body["nodes"] if n["labels"].get("embedded")), None)

        node = wait_for(local_node, timeout=60, what="the embedded portal's local volunteer")
        assert node["offer"]["cpus"] == 1 and node["offer"]["memory"] == 1_000_000_000
        portal = jp_serverapp.web_app.settings["grid_portal"]
        pid = portal.embedded_pid
        assert pid is not None and pid_alive(pid)

        run(jp_serverapp.cleanup_extensions())  # what stopping the server runs
        assert not pid_alive(pid)
    finally:
        stop_embedded_portal()


@pytest.mark.parametrize("grid_settings", [{"address": None}], indirect=True)
def test_an_embedded_portal_the_server_did_not_start_keeps_running(
    grid_settings: dict[str, Any], api: Api, jp_serverapp: Any, run: Any
) -> None:
    started = subprocess.run(
        grid_portal_command("embedded", "start"), capture_output=True, text=True, timeout=90
    )
    assert started.returncode == 0, started.stderr
    try:
        from grid_portal.connection import embedded_connection_path

        pid = Connection.load(embedded_connection_path()).pid
        status, body = api("capacity")
        assert status == 200, body
        run(jp_serverapp.cleanup_extensions())
        assert pid_alive(pid), "the server stopped a portal it had not started"
    finally:
        stop_embedded_portal()
