"""A ``%%grid`` cell, read in the kernel before anything is sent: what it reads and assigns.

:func:`analyse_cell` parses the cell with :mod:`ast` (never runs it): the names it may read
before assigning them, those it assigns or deletes at its top level, and whether it ends in
an expression whose value is shown. :func:`choose_inputs` picks which of the notebook's
variables travel with it. Pure Python, no Dask: any front end (the magic, a test) may use it.
"""

from __future__ import annotations

import ast
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from grid_portal.errors import UsageError

# Names IPython puts in the user namespace that a cell never means to ship.
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "_oh", "_ih", "_dh"})


class CellSyntaxError(UsageError):
    """The cell does not parse; found in the kernel, before anything is sent."""

    def __init__(self, exc: SyntaxError) -> None:
        self.lines = traceback.format_exception_only(SyntaxError, exc)
        super().__init__("".join(self.lines).strip())

    def _render_traceback_(self) -> list[str]:
        return [line.rstrip("\n") for line in self.lines]


@dataclass(frozen=True)
class CellCode:
    """A parsed cell. ``source`` is the body padded with blank lines so that line numbers in
    tracebacks count from the top of the notebook cell (its ``%%grid`` line is line 1)."""

    source: str
    filename: str
    reads: tuple[str, ...]  # names the cell may read before assigning them
    writes: tuple[str, ...]  # names it assigns in its own (module) scope
    deletes: tuple[str, ...]  # names it deletes
    has_value: bool  # ends in an expression whose value is shown, like a local cell


def analyse_cell(body: str, filename: str, line_offset: int = 1) -> CellCode:
    """Parse the cell body; raise :class:`CellSyntaxError` if it is not valid Python."""
    source = "\n" * line_offset + body
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        bad = (exc.text or "").lstrip()
        if bad[:1] in ("%", "!"):
            exc.msg += " (IPython magics and ! shell commands do not run on the grid)"
        raise CellSyntaxError(exc) from None
    reads, writes, deletes = _module_names(tree)
    last = tree.body[-1] if tree.body else None
    stripped = body.rstrip()
    has_value = isinstance(last, ast.Expr) and not stripped.endswith(";")
    return CellCode(source, filename, tuple(reads), tuple(writes), tuple(deletes), has_value)


class _Scanner(ast.NodeVisitor):
    """Names one statement loads, stores and deletes in module scope. Nested scopes (functions,
    lambdas, classes, comprehensions) contribute the names they read but do not bind, and the
    names they declare ``global`` and assign."""

    def __init__(self) -> None:
        self.loads: dict[str, None] = {}
        self.stores: dict[str, None] = {}
        self.deletes: dict[str, None] = {}

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.loads.setdefault(node.id)
        elif isinstance(node.ctx, ast.Store):
            self.stores.setdefault(node.id)
        else:
            self.loads.setdefault(node.id)  # `del x` needs x to be there
            self.deletes.setdefault(node.id)

    def visit_MatchAs(self, node: Any) -> None:
        if node.name:
            self.stores.setdefault(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: Any) -> None:
        if node.name:
            self.stores.setdefault(node.name)

    def visit_MatchMapping(self, node: Any) -> None:
        if node.rest:
            self.stores.setdefault(node.rest)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self.loads.setdefault(node.target.id)  # x += 1 reads x first
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self.stores.setdefault(alias.asname or alias.name.split(".")[0])

    visit_ImportFrom = visit_Import

    def _scope(self, outer: list[ast.AST], inner: list[ast.AST], bound: Iterable[str]) -> None:
        for node in outer:
            self.visit(node)
        nested = _Scanner()
        for node in inner:
            nested.visit(node)
        declared = _globals_in(inner)
        local = (set(bound) | set(nested.stores)) - declared
        for name in nested.loads:
            if name not in local:
                self.loads.setdefault(name)
        for name in declared & (set(nested.stores) | set(nested.deletes)):
            self.stores.setdefault(name)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        args = node.args
        defaults = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
        annotations = [a.annotation for a in _all_args(args) if a.annotation is not None]
        if node.returns is not None:
            annotations.append(node.returns)
        self._scope(
            [*node.decorator_list, *defaults, *annotations],
            list(node.body),
            (a.arg for a in _all_args(args)),
        )
        self.stores.setdefault(node.name)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        args = node.args
        defaults = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
        self._scope(defaults, [node.body], (a.arg for a in _all_args(args)))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scope([*node.decorator_list, *node.bases, *node.keywords], list(node.body), ())
        self.stores.setdefault(node.name)

    def _comprehension(self, node: Any, elements: list[ast.AST]) -> None:
        generators = node.generators
        # The first iterable is evaluated in the enclosing scope; the rest belong to the
        # comprehension's own scope, whose targets do not leak.
        targets = _Scanner()
        for gen in generators:
            targets.visit(gen.target)
        inner = [*(g.iter for g in generators[1:]), *(c for g in generators for c in g.ifs)]
        self._scope([generators[0].iter], [*inner, *elements], targets.stores)

    def visit_ListComp(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp) -> None:
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._comprehension(node, [node.key, node.value])

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        # `except E as e` unbinds e when the handler ends: never an output.
        if node.type is not None:
            self.visit(node.type)
        for stmt in node.body:
            self.visit(stmt)


