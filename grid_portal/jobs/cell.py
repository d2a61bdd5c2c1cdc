"""Remote cell execution: run a notebook cell on a node as if it ran in the kernel.

Code here runs in three places, and each part says which:

- **the kernel** (any front end): :func:`analyse_cell` reads the cell with :mod:`ast` (what it
  reads, what it assigns, whether it ends in an expression), :func:`pack_inputs` pickles the
  variables it needs, :class:`CellRun` submits it as a grid job, relays what the node streams
  back, cancels it, and :func:`unpack` turns what came back into values and errors.
- **a worker thread on the node**, or on a sandboxed node a task process: :func:`run_cell_task`
  is the Dask task. It does not run the cell itself: a Python thread cannot be stopped, so the
  cell runs in a child process that the task kills when the job is cancelled or its
  ``--timeout`` runs out. The task relays the child's output to the kernel while it runs and,
  for ``--bg`` cells, keeps the result at the portal (from a task process, through its narrow
  channel to the worker: see :func:`_emitter`).
- **the child process**: :func:`_child_main` runs the cell in a fresh ``__main__`` module with
  its own stdout/stderr (per-process capture: concurrent cells on one worker never see each
  other's output), collects ``display()`` calls and matplotlib figures, and reports back.

Streaming uses a per-run Dask ``Queue`` (see :class:`CellRun`) so output reaches only the
kernel that ran the cell. No Dask import at module level (DESIGN.md: ``jobs/`` stays cheap to
import, and the child process imports this module too).
"""

from __future__ import annotations

import ast
import base64
import builtins
import codecs
import contextlib
import functools
import linecache
import os
import pickle
import platform
import queue
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from grid_portal import isolation
from grid_portal.errors import GridError, UsageError
from grid_portal.proctree import data_size, descendants, limit_data, set_data_limit
from grid_portal.pushed import PUSH_ANNOTATION

# -- tunables -----------------------------------------------------------------------------------
FIRST_FLUSH = 0.15  # s a cell runs before its output starts streaming (quick cells send none)
FLUSH_INTERVAL = 0.05  # s between streamed batches: at most 20 small messages a second
STREAM_AFTER = 0.05  # s the kernel waits before opening the stream channel (< FIRST_FLUSH)
POLL_INTERVAL = 0.05  # s between checks, on the node, for cancellation and the deadline
RELAY_ATTEMPTS = 20  # failed puts in a row (no queue yet, kernel gone) before streaming stops
EMIT_TIMEOUT = 10.0  # s a node waits for the portal to take a stream batch or a kept result
MAX_OUTPUT_CHARS = 8_000_000  # text kept per cell; more would swamp the notebook anyway
STOP_CONFIRM_TIMEOUT = 5.0  # s the kernel waits for the node to confirm a cancelled cell stopped
# Task annotations a node checks a cell's stream and kept result against (the wire contract
# with grid_portal.client and node/taskproc.py, which import neither this nor each other).
STREAM_ANNOTATION = "grid_stream"
JOB_ANNOTATION = "grid_job"
# Where a cell's child stands among processes (its group and session), chosen by its task:
IN_PARENT_GROUP = 0  # in its sandboxed task process's group: the node's signals reach both
OWN_SESSION = 1  # a session and group of its own (a task in an unconfined worker)
OWN_GROUP = 2  # a group of its own in the worker's session (confined: the node's CPU share)
FORK_AHEAD_DELAY = 0.03  # s after a cell starts before the node forks the next cell's child
BIG_PAYLOAD = 1_000_000  # bytes; larger inputs are scattered once instead of sent per task
# Most a cell may send (code, pickled inputs and --map values together): past this, data
# belongs on the nodes (read there from a shared location), not in the portal's task graph.
MAX_CELL_BYTES = 200_000_000
STORED_FORMAT = "grid-cell/1"
# A --bg cell's payload up to this size is kept with its job at the portal, which runs it again
# by itself if it restarts while the cell runs (issue 8); a larger one is not resubmitted.
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


class RemoteCellError(Exception):
    """An exception raised by the cell on its node, when the original cannot be rebuilt here."""

    def __init__(self, ename: str, evalue: str, lines: Sequence[str]) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename, self.evalue, self.lines = ename, evalue, list(lines)

    def _render_traceback_(self) -> list[str]:
        return list(self.lines)


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
                f"{_one_line(exc)}. Create it inside the cell, or list only the variables the "
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
        raise UsageError(f"cannot send {what} to the grid: {_one_line(exc)}") from None


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


def _one_line(exc: BaseException) -> str:
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


