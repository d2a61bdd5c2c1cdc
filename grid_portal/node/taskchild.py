"""A task process: runs grid tasks one at a time for the worker that started it.

Started by :class:`grid_portal.node.taskproc.TaskProcessExecutor` as
``python -I -c BOOT PATH READ_FD WRITE_FD`` (see :data:`BOOT`), and bound to one job before its
first task (``("bind", workdir)``: that job's HOME, TMPDIR and working directory). The worker sends pickled calls over
one pipe and reads pickled results from the other; the task's own stdout and stderr are the
worker's. Each task process is its own process group, so the worker can suspend (SIGSTOP),
resume (SIGCONT) or end (SIGKILL) a task together with any processes it started.

Inside, ``distributed.get_worker()`` returns a :class:`WorkerView`: the worker's name, address,
id, nthreads, memory limit, resources and local directory, and what Dask's ``get_client()``,
``secede()`` and ``rejoin()`` look for (``grid_portal.node.taskclient``: a client of the task's
own job, on a delegated credential); anything else (P2P shuffles) needs the real worker and
says so.

The one way out to the grid is :meth:`WorkerView.grid_emit` (see :class:`TaskChannel`): while a
task runs it may send the worker these messages, each answered before it returns,

- ``("queue_put", {"name": ..., "data": ...})``: put plain data into a Dask ``Queue``;
- ``("store_result", {"job_id": ..., "data": bytes})``: keep a job's result at the portal;
- ``("failed_items", {"count": n})``: a batch task's items that raised, which its worker sends
  with the task's completion (the worker answers it itself);
- ``("delegate", {"csr": PEM})``: a credential for the task's job, which the worker asks the
  portal for (it answers only the node that runs the task);
- ``("secede", {"duration": s})``, ``("rejoin", {})``: the task leaves its slot while it
  waits for other tasks, and comes back (the worker answers them itself);

and the worker forwards them to the scheduler only for the names the task came with (its
``grid_stream`` and ``grid_job`` annotations; see ``TaskProcessExecutor``). Nothing else of the
worker or the scheduler is reachable from here.

What a task process sends is read in the worker by :func:`recv_plain`, a restricted unpickler:
the pipe's own message shapes (tuples, dicts, strings, numbers, bytes) and
``grid_portal.payload.OpaqueResult``, nothing else, so no pickle a task crafts (the pipe is
the task's to write) runs code in the worker, where the node's key is. A task's value arrives
as an ``OpaqueResult`` (``run_opaque`` pickled it in the task) and its exception as pickled
bytes plus text, which the worker forwards unopened. This process reads the worker's messages
with plain pickle: the worker is trusted here, not the other way round.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import struct
import sys
import threading
import time
from typing import Any, BinaryIO

from grid_portal.node.taskclient import WorkerLoop, handle_stimulus, task_client, task_thread
from grid_portal.proctree import data_size, set_data_limit

_HEADER = struct.Struct("!Q")
# How the worker starts a task process: ``python -I -c BOOT PATH_JSON READ_FD WRITE_FD``.
# Isolated mode (-I) reads no user site, no PYTHON* variables and puts no current directory on
# sys.path; the worker's own import path comes as the first argument.
BOOT = (
    "import json, sys; sys.path[:0] = [p for p in json.loads(sys.argv[1]) if p not in sys.path]; "
    "from grid_portal.node.taskchild import main; main(sys.argv[2:])"
)


def enter(workdir: dict[str, Any]) -> None:
    """Move into a job's own sandbox (node/taskproc.py): its HOME, TMPDIR and working
    directory, before any of the job's code runs here."""
    os.environ.update(workdir.get("env") or {})
    if workdir.get("cwd"):
        os.chdir(workdir["cwd"])
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile.tempdir = None  # found again from TMPDIR


# -- framing, shared with the worker side --------------------------------------------------------
def send(stream: BinaryIO, obj: Any, *, plain: bool = False) -> None:
    """Write one pickled message, length first. Pickles with cloudpickle (functions by value);
    ``plain``: with pickle (a task process's messages: plain data and opaque results)."""
    if plain:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        import cloudpickle

        data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    _write(stream, data)


