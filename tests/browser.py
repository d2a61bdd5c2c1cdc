"""A real JupyterLab server and a real headless Chromium, for end-to-end tests of the sidebar.

Plain helpers rather than pytest-playwright (which warns under pytest 9): a test module builds
its own module-scoped fixtures from ``start_lab`` and ``launch_chromium``.

The server is a ``jupyter lab`` process on a free loopback port with a random token. It is
isolated from the machine's own Jupyter set-up: its config, settings and workspaces live in a
temporary folder, and it serves *this checkout's* build of the extension
(``grid_portal/labextension``, put first on ``extra_labextensions_path``), whatever copy
``pip install`` left in ``share/jupyter/labextensions``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

REPO = Path(__file__).resolve().parent.parent
BUILT_EXTENSION = REPO / "grid_portal" / "labextension"
CHROMIUM = Path("/usr/bin/chromium")
WAIT_MS = 30_000  # what a page expectation waits: the machine has 2 cores, shared
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def why_no_browser_tests() -> str | None:
    """The reason end-to-end tests cannot run here, or None when they can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python playwright is not installed (pip install playwright; no browser download)"
    if not (BUILT_EXTENSION / "package.json").exists() or not any(
        (BUILT_EXTENSION / "static").glob("remoteEntry.*.js")
    ):
        return (
            f"the labextension is not built in {BUILT_EXTENSION} "
            "(pip install -e . or cd labextension && jlpm build)"
        )
    if shutil.which("jupyter-lab") is None:
        return "jupyter-lab is not on PATH"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Lab:
    """A running ``jupyter lab``."""

    process: subprocess.Popen[bytes]
    port: int
    token: str
    root: Path
    log: Path
    host: str = "127.0.0.1"

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def url(self) -> str:
        return f"{self.base}lab?token={self.token}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        # SIGINT twice is Jupyter's "shut down without asking"; SIGTERM also shuts kernels
        # down cleanly and runs the extensions' cleanup.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_lab(
    tmp: Path,
    connection_file: str | None,
    *extra: str,
    host: str = "127.0.0.1",
    prefix: tuple[str, ...] = (),
) -> Lab:
    """Start ``jupyter lab`` against the portal of ``connection_file``; return once it serves.

    Kernels inherit ``GRID_PORTAL_ADDRESS``, so ``%%grid`` cells reach the same portal as
    the server extension does. With no connection file the server has no portal configured
    (its user's config, data and runtime dirs are under ``tmp``): it offers the portals it
    finds on the LAN. ``prefix`` runs it elsewhere (``ip netns exec NAME``), listening on
    ``host``.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    root = tmp / "notebooks"
    root.mkdir(exist_ok=True)
    # extra_labextensions_path wants folders named after the package: link ours in.
    extensions = tmp / "labextensions"
    extensions.mkdir(exist_ok=True)
    link = extensions / "grid-portal"
    if not link.exists():
        link.symlink_to(BUILT_EXTENSION, target_is_directory=True)
    port, token = free_port(), secrets.token_hex(16)
    config_dir = tmp / "jupyter-config"
    config_dir.mkdir(exist_ok=True)
    # The server extension is enabled here as well as by the file `pip install` puts in
    # etc/jupyter (an editable install made before that file existed lacks it). No calls to
    # the internet from a test: no news feed, no update check.
    server_config = {"ServerApp": {"jpserver_extensions": {"grid_portal": True}}}
    lab_config = {
        "LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}
    }
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(server_config))
    (config_dir / "jupyter_lab_config.json").write_text(json.dumps(lab_config))
    # Nor the "Would you like to get notified about official Jupyter news?" toast.
    notification = tmp / "lab-settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True, exist_ok=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(config_dir),
        # ipyparallel's server extension adopts the clusters of ~/.ipython: leave other
        # people's alone. Kernels get a clean IPython profile too.
        IPYTHONDIR=str(tmp / "ipython"),
    )
    portal_options = []
    if connection_file is not None:
        env["GRID_PORTAL_ADDRESS"] = connection_file
        portal_options.append(f"--GridPortal.address={connection_file}")
    else:
        env.pop("GRID_PORTAL_ADDRESS", None)
        for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "JUPYTER_RUNTIME_DIR"):
            env[name] = str(tmp / name.lower())
    command = [
        *prefix,
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--ServerApp.ip={host}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        *portal_options,
        f"--LabApp.extra_labextensions_path={extensions}",
        f"--LabApp.user_settings_dir={tmp / 'lab-settings'}",
        f"--LabApp.workspaces_dir={tmp / 'lab-workspaces'}",
        # The tests drive JupyterLab commands (the theme) as a user's click would.
        "--LabApp.expose_app_in_browser=True",
        *extra,
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = tmp / "jupyter-lab.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    lab = Lab(process=process, port=port, token=token, root=root, log=log, host=host)

    def serving() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"jupyter lab exited early:\n{lab.output()}")
        request = urllib.request.Request(
            f"{lab.base}grid/api/version", headers={"Authorization": f"token {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200

    try:
        wait_for(serving, timeout=60, interval=0.2, what="jupyter lab to serve grid/api/")
    except BaseException:
        lab.stop()
        raise
    return lab


def http(lab: Lab, method: str, path: str, token: bool = True) -> tuple[int, str]:
    """A request to ``path`` (under the server's base URL) over real HTTP, with the server's
    token unless ``token`` is False: (status, body text). Errors are answers, not raised."""
    request = urllib.request.Request(
        f"{lab.base}{path}",
        method=method,
        data=b"{}" if method == "POST" else None,
        headers={"Authorization": f"token {lab.token}"} if token else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def conforms(path: str, body: Any, method: str = "get", status: int = 200) -> None:
    """``body`` matches the OpenAPI document's schema for that answer of ``path``."""
    from jsonschema import Draft202012Validator
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    from grid_portal.jupyter.openapi import openapi_document

    document = openapi_document()
    registry = Registry().with_resource("urn:grid-api", DRAFT202012.create_resource(document))
    schema = document["paths"][path][method]["responses"][str(status)]["content"]
    text = json.dumps(schema["application/json"]["schema"])
    text = text.replace('"#/components/', '"urn:grid-api#/components/')
    Draft202012Validator(json.loads(text), registry=registry).validate(body)


# -- the browser --------------------------------------------------------------------------------

# Console errors that are not ours and say nothing about the sidebar. Each entry is a regular
# expression matched against "TEXT @ URL". Keep this short and explain every line.
CONSOLE_NOISE = [
    r"favicon\.ico",  # a page without a favicon
]

# What marks a console message as coming from the Grid Portal extension or its server API.
_OURS = re.compile(r"grid-portal|grid/api|gp-|GridPortal", re.IGNORECASE)


@dataclass
class ConsoleLog:
    """Console errors and uncaught exceptions seen on a page."""

    errors: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        def on_console(message: Any) -> None:
            if message.type == "error":
                location = message.location or {}
                self.errors.append(f"{message.text} @ {location.get('url', '')}")

        def on_page_error(error: Any) -> None:
            self.errors.append(f"uncaught {error.name}: {error.message}\n{error.stack or ''}")

        page.on("console", on_console)
        page.on("pageerror", on_page_error)

    def ours(self, since: int = 0) -> list[str]:
        """Errors (from index ``since`` on) that concern our extension and are not noise."""
        return [
            e
            for e in self.errors[since:]
            if _OURS.search(e) and not any(re.search(n, e) for n in CONSOLE_NOISE)
        ]


# -- fixtures for modules that drive their own servers and browser -----------------------------
# Import them by name into a test module (pytest finds fixtures in its namespace).


@pytest.fixture(autouse=True)
def jp_asyncio_loop() -> Iterator[None]:
    """Override pytest-jupyter's autouse event-loop fixture (the REST API tests load that
    plugin, and pytest then applies it to every later test): Playwright's sync API runs its
    own loop for the whole module, which that fixture would try to close after each test."""
    yield None


@pytest.fixture(autouse=True)
def jp_server_cleanup() -> Iterator[None]:
    """Likewise: such a module runs its own `jupyter lab` processes, not pytest-jupyter's."""
    yield None


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Any]:
    """One headless Chromium for the module; page expectations wait up to WAIT_MS."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    with launch_chromium() as chromium:
        yield chromium


def open_sidebar(browser: Any, lab: Lab, console: ConsoleLog) -> Any:
    """A new page of ``lab`` in ``browser`` with the Grid sidebar opened."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    console.attach(page)
    page.goto(lab.url)
    page.locator('li[data-id="grid-portal:sidebar"]').click(timeout=90_000)
    return page


@contextmanager
def launch_chromium() -> Iterator[Any]:
    """A headless Chromium (Debian's), through Python playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
