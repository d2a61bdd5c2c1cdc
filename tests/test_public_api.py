"""The Grid client is the public API every front end uses: each public method says, in numpydoc
form, what each parameter means and what comes back, so a newcomer (or a face being written)
needs no reading of the code behind it.

Checked on the class itself (no portal needed): a docstring; a ``Parameters`` section naming
every named parameter (``cpus, gpus : float`` names two); ``Returns`` or ``Yields`` where a
method gives something back.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from grid_portal.client import Grid

SECTION = re.compile(r"^(?P<title>[A-Z][a-z]+)\n-{3,}\n", re.M)


def sections(doc: str) -> dict[str, str]:
    """A numpydoc docstring's sections by title, each its text."""
    found = list(SECTION.finditer(doc))
    return {
        m["title"]: doc[m.end() : found[i + 1].start() if i + 1 < len(found) else len(doc)]
        for i, m in enumerate(found)
    }


def described(name: str, parameters: str) -> bool:
    """``name`` heads an entry of a Parameters section, alone or among others."""
    entry = rf"^(?:[\w*]+, )*{re.escape(name)}(?:, [\w*]+)*(?: :|$)"
    return re.search(entry, parameters, re.M) is not None


def problems_of(cls: type) -> list[str]:
    found: list[str] = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        is_property = isinstance(member, property)
        function: Any = member.fget if is_property else getattr(member, "__func__", member)
        if not callable(function):
            continue
        doc = inspect.getdoc(function) or ""
        if not doc:
            found.append(f"{name}: no docstring")
            continue
        parts = sections(doc)
        signature = inspect.signature(function)
        named = [
            p.name
            for p in signature.parameters.values()
            if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if named and "Parameters" not in parts:
            found.append(f"{name}: no Parameters section")
        found += [
            f"{name}: parameter {p} not described"
            for p in named
            if "Parameters" in parts and not described(p, parts["Parameters"])
        ]
        gives = signature.return_annotation not in (inspect.Signature.empty, None, "None")
        if gives and not is_property and not {"Returns", "Yields"} & set(parts):
            found.append(f"{name}: no Returns section")
    return found


def test_every_public_method_of_grid_has_a_numpydoc_docstring() -> None:
    problems = problems_of(Grid)
    assert not problems, "Grid's docstrings:\n" + "\n".join(problems)


def test_the_check_above_can_fail() -> None:
    class Bare:
        def a(self) -> None: ...

        def b(self, x: int) -> int:
            """Does b."""
            return x

        def c(self, x: int, y: int) -> int:
            """Does c.

            Parameters
            ----------
            x : int
                An x.
            """
            return x + y

        def d(self, cpus: float, gpus: float) -> None:
            """Does d.

            Parameters
            ----------
            cpus, gpus : float
                What a task needs.
            """

    assert problems_of(Bare) == [
        "a: no docstring",
        "b: no Parameters section",
        "b: no Returns section",
        "c: parameter y not described",
        "c: no Returns section",
    ]