def _write(stream: BinaryIO, data: bytes) -> None:
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def recv(stream: BinaryIO) -> Any:
    """Read one message; EOFError when the other side has gone."""
    header = _read_exactly(stream, _HEADER.size)
    (size,) = _HEADER.unpack(header)
    return pickle.loads(_read_exactly(stream, size))


# What the worker admits from a task process (which a task controls): plain data and the opaque
# result type.
# Protocol 4/5 pickles of tuples, lists, dicts, str, bytes, numbers, None and bool name no
# global at all; these are the few plain types that do.
PIPE_CLASSES = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("builtins", "bytearray"),
        ("grid_portal.payload", "OpaqueResult"),
    }
)


class PipeRefused(pickle.UnpicklingError):
    """A task process sent something other than plain data and opaque results."""

    def __init__(self, what: str) -> None:
        super().__init__(f"a task process's message names {what}, which the worker does not open")
        self.what = what


class _PipeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in PIPE_CLASSES:
            raise PipeRefused(f"{module}.{name}")  # before anything is imported or called
        if module == "builtins":
            import builtins

            return getattr(builtins, name)
        from grid_portal.payload import OpaqueResult

        return OpaqueResult

    def persistent_load(self, pid: Any) -> Any:
        raise PipeRefused("a persistent id")


def loads_plain(data: bytes) -> Any:
    """One message from a task process, as the worker opens it (see :data:`PIPE_CLASSES`)."""
    return _PipeUnpickler(io.BytesIO(data)).load()


