"""Remote cell execution: run a notebook cell on a node as if it ran in the kernel.

A cell's code lives in three modules, one for each place it runs:

- **the kernel** (any front end), this module: :func:`analyse_cell` reads the cell with
  :mod:`ast` (what it reads, what it assigns, whether it ends in an expression),
  :func:`pack_inputs` pickles the variables it needs, :class:`CellRun` submits it as a grid job,
  relays what the node streams back, cancels it, and :func:`unpack` turns what came back into
  values and errors;
- **a worker thread on the node**: ``cell_task.run_cell_task``, the Dask task, which runs the
  cell in a child process it can stop, relays its output and keeps ``--bg`` results;
- **the child process**: ``cell_child``, which runs the cell in a fresh ``__main__`` and
  reports back; children are forked from a small fork server there.

Streaming uses a per-run Dask ``Queue`` (see :class:`CellRun`) so output reaches only the
kernel that ran the cell. No Dask import at module level (``jobs/`` stays cheap to
import, and the node's child processes import this module too).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import functools
import pickle
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from grid_portal.errors import GridError, RemoteError, UntrustedResult, UsageError
from grid_portal.protocol import STREAM_ANNOTATION  # noqa: F401 - names of the wire contract
from grid_portal.pushed import PUSH_ANNOTATION

# -- tunables -----------------------------------------------------------------------------------
STREAM_AFTER = 0.05  # s the kernel waits before opening the stream channel (< FIRST_FLUSH)
REPLICA_OUTPUT_WAIT = 3.0  # s a --replicas cell waits for copy 0's output after its result
STOP_CONFIRM_TIMEOUT = 5.0  # s the kernel waits for the node to confirm a cancelled cell stopped
# The task annotation that names a cell's stream queue: a node lets the task put into that
# queue and no other (cell_task.py; node/taskproc.py for other tasks).
BIG_PAYLOAD = 1_000_000  # bytes; larger inputs are scattered once instead of sent per task
# Most a cell may send (code, pickled inputs and --map values together): past this, data
# belongs on the nodes (read there from a shared location), not in the portal's task graph.
MAX_CELL_BYTES = 200_000_000
STORED_FORMAT = "grid-cell/1"
# A --bg cell's payload up to this size is kept with its job at the portal, which runs it again
# by itself if it restarts while the cell runs; a larger one is not resubmitted.
MAX_KEPT_PAYLOAD = 8 * 2**20

# Names IPython puts in the user namespace that a cell never means to ship.
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "_oh", "_ih", "_dh"})


# ================================================================================================
# Errors the user sees
# ================================================================================================
class CellSyntaxError(UsageError):
    """The cell does not parse; found in the kernel, before anything is sent."""

    def __init__(self, exc: SyntaxError) -> None:
        self.lines = traceback.format_exception_only(SyntaxError, exc)
        super().__init__("".join(self.lines).strip())

    def _render_traceback_(self) -> list[str]:
        return [line.rstrip("\n") for line in self.lines]


class RemoteCellError(RemoteError):
    """An exception raised by the cell on its node, when the original cannot (or, from a node
    the researcher does not trust, may not) be rebuilt here."""

    def __init__(self, ename: str, evalue: str, lines: Sequence[str]) -> None:
        super().__init__(ename, evalue, list(lines))


class CellTimedOut(GridError):
    """The cell ran past its ``--timeout``; the node stopped it."""

    def _render_traceback_(self) -> list[str]:
        return [f"CellTimedOut: {self}"]


class CellInterrupted(KeyboardInterrupt):
    """The user interrupted the kernel; the remote cell was cancelled. A KeyboardInterrupt so
    that "Run all" stops here, rendered as one line instead of a traceback of our code."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class CellResubmitted(GridError):
    """The portal restarted while the cell ran and ran it again by itself (a --bg cell): its
    result will be kept at the portal as before, for ``%grid result ID``."""


class CellFailed(Exception):
    """Raised by the task on the node so that Dask (and the portal's job record) see a failed
    task; carries everything the kernel needs to show the failure as the cell's own."""

    def __init__(self, summary: str, outcome: dict[str, Any]) -> None:
        super().__init__(summary)
        self.outcome = outcome

    def __reduce__(self) -> tuple[Any, ...]:
        return (CellFailed, (str(self), self.outcome))


