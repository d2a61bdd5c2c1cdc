"""The import arrows DESIGN.md forbids, checked on the source (cheap, and it fails loudly)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "grid_portal"


def dynamic_import(node: ast.AST) -> str | None:
    """The module a call such as ``__import__("grid_portal.x")`` or
    ``importlib.import_module("grid_portal.x")`` loads, when it is written out: such a call is
    an import like any other (hiding one this way would hide an arrow from these checks)."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    first = node.args[0]
    if name in ("__import__", "import_module") and isinstance(first, ast.Constant):
        return first.value if isinstance(first.value, str) else None
    return None


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif dynamic := dynamic_import(node):
            names.add(dynamic)
    return names


def sources(sub: str) -> list[Path]:
    base = PACKAGE / sub
    return sorted(base.rglob("*.py")) if base.is_dir() else [base]


# The kernel side of jobs: what runs in the researcher's kernel (the portal never imports it).
JOBS_KERNEL_SIDE = (
    "grid_portal.jobs.workflow",
    "grid_portal.jobs.cell",
    "grid_portal.jobs.cell_analysis",
    "grid_portal.jobs.cell_result",
    "grid_portal.jobs.cell_job",
    "grid_portal.jobs.cell_session",
)

FORBIDDEN = [
    (
        "portal",
        (
            "grid_portal.notebook",
            "grid_portal.jupyter",
            "grid_portal.cli",
            "grid_portal.client",
            *JOBS_KERNEL_SIDE,
        ),
    ),
    (
        "node",
        ("grid_portal.notebook", "grid_portal.jupyter", "grid_portal.cli", "grid_portal.portal"),
    ),
    ("model.py", ("distributed", "dask")),
    ("client.py", ("grid_portal.portal",)),
    (
        "requirements",
        ("distributed", "dask", "grid_portal.portal", "grid_portal.client", "grid_portal.jobs"),
    ),
    ("jobs/spec", ("distributed",)),
    # Both the kernel and the portal submit what jobs/graph.py builds, through their own client.
    ("jobs/graph.py", ("distributed", "grid_portal.client", *JOBS_KERNEL_SIDE)),
    ("jobs/stage_task.py", ("distributed.client", "grid_portal.client", *JOBS_KERNEL_SIDE)),
    # A cell's node side shares only jobs/cell_payload.py with the kernel.
    ("jobs/cell_task.py", ("grid_portal.client", *JOBS_KERNEL_SIDE)),
    ("jobs/cell_child.py", ("distributed", "grid_portal.client", *JOBS_KERNEL_SIDE)),
    ("jobs/cell_lease_task.py", ("grid_portal.client", *JOBS_KERNEL_SIDE)),
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


# Every face goes through the Grid client's public methods: its private handler calls and
# Dask client internals stay inside client.py, so the wire contract can change in one place.
PRIVATE_REACH = re.compile(r"\._call\(|\.client\._")


def test_faces_use_the_public_client() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "client.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE_REACH.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "use a public Grid method instead:\n" + "\n".join(offenders)


# A comment says why, not which ticket asked for it (the tracker is not in the repository, and
# a reason outlives it); nor does it send the reader to design notes kept elsewhere.
TICKET_OR_OUTSIDE_NOTES = re.compile(
    r"\b[Ii]ssues? \d+|\b[Ii]ssue: |\bDESIGN\.md\b|\bFIELD-NOTES\b"
)


def test_comments_give_reasons_not_ticket_numbers() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if TICKET_OR_OUTSIDE_NOTES.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "say why instead (or name a doc in docs/):\n" + "\n".join(offenders)


def test_every_module_is_on_the_architecture_page() -> None:
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if f"`{path.relative_to(PACKAGE.parent)}`" not in page
    ]
    assert not missing, "docs/architecture.md does not list:\n" + "\n".join(missing)


# -- no circles between rooms ---------------------------------------------------------------
# Rooms: each folder of grid_portal/ (portal, node, jobs, notebook, jupyter, requirements) and
# each top-level module. An arrow is any import: lazy ones, and those under TYPE_CHECKING too (a
# type alone still ties two rooms for whoever has to change one of them).
# Arrows that would close a circle, allowed with a reason while they are broken: none are left,
# and the test fails on a listed arrow that is gone (so the list only shrinks).
KNOWN_CIRCLE_ARROWS: dict[tuple[str, str], str] = {}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "grid_portal" or len(parts) < 2:
        return None
    return parts[1]


def room_arrows(paths: list[Path] | None = None) -> dict[tuple[str, str], list[str]]:
    arrows: dict[tuple[str, str], list[str]] = {}
    for path in paths if paths is not None else sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        source = rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")
        tree = ast.parse(path.read_text(), filename=str(path))
        package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
        for node in ast.walk(tree):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                modules = [module]
                if module == "grid_portal":
                    modules = [f"grid_portal.{alias.name}" for alias in node.names]
            elif dynamic := dynamic_import(node):
                modules = [dynamic]
            for module in modules:
                target = room_of(module)
                if target and target not in (source, "__init__", "__main__"):
                    where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    arrows.setdefault((source, target), []).append(where)
    return arrows


def circles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one room (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_circles_between_rooms() -> None:
    arrows = room_arrows()
    gone = sorted(set(KNOWN_CIRCLE_ARROWS) - set(arrows))
    assert not gone, f"these arrows are gone: drop them from KNOWN_CIRCLE_ARROWS: {gone}"
    found = circles(set(arrows) - set(KNOWN_CIRCLE_ARROWS))
    detail = [
        f"{a} -> {b}: {', '.join(arrows[(a, b)][:3])}"
        for component in found
        for a in component
        for b in component
        if (a, b) in arrows
    ]
    assert not found, "imports that close a circle between rooms:\n" + "\n".join(detail)


def test_an_import_written_as_a_call_or_for_types_only_is_an_arrow(tmp_path: Path) -> None:
    """``__import__`` and ``importlib.import_module`` with a written name count as imports, so
    neither the forbidden-import check nor the circle check can be passed by spelling an
    import as a call; an import under ``TYPE_CHECKING`` counts for the circle check too."""
    room = tmp_path / "grid_portal"
    room.mkdir()
    (room / "a.py").write_text(
        'def f():\n    return __import__("grid_portal.b").b\n'
        'def g():\n    import importlib\n    return importlib.import_module("grid_portal.c")\n'
    )
    (room / "b.py").write_text("from grid_portal import a\n")
    (room / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from grid_portal.a import f\n"
    )
    assert imported_modules(room / "a.py") >= {"grid_portal.b", "grid_portal.c"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, room
    try:
        arrows = room_arrows([room / "a.py", room / "b.py", room / "c.py"])
    finally:
        PACKAGE = saved
    assert {("a", "b"), ("a", "c"), ("b", "a"), ("c", "a")} <= set(arrows)
    assert circles(set(arrows)) == [["a", "b", "c"]]