def unpack(outcomes: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> CellResult:
    """Turn the outcomes of one cell (or of each --map value, in order) into a CellResult."""
    import cloudpickle

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
                value = cloudpickle.loads(data)
            except Exception as exc:  # noqa: BLE001 - e.g. a module not installed here
                result.notes.append(f"{prefix}{name} could not be loaded here: {_one_line(exc)}")
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
                value = cloudpickle.loads(outcome["value"])
                bundle = None
            except Exception as exc:  # noqa: BLE001
                result.notes.append(f"{prefix}the cell's value could not be loaded here: {exc}")
        values.append(value)
        if bundle is not None and not mapped:
            result.value_bundle = bundle
        if outcome.get("error") and result.error is None:
            result.error = rebuild_error(outcome, prefix)
    if mapped:
        result.values.update(per_name)
        result.value = values
    else:
        result.value = values[0]
    return result


def rebuild_error(outcome: dict[str, Any], prefix: str = "") -> BaseException:
    """The cell's own exception, with the node's traceback as what IPython shows."""
    import cloudpickle

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
            exc = cloudpickle.loads(error["pickled"])
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
    """A result kept at the portal (``%grid result`` after a kernel restart)."""
    try:
        blob = pickle.loads(data)
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
    workers: list[str] | None = None  # --where: the eligible nodes
    retries: int = 0
    timeout: float | None = None
    keep: bool = False  # --bg: the node keeps the result at the portal
    stream: bool = True


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

    # -- submit ---------------------------------------------------------------------------------
    def requests(self) -> list[dict[str, Any]]:
        base = {
            "job_id": self.job_id,
            "channel": self.channel,
            "timeout": self.options.timeout,
            "keep": self.options.keep and self.map_values is None,
        }
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
        if self.options.workers is not None:
            extra.update(workers=list(self.options.workers), allow_other_workers=False)
        if self.options.retries:
            extra["retries"] = int(self.options.retries)
        self.submitted_at = time.monotonic()
        resources = {
            "cpus": self.options.cpus,
            "gpus": self.options.gpus,
            "memory": self.options.memory,
            "wait": self.options.workers is not None,  # eligibility was checked already
        }
        if self.options.keep and self.map_values is None and len(self.payload) <= MAX_KEPT_PAYLOAD:
            # Kept with the job: a portal that restarts while the cell runs runs it again.
            self.grid.register_job(
                self.job_id, self.options.name, "cell", spec={"cell": self.kept_spec(requests[0])}
            )
        import dask

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
        """What the portal keeps to run this --bg cell again (``resubmit_kept_cell``). The
        payload stays opaque bytes there: the portal never unpickles it."""
        options = self.options
        return {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "request": {**request, "channel": None},
            "options": {
                "cpus": options.cpus,
                "gpus": options.gpus,
                "memory": options.memory,
                "workers": list(options.workers) if options.workers is not None else None,
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
        self.finished_at = time.monotonic()
        self.close()
        return [o for o in self.outcomes if o is not None]

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
                self._finish(index, pickle.loads(item[2]), sink)
            return
        future = item[2]
        outcome = self._outcome_of(index, future, item[3] if len(item) > 3 else None)
        if outcome is not None:
            self._finish(index, outcome, sink)

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
            return fetched if fetched is not None else future.result()
        if status == "cancelled":
            if self.cancelled:
                return {"cancelled": True, "events": []}
            try:
                job = self.grid.get_job(self.job_id)
            except Exception:  # noqa: BLE001 - the connection itself closed
                raise GridError(
                    f"the connection to the portal closed while job {self.job_id} ran"
                ) from None
            if job is not None and not job.state.finished:
                # Dask cancels futures when the connection to the portal is lost; the job
                # still running means the restarted portal submitted it again by itself.
                raise CellResubmitted(
                    f"the portal restarted while job {self.job_id} ran and ran it again; "
                    f"`%grid result {self.job_id}` fetches its result when it is done"
                )
            reason = (job.error if job is not None else None) or "cancelled"
            raise GridError(f"job {self.job_id} was cancelled on the grid: {reason}")
        exc = future.exception()
        if isinstance(exc, CellFailed):
            return exc.outcome
        raise GridError(f"the grid could not run the cell (job {self.job_id}): {_one_line(exc)}")

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


def resubmit_kept_cell(grid: Any, job_id: str, name: str, kept: dict[str, Any]) -> Any:
    """Run a --bg cell again from what its job kept at the portal (``CellRun.kept_spec``),
    under its own job id: the portal does this after a restart. As before, the node keeps the
    result at the portal; nothing streams (the kernel that listened is gone). A sandboxed node
    cannot keep it (its task process has no way to the portal) and the kernel that would have
    kept it instead no longer waits on this task, so the portal also holds the task's result
    (as it holds a workflow's outputs) until :func:`fetch_kept` moves it to the ledger. Waits
    for a node rather than refusing: volunteers rejoin a restarted portal by themselves."""
    import dask
    from distributed import fire_and_forget

    payload = base64.b64decode(kept["payload"])
    request = {**kept["request"], "channel": None, "job_id": job_id, "keep": True}
    options = kept["options"]
    extra: dict[str, Any] = {}
    if options.get("workers") is not None:
        extra.update(workers=list(options["workers"]), allow_other_workers=False)
    if options.get("retries"):
        extra["retries"] = int(options["retries"])
    with (
        grid.job(name, kind="cell", job_id=job_id),
        dask.annotate(grid_hold=True, grid_stage="cell"),
    ):
        future = grid.submit(
            run_cell_task,
            payload,
            request,
            key=f"grid-cell-{job_id}-0",
            cpus=options.get("cpus", 1),
            gpus=options.get("gpus", 0),
            memory=options.get("memory"),
            wait=True,
            **extra,
        )
    fire_and_forget(future)
    return future


def fetch_kept(grid: Any, job_id: str) -> bytes | None:
    """A --bg cell's kept result: from the ledger, else (a cell the portal ran again after a
    restart, on a node that could not keep it) from the task result the portal holds, which
    is then kept in the ledger and let go. None when there is neither."""
    data = grid.fetch_result(job_id)
    if data is not None:
        return data
    reply = grid._call("grid_workflow_outputs", job_id=job_id)
    keys = [k for ks in (reply.get("outputs") or {}).values() for k in ks]
    if reply.get("error") or not keys:
        return None
    from distributed import Future

    futures = [Future(k, grid.client) for k in keys]
    grid.client._inform_scheduler_of_futures()
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result())
        except CellFailed as exc:  # the cell's own error: its outcome says what happened
            outcomes.append(exc.outcome)
    data = stored_blob(outcomes, None)
    grid.store_result(job_id, data)
    grid._call("grid_workflow_release", job_id=job_id)
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


# ================================================================================================
# Node side: the Dask task
# ================================================================================================
@isolation.self_isolating
def run_cell_task(payload: bytes, request: dict[str, Any]) -> dict[str, Any]:
    """Run one cell (one --map value) on this node, in a child process; the Dask task.

    Returns the outcome dict; raises :class:`CellFailed` when the cell raised, timed out or its
    process died, so that Dask and the portal count the task as failed.

    Where the node runs tasks in sandboxed task processes (grid_portal.node.taskproc), this
    runs in one of those, not in the worker: output and the kept result go out through the
    task process's narrow channel to its worker (``get_worker().grid_emit``), which forwards
    them only to this task's own queue and job; and the executor itself ends the task process
    when the task is cancelled, so the cell's child stays in the task's process group for the
    executor's suspend and kill to reach it.
    """
    from distributed import get_worker
    from distributed.worker import thread_state

    try:
        worker: Any = get_worker()
    except ValueError:
        worker = None
    in_worker = worker is not None and _is_dask_worker(worker)
    emit = _emitter(worker, in_worker)
    key = getattr(thread_state, "key", None)

    def cancelled() -> bool:
        # The scheduler cancelled the task (grid.cancel, an interrupt, the kernel went away):
        # the worker's own state says so. Reading it from this thread is a plain dict lookup.
        if not in_worker or key is None:
            return False
        ts = worker.state.tasks.get(key)
        return ts is None or ts.state in ("cancelled", "released", "forgotten")

    channel = request.get("channel") if emit is not None else None
    keep = bool(request.get("keep"))
    if in_worker and key is not None:
        # Through the worker's own connection, only to the names the task came with in its
        # annotations, as a sandboxed task process's channel allows (node/taskproc.py).
        ts = worker.state.tasks.get(key)
        annotations = (ts.annotations or {}) if ts is not None else {}
        if channel is not None and channel != annotations.get(STREAM_ANNOTATION):
            channel = None
        keep = keep and request.get("job_id") == annotations.get(JOB_ANNOTATION)
    relay = _Relay(emit, channel, int(request.get("index", 0)))
    node = str(getattr(worker, "name", None) or platform.node())
    confinement = isolation.current() if in_worker else None
    if not in_worker:
        detach = IN_PARENT_GROUP
    else:
        detach = OWN_GROUP if confinement is not None else OWN_SESSION
    execution = _Execution(payload, request, node, relay, cancelled, detach, confinement)
    outcome = execution.run()
    outcome["streamed"] = channel is not None
    if keep and not outcome.get("cancelled"):
        outcome["kept"] = emit is not None and _keep_result(emit, request["job_id"], outcome)
    if outcome.get("error"):
        error = outcome["error"]
        raise CellFailed(f"{error.get('ename')}: {error.get('evalue')}", outcome)
    return outcome


def _is_dask_worker(worker: Any) -> bool:
    """The real Worker, not a sandboxed task process's view of it."""
    try:
        return worker.state is not None and worker.scheduler is not None
    except AttributeError:
        return False


Emit = Callable[[str, dict[str, Any]], Any]


def _emitter(worker: Any, in_worker: bool) -> Emit | None:
    """The task's way to the scheduler, for its output stream and its kept result: the
    worker's own connection when the task runs in the worker; the task process's channel to
    its worker when it runs sandboxed; None where there is neither (an older node)."""
    if in_worker:
        from distributed.utils import sync

        handlers = {"queue_put": "queue_put", "store_result": "grid_job_store_result"}

        def emit(kind: str, payload: dict[str, Any]) -> Any:
            handler = getattr(worker.scheduler, handlers[kind])
            return sync(worker.loop, handler, callback_timeout=EMIT_TIMEOUT, **payload)

        return emit
    return getattr(worker, "grid_emit", None) if worker is not None else None


def _keep_result(emit: Emit, job_id: str, outcome: dict[str, Any]) -> bool:
    """Store the result at the portal from the node itself, so a --bg cell's result is kept
    even when the kernel that sent it has gone (the portal accepts it from the node the job
    ran on). On refusal the kernel, if still there, stores it when the task completes."""
    data = stored_blob([outcome], None)
    try:
        reply = emit("store_result", {"job_id": job_id, "data": data})
    except Exception:  # noqa: BLE001 - a portal without the handler, a lost connection
        return False
    return isinstance(reply, dict) and "error" not in reply


class _Relay:
    """Sends batches of events to the kernel through the run's Queue (see CellRun). The kernel
    creates the queue only once the cell has run for STREAM_AFTER; a put before that fails
    (no such queue) and is tried again at the next flush, with everything not yet sent."""

    def __init__(self, emit: Emit | None, channel: str | None, index: int) -> None:
        self.emit = emit
        self.channel = channel
        self.index = index
        self.sent = 0  # events[:sent] are in the queue
        self.broken = channel is None or emit is None
        self.failures = 0

    def send(self, events: list[dict[str, Any]]) -> None:
        if self.broken or self.sent >= len(events):
            return
        assert self.emit is not None
        batch = events[self.sent :]
        try:
            self.emit(
                "queue_put", {"name": self.channel, "data": {"i": self.index, "events": batch}}
            )
        except PermissionError:
            self.broken = True  # the node refuses: the result still has it all
            return
        except Exception:  # noqa: BLE001 - no queue (yet), or the kernel left
            self.failures += 1
            self.broken = self.failures >= RELAY_ATTEMPTS
            return
        self.failures = 0
        self.sent = len(events)


class _Execution:
    """The task's side of one run: feed the child, gather its events, enforce cancel/timeout."""

    def __init__(
        self,
        payload: bytes,
        request: dict[str, Any],
        node: str,
        relay: _Relay,
        cancelled: Callable[[], bool],
        detach: int = OWN_SESSION,
        confinement: isolation.Confinement | None = None,
    ) -> None:
        self.detach = detach
        self.confinement = confinement
        self.payload = payload
        self.request = request
        self.node = node
        self.relay = relay
        self.cancelled = cancelled
        self.events: list[dict[str, Any]] = []
        self.chars = 0
        self.dropped = 0
        self.add({"k": "started", "node": node})

    def add(self, event: dict[str, Any]) -> None:
        if event["k"] in ("stdout", "stderr"):
            text = event["t"]
            if self.chars + len(text) > MAX_OUTPUT_CHARS:
                self.dropped += len(text)
                return
            self.chars += len(text)
            last = self.events[-1] if self.events else None
            if (
                last is not None
                and last["k"] == event["k"]
                and last["seq"] >= self.relay.sent
                and len(last["t"]) < 65536
            ):
                last["t"] += text  # not yet sent: coalesce into one event
                return
        event["seq"] = len(self.events)
        self.events.append(event)

    def run(self) -> dict[str, Any]:
        started = time.time()
        timeout = self.request.get("timeout")
        deadline = time.monotonic() + float(timeout) if timeout else None
        confinement = self.confinement
        child = POOL.take(self.detach, confinement.nice if confinement is not None else 0)
        result: dict[str, Any] | None = None
        stop_reason: str | None = None
        try:
            alive = child.send(
                {
                    "payload": self.payload,
                    "map_value": self.request.get("map_value"),
                    "path": list(sys.path),
                    "memory_limit": confinement.memory_limit if confinement is not None else 0,
                }
            )
            if confinement is not None:
                # The node's pause, move and memory watch reach the child from now on. (Told
                # once the cell is on its way: taking its memory baseline costs a moment.)
                confinement.started(child.pid)
            begun = last_flush = time.monotonic()
            while result is None and alive:
                messages, alive = child.read(POLL_INTERVAL)
                for message in messages:
                    if message.get("k") == "result":
                        result = message
                    else:
                        self.add(message)
                if result is not None:
                    break
                if self.cancelled():
                    stop_reason = "cancelled"
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    stop_reason = "timeout"
                    break
                if now - begun >= FIRST_FLUSH and now - last_flush >= FLUSH_INTERVAL:
                    self.relay.send(self.events)
                    last_flush = now
        finally:
            if result is None:
                child.kill()
            for message in child.drain():
                if message.get("k") != "result":
                    self.add(message)
        elapsed = time.time() - started
        if self.dropped:
            self.add(
                {
                    "k": "stderr",
                    "t": f"\n[{self.dropped} characters of output were dropped: a cell "
                    f"keeps at most {MAX_OUTPUT_CHARS}]\n",
                }
            )
        if stop_reason == "cancelled":
            self.add({"k": "stopped", "node": self.node})
            self.relay.send(self.events)  # tells the waiting kernel the node is free
            return {"cancelled": True, "node": self.node, "events": self.events}
        outcome: dict[str, Any] = dict(result or {})
        outcome.pop("k", None)
        if stop_reason == "timeout":
            outcome["error"] = {
                "ename": "CellTimedOut",
                "evalue": f"the cell ran longer than its --timeout of {float(timeout):g} s on "
                f"node {self.node} and was stopped; the node is free again. Raise --timeout, "
                "or split the work",
                "timed_out": True,
            }
        elif result is None:
            outcome["error"] = {
                "ename": "CellProcessDied",
                "evalue": f"the cell's process on node {self.node} ended before the cell "
                f"finished ({child.describe_exit()})",
                "grid": True,
            }
        outcome.update(node=self.node, elapsed=elapsed, events=self.events)
        return outcome


# ================================================================================================
# Node side: child processes
# ================================================================================================
_FRAME = struct.Struct("!Q")
_CHILD_BOOT = (
    "import sys; from grid_portal.jobs.cell import _child_main; "
    "_child_main(int(sys.argv[1]), int(sys.argv[2]))"
)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _send_frame(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    _write_all(fd, _FRAME.pack(len(data)) + data)


class _FrameReader:
    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self.buffer += data
        messages = []
        while len(self.buffer) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(self.buffer)
            if len(self.buffer) < _FRAME.size + size:
                break
            body = bytes(self.buffer[_FRAME.size : _FRAME.size + size])
            del self.buffer[: _FRAME.size + size]
            messages.append(pickle.loads(body))
        return messages


class _Child:
    """A fresh Python process that runs exactly one cell.

    Its fd 0 carries the request (then stays open: EOF there tells the child the worker died),
    a private pipe carries framed messages back, and fds 1 and 2 are pipes too, so output that
    bypasses ``sys.stdout`` (C extensions, subprocesses) is relayed as well. The child leads
    its own process group, so killing the group takes whatever the cell started along.
    ``wait`` reaps it and returns its exit code; until then its pid, and so its group id,
    cannot be reused, which is what makes killing the group safe.
    """

    def __init__(
        self,
        pid: int,
        ctl: int,
        out: int,
        err: int,
        proto: int,
        wait: Callable[[], Any],
        detach: int = OWN_SESSION,
    ) -> None:
        self.pid, self.ctl, self.proto = pid, ctl, proto
        self.detach = detach
        self._wait = wait  # reaps the child; returns its exit code, or a callable giving it
        self._exit_code: Any = None
        self.reaped = False
        self.reader = _FrameReader()
        self.decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for name in ("stdout", "stderr")
        }
        self.selector = selectors.DefaultSelector()
        self.selector.register(proto, selectors.EVENT_READ, "proto")
        self.selector.register(out, selectors.EVENT_READ, "stdout")
        self.selector.register(err, selectors.EVENT_READ, "stderr")
        self.fds = [ctl, out, err, proto]
        self.open = 3
        self.finished = False  # its result arrived

    def waiting(self) -> bool:
        """A child forked ahead is still there to take a cell (nothing, not even EOF, has come
        from it yet: EOF would mean it died, say with its task process)."""
        if self.open < 3 or not self.fds:
            return False
        import select

        readable, _, _ = select.select([self.proto], [], [], 0)
        return not readable

    def send(self, request: dict[str, Any]) -> bool:
        """Hand the child its cell; False if it died before taking it."""
        try:
            _send_frame(self.ctl, request)
        except OSError:
            return False
        return True

    def read(self, timeout: float) -> tuple[list[dict[str, Any]], bool]:
        """Messages (and raw output as stream events) that arrived within ``timeout``."""
        messages: list[dict[str, Any]] = []
        if self.open == 0:
            return messages, False
        for key, _ in self.selector.select(timeout):
            source = key.data
            data = os.read(key.fd, 1 << 16)
            if not data:
                self.selector.unregister(key.fileobj)
                self.open -= 1
                continue
            if source == "proto":
                for message in self.reader.feed(data):
                    if message.get("k") == "batch":
                        messages.extend(message["events"])
                    else:
                        self.finished = self.finished or message.get("k") == "result"
                        messages.append(message)
            else:
                text = self.decoders[source].decode(data)
                if text:
                    messages.append({"k": source, "t": text})
        return messages, self.open > 0

    def drain(self, limit: float = 1.0) -> list[dict[str, Any]]:
        """What is left in the pipes, then close. After a result nothing more is waited for
        (the cell is over; waiting for the process to wind down would cost a millisecond or
        two per cell); after a kill, up to ``limit`` for the pipes to close."""
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + limit
        while self.open:
            more, _ = self.read(0 if self.finished else 0.05)
            messages.extend(more)
            if (self.finished and not more) or time.monotonic() >= deadline:
                break
        self.close()
        return messages

    def kill(self) -> None:
        if not self.reaped:
            _kill_tree(self.pid, self.detach != IN_PARENT_GROUP)

    def close(self) -> None:
        # Whatever the cell left running (a background process) goes too: a volunteer's
        # machine runs nothing of a cell after the cell ended.
        self.kill()
        with contextlib.suppress(Exception):
            self.selector.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        if not self.reaped:
            self.reaped = True  # from here on the pid may be reused: no more killpg
            self._exit_code = self._wait()

    @property
    def returncode(self) -> int | None:
        code = self._exit_code
        return code() if callable(code) else code

    def describe_exit(self) -> str:
        code = self.returncode
        if code is None:
            return "its exit status is unknown"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = ", perhaps out of memory" if name == "SIGKILL" else ""
            return f"killed by {name}{hint}"
        return f"exit code {code}"


def _kill_tree(pid: int, group: bool) -> None:
    """SIGKILL a child and all it started: its process group when it leads one of its own,
    else (inside a sandboxed task process's group, which must live on) it and its
    descendants one by one."""
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        return
    victims = [pid, *descendants(pid)]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")  # never a GUI window on a volunteer's screen
    return env


def _spawn_child(detach: int = OWN_SESSION) -> tuple[_Child, subprocess.Popen[bytes]]:
    """A child started from scratch (~150 ms of CPU: the interpreter's own start-up)."""
    ctl_r, ctl_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    proto_r, proto_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_BOOT, str(proto_w), str(detach)],
            stdin=ctl_r,
            stdout=out_w,
            stderr=err_w,
            pass_fds=(proto_w,),
            start_new_session=detach == OWN_SESSION,
            env=_child_env(),
            **({"process_group": 0} if detach == OWN_GROUP else {}),
        )
    finally:
        for fd in (ctl_r, out_w, err_w, proto_w):
            os.close(fd)

    def wait() -> int | None:
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    return _Child(proc.pid, ctl_w, out_r, err_r, proto_r, wait, detach), proc


