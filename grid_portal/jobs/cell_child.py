"""The child process that runs one ``%%grid`` cell, and the fork server it comes from.

Runs on the node, in processes that ``grid_portal.jobs.cell_task`` starts: :func:`_child_main`
runs the cell in a fresh ``__main__`` module with its own stdout/stderr (per-process capture:
concurrent cells on one worker never see each other's output), collects ``display()`` calls
and matplotlib figures, and reports back over a pipe in length-prefixed pickles
(:func:`send_frame`). :func:`_zygote_main` is the small single-threaded fork server each
worker keeps, so that a cell's child is a fork (about a millisecond), not a new interpreter.
Only the standard library and light grid_portal modules are imported here: every cell's child
is a copy of the fork server, which has loaded all of it once.
"""

from __future__ import annotations

import ast
import base64
import builtins
import contextlib
import linecache
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
import types
from collections.abc import Iterable, Mapping
from typing import Any

from grid_portal.jobs.cell_payload import one_line
from grid_portal.proctree import data_size, descendants, limit_data, set_data_limit

FLUSH_INTERVAL = 0.05  # s between streamed batches: at most 20 small messages a second
# Where a cell's child stands among processes (its group and session), chosen by its task:
IN_PARENT_GROUP = 0  # in its sandboxed task process's group: the node's signals reach both
OWN_SESSION = 1  # a session and group of its own (a task in an unconfined worker)
OWN_GROUP = 2  # a group of its own in the worker's session (confined: the node's CPU share)


FRAME = struct.Struct("!Q")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def send_frame(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    write_all(fd, FRAME.pack(len(data)) + data)


def kill_tree(pid: int, group: bool) -> None:
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


ZYGOTE_MSG = struct.Struct(
    "!cqq"
)  # kind, then two numbers: fork(seq) forked(seq, pid) wait(pid)...


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
                send_frame(self.fd, {"k": "batch", "events": events})

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
    if request.get("workdir"):  # the job's own sandbox on this node (node/taskproc.py)
        os.environ.update(request["workdir"].get("env") or {})
        os.chdir(request["workdir"]["cwd"])
        if "tempfile" in sys.modules:
            sys.modules["tempfile"].tempdir = None  # found again from TMPDIR
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
                else one_line(exc)
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
            # The cell's own last line, as a notebook shows it: code the user sent to run.
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
            unsent[name] = one_line(exc)
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
    kill_tree(os.getpid(), detach != IN_PARENT_GROUP)
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
    header = _read_exact(ctl, FRAME.size)
    if header is None:
        return None
    (size,) = FRAME.unpack(header)
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
            sock.sendall(ZYGOTE_MSG.pack(kind, a, b))

    while True:
        readable, _, _ = select.select([sock, wake_r], [], [], 1.0 if to_reap else None)
        if wake_r in readable:
            os.read(wake_r, 512)
        if sock in readable:
            try:
                data, more, _, _ = socket.recv_fds(sock, ZYGOTE_MSG.size - len(buffer), 8)
            except OSError:
                data, more = b"", []
            if not data:
                break  # the worker is gone; its children notice by themselves
            buffer += data
            fds += more
            if len(buffer) < ZYGOTE_MSG.size:
                continue
            kind, a, b = ZYGOTE_MSG.unpack(buffer)
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
    send_frame(proto_fd, result)
    # Skip interpreter shutdown: a cell may leave threads or pools behind; the work is done.
    os._exit(0)