# ================================================================================================
# Kernel side: reading the cell
# ================================================================================================
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


def pack_inputs(namespace: Mapping[str, Any], names: Iterable[str]) -> dict[str, bytes]:
    """cloudpickle each input on its own, so a failure can name the variable."""
    import cloudpickle

    packed = {}
    for name in names:
        value = namespace[name]
        try:
            packed[name] = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means the same to the user
            raise UsageError(
                f"cannot send variable {name!r} ({type(value).__name__}) to the grid: "
                f"{one_line(exc)}. Create it inside the cell, or list only the variables the "
                "cell needs with --in a,b"
            ) from None
        check_cell_size(packed)  # stop at the variable that makes it too big
    return packed


def check_cell_size(inputs: Mapping[str, bytes], extra: int = 0) -> None:
    """Refuse a cell whose inputs (plus ``extra`` bytes: code, --map values) are larger than
    MAX_CELL_BYTES, naming the largest variables, before anything is sent."""
    from grid_portal.units import format_size

    total = sum(len(v) for v in inputs.values()) + extra
    if total <= MAX_CELL_BYTES:
        return
    largest = sorted(inputs.items(), key=lambda kv: -len(kv[1]))[:3]
    named = (
        ", ".join(f"{n} {format_size(len(v))}" for n, v in largest)
        or "its code, inputs and --map values together"
    )
    raise UsageError(
        f"this cell would send {format_size(total)} to the grid ({named}); at most "
        f"{format_size(MAX_CELL_BYTES)} travel with a cell. Read big data on the node, inside "
        "the cell (from a shared folder or URL), or leave variables out with --in a,b"
    )


def pack_value(value: Any, what: str) -> bytes:
    import cloudpickle

    try:
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot send {what} to the grid: {one_line(exc)}") from None


