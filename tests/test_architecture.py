"""The import arrows DESIGN.md forbids, checked on the source (cheap, and it fails loudly)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "grid_portal"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sources(sub: str) -> list[Path]:
    base = PACKAGE / sub
    return sorted(base.rglob("*.py")) if base.is_dir() else [base]


FORBIDDEN = [
    ("portal", ("grid_portal.notebook", "grid_portal.jupyter", "grid_portal.cli")),
    (
        "node",
        ("grid_portal.notebook", "grid_portal.jupyter", "grid_portal.cli", "grid_portal.portal"),
    ),
    ("model.py", ("distributed", "dask")),
    ("jobs/spec.py", ("distributed",)),
]


@pytest.mark.parametrize(("where", "banned"), FORBIDDEN, ids=[w for w, _ in FORBIDDEN])
def test_forbidden_imports(where: str, banned: tuple[str, ...]) -> None:
    offenders = []
    for path in sources(where):
        for module in imported_modules(path):
            if any(module == b or module.startswith(b + ".") for b in banned):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_import_grid_portal_stays_light() -> None:
    code = "import sys, grid_portal; print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
