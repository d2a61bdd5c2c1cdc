"""Workflows: a checked job spec becomes Dask tasks on the grid, files travel with them.

Submitting (``submit_workflow``, behind ``Grid.run_workflow`` and ``grid-portal submit``):

1. Everything that can be checked is checked before anything is submitted: the spec
   (``load_spec``), what the stages run (``check_importable``), each ``where`` expression,
   the files of a ``files`` map, and whether any connected node can run each stage at all.
2. The job is registered with its spec (so a restarted portal knows what was asked), then
   each stage, in dependency order, becomes one ``Client.map`` call: one task per map item,
   keys ``("<stage>-<job id>", i)`` (or ``"<stage>-<job id>"`` without a map), annotated with
   the job, the stage and the ``where`` requirement, with the stage's ``resources``,
   ``retries`` and ``priority``. A stage's inputs are the futures of the stages it needs:
   Dask itself orders the work and moves the data.
3. The results of the last stages (those no stage needs) and of every stage that declares
   output files are *held* by the portal (annotation ``grid_hold``), so the job runs to the
   end even when the submitter leaves; ``workflow_outputs`` fetches them later and
   ``release_outputs`` lets them go.

Running (on a volunteer, ``run_task``): a function stage is called in the worker's thread; a
shell command, a script or a ``file.py:function`` runs as a child process in a fresh working
folder, with its stdout and stderr captured per task (sent to the portal for ``grid-portal
logs``). Input files (a ``files`` map item, files that needed stages produced) are written
into that folder first; files matching ``outputs`` come back as ``StagedFile`` values with a
SHA-256 checksum, verified again when they are saved on the submitter's machine.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from grid_portal.errors import GridError, Unsatisfiable
from grid_portal.jobs.spec import (
    JobSpec,
    RunTarget,
    SpecError,
    SpecProblem,
    StageSpec,
    check_importable,
    load_spec,
    resolve_callable,
)
from grid_portal.jobs.task_output import leave_output
from grid_portal.protocol import (  # noqa: F401 - names of the wire contract
    HOLD_ANNOTATION,
    REPLICA_ANNOTATION,
    REPLICAS_ANNOTATION,
    STAGE_ANNOTATION,
    WHERE_ANNOTATION,
)

if TYPE_CHECKING:
    from distributed import Future

    from grid_portal.client import Grid
    from grid_portal.model import Job

# Annotations the portal plugin reads (grid_portal/portal/{placement,tasklog}.py).
# Issue 16, pipelines: a task of a streamed `each` stage names the key prefix of the task it
# follows (item i of the other stage), so the portal queues it in that item's place; a task
# of a stage with `fail: job` fails its whole job.
EACH_ANNOTATION = "grid_each"
FAIL_ANNOTATION = "grid_fail"

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
        staged.verify()
        rel = _safe_relative(staged.path)
        n = 1
        candidate = str(rel)
        while candidate in self.written and self.written[candidate] != staged.sha256:
            n += 1
            candidate = str(PurePosixPath(f"_{n}") / rel)
        if candidate not in self.written:
            target = self.root / candidate
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(staged.data)
            self.written[candidate] = staged.sha256
        return candidate


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


def save_outputs(outputs: Mapping[str, Any], dest: str | Path) -> list[Path]:
    """Write every StagedFile in ``outputs`` under ``dest`` (checksums verified); returns the paths."""
    placer = _Placer(Path(dest))
    Path(dest).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def walk(value: Any) -> None:
        if isinstance(value, StagedFile):
            written.append(placer.root / placer.place(value))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    for value in outputs.values():
        walk(value)
    return written


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
    """Which task this is. Passed as an argument: in a sandboxed task process (issue 7) the
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


# --- submitting ----------------------------------------------------------------------------------


def _origin(stage: StageSpec) -> str:
    return stage.run.origin.rsplit(".run", 1)[0]


def _requirement_text(stage: StageSpec) -> str | None:
    """The stage's ``where``, with ``gpu_memory`` added as a condition on the GPU."""
    parts = []
    if stage.where:
        parts.append(f"({stage.where})")
    if stage.resources.gpu_memory:
        parts.append(f"gpu.memory >= {int(stage.resources.gpu_memory)}B")
    return " and ".join(parts) or None


def check_requirements(spec: JobSpec) -> list[SpecProblem]:
    """Each stage's ``where``, compiled: unknown attributes and type mismatches, found here."""
    from grid_portal.requirements.matching import ExpressionError, compile_requirement

    problems = []
    for stage in spec.stages:
        text = _requirement_text(stage)
        if text is None:
            continue
        try:
            compile_requirement(text)
        except ExpressionError as exc:
            problems.append(SpecProblem(f"{_origin(stage)}.where", str(exc)))
    return problems


