"""A classroom: the portal as a JupyterHub service, students and a teacher, Binder's files.

The Hub is real (JupyterHub with DummyAuthenticator, SimpleLocalProcessSpawner and
configurable-http-proxy, all on 127.0.0.1), configured by the documented snippet
(``configure_jupyterhub``), which makes the portal a Hub-managed service. Two students run a
``%%grid`` cell in their own kernels; the teacher is a member of the Hub group "teachers".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Portal, grid_portal_command, start_volunteer, wait_for

from grid_portal.client import Grid
from grid_portal.errors import EnrolmentRefused, GridError, UsageError
from grid_portal.hubconnect import HubEnvironment, enrol_with_hub
from grid_portal.model import JobState
from grid_portal.portal.hub import HubSettings, HubUser, _bearer, role_for, user_from_model

REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = uuid.uuid4().hex  # the test's own Hub service, to create users and tokens


# -- pure parts ------------------------------------------------------------------------------
def test_teachers_are_hub_admins_or_members_of_a_teacher_group() -> None:
    settings = HubSettings(api_url="http://hub/hub/api", teacher_groups=("teachers",))
    assert role_for(HubUser("ann"), settings) == "client"
    assert role_for(HubUser("tom", groups=("teachers",)), settings) == "teacher"
    assert role_for(HubUser("root", admin=True), settings) == "teacher"
    strict = HubSettings(api_url="http://hub/hub/api", admins_are_teachers=False)
    assert role_for(HubUser("root", admin=True), strict) == "client"


def test_hub_settings_need_the_hubs_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_API_URL", raising=False)
    with pytest.raises(UsageError, match="--hub-api-url"):
        HubSettings.from_env()
    with pytest.raises(UsageError, match="http"):
        HubSettings.from_env(api_url="hub:8081/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api/")
    settings = HubSettings.from_env(teacher_groups=["teachers", " "])
    assert settings.api_url == "http://127.0.0.1:8081/hub/api"
    assert settings.teacher_groups == ("teachers",)


def test_only_a_hub_user_model_is_an_identity() -> None:
    user = user_from_model({"kind": "user", "name": "ann", "admin": False, "groups": ["x"]})
    assert user == HubUser("ann", False, ("x",))
    assert not user_from_model({"kind": "user", "name": "a", "admin": "yes"}).admin
    with pytest.raises(EnrolmentRefused, match="service"):
        user_from_model({"kind": "service", "name": "grid-portal"})
    assert _bearer("token abc") == "abc" and _bearer("Bearer abc") == "abc"
    assert _bearer("Basic abc") is None and _bearer("token") is None and _bearer(None) is None


def test_binder_files_install_the_package_and_open_the_examples() -> None:
    binder = REPO / "binder"
    post_build = (binder / "postBuild").read_text()
    assert os.access(binder / "postBuild", os.X_OK) and os.access(binder / "start", os.X_OK)
    assert re.search(r'^python -m pip install .*"\.\[jupyter\]"$', post_build, re.M)
    start = (binder / "start").read_text()
    assert 'exec "$@"' in start and "ensure_embedded_portal" in start
    requirements = (binder / "requirements.txt").read_text()
    assert "jupyterlab" in requirements
    notebooks = sorted((REPO / "example-notebooks").glob("*.ipynb"))
    assert notebooks, "binder opens example-notebooks/, which must have notebooks"
    for nb in notebooks:
        json.loads(nb.read_text())  # valid notebooks
    assert "example-notebooks" in (binder / "README.md").read_text()


# -- a real JupyterHub -----------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _find_proxy() -> str:
    """configurable-http-proxy from PATH, else from (or installed into) a cache folder."""
    found = shutil.which("configurable-http-proxy")
    if found:
        return found
    prefix = Path.home() / ".cache" / "grid-portal-tests" / "chp"
    local = prefix / "node_modules" / ".bin" / "configurable-http-proxy"
    if local.exists():
        return str(local)
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(
            "JupyterHub needs configurable-http-proxy and npm is missing: install Node.js, then "
            "npm install -g configurable-http-proxy"
        )
    print(f"installing configurable-http-proxy into {prefix}", file=sys.stderr)
    done = subprocess.run(
        [
            npm,
            "install",
            "--prefix",
            str(prefix),
            "--no-audit",
            "--no-fund",
            "configurable-http-proxy",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 or not local.exists():
        pytest.skip(f"npm could not install configurable-http-proxy: {done.stderr[-500:]}")
    return str(local)


@dataclass
class Classroom:
    hub: subprocess.Popen[bytes]
    hub_url: str  # public (the proxy), http://127.0.0.1:PORT
    portal: Portal
    env: dict[str, str]  # GRID_PORTAL_URL, GRID_PORTAL_CA_PIN, as the snippet set them
    tmp: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def api(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.hub_url}/hub/api{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def user_get(self, user: str, path: str) -> Any:
        request = urllib.request.Request(
            f"{self.hub_url}/user/{user}/{path}",
            headers={"Authorization": f"token {self.tokens[user]}"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def portal_post(self, path: str, body: dict[str, Any], token: str | None) -> tuple[int, Any]:
        ctx = ssl.create_default_context(cafile=str(self.portal.data_dir / "ca" / "ca.pem"))
        ctx.check_hostname = False
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"token {token}"
        request = urllib.request.Request(
            self.env["GRID_PORTAL_URL"] + path, data=json.dumps(body).encode(), headers=headers
        )
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def run_cell(self, user: str, code: str, timeout: float = 120) -> str:
        """Run ``code`` in ``user``'s kernel (started on first use); returns its stdout."""
        return asyncio.run(self._run_cell(user, code, timeout))

    async def _run_cell(self, user: str, code: str, timeout: float) -> str:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        kernels = self.__dict__.setdefault("kernels", {})
        if user not in kernels:
            request = urllib.request.Request(
                f"{self.hub_url}/user/{user}/api/kernels",
                data=b'{"name": "python3"}',
                headers={"Authorization": f"token {self.tokens[user]}"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                kernels[user] = json.loads(response.read())["id"]
        session = uuid.uuid4().hex
        ws_url = self.hub_url.replace("http://", "ws://")
        conn = await websocket_connect(
            HTTPRequest(
                f"{ws_url}/user/{user}/api/kernels/{kernels[user]}/channels?session_id={session}",
                headers={"Authorization": f"token {self.tokens[user]}"},
                request_timeout=60,
            )
        )
        msg_id = uuid.uuid4().hex
        await conn.write_message(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": user,
                        "session": session,
                        "msg_type": "execute_request",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": True,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )
        out: list[str] = []
        errors: list[str] = []
        replied = idle = False
        try:
            while not (replied and idle):
                raw = await asyncio.wait_for(conn.read_message(), timeout)
                if raw is None:
                    raise AssertionError(f"{user}'s kernel websocket closed")
                msg = json.loads(raw)
                if (msg.get("parent_header") or {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["header"]["msg_type"], msg["content"]
                if kind == "stream":
                    out.append(content["text"])
                elif kind == "error":
                    errors.append(f"{content['ename']}: {content['evalue']}")
                elif kind == "execute_reply":
                    replied = True
                elif kind == "status" and content.get("execution_state") == "idle":
                    idle = True
        finally:
            conn.close()
        assert not errors, f"{user}'s cell failed: {errors}; output: {''.join(out)}"
        return "".join(out)


def _hub_config(tmp: Path, ports: dict[str, int], proxy: str, data_dir: Path) -> str:
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    return f"""
import sys
from grid_portal.portal.hub import configure_jupyterhub

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {ports["public"]}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {ports["hub"]}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{ports["proxy_api"]}"
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.JupyterHub.db_url = "sqlite:///{tmp}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{tmp}/jupyterhub_cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "{tmp}/home/{{username}}"
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.args = {["--allow-root"] if as_root else []!r}
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
# Our server extension, as an installed package enables it.
c.Spawner.environment = {{"JUPYTER_CONFIG_PATH": {str(REPO / "jupyter-config")!r}}}
c.JupyterHub.services = [{{"name": "test-admin", "api_token": {ADMIN_TOKEN!r}}}]
c.JupyterHub.load_roles = [{{
    "name": "test-admin",
    "scopes": ["admin:users", "admin:servers", "admin:groups", "tokens"],
    "services": ["test-admin"],
}}]

# The documented snippet (docs/classroom.md):
configure_jupyterhub(
    c, data_dir={str(data_dir)!r}, host="127.0.0.1", port=0, http_port={ports["portal"]},
    teacher_groups=["teachers"],
)
"""


@pytest.fixture(scope="module")
def classroom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Classroom]:
    pytest.importorskip("jupyterhub", reason="pip install jupyterhub (the test extra has it)")
    proxy = _find_proxy()
    tmp = tmp_path_factory.mktemp("classroom")
    ports = dict(zip(("public", "hub", "proxy_api", "portal"), _free_ports(4), strict=True))
    data_dir = tmp / "portal"
    config = tmp / "jupyterhub_config.py"
    config.write_text(_hub_config(tmp, ports, proxy, data_dir))
    log = tmp / "hub.log"
    with open(log, "wb") as out:
        hub = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    hub_url = f"http://127.0.0.1:{ports['public']}"
    room: Classroom | None = None
    try:

        def portal_ready() -> dict[str, Any] | None:
            if hub.poll() is not None:
                raise AssertionError(f"the Hub exited:\n{log.read_text()[-5000:]}")
            path = data_dir / "portal.json"
            return json.loads(path.read_text()) if path.exists() else None

        info = wait_for(portal_ready, timeout=90, what="the Hub to start the portal service")
        portal = Portal(data_dir=data_dir, process=hub, info=info, log=log)
        env = {
            "GRID_PORTAL_URL": f"https://127.0.0.1:{ports['portal']}",
            "GRID_PORTAL_CA_PIN": json.loads((data_dir / "portal.json").read_text())["ca_pin"],
        }
        room = Classroom(hub=hub, hub_url=hub_url, portal=portal, env=env, tmp=tmp)
        wait_for(lambda: room.api("GET", "/"), timeout=60, what="the Hub's API")
        room.api("POST", "/users", {"usernames": ["alice", "bob", "mrs-t"]})
        room.api("POST", "/groups/teachers", {"users": ["mrs-t"]})
        for user in ("alice", "bob", "mrs-t"):
            reply = room.api("POST", f"/users/{user}/tokens", {"note": "test", "expires_in": 3600})
            room.tokens[user] = reply["token"]
        for user in ("alice", "bob"):
            room.api("POST", f"/users/{user}/server")
        # The lab machine joins meanwhile (one command, with a token from the portal).
        start_volunteer(portal, tmp, "lab-pc", "--cpus", "2", "--memory", "1GB")
        for user in ("alice", "bob"):
            wait_for(
                lambda u=user: room.api("GET", f"/users/{u}")["servers"].get("", {}).get("ready"),
                timeout=120,
                what=f"{user}'s server",
            )
        yield room
    finally:
        if room is not None:
            for user in ("alice", "bob"):
                with contextlib.suppress(OSError):  # URLError is an OSError
                    room.api("DELETE", f"/users/{user}/server")
            for v in room.portal.volunteers:
                v.kill()
        if hub.poll() is None:
            hub.send_signal(signal.SIGTERM)
            try:
                hub.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(hub.pid, signal.SIGKILL)
                hub.wait()


CELL = """%%grid --name {name}
answer = 6 * 7
print("answer", answer, "from {name}")
"""

REPORT = """
import json, time
from grid_portal import Grid
g = Grid()
with g.job("long-{name}") as long_id:
    # Long enough to outlast the checks below on a slow machine; the test cancels both.
    long_future = g.submit(time.sleep, 600)
print("REPORT" + json.dumps({{
    "me": g.whoami(),
    "owners": sorted({{j.owner for j in g.jobs()}}),
    "everyone": sorted({{j.owner for j in g.jobs(everyone=True)}}),
    "long": long_id,
}}))
"""


def _report(text: str) -> dict[str, Any]:
    line = next(line for line in text.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


def test_students_teacher_and_identity(classroom: Classroom) -> None:
    room = classroom
    reports = {}
    for user in ("alice", "bob"):
        out = room.run_cell(user, "%load_ext grid_portal")
        out = room.run_cell(user, CELL.format(name=f"{user}-cell"))
        assert f"answer 42 from {user}-cell" in out
        reports[user] = _report(room.run_cell(user, REPORT.format(name=user)))

    # Each student is the Hub user, verified by the portal with the Hub, and sees only their
    # own jobs, even when asking for everyone's.
    for user, report in reports.items():
        assert report["me"] == {"role": "client", "name": user}
        assert report["owners"] == [user] and report["everyone"] == [user]
    # The same through the REST API of the student's own Jupyter server.
    jobs = room.user_get("alice", "grid/api/jobs")["jobs"]
    assert jobs and {j["owner"] for j in jobs} == {"alice"}
    assert "alice-cell" in {j["name"] for j in jobs}

    # A student cannot cancel another's job.
    alice_long = reports["alice"]["long"]
    out = room.run_cell(
        "bob",
        f"try:\n    g.cancel({alice_long!r})\n    print('CANCELLED')\n"
        f"except Exception as exc:\n    print('REFUSED', type(exc).__name__)\n",
    )
    assert "REFUSED NotFound" in out

    # The teacher (group "teachers") enrols with their own Hub token, sees both students'
    # jobs and usage, sets a quota and cancels a student's job.
    env = HubEnvironment(
        token=room.tokens["mrs-t"],
        portal_url=room.env["GRID_PORTAL_URL"],
        pin=room.env["GRID_PORTAL_CA_PIN"],
        user="mrs-t",
    )
    conn = enrol_with_hub(env, room.tmp / "teacher")
    assert (conn.name, conn.role) == ("mrs-t", "teacher")
    with Grid(str(room.tmp / "teacher" / "connection.json"), start_embedded=False) as teacher:
        assert teacher.whoami() == {"role": "teacher", "name": "mrs-t"}
        owners = {j.owner for j in teacher.jobs(everyone=True)}
        assert {"alice", "bob"} <= owners
        usage = teacher._call("grid_fairshare")["users"]
        assert usage["alice"]["usage"] > 0 and usage["bob"]["usage"] > 0
        report = teacher._call("grid_fairshare_set", user="alice", quota=1)
        assert report["users"]["alice"]["quota"] == 1
        job = teacher.cancel(alice_long, reason="cancelled by the teacher")
        assert job.state is JobState.CANCELLED and job.owner == "alice"
    # Bob's long job is still his, untouched by Bob's failed attempt on Alice's.
    out = room.run_cell("bob", f"print('STATE', g.get_job({reports['bob']['long']!r}).state.value)")
    assert "STATE running" in out or "STATE queued" in out
    # ...and a student may not set quotas.
    out = room.run_cell(
        "bob",
        "try:\n    g._call('grid_fairshare_set', user='bob', quota=9)\n"
        "except Exception as exc:\n    print('REFUSED', type(exc).__name__, exc)\n",
    )
    assert "REFUSED NotAllowed" in out and "only the portal's admin" in out
    # Bob may cancel his own, which frees the volunteer's slot for the tests after this one.
    out = room.run_cell("bob", f"print('STATE', g.cancel({reports['bob']['long']!r}).state.value)")
    assert "STATE cancelled" in out


def test_a_claimed_name_is_never_trusted(classroom: Classroom) -> None:
    from grid_portal.keys import make_key_and_csr

    room = classroom
    _, csr = make_key_and_csr("bob")
    # Alice's token, Bob's name: refused.
    code, reply = room.portal_post(
        "/api/hub/enrol", {"csr": csr, "name": "bob"}, room.tokens["alice"]
    )
    assert code == 403 and "belongs to 'alice', not 'bob'" in reply["error"]
    # Alice's token, no name: a certificate for Alice, whatever the request's subject says.
    code, reply = room.portal_post("/api/hub/enrol", {"csr": csr}, room.tokens["alice"])
    assert code == 200 and (reply["name"], reply["role"]) == ("alice", "client")
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(reply["cert"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    # No token, or one the Hub does not know: refused.
    assert room.portal_post("/api/hub/enrol", {"csr": csr}, None)[0] == 401
    assert room.portal_post("/api/hub/enrol", {"csr": csr}, "not-a-hub-token")[0] == 403
    assert room.portal_post("/api/hub/enrol", {"csr": csr}, ADMIN_TOKEN)[0] == 403  # a service
    # Only a teacher mints join tokens for the lab's machines.
    assert room.portal_post("/api/hub/token", {"uses": 1}, room.tokens["alice"])[0] == 403
    code, reply = room.portal_post("/api/hub/token", {"uses": 3}, room.tokens["mrs-t"])
    assert code == 200 and reply["command"].startswith("grid-portal volunteer https://")
    assert reply["token"] in reply["command"]
    # The same from a teacher's terminal on the Hub: one command to print for the lab.
    teacher_env = {
        **os.environ,
        "JUPYTERHUB_API_TOKEN": room.tokens["mrs-t"],
        "JUPYTERHUB_USER": "mrs-t",
        **room.env,
    }
    done = subprocess.run(
        grid_portal_command("classroom", "token", "--uses", "2", "--ttl", "1h"),
        capture_output=True,
        text=True,
        env=teacher_env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "grid-portal volunteer https://127.0.0.1:" in done.stdout
    student_env = {
        **teacher_env,
        "JUPYTERHUB_API_TOKEN": room.tokens["bob"],
        "JUPYTERHUB_USER": "bob",
    }
    done = subprocess.run(
        grid_portal_command("classroom", "token"),
        capture_output=True,
        text=True,
        env=student_env,
        timeout=60,
    )
    assert done.returncode == 2 and "'bob' is not a teacher" in done.stderr
    # The client side refuses a portal whose CA does not match the pin, before sending.
    wrong = HubEnvironment(
        token=room.tokens["alice"],
        portal_url=room.env["GRID_PORTAL_URL"],
        pin="0" * 32,
        user="alice",
    )
    with pytest.raises(GridError, match="not the class portal"):
        enrol_with_hub(wrong, room.tmp / "impostor")
