"""``%%grid`` and ``%grid``: run a notebook cell on the grid as if it ran here.

``%load_ext grid_portal`` registers them. The logic lives in ``grid_portal.jobs`` (``cell``,
``cell_analysis``, ``cell_job``...); this module is the IPython face: options, the user
namespace, output areas, interrupts.
Every mistake a user can make ends as one clear line (IPython's UsageError, or a GridError
rendered without a traceback); a traceback only ever shows the cell's own code.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from grid_portal.errors import GridError, Unsatisfiable, UsageError
from grid_portal.jobs import cell as cells
from grid_portal.jobs.cell_federated import cell_run
from grid_portal.jobs.cell_job import CellJob, load_kept
from grid_portal.notebook import widgets
from grid_portal.units import duration_arg, format_duration, size_arg

_MAP_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s+in\s+(.+?)\s*$", re.DOTALL)
_LINE_COMMANDS = "jobs, result ID, cancel ID, nodes, status, connect [FILE]"


# -- option types: parsed, never evaluated ----------------------------------------------------
def _count(kind: str, allow_zero: bool) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {kind}") from None
        if value < 0 or (value == 0 and not allow_zero) or value != value:
            raise argparse.ArgumentTypeError(
                f"{text!r}: ask for {'0 or more' if allow_zero else 'more than 0'} {kind}"
            )
        return value

    return parse


def _timeout(text: str) -> float:
    seconds = duration_arg(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a timeout must be more than 0 s")
    return seconds


def _retries(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: retries is a whole number, 0 or more")
    return int(text)


def _replicas(text: str) -> int:
    from grid_portal.replication import MAX_REPLICAS

    if not text.isdigit() or not 1 <= int(text) <= MAX_REPLICAS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: replicas is a whole number from 1 to {MAX_REPLICAS}"
        )
    return int(text)


def _for_ipython(exc: GridError) -> BaseException:
    """Our errors as IPython shows user mistakes: one line, no traceback of our code."""
    if isinstance(exc, UsageError) and not hasattr(exc, "_render_traceback_"):
        return IPythonUsageError(str(exc))
    if not hasattr(exc, "_render_traceback_"):
        line = f"{type(exc).__name__}: {exc}"
        try:
            exc._render_traceback_ = lambda: [line]  # type: ignore[attr-defined]
        except AttributeError:
            return IPythonUsageError(str(exc))
    return exc


# -- where a running cell's output goes -------------------------------------------------------
def _untrusted() -> bool:
    return False


class _CellSink:
    """The running cell's own output area: prints go to this cell's stdout/stderr as they
    arrive, display() calls and figures become rich outputs. --map runs are prefixed by
    their value, line by line, since they interleave."""

    def __init__(self, status: widgets.RunStatus | None, labels: list[str] | None) -> None:
        self.status = status
        self.labels = labels
        self.at_line_start: dict[tuple[int, str], bool] = {}
        # Zero trust: rich output is shown as is only when every node of the job is trusted.
        self.trusted: Callable[[], bool] = _untrusted

    def inert(self, data: dict[str, Any], metadata: dict[str, Any]) -> tuple[dict, dict]:
        if self.trusted():
            return data, metadata
        from grid_portal.sanitize import inert_bundle

        return inert_bundle(data, metadata)

    def started(self, index: int, node: str) -> None:
        if self.status is not None:
            self.status.started(node)

    def _prefixed(self, index: int, name: str, text: str) -> str:
        if not self.labels:
            return text
        prefix = f"[{self.labels[index]}] "
        start = self.at_line_start.get((index, name), True)
        lines = text.split("\n")
        out = []
        for i, line in enumerate(lines):
            if line and (i > 0 or start):
                line = prefix + line
            out.append(line)
        self.at_line_start[(index, name)] = text.endswith("\n")
        return "\n".join(out)

    def stream(self, index: int, name: str, text: str) -> None:
        target = sys.stdout if name == "stdout" else sys.stderr
        target.write(self._prefixed(index, name, text))
        target.flush()

    def display(self, index: int, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        from IPython.display import publish_display_data

        data, metadata = self.inert(data, metadata)
        publish_display_data(data, metadata=metadata)

    def finished(self, index: int, outcome: dict[str, Any] | None) -> None:
        if self.status is not None:
            self.status.finished(ok=not (outcome or {}).get("error"))

    def tick(self) -> None:
        if self.status is not None:
            self.status.tick()


class _OutputSink(_CellSink):
    """A --bg cell's output: into an ipywidgets Output shown where the cell ran (filled in from
    a background thread, which widget messages allow), or kept to print when it is done."""

    def __init__(self, output: Any, labels: list[str] | None) -> None:
        super().__init__(None, labels)
        self.output = output
        self.kept: list[tuple[str, Any, Any]] = []

    def stream(self, index: int, name: str, text: str) -> None:
        text = self._prefixed(index, name, text)
        if self.output is not None:
            self.output.outputs += ({"output_type": "stream", "name": name, "text": text},)
        else:
            self.kept.append(("stream", name, text))

    def display(self, index: int, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        data, metadata = self.inert(data, metadata)
        if self.output is not None:
            item = {"output_type": "display_data", "data": data, "metadata": metadata}
            self.output.outputs += (item,)
        else:
            self.kept.append(("display", data, metadata))


# -- --bg jobs ----------------------------------------------------------------------------------
class BackgroundCell(CellJob):
    """What ``%%grid --bg`` returns: the job runs on (``grid_portal.jobs.cell_job``); this
    shows its output where the cell ran, filled in as it comes and closed with one line.

    ``%grid result ID`` brings its variables into the notebook; the portal keeps the result,
    so that works after a kernel restart too.
    """

    def __init__(self, magics: GridMagics, run: cells.CellRun, labels: list[str] | None) -> None:
        self.mode = widgets.frontend(magics.shell)
        self.output: Any = None
        if self.mode == "kernel" and widgets.have_widgets():
            import ipywidgets

            self.output = ipywidgets.Output()
        self.out = _OutputSink(self.output, labels)
        self.out.trusted = functools.partial(magics.grid.trusts_job, run.job_id)
        super().__init__(magics.grid, run, labels, self.out)

    def ended(self, note: str) -> None:
        if self.output is not None:
            line = {"output_type": "stream", "name": "stderr", "text": note + "\n"}
            self.output.outputs += (line,)
            return
        # A terminal: print it all now, under the prompt.
        for kind, a, b in self.out.kept:
            if kind == "stream":
                (sys.stdout if a == "stdout" else sys.stderr).write(b)
            else:
                print(a.get("text/plain", "<rich output>"))
        print(note, file=sys.stderr)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if self.output is not None:
            import html

            import ipywidgets

            text = html.escape(repr(self))
            header = ipywidgets.HTML(
                f"<span style='font-family:monospace;opacity:.8'>{text}</span>"
            )
            display(ipywidgets.VBox([header, self.output]))
        else:
            display({"text/plain": repr(self)}, raw=True)


# -- the magics ------------------------------------------------------------------------------
@magics_class
class GridMagics(Magics):
    """``%%grid`` runs a cell on the grid; ``%grid ...`` looks at and steers the grid."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._grid: Any = None
        self.jobs: dict[str, BackgroundCell] = {}
        self._nodes_view: Any = None

    # the connection -------------------------------------------------------------------------
    @property
    def grid(self) -> Any:
        """The Grid these magics use: GRID_PORTAL_ADDRESS, this user's portal, or the embedded
        one, which is started on first use when nothing is configured."""
        if self._grid is None:
            from grid_portal.client import Grid

            self._grid = Grid()
        return self._grid

    def close(self) -> None:
        if self._nodes_view is not None:
            self._nodes_view.stop()
        if self._grid is not None:
            self._grid.close()
            self._grid = None

    # %%grid ---------------------------------------------------------------------------------
    @magic_arguments()
    @argument(
        "--cpus",
        type=_count("CPUs", False),
        default=1.0,
        metavar="N",
        help="CPUs the cell needs on its node (default 1)",
    )
    @argument(
        "--gpus",
        type=_count("GPUs", True),
        default=0.0,
        metavar="N",
        help="GPUs it needs (default 0)",
    )
    @argument(
        "--memory",
        type=size_arg,
        default=None,
        metavar="SIZE",
        help="memory it needs, like 4GB or 512MiB",
    )
    @argument(
        "--where",
        nargs="+",
        default=None,
        metavar="EXPR",
        help='which nodes may run it, like: gpu.memory >= 16GB and os == "linux"',
    )
    @argument("--name", default=None, help="the job's name in %%grid jobs and the sidebar")
    @argument(
        "--timeout",
        type=_timeout,
        default=None,
        metavar="DURATION",
        help="stop the cell if it runs longer than this on its node, like 30s or 5m",
    )
    @argument(
        "--retries",
        type=_retries,
        default=None,  # not given: Dask's rule, a lost node's cell runs again elsewhere
        metavar="N",
        help="run it again up to N times if it fails or its node is lost",
    )
    @argument(
        "--replicas",
        type=_replicas,
        default=1,
        metavar="N",
        help="run it on N different nodes and let the portal compare what it brings back "
        "(variables and value); with 3 or more the majority wins (default 1)",
    )
    @argument(
        "--bg",
        action="store_true",
        help="return at once with a job handle; the output fills in when it is done",
    )
    @argument(
        "--in",
        dest="inputs",
        default=None,
        metavar="a,b",
        help="send exactly these variables (default: the ones the cell reads)",
    )
    @argument(
        "--out",
        dest="outputs",
        default=None,
        metavar="c,d",
        help="bring back exactly these variables (default: the ones the cell assigns)",
    )
    @argument(
        "--map",
        nargs="+",
        default=None,
        metavar="NAME in EXPR",
        help="run the cell once per value of EXPR, in parallel; variables come back "
        "as lists in the order of the values",
    )
    @cell_magic("grid")
    def grid_cell(self, line: str, cell: str) -> Any:
        """Run this cell on the grid, as if it ran here.

        The variables the cell reads are sent with it, the ones it assigns come back, its
        prints stream here while it runs, its display() calls and figures show here, its
        errors stop the notebook with a traceback that points into the cell, and interrupting
        the kernel cancels it on its node.

        Examples::

            %%grid --cpus 4 --memory 8GB --timeout 10m
            result = simulate(params)

            %%grid --map seed in range(20)
            estimate = monte_carlo(seed)
        """
        try:
            return self._grid_cell(line, cell)
        except GridError as exc:
            raise _for_ipython(exc) from None

    def _grid_cell(self, line: str, cell: str) -> Any:
        args = parse_argstring(self.grid_cell, line)
        where = " ".join(args.where) if args.where else None
        expression = None
        if where is not None:
            from grid_portal.requirements.matching import compile_requirement

            expression = compile_requirement(where)  # a mistake is an error before anything
        inputs_wanted = cells.split_names(args.inputs, "--in")
        outputs_wanted = cells.split_names(args.outputs, "--out")
        count = getattr(self.shell, "execution_count", 0)
        code = cells.analyse_cell(cell, filename=f"Cell In[{count}]")
        map_name, values, labels = self._map_values(args.map)
        if values is not None and not values:
            print(f"--map {map_name}: no values, so nothing ran", file=sys.stderr)
            empty = {n: [] for n in (outputs_wanted or code.writes) if n != map_name}
            self.shell.user_ns.update(empty)
            return [] if code.has_value else None
        namespace = self.shell.user_ns
        names = cells.choose_inputs(
            code,
            namespace,
            hidden=getattr(self.shell, "user_ns_hidden", {}),
            explicit=inputs_wanted,
            exclude=[map_name] if map_name else [],
        )
        payload = cells.make_payload(
            code, cells.pack_inputs(namespace, names), outputs_wanted, map_name
        )
        map_values = (
            [cells.pack_value(v, f"--map value {labels[i]}") for i, v in enumerate(values)]
            if values is not None and labels is not None
            else None
        )
        grid = self.grid
        options = cells.RunOptions(
            name=args.name or _default_name(cell),
            cpus=args.cpus,
            gpus=args.gpus,
            memory=args.memory,
            retries=args.retries,
            timeout=args.timeout,
            keep=args.bg,
            stream=not args.bg,
            replicas=args.replicas,
            where=expression.text if expression is not None else None,
        )
        run = cell_run(grid, payload, options, map_values, labels)  # over portals: split
        try:
            run.submit()
        except Unsatisfiable as exc:
            online = exc.online if exc.online is not None else grid.capacity().nodes_online
            if online:
                raise _cell_refusal(exc, expression, args.replicas) from None
            # No node at all yet: typically the embedded portal, just started, whose local
            # volunteer is still joining. Wait for one instead of failing the first cell.
            self._await_node(grid)
            try:
                run.submit()
            except Unsatisfiable as again:
                raise _cell_refusal(again, expression, args.replicas) from None
        if args.bg:
            handle = BackgroundCell(self, run, labels)
            self.jobs[run.job_id] = handle
            return handle
        return self._wait(run, code, labels)

    def _await_node(self, grid: Any, timeout: float = 60.0) -> None:
        print(
            f"no node is online yet; waiting up to {timeout:.0f} s for one to join",
            file=sys.stderr,
        )
        try:
            grid.wait_for_nodes(1, timeout=timeout)
            return
        except KeyboardInterrupt:
            raise cells.CellInterrupted("stopped waiting for a node; nothing was sent") from None
        except TimeoutError:
            pass
        raise GridError(
            f"no node joined the grid within {timeout:.0f} s, so nothing was sent; see "
            "%grid nodes, and ask volunteers to join"
        )

    def _map_values(
        self, tokens: list[str] | None
    ) -> tuple[str | None, list[Any] | None, list[str] | None]:
        if tokens is None:
            return None, None, None
        text = " ".join(tokens)
        match = _MAP_RE.match(text)
        if not match:
            raise UsageError(
                f"--map {text}: write it as NAME in EXPRESSION, like --map x in range(10)"
            )
        name, source = match.groups()
        try:
            # The one place an option is evaluated: the user's own Python, here, like a
            # `for name in EXPRESSION:` they would have written.
            iterable = self.shell.ev(source)
        except Exception as exc:  # noqa: BLE001 - any failure is the user's expression
            raise UsageError(f"--map {name} in {source}: {cells.one_line(exc)}") from None
        try:
            values = list(iterable)
        except TypeError:
            raise UsageError(
                f"--map {name} in {source}: {type(iterable).__name__} object is not iterable; "
                "give a list, a range or another iterable"
            ) from None
        labels = [f"{name}={_short(v)}" for v in values]
        return name, values, labels

    def _wait(self, run: cells.CellRun, code: cells.CellCode, labels: list[str] | None) -> Any:
        mode = widgets.frontend(self.shell)
        status = widgets.RunStatus(mode, run.job_id, total=run.count) if mode != "plain" else None
        sink = _CellSink(status, labels)
        sink.trusted = functools.partial(run.grid.trusts_job, run.job_id)
        try:
            outcomes = run.wait(sink, status_every=None if status is None else 1.0)
        except KeyboardInterrupt:
            message = run.cancel("interrupted by its owner")
            if status is not None:
                status.close(message, ok=False)
            raise cells.CellInterrupted(message) from None
        except GridError as exc:
            if status is not None:
                status.close(str(exc), ok=False)
            raise
        result = cells.unpack(outcomes, labels, sink.trusted)
        self._apply(result)
        if status is not None:
            where = ", ".join(result.nodes) or "the grid"
            verb = "failed after" if result.error is not None else "done in"
            status.close(
                f"{verb} {format_duration(result.elapsed)} on {where}", ok=result.error is None
            )
        return self._finish(result)

    def _apply(self, result: cells.CellResult) -> None:
        namespace = self.shell.user_ns
        namespace.update(result.values)
        for name in result.deleted:
            namespace.pop(name, None)
        for note in result.notes:
            print(note, file=sys.stderr)

    def _finish(self, result: cells.CellResult) -> Any:
        if result.error is not None:
            raise result.error
        if not result.has_value:
            return None
        if result.value_bundle is not None:
            from IPython.display import publish_display_data

            publish_display_data(result.value_bundle)
            return None
        return result.value

    # %grid -----------------------------------------------------------------------------------
    @line_magic("grid")
    def grid_line(self, line: str) -> Any:
        """Look at and steer the grid.

        %grid jobs            your jobs, newest last
        %grid result ID       show a job's output and load its variables here (a --bg cell's
                              result is kept by the portal, also across kernel restarts)
        %grid cancel ID       cancel a job: queued work is dropped, running work stopped
        %grid nodes           the live capacity table
        %grid status          the grid's totals
        %grid connect [FILE]  connect to the portal in a connection file (default: the
                              configured or embedded portal); returns the Grid
        """
        try:
            return self._grid_line(line)
        except GridError as exc:
            raise _for_ipython(exc) from None

    def _grid_line(self, line: str) -> Any:
        words = line.split()
        if not words:
            raise UsageError(f"%grid needs a command: {_LINE_COMMANDS}")
        command, rest = words[0], words[1:]
        handlers = {
            "jobs": (self._jobs, 0),
            "result": (self._result, 1),
            "cancel": (self._cancel, 1),
            "nodes": (self._nodes, 0),
            "status": (self._status, 0),
            "connect": (self._connect, -1),
        }
        if command not in handlers:
            raise UsageError(f"%grid {command}: unknown command; use one of {_LINE_COMMANDS}")
        handler, wanted = handlers[command]
        if wanted >= 0 and len(rest) != wanted:
            what = "a job ID (see %grid jobs)" if wanted else "nothing more"
            raise UsageError(f"%grid {command} takes {what}")
        if wanted < 0 and len(rest) > 1:
            raise UsageError(f"%grid {command} takes at most one connection file")
        return handler(*rest)

    def _jobs(self) -> None:
        jobs = self.grid.jobs()
        mode = widgets.frontend(self.shell)
        if not jobs:
            print("no jobs yet: run a %%grid cell")
            return
        widgets.show_table(mode, f"{len(jobs)} jobs", widgets.JOB_HEADERS, widgets.job_rows(jobs))

    def _result(self, job_id: str) -> Any:
        grid = self.grid
        job = grid.get_job(job_id)
        if job is None:
            raise GridError(f"no job {job_id} of yours on this portal; %grid jobs lists them")
        handle = self.jobs.get(job_id)
        labels: list[str] | None
        if handle is not None:
            outcomes, labels = handle.wait(), handle.labels
        else:
            if not job.state.finished:
                job = self._wait_for_job(job_id)
            outcomes, labels = load_kept(grid, job_id, job)
        sink = _CellSink(None, labels)
        sink.trusted = functools.partial(grid.trusts_job, job_id)
        cells.replay(outcomes, sink)
        result = cells.unpack(outcomes, labels, sink.trusted)
        self._apply(result)
        return self._finish(result)

    def _wait_for_job(self, job_id: str) -> Any:
        """Long-poll the portal until the job ends; Ctrl-C stops waiting, not the job."""
        grid = self.grid
        mode = widgets.frontend(self.shell)
        status = widgets.RunStatus(mode, job_id) if mode != "plain" else None

        def progress(job: Any) -> None:
            if status is not None and job.nodes:
                status.started(job.nodes[0])

        try:
            job = grid.wait(job_id, progress=progress)
        except KeyboardInterrupt:
            if status is not None:
                status.close(f"stopped waiting; job {job_id} goes on", ok=False)
            raise cells.CellInterrupted(
                f"stopped waiting for job {job_id}, which goes on; %grid cancel {job_id} stops it"
            ) from None
        if status is not None:
            status.close(f"job {job_id} {job.state.value}", ok=job.state.value == "done")
        return job

    def _cancel(self, job_id: str) -> None:
        handle = self.jobs.get(job_id)
        if handle is not None:
            print(handle.cancel())
            return
        job = self.grid.cancel(job_id, reason="cancelled by its owner")
        print(f"cancelled job {job.id} ({job.name}): {job.state.value}")

    def _nodes(self) -> None:
        grid = self.grid
        mode = widgets.frontend(self.shell)
        if mode == "kernel" and widgets.have_widgets():
            if self._nodes_view is not None:
                self._nodes_view.stop()
            self._nodes_view = widgets.NodesView(grid).show()
            return
        nodes = grid.nodes()
        if mode == "terminal":
            from rich.console import Console

            from grid_portal.render import nodes_table

            Console().print(nodes_table(nodes))
            return
        widgets.show_table(
            mode, widgets.nodes_title(nodes), widgets.NODE_HEADERS, widgets.node_rows(nodes)
        )

    def _status(self) -> None:
        from grid_portal.render import capacity_text

        grid = self.grid
        print(capacity_text(grid.capacity()))
        overview = grid.jobs_overview()
        mine = [j for j in overview["jobs"] if j["state"] in ("queued", "running")]
        others = overview["others"]
        print(
            f"your jobs: {len(mine)} queued or running; others': {others['running']} running, "
            f"{others['queued']} queued"
        )

    def _connect(self, address: str | None = None) -> Any:
        from grid_portal.client import Grid

        grid = Grid(address, start_embedded=address is None)
        self.close()
        self._grid = grid
        who = grid.whoami() or {}
        print(f"connected to {grid.connection.scheduler} as {who.get('name', '?')}")
        return grid