def _stage_plan(job_id: str, stage: StageSpec, spec: JobSpec) -> StagePlan:
    run = stage.run
    code = None
    if run.kind == "file":
        path = spec.base_dir / str(run.path)
        try:
            code = StagedFile.of(str(run.path), path.read_bytes())
        except OSError as exc:
            raise SpecError(f"cannot read {path}: {exc.strerror or exc}", run.origin) from None
    kind = {"function": "function", "shell": "shell"}.get(
        run.kind, "file-function" if run.function else "script"
    )
    target = run.command if run.kind == "shell" else str(run.to_value())
    return StagePlan(
        job_id=job_id,
        stage=stage.name,
        origin=_origin(stage),
        kind=kind,
        target=str(target),
        code=code,
        args=tuple(stage.args),
        params=dict(stage.params),
        outputs=tuple(stage.outputs),
        timeout=stage.timeout,
        pick=(stage.map.as_name,) if stage.map and _each(stage) and not stage.map.stream else (),
    )


def _each(stage: StageSpec) -> str | None:
    """The stage whose items this one follows one to one (``map: {each: ...}``), if any."""
    return stage.map.each if stage.map is not None and stage.map.kind == "each" else None


def _bindings(stage: StageSpec, spec: JobSpec) -> list[dict[str, Any]]:
    """The keyword arguments of each task: one dict per map item (one empty dict without a map)."""
    if stage.map is None:
        return [{}]
    if stage.map.kind == "each":  # its item arrives from the other stage, as an input
        return [{} for _ in range(spec.count(stage))]
    if stage.map.kind != "files":
        return [stage.map.bind(item) for item in stage.map.items(spec.base_dir)]
    out = []
    for path in stage.map.items(spec.base_dir):
        rel = Path(path).relative_to(spec.base_dir).as_posix()
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SpecError(
                f"cannot read {path}: {exc.strerror or exc}", f"{stage.map.origin}.files.glob"
            ) from None
        out.append(stage.map.bind(StagedFile.of(rel, data)))
    if not out:
        raise SpecError(
            f"{stage.map.glob!r} matches no file in {spec.base_dir}; check the pattern",
            f"{stage.map.origin}.files.glob",
        )
    return out


def load_workflow(
    spec: JobSpec | str | Path | Mapping[str, Any], overrides: Iterable[str] = ()
) -> JobSpec:
    """The checked spec, or SpecError listing every problem (nothing is submitted)."""
    if isinstance(spec, JobSpec):
        overrides = list(overrides)
        if overrides:
            spec = load_spec(spec.to_dict(), overrides, base_dir=spec.base_dir)
    else:
        spec = load_spec(spec, overrides)
    problems = check_importable(spec) + check_requirements(spec)
    if problems:
        raise SpecError(problems)
    return spec


def check_nodes(grid: Grid, spec: JobSpec) -> None:
    """Refuse a stage that no connected node could run (Unsatisfiable names the closest ones)."""
    for stage in spec.stages:
        asked = f"where {stage.where!r}" if stage.where else "its resources"
        try:
            grid.require(_requirement_text(stage), stage.requirement().resources(), asked)
        except Unsatisfiable as exc:
            exc.args = (f"{_origin(stage)} ({stage.name}): {exc}",)
            raise


def submit_workflow(
    grid: Grid,
    spec: JobSpec | str | Path | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    wait: bool = False,
    wait_for_nodes: bool = False,
    job_id: str | None = None,
    progress: Callable[[Job], None] | None = None,
) -> Job:
    """Check and submit a workflow; returns its Job (finished when ``wait``)."""
    from grid_portal.model import new_job_id

    spec = load_workflow(spec, overrides)
    job_id = job_id or new_job_id()
    plans = {s.name: _stage_plan(job_id, s, spec) for s in spec.stages}
    bindings = {s.name: _bindings(s, spec) for s in spec.stages}
    if not wait_for_nodes:
        check_nodes(grid, spec)
    kept = _register_and_submit(grid, spec, job_id, plans, bindings)
    if wait:
        grid.wait(job_id, futures=kept, progress=progress)
    del kept  # the portal holds them for the owner; let go of our references
    job = grid.get_job(job_id)
    assert job is not None
    return job


def _register_and_submit(
    grid: Grid,
    spec: JobSpec,
    job_id: str,
    plans: Mapping[str, StagePlan],
    bindings: Mapping[str, list[dict[str, Any]]],
) -> list[Future]:
    # The spec is kept with the job: a restarted portal submits it again (resubmit_workflow).
    grid.register_job(job_id, spec.name, "workflow", spec=spec.to_dict())
    return _submit_stages(grid, spec, job_id, plans, bindings)