_ZYGOTE_BOOT = (
    "import sys; from grid_portal.jobs.cell import _zygote_main; "
    "_zygote_main(int(sys.argv[1]), int(sys.argv[2]))"
)
_ZMSG = struct.Struct("!cqq")  # kind, then two numbers: fork(seq) forked(seq, pid) wait(pid)...


class _Zygote:
    """A pre-started, single-threaded process that forks one child per cell.

    Starting Python costs ~150 ms of CPU here; a fork of this small, idle process costs a
    millisecond or two, so a cell's child is ready at once even when cells come back to back.
    Forking the worker itself would be unsafe (it runs threads); this process runs none.
    The pipes of each child are made here and handed over with SCM_RIGHTS.
    """

    def __init__(self, detach: int = OWN_SESSION, nice: int = 0) -> None:
        import socket

        self.detach = detach
        self.nice = nice
        mine, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ZYGOTE_BOOT, str(theirs.fileno()), str(nice)],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=detach == OWN_SESSION,
                env=_child_env(),
            )
        finally:
            theirs.close()
        self.sock = mine
        self.send_lock = threading.Lock()
        self.replies: dict[tuple[bytes, int], int] = {}
        self.cond = threading.Condition()
        self.seq = 0
        self.dead = False
        threading.Thread(target=self._read, name="grid-zygote", daemon=True).start()

    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while len(buffer) >= _ZMSG.size:
                kind, a, b = _ZMSG.unpack_from(buffer)
                buffer = buffer[_ZMSG.size :]
                with self.cond:
                    self.replies[(kind, a)] = b
                    self.cond.notify_all()
        with self.cond:
            self.dead = True
            self.cond.notify_all()

    def _reply(self, key: tuple[bytes, int], timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while key not in self.replies and not self.dead:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)
            return self.replies.pop(key, None)

    def child(self) -> _Child:
        import socket

        ctl_r, ctl_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        proto_r, proto_w = os.pipe()
        try:
            with self.send_lock:
                self.seq += 1
                seq = self.seq
                socket.send_fds(
                    self.sock,
                    [_ZMSG.pack(b"F", seq, self.detach)],
                    [ctl_r, out_w, err_w, proto_w],
                )
        finally:
            for fd in (ctl_r, out_w, err_w, proto_w):
                os.close(fd)
        pid = self._reply((b"P", seq), 10.0)
        if pid is None:
            for fd in (ctl_w, out_r, err_r, proto_r):
                os.close(fd)
            self.dead = True
            raise OSError("the cell runner's fork server did not answer")
        return _Child(pid, ctl_w, out_r, err_r, proto_r, lambda: self._reap(pid), self.detach)

    def _reap(self, pid: int) -> Callable[[], int | None]:
        """Ask the server to reap ``pid``; the exit code is waited for only if asked for."""
        with contextlib.suppress(OSError), self.send_lock:
            self.sock.sendall(_ZMSG.pack(b"W", pid, 0))
        return lambda: self._reply((b"X", pid), 5.0)


