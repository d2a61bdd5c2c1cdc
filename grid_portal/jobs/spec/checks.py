"""Importing what a stage runs: ``resolve_callable`` and the submit-time ``check_importable``."""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grid_portal.jobs.spec.model import JobSpec, RunTarget, StageSpec
from grid_portal.jobs.spec.problems import SpecError, SpecProblem, _type_name
from grid_portal.jobs.spec.schema import MAX_DOCUMENT_BYTES


def _import_file(path: Path, origin: str) -> Any:
    """Import a Python file as a module, cached while the file is unchanged."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror or exc}", origin) from None
    digest = hashlib.sha1(str(path).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    name = f"_grid_portal_file_{digest}_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
    cached = sys.modules.get(name)
    if cached is not None and getattr(cached, "__grid_portal_mtime__", None) == mtime:
        return cached
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {path}: not a Python file", origin)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so classes defined in the file can be pickled
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise SpecError(
            f"cannot import file {str(path)!r}: {type(exc).__name__}: {exc}", origin
        ) from None
    module.__grid_portal_mtime__ = mtime  # type: ignore[attr-defined]
    return module


def resolve_callable(
    target: RunTarget | str, base_dir: str | Path | None = None
) -> Callable[..., Any]:
    """The function a ``module:function`` or ``file.py:function`` target names.

    Imports the module (or file, relative to ``base_dir``); raises SpecError saying what
    could not be imported, e.g. ``stages[0].run: cannot import module 'mypkg.sim': No module
    named 'mypkg'``.
    """
    if isinstance(target, str):
        target = RunTarget.parse(target)
    origin = target.origin
    if target.kind == "shell":
        raise SpecError("a shell command is not a Python function", origin)
    if target.kind == "file" and not target.function:
        raise SpecError(
            f"{target.path} runs as a script; name a function ('{target.path}:main') to call one",
            origin,
        )
    if target.kind == "file":
        root = Path(base_dir) if base_dir is not None else Path.cwd()
        path = (root / str(target.path)).absolute()
        if not path.is_file():
            raise SpecError(f"no file {str(target.path)!r} in {root.absolute()}", origin)
        module = _import_file(path, origin)
        label = str(target.path)
    else:
        label = str(target.module)
        try:
            module = importlib.import_module(label)
        except (Exception, SystemExit) as exc:  # the module's own code may raise anything
            raise SpecError(f"cannot import module {label!r}: {exc}", origin) from None
    obj: Any = module
    for attr in str(target.function).split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise SpecError(f"{label!r} has no attribute {target.function!r}", origin) from None
    if not callable(obj):
        raise SpecError(f"{target} is {_type_name(obj)}, not a function", origin)
    return obj


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _check_file(stage: StageSpec, base_dir: Path) -> list[SpecProblem]:
    origin = stage.run.origin
    path = base_dir / str(stage.run.path)
    if not path.is_file():
        return [SpecProblem(origin, f"no file {stage.run.path!r} in {base_dir}")]
    try:
        if path.stat().st_size > 10 * MAX_DOCUMENT_BYTES:
            return []  # unusually big; leave it to the run
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        return [SpecProblem(origin, f"{stage.run.path} line {exc.lineno}: {exc.msg}")]
    except (OSError, ValueError) as exc:
        return [SpecProblem(origin, f"cannot read {stage.run.path}: {exc}")]
    head = str(stage.run.function or "").split(".")[0]
    if head and head not in _top_level_names(tree):
        return [SpecProblem(origin, f"{stage.run.path} defines no {head!r} at top level")]
    return []


def check_importable(spec: JobSpec) -> list[SpecProblem]:
    """Problems with what the stages run, found on the submitting machine.

    A module that is not installed here at all is skipped (it may exist only on the nodes);
    one that is here must import and have the function. Files must exist; they are parsed,
    not run, to find the function.
    """
    problems: list[SpecProblem] = []
    for stage in spec.stages:
        if stage.run.kind == "file":
            problems.extend(_check_file(stage, spec.base_dir))
        elif stage.run.kind == "function":
            top = str(stage.run.module).split(".")[0]
            try:
                if importlib.util.find_spec(top) is None:
                    continue
            except (ImportError, ValueError):
                continue
            try:
                resolve_callable(stage.run, spec.base_dir)
            except SpecError as exc:
                problems.extend(exc.problems)
    return problems
