"""The parsed job: ``JobSpec`` and its stages, run targets, maps and resources."""

from __future__ import annotations

import copy
import glob
import itertools
import json
import math
import os
import re
import shlex
import string
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from grid_portal.jobs.spec.problems import SpecError, _short
from grid_portal.jobs.spec.schema import _RUN_HINT, MAX_TASKS, RUN_PATTERN
from grid_portal.model import Requirement


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return json.dumps(value, default=str)


@dataclass
class RunTarget:
    """What a stage runs.

    kind "function": ``module`` and ``function`` (``mypkg.sim:run``); kind "file": ``path``
    (relative to the spec's folder) and optionally ``function`` (``tools/fit.py:main``; without
    one the file runs as a script); kind "shell": ``command``, a template with ``{name}``
    placeholders.
    """

    kind: Literal["function", "file", "shell"]
    module: str | None = None
    function: str | None = None
    path: str | None = None
    command: str | None = None
    origin: str = field(default="run", repr=False, compare=False)  # for messages: stages[0].run

    @classmethod
    def parse(cls, value: Any, origin: str = "run") -> RunTarget:
        """``"mod:fn"``, ``"file.py"``, ``"file.py:fn"`` or ``{"shell": "..."}`` -> RunTarget."""
        if isinstance(value, Mapping):
            command = value.get("shell")
            if set(value) != {"shell"} or not isinstance(command, str) or not command:
                raise SpecError(f"must be {{shell: 'command'}}; {_RUN_HINT}", origin)
            target = cls("shell", command=command, origin=origin)
            target.placeholders()  # checks the template
            return target
        if not isinstance(value, str) or not re.fullmatch(RUN_PATTERN, value):
            raise SpecError(f"{_short(value)} is not a run target: {_RUN_HINT}", origin)
        head, sep, tail = value.partition(":")
        if head.endswith(".py"):
            return cls("file", path=head, function=tail or None, origin=origin)
        return cls("function", module=head, function=tail, origin=origin)

    def to_value(self) -> str | dict[str, str]:
        """The form written in a spec."""
        if self.kind == "shell":
            return {"shell": self.command or ""}
        if self.kind == "file":
            return f"{self.path}:{self.function}" if self.function else str(self.path)
        return f"{self.module}:{self.function}"

    def __str__(self) -> str:
        value = self.to_value()
        return value if isinstance(value, str) else f"shell: {value['shell']}"

    def placeholders(self) -> list[str]:
        """The ``{name}`` placeholders of a shell command, in order, each once."""
        if self.kind != "shell":
            return []
        names: list[str] = []
        try:
            parsed = list(string.Formatter().parse(self.command or ""))
        except ValueError as exc:
            raise SpecError(
                f"bad placeholder in the shell command ({exc}); write {{name}}, and {{{{ or }}}} for a literal brace",
                f"{self.origin}.shell",
            ) from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or spec or conversion:
                raise SpecError(
                    f"placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                    "is not allowed: write a plain {name} (values are inserted as quoted text)",
                    f"{self.origin}.shell",
                )
            if name not in names:
                names.append(name)
        return names

    def render_shell(self, values: Mapping[str, Any]) -> str:
        """The shell command with every placeholder replaced by its shell-quoted value.

        Lists become several quoted words; ``{x_name}`` / ``{x_stem}`` give the file name of
        a path ``x`` with / without its suffix (handy for a ``files`` map).
        """
        out: list[str] = []
        for literal, name, _, _ in string.Formatter().parse(self.command or ""):
            out.append(literal)
            if name is None:
                continue
            if name in values:
                value = values[name]
            else:
                base, _, derived = name.rpartition("_")
                if derived not in ("name", "stem") or base not in values:
                    raise SpecError(f"no value for placeholder {{{name}}}", f"{self.origin}.shell")
                p = PurePosixPath(_as_text(values[base]).replace(os.sep, "/"))
                value = p.name if derived == "name" else p.stem
            if isinstance(value, (list, tuple)):
                out.append(" ".join(shlex.quote(_as_text(v)) for v in value))
            else:
                out.append(shlex.quote(_as_text(value)))
        return "".join(out)

    def script_argv(
        self, values: Mapping[str, Any], args: Sequence[Any] = (), python: str = sys.executable
    ) -> list[str]:
        """The command line of a script stage: ``python file.py ARGS --name=value ...``.

        Text is passed as is; anything else (numbers, lists, mappings) as JSON.
        """
        if self.kind != "file" or self.function:
            raise SpecError(
                "only a 'file.py' target without a function runs as a script", self.origin
            )
        argv = [python, str(self.path), *(_as_text(a) for a in args)]
        argv.extend(f"--{name}={_as_text(value)}" for name, value in values.items())
        return argv