class _ChildPool:
    """Where children come from: the fork server where the OS has fork and fd passing (Linux,
    macOS); elsewhere a child started ahead of need, so a cell rarely waits for one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.zygote: _Zygote | None = None
        self.forked: _Child | None = None  # forked ahead by the fork server, waiting for a cell
        self.spare: tuple[_Child, subprocess.Popen[bytes]] | None = None
        self._ahead: tuple[_Zygote, float] | None = None  # fork for this server after then
        self._ahead_due = threading.Condition(self.lock)
        self._forker_pid = 0  # the process whose forker thread runs
        import socket

        self.forking = hasattr(os, "fork") and hasattr(socket, "send_fds")

    def take(self, detach: int = OWN_SESSION, nice: int = 0) -> _Child:
        if self.forking:
            with self.lock:
                zygote = self.zygote
                if (
                    zygote is None
                    or not zygote.alive()
                    or (zygote.detach, zygote.nice) != (detach, nice)
                ):
                    if self.forked is not None:
                        self.forked.close()
                    zygote = _Zygote(detach, nice)
                    self.zygote, self.forked = zygote, None
                child, self.forked = self.forked, None
            try:
                if child is None or not child.waiting():
                    child = zygote.child()
                # Fork the next cell's child ahead of need, but not at once: the fork and the
                # new child's start-up would compete with this cell, and with the trip of its
                # result, for the CPU (a trivial cell took 1 ms longer on two busy cores).
                self._fork_ahead_soon(zygote)
                return child
            except OSError:
                pass  # a broken fork server: start this one from scratch, a new server next
        with self.lock:
            spare, self.spare = self.spare, None
        if spare is None or spare[1].poll() is not None or spare[0].detach != detach:
            if spare is not None:
                spare[0].close()
            spare = _spawn_child(detach)
        if not self.forking:
            threading.Thread(target=self._refill, name="grid-cell-spare", daemon=True).start()
        return spare[0]

    def _fork_ahead_soon(self, zygote: _Zygote) -> None:
        """Have the forker thread fork a child FORK_AHEAD_DELAY from now. One long-lived
        thread, not a timer per cell: starting a thread costs the cell's own path a little."""
        with self.lock:
            self._ahead = (zygote, time.monotonic() + FORK_AHEAD_DELAY)
            if self._forker_pid != os.getpid():  # none yet, or inherited by a fork
                self._forker_pid = os.getpid()
                thread = threading.Thread(target=self._forker, name="grid-cell-forker")
                thread.daemon = True
                thread.start()
            else:
                self._ahead_due.notify()

    def _forker(self) -> None:
        while True:
            with self.lock:
                while self._ahead is None:
                    self._ahead_due.wait()
                zygote, due = self._ahead
                wait = due - time.monotonic()
                if wait > 0:
                    self._ahead_due.wait(wait)  # then look again: a newer cell may have come
                    continue
                self._ahead = None
            self._fork_ahead(zygote)

    def _fork_ahead(self, zygote: _Zygote) -> None:
        try:
            child = zygote.child()
        except OSError:
            return
        with self.lock:
            if self.zygote is zygote and self.forked is None:
                self.forked, child = child, None
        if child is not None:
            child.close()

    def _refill(self) -> None:
        with self.lock:
            if self.spare is None or self.spare[1].poll() is not None:
                self.spare = _spawn_child()


