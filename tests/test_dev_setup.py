"""`./dev` sets up its own virtual environment, `.venv`, also where the system's Python refuses
installs (PEP 668: Debian and Ubuntu say "externally-managed-environment"), and what it installs
for `./dev lab` runs every example notebook.

Once per module, in a copy of this checkout: `PYTHON=<a Python that refuses installs> ./dev
setup`, the set-up `./dev lab` does before starting JupyterLab (the `jupyter` extra). That
Python is this machine's own, seen through symlinks under another prefix with an
EXTERNALLY-MANAGED marker in its standard library, as Debian's has. (A venv with the marker
would not do: pip ignores it inside a virtual environment.) The whole install takes about 45 s
here with a warm pip cache, the notebooks about 15 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from test_example_notebooks import check_example

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout"
)

_BASE_INFO = """import json, os, sys, sysconfig
print(json.dumps({
    "exe": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
    "stdlib": sysconfig.get_path("stdlib"), "platlibdir": sys.platlibdir,
    "version": "%d.%d" % sys.version_info[:2], "libdir": sysconfig.get_config_var("LIBDIR"),
    "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
}))"""


def externally_managed_python(where: Path) -> Path:
    """This interpreter's base installation under a new prefix, its standard library
    symlinked, plus EXTERNALLY-MANAGED; the new interpreter's path."""
    info = json.loads(
        subprocess.run(
            [sys.executable, "-c", _BASE_INFO], capture_output=True, text=True, check=True
        ).stdout
    )
    prefix = where / "python"
    stdlib = prefix / info["platlibdir"] / f"python{info['version']}"
    stdlib.mkdir(parents=True)
    for entry in Path(info["stdlib"]).iterdir():
        if entry.name not in ("site-packages", "dist-packages", "EXTERNALLY-MANAGED"):
            (stdlib / entry.name).symlink_to(entry)
    (stdlib / "EXTERNALLY-MANAGED").write_text(
        "[externally-managed]\nError=This Python is managed by the system (tests/test_dev_setup.py)\n"
    )
    if info["shared"] and info["libdir"]:
        for lib in Path(info["libdir"]).glob("libpython*"):
            (prefix / info["platlibdir"] / lib.name).symlink_to(lib)
    (prefix / "bin").mkdir()
    python = prefix / "bin" / f"python{info['version']}"
    shutil.copy2(info["exe"], python)  # a copy: Python finds its prefix from where it lies
    return python


def copy_of_checkout(where: Path) -> Path:
    """The files git knows of (committed or not, never ignored ones) and the built extension."""
    built = REPO / "grid_portal" / "labextension" / "package.json"
    if not built.exists():
        pytest.skip("build the JupyterLab extension first (./dev test does)")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, where / name)
    shutil.copytree(built.parent, where / "grid_portal" / "labextension")
    return where