def _range_len(start: int, stop: int, step: int) -> int:
    """len(range(start, stop, step)) without building it (and without len()'s overflow)."""
    if step > 0:
        return max(0, (stop - start + step - 1) // step)
    return max(0, (start - stop - step - 1) // -step)


@dataclass
class MapSpec:
    """A stage's fan-out: one task per item.

    kind "over": the list ``over``; "range": integers ``start``..``stop`` by ``step``;
    "grid": every combination of the lists in ``grid`` (last key varies fastest), each item a
    dict of keyword arguments; "files": sorted paths matching ``glob`` under the spec's folder;
    "each": one item per item of the map stage ``each`` (a pipeline: item i receives that
    stage's item i, as soon as it is done unless ``stream`` is False). An ``each`` map's count
    and items come from the other stage: ask ``JobSpec.count``.
    """

    kind: Literal["over", "range", "grid", "files", "each"]
    over: list[Any] | None = None
    start: int = 0
    stop: int = 0
    step: int = 1
    grid: dict[str, list[Any]] | None = None
    glob: str | None = None
    as_name: str = "item"  # the `as` of the spec
    origin: str = field(default="map", repr=False, compare=False)
    each: str | None = None  # kind "each": the stage whose items this one follows
    stream: bool = True  # kind "each": start item i when item i is done (False: a barrier)

    def count(self, base_dir: str | Path | None = None) -> int:
        """How many tasks this map makes; arithmetic for range and grid, never materialised."""
        if self.kind == "over":
            return len(self.over or [])
        if self.kind == "range":
            return _range_len(self.start, self.stop, self.step)
        if self.kind == "grid":
            return math.prod(len(v) for v in (self.grid or {}).values())
        if self.kind == "each":
            raise ValueError("an 'each' map has as many items as its stage: use JobSpec.count")
        return len(self._files(base_dir))

    def items(self, base_dir: str | Path | None = None) -> Iterator[Any]:
        """The items, lazily where possible (a range or grid is never built in full)."""
        if self.kind == "over":
            yield from self.over or []
        elif self.kind == "range":
            yield from range(self.start, self.stop, self.step)
        elif self.kind == "grid":
            grid = self.grid or {}
            keys = list(grid)
            for combo in itertools.product(*(grid[k] for k in keys)):
                yield dict(zip(keys, combo, strict=True))
        else:
            yield from self._files(base_dir)

    def bind(self, item: Any) -> dict[str, Any]:
        """The keyword arguments one item is passed as."""
        if self.kind == "grid":
            return dict(item)
        return {self.as_name: item}

    def argument_names(self) -> list[str]:
        """The keyword arguments (shell placeholders) this map supplies."""
        if self.kind == "grid":
            return list(self.grid or {})
        names = [self.as_name]
        if self.kind == "files":
            names += [f"{self.as_name}_name", f"{self.as_name}_stem"]
        return names

    def _files(self, base_dir: str | Path | None) -> list[Path]:
        root = Path(base_dir if base_dir is not None else Path.cwd()).absolute()
        pattern = self.glob or ""
        found: list[Path] = []
        try:
            for match in glob.iglob(pattern, root_dir=root, recursive=True):
                path = root / match
                if path.is_file():
                    found.append(path)
                    if len(found) > MAX_TASKS:
                        raise SpecError(
                            f"{pattern!r} matches more than {MAX_TASKS:,} files; narrow the pattern "
                            "or split the job",
                            f"{self.origin}.files.glob",
                        )
        except (OSError, ValueError) as exc:
            raise SpecError(
                f"cannot list {pattern!r} in {root}: {exc}", f"{self.origin}.files.glob"
            ) from None
        return sorted(found)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "over":
            out: dict[str, Any] = {"over": copy.deepcopy(self.over)}
        elif self.kind == "range":
            out = {"range": {"start": self.start, "stop": self.stop, "step": self.step}}
        elif self.kind == "grid":
            out = {"grid": copy.deepcopy(self.grid)}
        elif self.kind == "each":
            out = {"each": self.each}
            if not self.stream:
                out["stream"] = False
        else:
            out = {"files": {"glob": self.glob}}
        if self.kind != "grid":
            out["as"] = self.as_name
        return out


@dataclass
class Resources:
    """What one task needs from a node; sizes in bytes."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int | None = None
    gpu_memory: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cpus": self.cpus, "gpus": self.gpus}
        if self.memory is not None:
            out["memory"] = self.memory
        if self.gpu_memory is not None:
            out["gpu_memory"] = self.gpu_memory
        return out


@dataclass
class StageSpec:
    """One checked stage. ``priority`` already includes the job's default."""

    name: str
    run: RunTarget
    args: list[Any] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    map: MapSpec | None = None
    needs: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)
    where: str | None = None
    retries: int | None = None  # given (0 too): a lost node counts as a try (portal/retries.py)
    timeout: float | None = None  # seconds
    priority: int = 0
    outputs: list[str] = field(default_factory=list)
    replicas: int = 1  # copies of each task, on different nodes, compared by the portal
    fail: str = "item"  # "item": a failed task fails its item's chain; "job": the whole job

    @property
    def argument(self) -> str:
        """The keyword argument under which stages that need this one receive its outputs."""
        return _argument_name(self.name)

    def requirement(self) -> Requirement:
        """This stage's needs as the shared model's Requirement, for matching."""
        return Requirement(
            cpus=self.resources.cpus,
            gpus=self.resources.gpus,
            memory=self.resources.memory,
            where=self.where,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "run": self.run.to_value()}
        if self.args:
            out["args"] = copy.deepcopy(self.args)
        if self.params:
            out["params"] = copy.deepcopy(self.params)
        if self.map is not None:
            out["map"] = self.map.to_dict()
        if self.needs:
            out["needs"] = list(self.needs)
        out["resources"] = self.resources.to_dict()
        if self.where is not None:
            out["where"] = self.where
        if self.retries is not None:
            out["retries"] = self.retries
        if self.timeout is not None:
            out["timeout"] = self.timeout
        out["priority"] = self.priority
        if self.outputs:
            out["outputs"] = list(self.outputs)
        if self.replicas > 1:
            out["replicas"] = self.replicas
        if self.fail != "item":
            out["fail"] = self.fail
        return out


@dataclass
class JobSpec:
    """A checked job: stages in an order where every stage comes after the stages it needs."""

    name: str
    priority: int = 0
    stages: list[StageSpec] = field(default_factory=list)
    base_dir: Path = field(default_factory=Path.cwd, compare=False)  # relative files start here

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def count(self, stage: StageSpec) -> int:
        """How many tasks ``stage`` makes (an ``each`` map: as many as its stage's)."""
        seen: set[str] = set()
        while stage.map is not None and stage.map.kind == "each" and stage.name not in seen:
            seen.add(stage.name)
            stage = self.stage(str(stage.map.each))
        return stage.map.count(self.base_dir) if stage.map else 1

    def task_count(self) -> int:
        """Tasks in the whole job (globs files for a ``files`` map)."""
        return sum(self.count(s) for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data; ``load_spec(spec.to_dict(), base_dir=...)`` gives it back."""
        return {
            "name": self.name,
            "priority": self.priority,
            "stages": [s.to_dict() for s in self.stages],
        }


def _argument_name(stage_name: str) -> str:
    return stage_name.replace("-", "_")
