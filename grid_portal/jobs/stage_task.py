"""A workflow task on its node: the node side of workflows (``jobs/workflow.py`` submits).

``run_task`` runs one task of a stage (``StagePlan``, the map item's ``TaskId``): a function
stage is called in the task's thread; a shell command, a script or a ``file.py:function`` runs
as a child process in a fresh working folder, with its stdout and stderr captured per task
(sent to the portal for ``grid-portal logs``). Input files (a ``files`` map item, files that
needed stages produced) are written into that folder first; files matching ``outputs`` come
back as ``StagedFile`` values with a SHA-256 checksum, verified again when they are saved on
the submitter's machine. Nothing here imports Dask's client.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from grid_portal.errors import GridError
from grid_portal.jobs.spec import RunTarget, resolve_callable
from grid_portal.jobs.task_output import leave_output

MAX_LOG_CHARS = 64 * 1024  # tail of each stream sent to the portal per task
CODE_CACHE = "grid-portal-code"  # shipped .py files, by content, under the temp folder


class TaskFailed(GridError):
    """A stage's task failed on its node: the message names the stage, the item and why."""


# --- files that travel with tasks ----------------------------------------------------------------


@dataclass(frozen=True)
class StagedFile:
    """A file moving between the submitter and nodes: a relative path, its bytes, their SHA-256."""

    path: str  # relative, '/'-separated
    data: bytes = field(repr=False)
    sha256: str = ""

    @classmethod
    def of(cls, path: str, data: bytes) -> StagedFile:
        return cls(path, data, hashlib.sha256(data).hexdigest())

    @property
    def size(self) -> int:
        return len(self.data)

    def verify(self) -> None:
        if hashlib.sha256(self.data).hexdigest() != self.sha256:
            raise TaskFailed(f"{self.path} arrived damaged (checksum mismatch); run the job again")

    def __repr__(self) -> str:
        return f"StagedFile({self.path!r}, {self.size} bytes, sha256={self.sha256[:12]}...)"