# --- after a portal restart (grid_portal/portal/recovery.py) ---------------------------------------

_NOT_KEPT = (
    "{origin} reads files from the submitter's machine ({what}), which the portal does not keep; "
    "submit the job again"
)


def why_not_resubmittable(spec: Mapping[str, Any]) -> str | None:
    """Why the portal cannot submit this stored spec again by itself; None if it can.

    Pure: nothing is imported or read. Stages that read files on the submitter's machine
    (``file.py`` stages, ``files`` maps) are not resubmitted: the portal keeps no copy, and it
    must never read files of its own machine on a researcher's behalf.
    """
    try:
        checked = load_spec(spec, base_dir=_NO_FILES)
    except SpecError as exc:
        return f"its stored spec is no longer valid: {exc}"
    problems = check_requirements(checked)
    if problems:
        return f"its stored spec is no longer valid: {SpecError(problems)}"
    for stage in checked.stages:
        if stage.run.kind == "file":
            return _NOT_KEPT.format(origin=_origin(stage), what=str(stage.run.path))
        if stage.map is not None and stage.map.kind == "files":
            return _NOT_KEPT.format(origin=_origin(stage), what=f"files {stage.map.glob!r}")
    return None


# A folder that never exists: a resubmitted spec has no base folder of its own.
_NO_FILES = Path("/nonexistent/grid-portal-resubmission")


def resubmit_workflow(grid: Grid, job_id: str, spec: Mapping[str, Any]) -> list[Future]:
    """Submit a workflow again under its own job id, from the spec kept with its job.

    Used by the portal after a restart, with the owner set by the caller's annotation. The
    same steps as ``submit_workflow`` after its checks, minus importing what stages run (the
    portal never imports researchers' modules) and without waiting for nodes: volunteers
    rejoin a restarted portal by themselves, and the tasks wait for them.
    """
    reason = why_not_resubmittable(spec)
    if reason is not None:
        raise GridError(reason)
    checked = load_spec(spec, base_dir=_NO_FILES)
    plans = {s.name: _stage_plan(job_id, s, checked) for s in checked.stages}
    bindings = {s.name: _bindings(s, checked) for s in checked.stages}
    return _register_and_submit(grid, checked, job_id, plans, bindings)


def _submit_stages(
    grid: Grid,
    spec: JobSpec,
    job_id: str,
    plans: Mapping[str, StagePlan],
    bindings: Mapping[str, list[dict[str, Any]]],
) -> list[Future]:
    """Submit every stage, needs first; returns the futures of the stages whose outputs come
    back (``_kept``). The others are dropped on return: Dask keeps what those need."""
    import dask

    needed = {n for s in spec.stages for n in s.needs}
    futures: dict[str, list[Future]] = {}
    collected: dict[str, Future] = {}
    client = grid.client
    with grid.job(spec.name, kind="workflow", job_id=job_id):
        for stage in _submission_order(spec):
            inputs: dict[str, Any] = {}
            each = _each(stage)
            streamed = bool(each and stage.map and stage.map.stream)
            count = len(bindings[stage.name])
            per_item: list[dict[str, Any]] = [{} for _ in range(count)]
            for name in stage.needs:
                upstream = futures[name]
                argument = spec.stage(name).argument
                if name == each and stage.map is not None:
                    argument = stage.map.as_name
                    if streamed:  # one to one: item i waits for item i only, no barrier
                        for i, item in enumerate(per_item):
                            item[argument] = upstream[i]
                        continue
                if spec.stage(name).map is None:
                    inputs[argument] = upstream[0]
                elif stage.map is None:
                    inputs[argument] = upstream  # one task: take the list directly
                else:  # every task of a map needs the whole list: gather it once
                    if name not in collected:
                        with dask.annotate(grid_stage=f"{name}-collect"):
                            collected[name] = client.submit(
                                collect, *upstream, key=f"{name}-collect-{job_id}", pure=False
                            )
                    inputs[argument] = collected[name]
            task_inputs = [{**inputs, **item} for item in per_item]
            prefix = f"{stage.name}-{job_id}"
            keys: list[Any] = [(prefix, i) for i in range(count)] if stage.map else [prefix]
            annotations: dict[str, Any] = {STAGE_ANNOTATION: stage.name}
            where = _requirement_text(stage)
            if where:
                annotations[WHERE_ANNOTATION] = where
            if _kept(stage, needed):
                annotations[HOLD_ANNOTATION] = True
            if stage.replicas > 1:
                annotations[REPLICAS_ANNOTATION] = stage.replicas
            if streamed:
                annotations[EACH_ANNOTATION] = f"{each}-{job_id}"
            if stage.fail == "job":
                annotations[FAIL_ANNOTATION] = "job"
            ids = [TaskId(str(k), i if stage.map else None) for i, k in enumerate(keys)]
            with dask.annotate(**annotations):
                futures[stage.name] = client.map(
                    run_task,
                    [plans[stage.name]] * count,
                    ids,
                    bindings[stage.name],
                    task_inputs,
                    key=keys,
                    resources=stage.requirement().resources(),
                    retries=stage.retries or None,
                    priority=stage.priority,
                    pure=False,
                )
            # Replicas: copy j of task i is ("<stage>-<job>-replica<j>", i); the portal runs
            # the copies on different nodes and compares them before anything uses copy 0.
            for j in range(1, stage.replicas):
                copies = [_copy_key(k, j) for k in keys]
                marks = {STAGE_ANNOTATION: f"{stage.name}-replica{j}", REPLICA_ANNOTATION: j}
                if where:
                    marks[WHERE_ANNOTATION] = where
                with dask.annotate(**marks):
                    client.map(
                        run_task,
                        [plans[stage.name]] * count,
                        [TaskId(str(k), i if stage.map else None) for i, k in enumerate(copies)],
                        bindings[stage.name],
                        task_inputs,
                        key=copies,
                        resources=stage.requirement().resources(),
                        retries=stage.retries or None,
                        priority=stage.priority,
                        pure=False,
                    )
    return [f for s in spec.stages if _kept(s, needed) for f in futures[s.name]]