def recv_plain(stream: BinaryIO) -> Any:
    """Read one message from a task process; :class:`PipeRefused` for anything but plain data
    and opaque results (the message is read whole first, so the framing stays intact)."""
    header = _read_exactly(stream, _HEADER.size)
    (size,) = _HEADER.unpack(header)
    return loads_plain(_read_exactly(stream, size))


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    chunks = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            raise EOFError("the other side closed the pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


# -- what get_worker() returns in here ---------------------------------------------------------
class WorkerView:
    """The parts of the Dask worker a task may use from its own process."""

    AVAILABLE = ("name", "address", "id", "nthreads", "memory_limit", "resources", "grid_emit")
    handle_stimulus = staticmethod(handle_stimulus)  # Dask's secede() names it (taskclient)

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    @property
    def total_resources(self) -> dict[str, float]:
        return dict(self.__dict__.get("resources") or {})

    @property
    def loop(self) -> WorkerLoop:
        return WorkerLoop(self)

    def _get_client(self, timeout: Any = None) -> Any:
        """What Dask's ``get_client()`` asks a worker for: the task's job's own client."""
        return task_client(self, timeout)

    def grid_emit(self, kind: str, payload: dict[str, Any]) -> Any:
        """Send the worker one message for the grid (see :class:`TaskChannel`); returns what
        the scheduler answered. Raises PermissionError for a name this task was not given."""
        channel = self.__dict__.get("_channel")
        if channel is None:
            raise RuntimeError("this task process has no channel to its worker")
        return channel.emit(kind, payload)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(
            f"get_worker().{attr} is not available to grid tasks: on a volunteer's node a task "
            "runs in its own sandboxed process, not inside the Dask worker. Available: "
            f"{', '.join(self.AVAILABLE)}, local_directory, get_client(), secede() and "
            "rejoin(). (P2P shuffles need the worker itself; use shuffle/rechunk method "
            "'tasks'.)"
        )

    def __repr__(self) -> str:
        return f"<grid task view of worker {self.__dict__.get('name')!r}>"


# -- the task's channel to its worker ------------------------------------------------------------
EMIT_KINDS = ("queue_put", "store_result", "failed_items", "delegate", "secede", "rejoin")


class TaskChannel:
    """A task's narrow channel to its worker, over the task process's own pipes.

    A message goes out as ``("emit", kind, payload)`` and the worker's executor thread, which is
    waiting for the task's result, answers ``("emitted", {"ok": ..., ...})`` before it reads
    anything else: the pipes stay strictly request/answer, and messages reach the scheduler in
    the order the task sent them. Open only while a task runs: a thread a task left behind
    cannot write into the pipe once its task's result has been sent.
    """

    def __init__(self, inp: BinaryIO, out: BinaryIO) -> None:
        self.inp, self.out = inp, out
        self.lock = threading.Lock()  # one message (and its answer) at a time
        self.open = False

    def set_open(self, value: bool) -> None:
        with self.lock:  # waits for a message in flight, so no answer is left unread
            self.open = value

    def emit(self, kind: str, payload: dict[str, Any]) -> Any:
        if kind not in EMIT_KINDS:
            raise ValueError(f"unknown message kind {kind!r}; one of {', '.join(EMIT_KINDS)}")
        message = ("emit", kind, payload)
        try:  # what the worker will admit (recv_plain), checked here, where the task hears it
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            loads_plain(data)
        except Exception as exc:  # noqa: BLE001 - PipeRefused, or not picklable at all
            raise PermissionError(
                f"a message to the worker carries plain data only (str, numbers, bytes, lists, "
                f"dicts): {exc}"
            ) from None
        with self.lock:
            if not self.open:
                raise RuntimeError("grid_emit is for a running task; this task has ended")
            _write(self.out, data)
            answer = recv(self.inp)
        if not (isinstance(answer, tuple) and answer[:1] == ("emitted",)):
            raise ConnectionError(f"the worker answered {answer!r}")
        reply = answer[1]
        if reply.get("ok"):
            return reply.get("reply")
        if reply.get("refused"):
            raise PermissionError(reply.get("error") or "refused")
        raise ConnectionError(reply.get("error") or "the worker could not forward it")


# -- memory accounting (data_size, set_data_limit: grid_portal.proctree) ------------------------
def memory_error_text(key: Any, limit: int, node: str, detail: str = "") -> str:
    """What the researcher reads when a task passed its memory limit."""
    from grid_portal.units import format_size

    text = (
        f"grid task {key!r} needed more than its memory limit of {format_size(limit)} on node "
        f"{node!r}, so it was stopped"
    )
    if detail and detail not in ("MemoryError()", "MemoryError"):
        text += f" ({detail})"
    return (
        text + "; ask for more with memory=... (for example grid.submit(f, memory='4GB')) "
        "or make the task use less"
    )


def _memory_error_message(msg: dict[str, Any], key: Any, limit: int, node: str) -> dict[str, Any]:
    """Replace a task's MemoryError by one that names the limit and what to do."""
    from distributed.core import error_message

    detail = str(msg.get("exception_text") or "")
    try:
        raise MemoryError(memory_error_text(key, limit, node, detail))
    except MemoryError as exc:
        new: dict[str, Any] = dict(error_message(exc))
    new["traceback"] = msg.get("traceback")
    new["traceback_text"] = msg.get("traceback_text", "")
    for field in ("op", "start", "stop"):
        new[field] = msg.get(field)
    return new


def _raw(field: Any) -> bytes | None:
    """A pickled exception or traceback as Dask's error_message made it (``Serialize`` of
    bytes), as bytes: the worker forwards them unopened."""
    data = getattr(field, "data", field)
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else None


def plain_reply(msg: dict[str, Any]) -> dict[str, Any]:
    """Dask's result dictionary as the worker admits it (:func:`recv_plain`): the value as an
    ``OpaqueResult`` (wrapped here if the task was not a ``run_opaque`` one), an exception as
    pickled bytes and text; timings; nothing else (no classes: the worker sets ``type``)."""
    from grid_portal.payload import OpaqueResult

    op = msg.get("op")
    times = {k: msg.get(k) for k in ("start", "stop") if isinstance(msg.get(k), (int, float))}
    if op == "task-finished":
        result = msg.get("result")
        if type(result) is not OpaqueResult:
            result = OpaqueResult.wrap(result)
        return {"op": op, "status": "OK", "result": result, **times}
    if op == "value":
        value = msg.get("value")
        return {
            "op": op,
            "value": value if type(value) is OpaqueResult else OpaqueResult.wrap(value),
        }
    return {
        "op": "task-erred",
        "status": str(msg.get("status") or "error"),
        "exception": _raw(msg.get("exception")),
        "traceback": _raw(msg.get("traceback")),
        "exception_text": str(msg.get("exception_text") or "")[:100_000],
        "traceback_text": str(msg.get("traceback_text") or "")[:100_000],
        **times,
    }


def _unsendable_result(msg: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    from distributed.core import error_message

    try:
        raise TypeError(
            f"the task's result ({msg.get('type')}) cannot be sent back from its sandboxed "
            f"process: {exc}; return plain data (numbers, arrays, frames, dicts, lists)"
        )
    except TypeError as err:
        new: dict[str, Any] = dict(error_message(err))
    new.update(op="task-erred", start=msg.get("start"), stop=msg.get("stop"))
    return new


# -- the loop -----------------------------------------------------------------------------------
def _watch_parent(parent: int) -> None:
    """Exit when the worker that started us is gone (a task may be running: do not wait)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    inp = os.fdopen(int(argv[0]), "rb")
    out = os.fdopen(int(argv[1]), "wb")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    config = recv(inp)
    if config.get("nice"):
        with contextlib.suppress(OSError):
            os.nice(int(config["nice"]))
    # Import what every task needs now, while no task waits for it.
    from distributed.worker import _worker_cvar

    view = WorkerView(**config["view"])
    channel = TaskChannel(inp, out)
    view.__dict__["_channel"] = channel
    _worker_cvar.set(view)  # type: ignore[arg-type]
    node = str(config["view"].get("name"))
    max_memory = config.get("max_memory")
    baseline = data_size()
    if max_memory and baseline is not None:
        # The hard limit: no task here may ever hold more than the whole node lends.
        set_data_limit(None, baseline + int(max_memory))
    send(out, ("ready", os.getpid()), plain=True)

    while True:
        try:
            message = recv(inp)
        except EOFError:
            return
        if message[0] == "bind":  # this process now serves one job only
            enter(message[1])
            # The worker's own directory stays known as the outbox for what the worker
            # forwards (a shell task's output: jobs/workflow.py), apart from the job's.
            view.__dict__.setdefault("grid_outbox", view.__dict__.get("local_directory"))
            view.__dict__["local_directory"] = message[1].get("cwd")
            continue
        if message[0] != "run":
            return
        _, key, limit, payload = message
        started = data_size()
        if limit and started is not None:
            set_data_limit(started + int(limit))
        channel.set_open(True)
        try:
            fn, args, kwargs = pickle.loads(payload)
            with task_thread(view, key):  # what Dask's secede() and rejoin() look for
                msg = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - unpickling the call failed: report it
            from distributed.core import error_message

            msg = dict(error_message(exc))
            msg.update(op="task-erred", start=time.time(), stop=time.time())
        finally:
            channel.set_open(False)
            set_data_limit(None)  # back to the hard limit, to send the result
        if not isinstance(msg, dict):  # not a task (a benchmark, ...): the plain return value
            msg = {"op": "value", "value": msg}
        error = msg.pop("actual_exception", None)
        if limit and isinstance(error, MemoryError):
            msg = _memory_error_message(msg, key, int(limit), node)
        # How much this process has grown since it started: the worker retires bloated ones.
        now = data_size()
        growth = now - baseline if now is not None and baseline is not None else 0
        try:
            reply = plain_reply(msg)
        except Exception as exc:  # noqa: BLE001 - an unpicklable result
            reply = plain_reply(_unsendable_result(msg, exc))
        send(out, ("done", reply, int(growth)), plain=True)
        del msg, payload, reply


if __name__ == "__main__":
    main()