def _safe_relative(path: str) -> PurePosixPath:
    rel = PurePosixPath(path.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise TaskFailed(f"refusing file path {path!r}: it must stay inside the task's folder")
    return rel


class _Placer:
    """Writes staged files into a folder at their relative paths; a path already taken by
    different content goes under ``_2/``, ``_3/``... so nothing is overwritten."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.written: dict[str, str] = {}  # relative path -> sha256

    def place(self, staged: StagedFile) -> str:
        candidate, new = self.name(staged)
        if new:
            target = self.root / candidate
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(staged.data)
        return candidate

    def name(self, staged: StagedFile) -> tuple[str, bool]:
        """The relative path ``staged`` has among the files named so far, and whether it is
        new there (the same content under the same path is one file). Checks it first."""
        staged.verify()
        rel = _safe_relative(staged.path)
        n = 1
        candidate = str(rel)
        while candidate in self.written and self.written[candidate] != staged.sha256:
            n += 1
            candidate = str(PurePosixPath(f"_{n}") / rel)
        new = candidate not in self.written
        self.written[candidate] = staged.sha256
        return candidate, new


def _replace_files(value: Any, placer: _Placer, absolute: bool) -> Any:
    """``value`` with every StagedFile written out and replaced by its path (as text)."""
    if isinstance(value, StagedFile):
        rel = placer.place(value)
        return str(placer.root / rel) if absolute else rel
    if isinstance(value, list):
        return [_replace_files(v, placer, absolute) for v in value]
    if isinstance(value, tuple):
        return tuple(_replace_files(v, placer, absolute) for v in value)
    if isinstance(value, dict):
        return {k: _replace_files(v, placer, absolute) for k, v in value.items()}
    return value


def _flatten(value: Any) -> Any:
    """Nested lists as one list: a map stage's files arrive as [[a, b], [c]]; a shell command
    wants ``a b c``."""
    if not isinstance(value, (list, tuple)):
        return value
    out: list[Any] = []
    for item in value:
        flat = _flatten(item)
        out.extend(flat if isinstance(flat, list) else [flat])
    return out


# --- what one stage's tasks run ------------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    """Everything a node needs to run one task of a stage (the map item and inputs aside)."""

    job_id: str
    stage: str
    origin: str  # "stages[2]", for messages
    kind: str  # "function" | "file-function" | "script" | "shell"
    target: str  # "mod:fn", "file.py:fn", "file.py", or the shell template
    code: StagedFile | None = None  # the .py file of a file stage
    args: tuple[Any, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    timeout: float | None = None
    pick: tuple[str, ...] = ()  # inputs that are a whole map stage: take item ``index`` of each


@dataclass(frozen=True)
class TaskId:
    """Which task this is. Passed as an argument: in a sandboxed task process the
    task cannot ask the Dask worker for its own key."""

    key: str  # str() of the Dask key, as the portal's task records name it
    index: int | None  # the map item's index


def _describe_task(plan: StagePlan, task: TaskId) -> str:
    if task.index is None:
        return f"{plan.origin}: stage {plan.stage!r}"
    return f"{plan.origin}: task {task.index} of stage {plan.stage!r}"


def run_task(
    plan: StagePlan, task: TaskId, bound: Mapping[str, Any], inputs: Mapping[str, Any]
) -> Any:
    """Run one task of a stage on this node. ``bound`` is the map item's keyword arguments,
    ``inputs`` the outputs of the needed stages (by argument name)."""
    if plan.pick and task.index is not None:  # an `each` stage behind a barrier: its item
        inputs = {k: v[task.index] if k in plan.pick else v for k, v in inputs.items()}
    base = None
    with contextlib.suppress(ImportError, ValueError, AttributeError):
        from distributed import get_worker

        base = get_worker().local_directory
    workdir = Path(tempfile.mkdtemp(prefix="grid-task-", dir=base))
    try:
        placer = _Placer(workdir)
        if plan.kind == "function":
            values = {
                **dict(plan.params),
                **_replace_files(dict(bound), placer, absolute=True),
                **_replace_files(dict(inputs), placer, absolute=True),
            }
            fn = resolve_callable(RunTarget.parse(plan.target, f"{plan.origin}.run"))
            with _deadline(plan.timeout, lambda: _describe_task(plan, task)):
                return fn(*plan.args, **values)
        values = {
            **dict(plan.params),
            **_replace_files(dict(bound), placer, absolute=False),
            **_replace_files(dict(inputs), placer, absolute=False),
        }
        staged_in = dict(placer.written)
        return _run_process(plan, task, workdir, values, staged_in)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def collect(*parts: Any) -> list[Any]:
    """A map stage's outputs as one list, in map order (for a map stage that needs it)."""
    return list(parts)


# -- child processes: shell commands, scripts and file.py:function ---------------------------

_CHILD = r"""
import importlib.util, os, pickle, sys
spec_path, result_path = sys.argv[1], sys.argv[2]
with open(spec_path, "rb") as f:
    path, function, args, kwargs = pickle.load(f)
sys.path.insert(0, os.path.dirname(path))
spec = importlib.util.spec_from_file_location("__grid_stage__", path)
module = importlib.util.module_from_spec(spec)
sys.modules["__grid_stage__"] = module
spec.loader.exec_module(module)
obj = module
for part in function.split("."):
    obj = getattr(obj, part)
value = obj(*args, **kwargs)
with open(result_path, "wb") as f:
    pickle.dump(value, f)
"""


def _code_path(code: StagedFile) -> Path:
    """The shipped .py file on this node, cached by content (written once per node)."""
    folder = Path(tempfile.gettempdir()) / CODE_CACHE / code.sha256[:24]
    path = folder / PurePosixPath(code.path).name
    if not path.exists():
        code.verify()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_bytes(code.data)
        os.replace(tmp, path)
    return path


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - MAX_LOG_CHARS))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return text if size <= MAX_LOG_CHARS else "...\n" + text