def _copy_key(key: Any, j: int) -> Any:
    """The key of copy ``j`` of a replicated task (grid_portal.portal.replicas.copy_key)."""
    if isinstance(key, tuple):
        return (f"{key[0]}-replica{j}", *key[1:])
    return f"{key}-replica{j}"


def _kept(stage: StageSpec, needed: set[str]) -> bool:
    """Whose outputs come back: the last stages, and every stage that declares output files."""
    return stage.name not in needed or bool(stage.outputs)


def _submission_order(spec: JobSpec) -> list[StageSpec]:
    """Needs first; among stages free to go, higher ``priority`` first, then file order.

    Fair share tags a user's tasks in the order they arrive, so this order is the order in
    which a workflow's independent stages get the user's share of the grid.
    """
    import heapq

    position = {s.name: i for i, s in enumerate(spec.stages)}
    waiting = {s.name: set(s.needs) for s in spec.stages}
    ready = [(-s.priority, position[s.name]) for s in spec.stages if not s.needs]
    heapq.heapify(ready)
    order: list[StageSpec] = []
    while ready:
        _, i = heapq.heappop(ready)
        stage = spec.stages[i]
        order.append(stage)
        for other in spec.stages:
            if stage.name in waiting[other.name]:
                waiting[other.name].discard(stage.name)
                if not waiting[other.name]:
                    heapq.heappush(ready, (-other.priority, position[other.name]))
    return order


# --- results -------------------------------------------------------------------------------------


def held_outputs(grid: Grid, job_id: str) -> dict[str, list[Any]]:
    """The keys of a workflow's held outputs by stage (``Grid.held_keys``)."""
    return grid.held_keys(job_id)  # NotFound, UsageError


def workflow_outputs(grid: Grid, job_id: str) -> dict[str, Any]:
    """A workflow's kept outputs (last stages, stages with output files), by stage; a map
    stage's as a list in map order.

    Raises the task's error when one failed, GridError when the job has no held outputs
    (not a workflow, not yours, already fetched and released, or expired).
    """
    held = held_outputs(grid, job_id)
    out: dict[str, Any] = {}
    futures = {stage: grid.futures_for(keys) for stage, keys in held.items()}
    for stage, keys in held.items():
        values = grid.client.gather(futures[stage])
        mapped = all(isinstance(k, tuple) for k in keys)
        out[stage] = values if mapped else values[0]
    return out


def release_outputs(grid: Grid, job_id: str) -> bool:
    """Let the portal drop a workflow's held outputs (after they were fetched)."""
    return grid.release_held(job_id)


def describe_outputs(outputs: Mapping[str, Any], limit: int = 200) -> list[str]:
    """One line per stage for terminals: files are counted, values shown short."""
    lines = []
    for stage, value in outputs.items():
        files = [v for v in _iter_files(value)]
        if files:
            total = sum(f.size for f in files)
            lines.append(f"{stage}: {len(files)} file(s), {total:,} bytes")
        else:
            lines.append(f"{stage}: {_short(repr(value), limit)}")
    return lines


def _iter_files(value: Any) -> Iterable[StagedFile]:
    if isinstance(value, StagedFile):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _iter_files(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _iter_files(v)
