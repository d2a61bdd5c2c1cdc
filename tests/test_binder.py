"""``binder/`` builds and starts: with repo2docker where Docker runs, else the same steps in a
fresh virtual environment (``requirements.txt``, ``postBuild``, ``start``), as Binder runs
them. Slow (a whole environment): built once for the module, from pip's cache and this
machine's wheels, in a copy of the checkout with the built JupyterLab extension, as
tests/test_dev_setup.py does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import wait_for
from test_dev_setup import REPO, clean_env, copy_of_checkout

pytestmark = pytest.mark.skipif(
    not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout"
)


def _docker_runs() -> str | None:
    """Why repo2docker cannot run here; None when it can."""
    if shutil.which("repo2docker") is None:
        return "repo2docker is not installed"
    if shutil.which("docker") is None:
        return "docker is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return "the Docker daemon is not running (docker info failed)"
    return None


@pytest.mark.timeout(1800)
def test_repo2docker_builds_and_starts_the_binder_image() -> None:
    reason = _docker_runs()
    if reason is not None:
        pytest.skip(f"{reason}: the fresh virtual environment test runs binder/ instead")
    image = f"grid-portal-binder-test-{uuid.uuid4().hex[:8]}"
    build = subprocess.run(
        ["repo2docker", "--no-run", "--image-name", image, str(REPO)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert build.returncode == 0, build.stderr[-5000:]
    try:
        # The image's entrypoint runs binder/start, then the command: the grid must load.
        run = subprocess.run(
            ["docker", "run", "--rm", image, "jupyter", "server", "extension", "list"],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-5000:]
        assert "grid_portal" in run.stdout + run.stderr and "OK" in run.stdout + run.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True, timeout=120)


@dataclass
class BinderEnv:
    repo: Path
    venv: Path
    env: dict[str, str]

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


@pytest.fixture(scope="module")
def binder_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BinderEnv]:
    """A fresh venv with binder/requirements.txt installed, then binder/postBuild run in a
    copy of the checkout, as repo2docker does (``python`` and ``pip`` are the venv's)."""
    tmp = tmp_path_factory.mktemp("binder")
    repo = copy_of_checkout(tmp / "checkout")
    venv = tmp / "venv"
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    dirs = {}
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "JUPYTER_RUNTIME_DIR"):
        dirs[var] = str(tmp / var.lower())
        Path(dirs[var]).mkdir(mode=0o700)
    env = clean_env(**dirs, HOME=str(tmp / "home"))
    (tmp / "home").mkdir()
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env["PATH"]])
    env["VIRTUAL_ENV"] = str(venv)
    for step in (
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-r", "binder/requirements.txt"],
        [str(repo / "binder" / "postBuild")],
    ):
        done = subprocess.run(step, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{step}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    yield BinderEnv(repo=repo, venv=venv, env=env)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, token: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        return response.status, response.read()


@pytest.mark.timeout(1800)
def test_binder_steps_in_a_fresh_venv_start_jupyterlab_with_the_grid(
    binder_env: BinderEnv,
) -> None:
    port, token = _free_port(), uuid.uuid4().hex
    base = f"http://127.0.0.1:{port}"
    command = [
        str(binder_env.repo / "binder" / "start"),  # as Binder: start, then its command
        str(binder_env.bin / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1",
        f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        "--allow-root",
    ]  # fmt: skip
    log = binder_env.repo.parent / "binder-lab.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            command,
            cwd=binder_env.repo,
            env=binder_env.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def answers() -> dict | None:
            if server.poll() is not None:
                raise AssertionError(f"JupyterLab exited:\n{log.read_text()[-5000:]}")
            status, body = _get(f"{base}/grid/api/version", token)
            return json.loads(body) if status == 200 else None

        version = wait_for(answers, timeout=180, interval=0.5, what="JupyterLab with the grid")
        assert version["api"] >= 1  # the server extension loaded
        # start made the embedded portal, with the Binder machine as its one node.
        capacity = wait_for(
            lambda: (
                (c := json.loads(_get(f"{base}/grid/api/capacity", token)[1]))
                and c["nodes_online"] == 1
                and c
            ),
            timeout=180,
            interval=0.5,
            what="the embedded portal's node",
        )
        assert capacity["nodes_online"] == 1
        # postBuild installed the sidebar: JupyterLab's page lists the prebuilt extension.
        status, page = _get(f"{base}/lab", token)
        assert status == 200 and b'"name": "grid-portal"' in page.replace(b'":"', b'": "')
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        subprocess.run(
            [str(binder_env.bin / "grid-portal"), "embedded", "stop"],
            env=binder_env.env,
            capture_output=True,
            timeout=120,
        )