def _run_process(
    plan: StagePlan,
    task: TaskId,
    workdir: Path,
    values: dict[str, Any],
    staged_in: Mapping[str, str],
) -> Any:
    target = RunTarget.parse(
        {"shell": plan.target} if plan.kind == "shell" else plan.target, f"{plan.origin}.run"
    )
    logs = Path(tempfile.mkdtemp(prefix="grid-logs-"))
    result_path = logs / "result.pickle"
    try:
        if plan.kind == "shell":
            command: list[str] | str = target.render_shell(
                {k: _flatten(v) for k, v in values.items()}
            )
            shown = command
            argv: list[str] = ["/bin/sh", "-c", command]
        else:
            assert plan.code is not None
            script = str(_code_path(plan.code))
            if plan.kind == "script":
                argv = target.script_argv(values, plan.args)
                argv[1] = script
                shown = " ".join(argv[1:2]) + " ..."
            else:
                spec_path = logs / "call.pickle"
                with spec_path.open("wb") as f:
                    pickle.dump((script, target.function, list(plan.args), values), f)
                argv = [sys.executable, "-c", _CHILD, str(spec_path), str(result_path)]
                shown = plan.target
        with (logs / "stdout").open("wb") as out, (logs / "stderr").open("wb") as err:
            process = subprocess.Popen(
                argv, cwd=workdir, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            try:
                code = process.wait(timeout=plan.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                code = None
            except BaseException:
                _kill_group(process)
                raise
        stdout, stderr = _tail(logs / "stdout"), _tail(logs / "stderr")
        leave_output(task.key, stdout, stderr)
        what = _describe_task(plan, task)
        if code is None:
            raise TaskFailed(f"{what}: still running after the timeout of {plan.timeout:g} s")
        if code != 0:
            last = "\n".join(stderr.strip().splitlines()[-5:])
            raise TaskFailed(
                f"{what}: `{_short(shown)}` exited with status {code}"
                + (f"; it printed:\n{last}" if last else "")
            )
        if plan.outputs:
            return _collect_outputs(workdir, plan.outputs, staged_in)
        if plan.kind == "file-function":
            with result_path.open("rb") as f:
                return pickle.load(f)
        return (logs / "stdout").read_bytes().decode("utf-8", "replace")
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.killpg(process.pid, 9)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _collect_outputs(
    workdir: Path, patterns: Sequence[str], staged_in: Mapping[str, str]
) -> list[StagedFile]:
    """Files matching the stage's ``outputs`` (input files left unchanged are not outputs)."""
    found: dict[str, StagedFile] = {}
    for pattern in patterns:
        for match in glob.glob(pattern, root_dir=workdir, recursive=True):
            path = workdir / match
            rel = PurePosixPath(Path(match).as_posix()).as_posix()
            if rel in found or not path.is_file() or path.is_symlink():
                continue
            staged = StagedFile.of(rel, path.read_bytes())
            if staged_in.get(rel) == staged.sha256:
                continue
            found[rel] = staged
    return [found[p] for p in sorted(found)]


# -- time limits for function stages -----------------------------------------------------------


class _TaskTimeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float | None, what: Callable[[], str]) -> Any:
    """Interrupt this thread when ``seconds`` pass. Python code stops at once; a long call into
    C (a sleep, a big numpy operation) stops when it returns to Python."""
    if not seconds:
        yield
        return
    thread_id = threading.get_ident()
    lock = threading.Lock()
    state = {"armed": True, "fired": False}

    def fire() -> None:
        with lock:
            if state["armed"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(thread_id), ctypes.py_object(_TaskTimeout)
                )

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    try:
        try:
            timer.start()
            yield
        finally:
            with lock:
                state["armed"] = False
            timer.cancel()
    except _TaskTimeout:
        raise TaskFailed(f"{what()}: still running after the timeout of {seconds:g} s") from None