def make_payload(
    code: CellCode,
    inputs: dict[str, bytes],
    outputs: list[str] | None,
    map_name: str | None = None,
) -> bytes:
    """Everything every run of the cell shares, as one blob (plain pickle of plain data)."""
    wanted = outputs if outputs is not None else [n for n in code.writes if n != map_name]
    return pickle.dumps(
        {
            "source": code.source,
            "filename": code.filename,
            "inputs": inputs,
            "outputs": wanted,
            "explicit_outputs": outputs is not None,
            "deletes": list(code.deletes),
            "has_value": code.has_value,
            "map_name": map_name,
        },
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# ================================================================================================
# Kernel side: what came back
# ================================================================================================
@dataclass
class CellResult:
    """What a finished cell (or --map sweep) hands back to the notebook."""

    values: dict[str, Any] = field(default_factory=dict)  # to assign in the user namespace
    deleted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each, shown on stderr
    has_value: bool = False
    value: Any = None
    value_bundle: dict[str, Any] | None = None  # the value's repr, when it could not travel
    error: BaseException | None = None
    nodes: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def unpack(
    outcomes: Sequence[dict[str, Any]],
    labels: Sequence[str] | None = None,
    trusted: Callable[[], bool] | None = None,
) -> CellResult:
    """Turn the outcomes of one cell (or of each --map value, in order) into a CellResult.

    What the node pickled (variables, the value, the exception) is opened as data only
    (``grid_portal.safe_pickle``) unless ``trusted()`` says every node that ran the job is
    trusted; a refused variable is a note naming its type, and the rest still loads."""
    opener = _Opener(trusted)
    result = CellResult()
    if not outcomes:
        return result
    mapped = labels is not None
    per_name: dict[str, list[Any]] = {}
    values: list[Any] = []
    for index, outcome in enumerate(outcomes):
        prefix = f"[{labels[index]}] " if mapped and labels else ""
        node = outcome.get("node")
        if node and node not in result.nodes:
            result.nodes.append(node)
        result.elapsed = max(result.elapsed, float(outcome.get("elapsed") or 0.0))
        for name, reason in (outcome.get("unsent") or {}).items():
            result.notes.append(
                f"{prefix}{name} was not sent back ({reason}); it stayed on the node"
            )
        for name in outcome.get("missing") or ():
            result.notes.append(f"{prefix}--out {name}: the cell did not set {name}")
        for name, data in (outcome.get("outputs") or {}).items():
            try:
                value = opener.open(data)
            except UntrustedResult as exc:
                result.notes.append(f"{prefix}{name} was not loaded: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a module not installed here
                result.notes.append(f"{prefix}{name} could not be loaded here: {one_line(exc)}")
                continue
            if mapped:
                per_name.setdefault(name, [None] * len(outcomes))[index] = value
            else:
                result.values[name] = value
        if not mapped:
            result.deleted = list(outcome.get("deleted") or ())
        result.has_value = result.has_value or bool(outcome.get("has_value"))
        value, bundle = None, outcome.get("value_bundle")
        if outcome.get("value") is not None:
            try:
                value = opener.open(outcome["value"])
                bundle = None
            except UntrustedResult as exc:
                result.notes.append(f"{prefix}the cell's value was not loaded: {exc}")
            except Exception as exc:  # noqa: BLE001
                result.notes.append(f"{prefix}the cell's value could not be loaded here: {exc}")
        values.append(value)
        if bundle is not None and not mapped:
            result.value_bundle = bundle if opener.trusted() else _inert(bundle)
        if outcome.get("error") and result.error is None:
            result.error = rebuild_error(outcome, prefix, opener)
    if mapped:
        result.values.update(per_name)
        result.value = values
    else:
        result.value = values[0]
    return result


class _Opener:
    """Opens what a node pickled: as data only, or with cloudpickle when ``trusted()`` (asked
    at most once, and only when something is not plain data)."""

    def __init__(self, trusted: Callable[[], bool] | None) -> None:
        self._trusted = trusted
        self._answer: bool | None = None

    def trusted(self) -> bool:
        if self._answer is None:
            self._answer = bool(self._trusted is not None and self._trusted())
        return self._answer

    def open(self, data: bytes) -> Any:
        from grid_portal.safe_pickle import loads_data

        try:
            return loads_data(data)
        except UntrustedResult:
            if not self.trusted():
                raise
        import cloudpickle

        return cloudpickle.loads(data)

    def open_exception(self, data: bytes) -> Any:
        from grid_portal.safe_pickle import loads_exception

        try:
            return loads_exception(data)
        except UntrustedResult:
            if not self.trusted():
                return None  # shown as a RemoteCellError with the node's traceback
        import cloudpickle

        return cloudpickle.loads(data)


def _inert(bundle: dict[str, Any]) -> dict[str, Any]:
    from grid_portal.sanitize import inert_bundle

    return inert_bundle(bundle)[0]


def rebuild_error(
    outcome: dict[str, Any], prefix: str = "", opener: _Opener | None = None
) -> BaseException:
    """The cell's own exception, with the node's traceback as what IPython shows."""
    opener = opener or _Opener(None)
    error = outcome["error"]
    node = outcome.get("node") or "its node"
    if error.get("timed_out"):
        return CellTimedOut(f"{prefix}{error['evalue']}")
    if error.get("grid"):
        return GridError(f"{prefix}{error['evalue']}")
    lines = [line.rstrip("\n") for line in error.get("lines") or ()]
    header = f"{prefix}Traceback from node {node} (most recent call last):"
    lines = [
        header if line.startswith("Traceback (most recent call last)") else line for line in lines
    ] or [f"{prefix}{error['ename']}: {error['evalue']}"]
    exc: BaseException | None = None
    if error.get("pickled") is not None:
        with contextlib.suppress(Exception):
            exc = opener.open_exception(error["pickled"])
    # SyntaxError and BaseExceptions (SystemExit...) get special handling in IPython that
    # would show our frames; a plain Exception carrying the remote traceback does not.
    if (
        isinstance(exc, Exception)
        and not isinstance(exc, SyntaxError)
        and _can_set_attr(exc, lines)
    ):
        return exc
    return RemoteCellError(error.get("ename", "Error"), error.get("evalue", ""), lines)


def _can_set_attr(exc: BaseException, lines: list[str]) -> bool:
    try:
        exc._render_traceback_ = lambda: list(lines)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return False
    return True


def stored_blob(outcomes: list[dict[str, Any]], labels: list[str] | None) -> bytes:
    return pickle.dumps(
        {"format": STORED_FORMAT, "outcomes": outcomes, "labels": labels},
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def load_stored(data: bytes) -> tuple[list[dict[str, Any]], list[str] | None]:
    """A result kept at the portal (``%grid result`` after a kernel restart). Its node may
    have stored it, so it is opened as data only (the variables in it are opened later, by
    :func:`unpack`)."""
    from grid_portal.safe_pickle import loads_data

    try:
        blob = loads_data(data)
    except UntrustedResult:
        raise
    except Exception:  # noqa: BLE001
        blob = None
    if not isinstance(blob, dict) or blob.get("format") != STORED_FORMAT:
        raise GridError("the result kept at the portal is not a %%grid cell's result")
    return list(blob["outcomes"]), blob.get("labels")


# ================================================================================================
# Kernel side: running a cell on the grid
# ================================================================================================
class Sink(Protocol):
    """Where a running cell's output goes (the notebook's output area, a widget, a terminal)."""

    def started(self, index: int, node: str) -> None: ...
    def stream(self, index: int, name: str, text: str) -> None: ...
    def display(self, index: int, data: dict[str, Any], metadata: dict[str, Any]) -> None: ...
    def finished(self, index: int, outcome: dict[str, Any] | None) -> None: ...
    def tick(self) -> None: ...


@dataclass
class RunOptions:
    name: str
    cpus: float = 1
    gpus: float = 0
    memory: int | None = None
    where: str | None = None  # --where: the portal places the cell, and re-matches as nodes join
    retries: int = 0
    timeout: float | None = None
    keep: bool = False  # --bg: the node keeps the result at the portal
    stream: bool = True
    replicas: int = 1  # --replicas: copies on different nodes, compared by the portal


class CellRun:
    """One submitted cell: one task, or one per ``--map`` value, all in one grid job.

    Streaming: each run gets a Dask ``Queue`` named with 128 random bits that only this kernel
    and the task know. The node puts batches of output into it and this kernel takes them out.
    Queue items go to exactly one reader and are dropped by the scheduler once read, and the
    scheduler has no way to list queue names. Not ``print``/Dask's "print" topic: every client
    receives those. Not ``log_event`` + ``subscribe_topic``: the scheduler keeps every event
    of every topic and hands them all to any client that calls ``get_events()``, so one user's
    output would be readable by all and would pile up at the portal for ever.
    Everything streamed is also in the task's result, so output is complete even if the
    stream is late or lost; quick cells (< FIRST_FLUSH) stream nothing at all, and this kernel
    creates the queue only once the cell has run STREAM_AFTER (no round trip for quick ones).
    The name also travels as the tasks' ``grid_stream`` annotation: a sandboxed node lets a
    task's process put into that queue and no other (grid_portal.node.taskproc).
    """

    def __init__(
        self,
        grid: Any,
        payload: bytes,
        options: RunOptions,
        map_values: list[bytes] | None = None,
        labels: list[str] | None = None,
        job_id: str | None = None,
    ) -> None:
        self.grid = grid
        self.payload = payload
        self.options = options
        self.map_values = map_values
        self.labels = labels
        self.count = len(map_values) if map_values is not None else 1
        self.job_id = job_id or uuid.uuid4().hex[:12]
        self.channel = f"grid-cell-{uuid.uuid4().hex}" if options.stream else None
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.futures: list[Any] = []
        self.outcomes: list[dict[str, Any] | None] = [None] * self.count
        self.nodes: dict[int, str] = {}  # runs the stream said started, and where
        self._polled_nodes: set[str] = set()  # nodes the portal said run the job
        self.stopped: set[int] = set()
        self.submitted_at = 0.0
        self.finished_at: float | None = None
        self._shown = [-1] * self.count  # highest event seq delivered, per run
        self._pump: threading.Thread | None = None
        self._pump_due = options.stream  # start streaming once the cell is not instant
        self._queue: Any = None
        self._queue_ready = threading.Event()
        self._end_token = uuid.uuid4().hex
        self._closed = False
        self.cancelled = False
        self._pushed: set[int] = set()  # runs whose result the portal pushed (grid_portal.pushed)
        self.ended: set[int] = set()  # --replicas: runs whose copy 0 sent all its output

    # -- submit ---------------------------------------------------------------------------------
    def requests(self) -> list[dict[str, Any]]:
        base = {
            "job_id": self.job_id,
            "channel": self.channel,
            "timeout": self.options.timeout,
            "keep": self.options.keep and self.map_values is None,
        }
        if self.options.replicas > 1:
            base["compare"] = True  # the node returns only the data (cell_task.COMPARED_FIELDS)
        if self.map_values is None:
            return [{**base, "index": 0, "map_value": None}]
        return [{**base, "index": i, "map_value": v} for i, v in enumerate(self.map_values)]

    def submit(self) -> CellRun:
        check_cell_size({}, len(self.payload) + sum(len(v) for v in self.map_values or ()))
        grid = self.grid
        payload: Any = self.payload
        if len(self.payload) > BIG_PAYLOAD and self.count > 1:
            # Large inputs travel once to the grid, not once per --map value.
            payload = grid.client.scatter(self.payload, hash=False)
        requests = self.requests()
        keys = [f"grid-cell-{self.job_id}-{i}" for i in range(self.count)]
        extra: dict[str, Any] = {}
        if self.options.retries:
            extra["retries"] = int(self.options.retries)
        self.submitted_at = time.monotonic()
        resources = {
            "cpus": self.options.cpus,
            "gpus": self.options.gpus,
            "memory": self.options.memory,
            "where": self.options.where,
        }
        if self.options.replicas > 1:
            replicas = self.options.replicas
            if self.options.keep:
                raise UsageError(
                    "--replicas and --bg do not go together (yet): run it in the foreground"
                )
            resources["replicas"] = replicas
            # Copy 0's output, ended by an "end" event, comes through the stream: open it now.
            self._pump_due = self.channel is not None
        if self.options.keep and self.map_values is None and len(self.payload) <= MAX_KEPT_PAYLOAD:
            # Kept with the job: a portal that restarts while the cell runs runs it again.
            self.grid.register_job(
                self.job_id, self.options.name, "cell", spec={"cell": self.kept_spec(requests[0])}
            )
        import dask

        from grid_portal.jobs.cell_task import run_cell_task  # the node's side

        for index, key in enumerate(keys):
            grid.pushed.expect(key, functools.partial(self._on_pushed, index))
        with (
            grid.job(self.options.name, kind="cell", job_id=self.job_id),
            _stream_to(self.channel),
            dask.annotate(**{PUSH_ANNOTATION: True}),
        ):
            if self.map_values is None:
                future = grid.submit(
                    run_cell_task, payload, requests[0], key=keys[0], **resources, **extra
                )
                self.futures = [future]
            else:
                self.futures = grid.map(
                    run_cell_task, [payload] * self.count, requests, key=keys, **resources, **extra
                )
        if self.options.keep:
            from distributed import fire_and_forget

            fire_and_forget(self.futures)  # a --bg cell outlives the kernel that sent it
        loop = grid.client.loop
        for index, future in enumerate(self.futures):
            loop.add_callback(self._fetch, index, future)
        if self.options.replicas > 1 and self.channel is not None:
            self._start_pump()
        return self

    def _on_pushed(self, index: int, data: bytes) -> None:
        """In the client's event loop: the node pushed this run's result with its completion
        (``grid_portal.pushed``), ahead of Dask's word that the task finished."""
        self._pushed.add(index)
        self.inbox.put(("pushed", index, data))

    async def _fetch(self, index: int, future: Any) -> None:
        """In the client's event loop: wait for one run to end and, unless its result was
        pushed already, fetch its outcome there, then hand both to the waiting thread.
        (``add_done_callback`` runs its callback in a thread of Dask's own, and
        ``future.result()`` then goes back through the loop: two thread switches more per
        cell.) A run that failed or was cancelled comes without its outcome; the waiting
        thread asks."""
        import asyncio

        value = None
        try:
            state = getattr(future, "_state", None)
            if state is not None:
                await state.wait()  # a pushed result arrives before Dask says "finished"
            if index not in self._pushed:
                got = await self.grid.client.gather([future], asynchronous=True)
                value = got[0]
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the future tells why
            pass
        finally:
            self.inbox.put(("done", index, future, value))

    def kept_spec(self, request: dict[str, Any]) -> dict[str, Any]:
        """What the portal keeps to run this --bg cell again (``jobs.graph.resubmit_kept_cell``).
        The payload stays opaque bytes there: the portal never unpickles it."""
        options = self.options
        return {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "request": {**request, "channel": None},
            "options": {
                "cpus": options.cpus,
                "gpus": options.gpus,
                "memory": options.memory,
                "where": options.where,
                "retries": options.retries,
                "timeout": options.timeout,
            },
        }

    # -- the stream channel ------------------------------------------------------------------
    def _start_pump(self) -> None:
        self._pump_due = False
        if self._pump is not None or self.channel is None or self._closed:
            return
        self._pump = threading.Thread(target=self._pump_loop, name="grid-cell-stream", daemon=True)
        self._pump.start()

    def _pump_loop(self) -> None:
        from distributed import Queue

        try:
            self._queue = Queue(self.channel, client=self.grid.client)
        except Exception:  # noqa: BLE001 - no stream: the result still carries all output
            return
        finally:
            self._queue_ready.set()
        try:
            while True:
                item = self._queue.get()
                if not isinstance(item, dict) or item.get("end") == self._end_token:
                    break
                self.inbox.put(("events", int(item.get("i", 0)), item.get("events") or []))
        except Exception:  # noqa: BLE001 - the client closed under us
            pass
        finally:
            with contextlib.suppress(Exception):
                self._queue.close()

    def close(self) -> None:
        """Stop the stream pump, off the caller's thread: the result is already here."""
        if self._closed:
            return
        self._closed = True
        for index in range(self.count):
            self.grid.pushed.forget(f"grid-cell-{self.job_id}-{index}")
        if self._pump is None:
            return
        threading.Thread(target=self._end_pump, name="grid-cell-close", daemon=True).start()

    def _end_pump(self) -> None:
        self._queue_ready.wait(30)
        if self._queue is None:
            return
        with contextlib.suppress(Exception):
            self._queue.put({"end": self._end_token})

    # -- waiting --------------------------------------------------------------------------------
    def done(self) -> bool:
        return all(o is not None for o in self.outcomes)

    def wait(
        self, sink: Sink, tick: float = 0.25, status_every: float | None = None
    ) -> list[dict[str, Any]]:
        """Relay output to ``sink`` until every run finished; return their outcomes.

        Runs in the kernel's main thread, so a KeyboardInterrupt arrives here (call
        :meth:`cancel` then). Raises GridError when the grid could not run the cell at all;
        the cell's own exception is in the outcome (see :func:`unpack`). With
        ``status_every``, a node that streams nothing (a sandboxed one) is still named: the
        portal's job record is asked that often which nodes run the job.
        """
        polled = 0.0
        while not self.done():
            if self._pump_due and time.monotonic() - self.submitted_at >= STREAM_AFTER:
                self._start_pump()
            try:
                item = self.inbox.get(timeout=STREAM_AFTER if self._pump_due else tick)
            except queue.Empty:
                now = time.monotonic()
                if status_every is not None and not self.nodes and now - polled >= status_every:
                    polled = now
                    self._poll_nodes(sink)
                sink.tick()
                continue
            self._handle(item, sink)
            failed = next(
                (i for i, o in enumerate(self.outcomes) if o is not None and o.get("error")),
                None,
            )
            if failed is not None and self.count > 1 and not self.done():
                self._drop_others()  # like a loop, a sweep stops at its first error
                break
        if self.options.replicas > 1 and self._pump is not None:
            self._await_output(sink)
        self.finished_at = time.monotonic()
        self.close()
        return [o for o in self.outcomes if o is not None]

    def _await_output(self, sink: Sink, limit: float = REPLICA_OUTPUT_WAIT) -> None:
        """--replicas: the agreed result holds no output; copy 0's comes through the stream,
        ended by an "end" event. Relay it for a moment more if it is not all here yet."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            pending = [
                i
                for i, o in enumerate(self.outcomes)
                if o is not None and not o.get("error") and not o.get("cancelled")
                if i not in self.ended
            ]
            if not pending:
                return
            try:
                item = self.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if item[0] == "events":
                self._deliver(item[1], item[2], sink)

    def _poll_nodes(self, sink: Sink) -> None:
        try:
            job = self.grid.get_job(self.job_id)
        except Exception:  # noqa: BLE001 - only a status line depends on it
            return
        if job is not None and job.state.value == "running":
            for node in job.nodes:
                if node not in self._polled_nodes:
                    self._polled_nodes.add(node)
                    sink.started(0, node)

    def _handle(self, item: tuple[Any, ...], sink: Sink) -> None:
        kind, index = item[0], item[1]
        if kind == "events":
            self._deliver(index, item[2], sink)
            return
        if kind == "pushed":
            if self.outcomes[index] is None:
                self._finish(index, self._open_pushed(item[2]), sink)
            return
        future = item[2]
        outcome = self._outcome_of(index, future, item[3] if len(item) > 3 else None)
        if outcome is not None:
            self._finish(index, outcome, sink)

    def _open_pushed(self, data: bytes) -> dict[str, Any]:
        """A pushed outcome, as data only: the node pickled it (``grid_portal.pushed``)."""
        from grid_portal.safe_pickle import loads_data

        try:
            outcome = loads_data(data)
        except UntrustedResult:
            if not self.grid.trusts_job(self.job_id):
                raise
            outcome = pickle.loads(data)
        if not isinstance(outcome, dict):
            raise GridError(f"job {self.job_id}: its node sent back something that is not a result")
        return outcome

    def _finish(self, index: int, outcome: dict[str, Any], sink: Sink) -> None:
        self._deliver(index, outcome.get("events") or [], sink)
        self.outcomes[index] = outcome
        sink.finished(index, outcome)

    def _outcome_of(
        self, index: int, future: Any, fetched: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        if self.outcomes[index] is not None:
            return None
        status = future.status
        if status == "finished":
            outcome = fetched if fetched is not None else future.result()
            if not isinstance(outcome, dict):  # a node answering with something else
                raise GridError(
                    f"job {self.job_id}: its node sent back something that is not a result"
                )
            return outcome
        if status == "cancelled":
            if self.cancelled:
                return {"cancelled": True, "events": []}
            try:
                job = self.grid.get_job(self.job_id)
            except Exception:  # noqa: BLE001 - the connection itself closed
                raise GridError(
                    f"the connection to the portal closed while job {self.job_id} ran"
                ) from None
            if job is not None and (not job.state.finished or job.state.value == "done"):
                # Dask cancels futures when the connection to the portal is lost; the job
                # still running (or already done, when the rerun was quicker than this
                # kernel's reconnection) means the restarted portal submitted it again.
                raise CellResubmitted(
                    f"the portal restarted while job {self.job_id} ran and ran it again; "
                    f"`%grid result {self.job_id}` fetches its result when it is done"
                )
            reason = (job.error if job is not None else None) or "cancelled"
            raise GridError(f"job {self.job_id} was cancelled on the grid: {reason}")
        exc = future.exception()
        if isinstance(exc, CellFailed):
            return exc.outcome
        raise GridError(f"the grid could not run the cell (job {self.job_id}): {one_line(exc)}")

    def _deliver(self, index: int, events: list[dict[str, Any]], sink: Sink) -> None:
        for event in sorted(events, key=lambda e: e.get("seq", 0)):
            seq = int(event.get("seq", 0))
            if seq <= self._shown[index]:
                continue  # already streamed
            self._shown[index] = seq
            kind = event.get("k")
            if kind == "started":
                self.nodes[index] = str(event.get("node"))
                sink.started(index, self.nodes[index])
            elif kind == "stopped":
                self.stopped.add(index)
            elif kind == "end":
                self.ended.add(index)
            elif kind in ("stdout", "stderr"):
                sink.stream(index, kind, event.get("t", ""))
            elif kind == "display":
                sink.display(index, dict(event.get("d") or {}), dict(event.get("m") or {}))

    def _drop_others(self) -> None:
        unfinished = [f for i, f in enumerate(self.futures) if self.outcomes[i] is None]
        with contextlib.suppress(Exception):
            self.grid.client.cancel(unfinished, force=True)
        for i, outcome in enumerate(self.outcomes):
            if outcome is None:
                self.outcomes[i] = {"cancelled": True, "events": []}

    # -- cancelling -----------------------------------------------------------------------------
    def cancel(self, reason: str, confirm: float = STOP_CONFIRM_TIMEOUT) -> str:
        """Cancel the job at the portal (queued tasks dropped, running ones killed on their
        node); wait a little for the nodes to confirm. Returns a sentence for the user."""
        self.cancelled = True
        with contextlib.suppress(GridError):
            self.grid.cancel(self.job_id, reason=reason)
        running = {i for i in self.nodes if self.outcomes[i] is None}
        deadline = time.monotonic() + confirm
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting
            while running - self.stopped and time.monotonic() < deadline:
                try:
                    item = self.inbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item[0] == "events":
                    self._deliver(item[1], item[2], NullSink())
                elif item[0] == "done":
                    running.discard(item[1])
        self.close()
        nodes = sorted({self.nodes[i] for i in self.nodes})
        if not nodes:
            try:
                job = self.grid.get_job(self.job_id)
            except Exception:  # noqa: BLE001
                job = None
            if job is not None and job.nodes:
                # A node that streams nothing (sandboxed): its executor ends the task.
                return f"cancelled job {self.job_id}, which ran on {', '.join(job.nodes)}"
            return f"cancelled job {self.job_id} before it started"
        confirmed = not (running - self.stopped)
        where = ", ".join(nodes)
        if confirmed:
            return f"cancelled job {self.job_id}: stopped on {where}, which is free again"
        return f"cancelled job {self.job_id}; {where} is stopping it"


def fetch_kept(grid: Any, job_id: str) -> bytes | None:
    """A --bg cell's kept result: from the ledger, else (a cell the portal ran again after a
    restart, on a node that could not keep it) from the task result the portal holds, which
    is then kept in the ledger and let go. None when there is neither."""
    data = grid.fetch_result(job_id)
    if data is not None:
        return data
    try:
        held = grid.held_keys(job_id)
    except GridError:  # NotFound: nothing held; UsageError: replicas still compared
        return None
    keys = [k for ks in held.values() for k in ks]
    if not keys:
        return None
    futures = grid.futures_for(keys)
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result())
        except CellFailed as exc:  # the cell's own error: its outcome says what happened
            outcomes.append(exc.outcome)
    data = stored_blob(outcomes, None)
    grid.store_result(job_id, data)
    grid.release_held(job_id)
    return data


def _stream_to(channel: str | None) -> Any:
    """Name the run's stream queue in its tasks' annotations: a sandboxed node lets a task put
    into that queue and no other (grid_portal.node.taskproc)."""
    if channel is None:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(**{STREAM_ANNOTATION: channel})


class NullSink:
    """A sink that shows nothing (output is still in the outcomes)."""

    def started(self, index: int, node: str) -> None:
        pass

    def stream(self, index: int, name: str, text: str) -> None:
        pass

    def display(self, index: int, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        pass

    def finished(self, index: int, outcome: dict[str, Any] | None) -> None:
        pass

    def tick(self) -> None:
        pass


def replay(outcomes: Sequence[dict[str, Any]], sink: Sink) -> None:
    """Show the output a finished cell produced (``%grid result`` of a kept result)."""
    for index, outcome in enumerate(outcomes):
        for event in sorted(outcome.get("events") or [], key=lambda e: e.get("seq", 0)):
            kind = event.get("k")
            if kind in ("stdout", "stderr"):
                sink.stream(index, kind, event.get("t", ""))
            elif kind == "display":
                sink.display(index, dict(event.get("d") or {}), dict(event.get("m") or {}))