def _pip_cache_dir() -> str:
    import platformdirs

    return platformdirs.user_cache_dir("pip")  # where pip keeps it


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without its virtual environment or test-only settings."""
    drop = (
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "PYTHONHOME",
        "GRID_PORTAL_ADDRESS",
        "GRID_PORTAL_DATA_DIR",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # Installs here are about where packages go, not how fast they import later: no bytecode
    # compiling (PIP_COMPILE=0; pip reads PIP_NO_COMPILE=1 the wrong way round), and pip's
    # cache stays the user's even where a test moves HOME.
    env.setdefault("PIP_COMPILE", "0")
    env.setdefault("PIP_CACHE_DIR", _pip_cache_dir())
    venv_bin = str(Path(sys.prefix) / "bin")
    if sys.prefix != sys.base_prefix:  # run by ./dev test: its .venv must not leak in
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    return {**env, **extra}


@dataclass
class DevSetup:
    repo: Path
    base: Path  # the Python that refuses installs
    pip_only: Path  # a folder holding only pip, to ask that Python to install
    result: subprocess.CompletedProcess[str]

    @property
    def python(self) -> Path:
        return self.repo / ".venv" / "bin" / "python"


@pytest.fixture(scope="module")
def dev_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevSetup]:
    import pip

    tmp = tmp_path_factory.mktemp("dev-setup")
    base = externally_managed_python(tmp)
    pip_only = tmp / "pip-only"
    pip_only.mkdir()
    (pip_only / "pip").symlink_to(Path(pip.__file__).parent)
    repo = copy_of_checkout(tmp / "checkout")
    result = subprocess.run(
        [str(repo / "dev"), "setup"],
        cwd=repo,
        env=clean_env(PYTHON=str(base)),
        capture_output=True,
        text=True,
        timeout=500,
    )
    yield DevSetup(repo=repo, base=base, pip_only=pip_only, result=result)


def refuses_installs(setup: DevSetup) -> str:
    out = subprocess.run(
        [str(setup.base), "-m", "pip", "install", "--dry-run", "--no-deps", "-e", str(setup.repo)],
        env=clean_env(PYTHONPATH=str(setup.pip_only)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0, out
    return out.stdout + out.stderr


@pytest.mark.timeout(600)
def test_dev_makes_and_uses_its_own_venv_under_a_python_that_refuses_installs(
    dev_setup: DevSetup,
) -> None:
    # The stand-in refuses as Debian's Python does (what the old ./dev ran into).
    assert "externally-managed-environment" in refuses_installs(dev_setup)
    result = dev_setup.result
    assert result.returncode == 0, result.stdout + result.stderr
    venv = dev_setup.repo / ".venv"
    # It says where, and which Python made it.
    assert f"creating the virtual environment {venv} with {dev_setup.base}" in result.stdout
    assert f"ready: {venv}" in result.stdout
    probe = subprocess.run(
        [
            str(dev_setup.python),
            "-c",
            "import json, sys, grid_portal, numpy, matplotlib, jupyterlab, ipykernel; "
            "print(json.dumps([sys.base_prefix, grid_portal.__file__]))",
        ],
        cwd=dev_setup.base.parent,  # not this checkout's folder, which -c would put on sys.path
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    base_prefix, package = json.loads(probe.stdout)
    assert Path(base_prefix) == dev_setup.base.parent.parent  # made from the PYTHON given
    assert Path(package).is_relative_to(dev_setup.repo)  # this checkout, editable
    # Nothing went into the Python that refuses: it still has no site-packages of its own.
    assert not list(dev_setup.base.parent.parent.glob("lib*/python*/site-packages"))


@pytest.mark.timeout(600)
def test_every_example_notebook_runs_in_the_environment_dev_lab_makes(
    dev_setup: DevSetup, tmp_path: Path
) -> None:
    if dev_setup.result.returncode != 0:
        pytest.skip("./dev setup failed (see the test above)")
    # As after `./dev lab`: only .venv, nothing configured, so Grid() starts the embedded
    # portal with this machine as its volunteer, from .venv too. Its own dirs, not the suite's.
    dirs = {}
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "JUPYTER_RUNTIME_DIR"):
        dirs[var] = str(tmp_path / var.lower())
        Path(dirs[var]).mkdir(mode=0o700)
    env = clean_env(**dirs)
    env["PATH"] = os.pathsep.join([str(dev_setup.python.parent), env["PATH"]])
    examples = sorted((dev_setup.repo / "example-notebooks").glob("*.ipynb"))
    out = tmp_path / "executed"
    try:
        run = subprocess.run(
            [str(dev_setup.python), "-m", "nbconvert", "--to", "notebook", "--execute",
             "--ExecutePreprocessor.timeout=240", "--output-dir", str(out),
             *map(str, examples)],
            cwd=dev_setup.repo / "example-notebooks",
            env=env,
            capture_output=True,
            text=True,
            timeout=540,
        )  # fmt: skip
    finally:
        subprocess.run(
            [str(dev_setup.python), "-m", "grid_portal.cli", "embedded", "stop"],
            env=env,
            capture_output=True,
            timeout=60,
        )
    assert run.returncode == 0, run.stderr[-5000:]
    assert examples
    for path in examples:
        check_example(path.stem, nbformat.read(out / path.name, as_version=4))
