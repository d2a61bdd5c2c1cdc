"""The JupyterLab extension (labextension/): its TypeScript unit tests, and the prebuilt
extension that `pip install` builds into grid_portal/labextension and registers with Jupyter.

The project is installed (`pip install -e .`) before the tests run, so the build itself is
not repeated here; these tests check what it left behind.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "labextension"
BUILT = ROOT / "grid_portal" / "labextension"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} is not on PATH, so the TypeScript unit tests cannot run here"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_typescript_unit_tests_pass() -> None:
    _require("node")
    jlpm = _require("jlpm")  # from jupyter-builder, a build requirement of the project
    if not (SOURCE / "node_modules").is_dir():
        # `pip install` normally leaves node_modules behind; a checkout without it installs
        # the locked versions (no lockfile changes allowed: the test must not edit the tree).
        install = _run([jlpm, "install", "--immutable"], SOURCE, timeout=600)
        assert install.returncode == 0, install.stdout + install.stderr
    result = _run([jlpm, "test"], SOURCE, timeout=300)
    output = _ANSI.sub("", result.stdout + result.stderr)
    assert result.returncode == 0, output
    # node's test runner closes with "ℹ pass N" and "ℹ fail N": make sure tests really ran.
    passed = re.search(r"^\S*\s*pass (\d+)$", output, re.MULTILINE)
    failed = re.search(r"^\S*\s*fail (\d+)$", output, re.MULTILINE)
    assert passed and failed, f"no test summary in the output:\n{output}"
    assert int(failed.group(1)) == 0, output
    assert int(passed.group(1)) >= 50, f"only {passed.group(1)} TypeScript tests ran:\n{output}"


def test_prebuilt_extension_is_built() -> None:
    package_json = BUILT / "package.json"
    assert package_json.is_file(), (
        f"{package_json} is missing: `pip install -e .` should have built the extension "
        "(see labextension/README.md)"
    )
    package = json.loads(package_json.read_text())
    assert package["name"] == "grid-portal"
    # The builder records the entry point it wrote; it must be there to be loaded.
    entry = package["jupyterlab"]["_build"]["load"]
    assert (BUILT / entry).is_file(), f"{entry} named in package.json was not built"
    assert (BUILT / "schemas" / "grid-portal" / "plugin.json").is_file()


def test_jupyter_lists_the_extension_enabled() -> None:
    jupyter = shutil.which("jupyter")
    cmd = [jupyter] if jupyter else [sys.executable, "-m", "jupyter"]
    result = _run([*cmd, "labextension", "list"], ROOT, timeout=120)
    output = _ANSI.sub("", result.stdout + result.stderr)
    assert result.returncode == 0, output
    line = next((ln for ln in output.splitlines() if ln.strip().startswith("grid-portal ")), None)
    assert line is not None, f"grid-portal is not among the installed extensions:\n{output}"
    assert re.search(r"\benabled\b", line) and re.search(r"\bOK\b", line), line


def test_settings_schema_is_valid_and_its_defaults_fit() -> None:
    schema = json.loads((SOURCE / "schema" / "plugin.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = {key: spec["default"] for key, spec in schema["properties"].items()}
    jsonschema.validate(defaults, schema)
    memory = schema["properties"]["defaultMemory"]
    # The same sizes that grid_portal.units.parse_size and the dialog accept.
    for good in ["", "4GB", "512MiB", "1.5 GiB", "1024", "2tb"]:
        jsonschema.validate({"defaultMemory": good}, {"properties": {"defaultMemory": memory}})
    for bad in ["lots", "4 parsecs", "-1GB", "4ib"]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"defaultMemory": bad}, {"properties": {"defaultMemory": memory}})
    # The toolbar button and the command id that docs/sidebar.md promises.
    toolbar = schema["jupyter.lab.toolbars"]["Notebook"]
    assert [item["command"] for item in toolbar] == ["grid-portal:run-cell"]