POOL = _ChildPool()


# ================================================================================================
# Child side
# ================================================================================================
class _Outbox:
    """Orders everything the cell emits (stdout, stderr, displays) and batches it to the task:
    at most every 50 ms, or sooner when a display or the end needs it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.size = 0
        self.wake = threading.Event()
        self.flusher: threading.Thread | None = None  # started by the first print

    def text(self, name: str, text: str) -> None:
        if not text:
            return
        if self.flusher is None:
            self.flusher = threading.Thread(target=self._flusher, name="grid-outbox", daemon=True)
            self.flusher.start()
        with self.lock:
            last = self.events[-1] if self.events else None
            if last is not None and last["k"] == name:
                last["t"] += text
            else:
                self.events.append({"k": name, "t": text})
            self.size += len(text)
            big = self.size > 1 << 16
        if big:
            self.flush()
        else:
            self.wake.set()

    def display(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        with self.lock:
            self.events.append({"k": "display", "d": data, "m": metadata})
        self.flush()

    def flush(self) -> None:
        with self.lock:
            events, self.events, self.size = self.events, [], 0
            if events:
                _send_frame(self.fd, {"k": "batch", "events": events})

    def _flusher(self) -> None:
        while True:
            self.wake.wait()
            time.sleep(FLUSH_INTERVAL)  # gather a burst of prints into one message
            self.wake.clear()
            self.flush()


class _Writer:
    """``sys.stdout``/``sys.stderr`` of the child: text goes to the outbox, in order."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, outbox: _Outbox, name: str, fd: int) -> None:
        self.outbox, self.name, self._fd = outbox, name, fd

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.outbox.text(self.name, text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.outbox.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd  # the raw pipe, relayed too (subprocess(stdout=sys.stdout) works)

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return False


_FORMATTER: Any = None


def _mimebundle(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """How IPython would show ``obj`` (text/plain always; html, png... when it has them)."""
    global _FORMATTER
    try:
        if _FORMATTER is None:
            from IPython.core.formatters import DisplayFormatter

            _FORMATTER = DisplayFormatter()
        data, metadata = _FORMATTER.format(obj)
    except Exception:  # noqa: BLE001 - no IPython on this node, or a broken _repr_*_
        data, metadata = {"text/plain": repr(obj)}, {}
    return _jsonable(data), dict(metadata or {})


def _jsonable(data: Mapping[str, Any]) -> dict[str, Any]:
    # Jupyter carries binary mime types (image/png) as base64 text.
    return {
        k: base64.b64encode(v).decode("ascii") if isinstance(v, (bytes, bytearray)) else v
        for k, v in data.items()
    }


class _Display:
    """``display()`` inside a grid cell: the output comes back as a rich output."""

    def __init__(self, outbox: _Outbox) -> None:
        self.outbox = outbox

    def __call__(
        self, *objs: Any, raw: bool = False, metadata: dict[str, Any] | None = None, **_: Any
    ) -> None:
        for obj in objs:
            if raw and isinstance(obj, dict):
                data, md = _jsonable(obj), dict(metadata or {})
            else:
                data, md = _mimebundle(obj)
                md.update(metadata or {})
            if data:
                self.outbox.display(data, md)


def _flush_figures(outbox: _Outbox) -> None:
    """Open matplotlib figures as PNG outputs, like the inline backend does after a cell."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    import io

    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        buffer = io.BytesIO()
        try:
            figure.savefig(buffer, format="png", bbox_inches="tight")
        except Exception as exc:  # noqa: BLE001 - show the problem, keep the cell's result
            outbox.text("stderr", f"could not draw figure {number}: {exc}\n")
            continue
        width, height = (int(v) for v in figure.get_size_inches() * figure.dpi)
        outbox.display(
            {
                "image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                "text/plain": f"<Figure size {width}x{height} with {len(figure.axes)} Axes>",
            },
            {},
        )
    pyplot.close("all")


def _prepare_libraries(
    source: str, inputs: Mapping[str, bytes], outbox: _Outbox, show: Any
) -> None:
    """Hook matplotlib and IPython's display only when the cell may use them (their import
    costs a second, which a cell that never plots should not pay)."""
    uses = source + " ".join(inputs)
    if "matplotlib" in uses or "plt" in uses or any(b"matplotlib" in d for d in inputs.values()):
        with contextlib.suppress(Exception):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as pyplot

            pyplot.show = lambda *args, **kwargs: _flush_figures(outbox)
    if "IPython" in uses or any(b"IPython" in d for d in inputs.values()):
        with contextlib.suppress(Exception):
            import IPython.core.display_functions as display_functions
            import IPython.display as ipython_display

            display_functions.display = show
            ipython_display.display = show  # type: ignore[attr-defined]


def _describe_error(exc: BaseException, filename: str) -> dict[str, Any]:
    import cloudpickle

    tb = exc.__traceback__
    first = tb
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next  # hide the runner's own frames
    lines = traceback.format_exception(type(exc), exc, tb or first)
    try:
        pickled: bytes | None = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001
        pickled = None
    return {
        "ename": type(exc).__name__,
        "evalue": str(exc),
        "lines": "".join(lines).splitlines(),
        "pickled": pickled,
    }


def _run_in_child(request: dict[str, Any], outbox: _Outbox) -> dict[str, Any]:
    import cloudpickle

    if request.get("path"):
        sys.path[:] = list(request["path"])
    if request.get("memory_limit"):
        limit_data(int(request["memory_limit"]))
    cell = pickle.loads(request["payload"])
    filename = cell["filename"]
    source = cell["source"]
    module = types.ModuleType("__main__")
    namespace = module.__dict__
    namespace["__builtins__"] = builtins
    sys.modules["__main__"] = module  # pickling by reference of cell functions works here too
    show = _Display(outbox)
    namespace["display"] = show
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    sys.stdout = _Writer(outbox, "stdout", 1)
    sys.stderr = _Writer(outbox, "stderr", 2)
    inputs = cell["inputs"]
    _prepare_libraries(source, inputs, outbox, show)
    outcome: dict[str, Any] = {"k": "result", "has_value": cell["has_value"]}
    for name, data in inputs.items():
        try:
            namespace[name] = cloudpickle.loads(data)
        except Exception as exc:  # noqa: BLE001
            missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
            fix = (
                f"it needs module {missing!r}, which this node lacks: install it there, or "
                f"choose nodes that have it with --where 'packages.{missing} >= \"0\"'"
                if missing
                else _one_line(exc)
            )
            outcome["error"] = {
                "ename": "InputError",
                "evalue": f"variable {name!r} could not be loaded on this node: {fix}",
                "grid": True,
            }
            return outcome
    if cell["map_name"]:
        namespace[cell["map_name"]] = cloudpickle.loads(request["map_value"])
    tree = ast.parse(source, filename=filename)
    last = tree.body.pop() if cell["has_value"] else None
    value: Any = None
    try:
        exec(compile(tree, filename, "exec"), namespace)  # noqa: S102 - the user's own cell
        if last is not None:
            expression = ast.Expression(last.value)  # type: ignore[attr-defined]
            value = eval(compile(expression, filename, "eval"), namespace)  # noqa: S307
    except BaseException as exc:  # noqa: BLE001 - every failure of the cell is reported
        outcome["error"] = _describe_error(exc, filename)
        outcome["has_value"] = False
    if request.get("memory_limit"):
        set_data_limit(None)  # the cell is over: room to pack and send its results
    sys.stdout.flush()
    _flush_figures(outbox)
    if outcome["has_value"] and value is not None:
        try:
            outcome["value"] = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - show its repr instead
            outcome["value_bundle"] = _mimebundle(value)[0]
    elif outcome["has_value"]:
        outcome["has_value"] = False  # None shows nothing, as in a local cell
    outputs, unsent, missing = {}, {}, []
    for name in cell["outputs"]:
        if name not in namespace:
            if cell["explicit_outputs"]:
                missing.append(name)
            continue
        try:
            outputs[name] = cloudpickle.dumps(namespace[name], protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001
            unsent[name] = _one_line(exc)
    outcome.update(
        outputs=outputs,
        unsent=unsent,
        missing=missing,
        deleted=[n for n in cell["deletes"] if n not in namespace],
    )
    return outcome


def _watch_parent(ctl: Any, detach: int, requests: list[Any], ready: threading.Event) -> None:
    """Read the cell's request (this thread starts while the child waits as a spare, so the
    cell does not wait for it), then watch the control pipe (see _end_with_parent)."""
    try:
        requests.append(_read_request(ctl))
    finally:
        ready.set()
    _end_with_parent(ctl, detach)


def _end_with_parent(ctl: Any, detach: int) -> None:
    """EOF on the control pipe means the worker is gone: take the cell and all it started down
    with it, so a dead worker never leaves work running on a volunteer's machine."""
    with contextlib.suppress(Exception):
        while ctl.read(1 << 12):
            pass
    _kill_tree(os.getpid(), detach != IN_PARENT_GROUP)
    os._exit(1)