# --cpu is a typo to report, not a guess to make (IPython's parser takes no allow_abbrev).
GridMagics.grid_cell.parser.allow_abbrev = False  # type: ignore[attr-defined]


def _cell_refusal(exc: Unsatisfiable, expression: Any, replicas: int) -> Unsatisfiable:
    """The client's refusal, worded for a cell: its advice (``wait=True``) is for Python code,
    a cell changes its options. Built from the refusal's fields where they say enough."""
    if replicas > 1 and "different nodes" in str(exc):
        text = str(exc).split(" Ask for fewer")[0]
        return Unsatisfiable(f"{text}. Ask for fewer with --replicas")
    if expression is not None and exc.where is not None and exc.closest:
        closest = exc.closest[0]
        return Unsatisfiable(
            f"--where {exc.where!r}: no online node meets it with the CPUs, GPUs and memory "
            f"asked for; the closest, {closest['name']}, fails because "
            f"{'; '.join(closest['reasons'])}. Change --where, or ask for less with --cpus, "
            "--gpus, --memory",
            where=exc.where,
            resources=exc.resources,
            online=exc.online,
            closest=exc.closest,
        )
    text = str(exc).split(" Ask for less")[0].split(" Change the requirement")[0]
    return Unsatisfiable(f"{text}. Ask for less with --cpus, --gpus, --memory")


def _default_name(cell: str) -> str:
    for line in cell.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return f"cell: {line[:50]}"
    return "cell"


def _short(value: Any, width: int = 24) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


# -- extension entry points -------------------------------------------------------------------
_LOADED: dict[int, GridMagics] = {}


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext grid_portal``."""
    magics = GridMagics(ipython)
    ipython.register_magics(magics)
    _LOADED[id(ipython)] = magics


def unload_ipython_extension(ipython: Any) -> None:
    magics = _LOADED.pop(id(ipython), None)
    if magics is None:
        return
    magics.close()
    manager = ipython.magics_manager
    manager.magics["cell"].pop("grid", None)
    manager.magics["line"].pop("grid", None)
    manager.registry.pop(type(magics).__name__, None)


def magics_for(ipython: Any) -> GridMagics | None:
    """The loaded GridMagics of a shell (tests and the Jupyter extension use it)."""
    return _LOADED.get(id(ipython))


__all__ = [
    "BackgroundCell",
    "GridMagics",
    "load_ipython_extension",
    "magics_for",
    "unload_ipython_extension",
]