def _all_args(args: ast.arguments) -> list[ast.arg]:
    extra = [a for a in (args.vararg, args.kwarg) if a is not None]
    return [*args.posonlyargs, *args.args, *args.kwonlyargs, *extra]


def _globals_in(body: list[ast.AST]) -> set[str]:
    found: set[str] = set()
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Global):
                found.update(node.names)
    return found


# Simple statements after which the names they store are surely bound.
_DEFINITE = (
    ast.Assign,
    ast.AnnAssign,
    ast.AugAssign,
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
)


class _Flow:
    """Walks the module's statements in order, knowing which names are surely bound so far.

    A name read only after a statement that surely assigned it is not an input:
    ``x = load(); print(x)`` does not ship the notebook's old ``x``; nor does the target of the
    ``for`` loop it is read in. Branches may be skipped, so what they bind stays theirs.
    """

    def __init__(self) -> None:
        self.reads: dict[str, None] = {}
        self.writes: dict[str, None] = {}
        self.deletes: dict[str, None] = {}

    def expr(self, nodes: Iterable[ast.AST | None], bound: set[str]) -> set[str]:
        """Scan expressions (or simple statements); returns the names they store."""
        scan = _Scanner()
        for node in nodes:
            if node is not None:
                scan.visit(node)
        for name in scan.loads:
            if name not in bound:
                self.reads.setdefault(name)
        self.writes.update(scan.stores)
        self.deletes.update(scan.deletes)
        return set(scan.stores)

    def block(self, statements: Iterable[ast.stmt], bound: set[str]) -> None:
        for stmt in statements:
            if isinstance(stmt, (ast.For, ast.AsyncFor)):
                targets = self.expr([stmt.iter, stmt.target], bound)
                self.block(stmt.body, bound | targets)
                self.block(stmt.orelse, set(bound))
            elif isinstance(stmt, (ast.While, ast.If)):
                self.expr([stmt.test], bound)
                self.block(stmt.body, set(bound))
                self.block(stmt.orelse, set(bound))
            elif isinstance(stmt, (ast.With, ast.AsyncWith)):
                for item in stmt.items:
                    bound |= self.expr([item.context_expr, item.optional_vars], bound)
                self.block(stmt.body, bound)  # a with-body runs (unless it raises)
            elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
                self.block(stmt.body, set(bound))  # type: ignore[attr-defined]
                for handler in stmt.handlers:  # type: ignore[attr-defined]
                    self.expr([handler.type], bound)
                    self.block(handler.body, set(bound))
                self.block(stmt.orelse, set(bound))  # type: ignore[attr-defined]
                self.block(stmt.finalbody, set(bound))  # type: ignore[attr-defined]
            elif type(stmt).__name__ == "Match":
                self.expr([stmt.subject], bound)  # type: ignore[attr-defined]
                for case in stmt.cases:  # type: ignore[attr-defined]
                    captures = self.expr([case.pattern], bound)
                    self.expr([case.guard], bound | captures)
                    self.block(case.body, bound | captures)
            else:
                stores = self.expr([stmt], bound)
                if isinstance(stmt, _DEFINITE):
                    bound |= stores
                if isinstance(stmt, ast.Delete):
                    bound -= {t.id for t in stmt.targets if isinstance(t, ast.Name)}


def _module_names(tree: ast.Module) -> tuple[list[str], list[str], list[str]]:
    """(reads, writes, deletes) of a cell: see _Flow."""
    flow = _Flow()
    flow.block(tree.body, set())
    return list(flow.reads), list(flow.writes), list(flow.deletes)


def split_names(text: str | None, option: str) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]`` for ``--in``/``--out``; checks each is an identifier."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if not name.isidentifier():
            raise UsageError(
                f"{option} {text!r}: {name!r} is not a variable name; write names separated by "
                "commas, like a,b,c"
            )
    return names


def choose_inputs(
    code: CellCode,
    namespace: Mapping[str, Any],
    hidden: Mapping[str, Any] | None = None,
    explicit: list[str] | None = None,
    exclude: Iterable[str] = (),
) -> list[str]:
    """The names to ship: those the cell reads that exist here (or exactly ``--in``)."""
    skip = set(exclude)
    if explicit is not None:
        missing = [n for n in explicit if n not in namespace]
        if missing:
            raise UsageError(
                f"--in names {', '.join(missing)}, which this notebook does not define; "
                "run the cell that defines it first, or drop it from --in"
            )
        return [n for n in explicit if n not in skip]
    hidden = hidden or {}
    chosen = []
    for name in code.reads:
        if name in skip or name not in namespace or name in _IPYTHON_NAMES:
            continue
        if name.startswith("_") and (name.strip("_") == "" or name[1:].lstrip("i").isdigit()):
            continue  # IPython's output history: _, __, _5, _i5 ...
        if name in hidden and hidden[name] is namespace[name]:
            continue  # something IPython put there, not the user's
        if name == "__builtins__":
            continue
        chosen.append(name)
    return chosen