def _read_exact(ctl: Any, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = ctl.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _read_request(ctl: Any) -> dict[str, Any] | None:
    header = _read_exact(ctl, _FRAME.size)
    if header is None:
        return None
    (size,) = _FRAME.unpack(header)
    body = _read_exact(ctl, size)
    return None if body is None else pickle.loads(body)


def _zygote_main(sock_fd: int, nice: int = 0) -> None:
    """The fork server (see _Zygote). Single-threaded on purpose: forking it is safe."""
    import select
    import socket

    import cloudpickle  # noqa: F401 - loaded once here, inherited by every child

    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)  # every cell's child inherits it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    # A child's exit wakes the loop at once (SIGCHLD through the wakeup fd), so reaping it
    # never waits on a timer.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    buffer, fds = b"", []
    to_reap: set[int] = set()

    def send(kind: bytes, a: int, b: int) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(_ZMSG.pack(kind, a, b))

    while True:
        readable, _, _ = select.select([sock, wake_r], [], [], 1.0 if to_reap else None)
        if wake_r in readable:
            os.read(wake_r, 512)
        if sock in readable:
            try:
                data, more, _, _ = socket.recv_fds(sock, _ZMSG.size - len(buffer), 8)
            except OSError:
                data, more = b"", []
            if not data:
                break  # the worker is gone; its children notice by themselves
            buffer += data
            fds += more
            if len(buffer) < _ZMSG.size:
                continue
            kind, a, b = _ZMSG.unpack(buffer)
            buffer = b""
            if kind == b"F":
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for fd in (wake_r, wake_w):
                        os.close(fd)
                    _forked_child(fds, int(b))
                for fd in fds:
                    os.close(fd)
                fds = []
                send(b"P", a, pid)
            elif kind == b"W":
                to_reap.add(a)
        for pid in list(to_reap):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                to_reap.discard(pid)
                send(b"X", pid, os.waitstatus_to_exitcode(status))
    os._exit(0)


def _forked_child(fds: list[int], detach: int) -> None:
    ctl, out, err, proto = fds
    if detach == OWN_SESSION:
        os.setsid()
    elif detach == OWN_GROUP:
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    for fd, target in ((ctl, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    try:
        _child_main(proto, detach)
    finally:
        os._exit(1)


_WARM_UP = {
    "source": "_grid_warm_up = [1]\n_grid_warm_up\n",
    "filename": "<grid warm-up>",
    "inputs": {},
    "outputs": ["_grid_warm_up"],
    "explicit_outputs": False,
    "deletes": [],
    "has_value": True,
    "map_name": None,
}


def _warm_up() -> None:
    """Run a tiny cell while this child waits for its own. A forked child pays for its first
    write to each memory page it shares with the fork server (the page is copied); running a
    cell's path once now, not when the cell has come, halves a trivial cell's own time."""
    saved = sys.stdout, sys.stderr, sys.modules.get("__main__")
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        payload = pickle.dumps(_WARM_UP, protocol=pickle.HIGHEST_PROTOCOL)
        _run_in_child({"payload": payload, "map_value": None}, _Outbox(devnull))
        data_size()  # the memory limit's first reading, too
    except Exception:  # noqa: BLE001 - only a head start; the cell runs regardless
        pass
    finally:
        sys.stdout, sys.stderr = saved[0], saved[1]
        if saved[2] is not None:
            sys.modules["__main__"] = saved[2]
        linecache.cache.pop(_WARM_UP["filename"], None)
        os.close(devnull)


def _child_main(proto_fd: int, detach: int = OWN_SESSION) -> None:
    """Entry point of a child process (see _Child)."""
    ctl = os.fdopen(os.dup(0), "rb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # input() in a cell must not read our control pipe
    import cloudpickle  # noqa: F401 - loaded while this child waits as a spare

    requests: list[Any] = []
    ready = threading.Event()
    watch = threading.Thread(
        target=_watch_parent, args=(ctl, detach, requests, ready), name="grid-watch"
    )
    watch.daemon = True
    watch.start()
    if not ready.is_set():
        _warm_up()
    ready.wait()
    request = requests[0] if requests else None
    if request is None:
        os._exit(0)  # the worker left while this child was a spare
    outbox = _Outbox(proto_fd)
    try:
        result = _run_in_child(request, outbox)
    except BaseException as exc:  # noqa: BLE001 - our own failure: still report it
        result = {
            "k": "result",
            "error": {"ename": type(exc).__name__, "evalue": str(exc), "grid": True},
        }
    outbox.flush()
    _send_frame(proto_fd, result)
    # Skip interpreter shutdown: a cell may leave threads or pools behind; the work is done.
    os._exit(0)
