"""From a checked document to a ``JobSpec``: stages, maps, order and task counts; ``load_spec``."""

from __future__ import annotations

import heapq
import keyword
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from grid_portal.errors import UsageError
from grid_portal.jobs.spec.model import (
    JobSpec,
    MapSpec,
    Resources,
    RunTarget,
    StageSpec,
    _argument_name,
)
from grid_portal.jobs.spec.overrides import _apply_override
from grid_portal.jobs.spec.problems import SpecError, SpecProblem, _did_you_mean, _short, _type_name
from grid_portal.jobs.spec.reading import _plain, _read_source
from grid_portal.jobs.spec.schema import (
    _MAP_KINDS,
    _PATTERN_HINTS,
    IDENTIFIER_PATTERN,
    JOB_NAME_PATTERN,
    MAX_TASKS,
    STAGE_NAME_PATTERN,
)
from grid_portal.jobs.spec.validation import _validate
from grid_portal.units import parse_duration, parse_size

# --- semantic checks ----------------------------------------------------------------------------


class _Problems(list[SpecProblem]):
    def add(self, path: str, message: str) -> None:
        self.append(SpecProblem(path, message))


def _build_map(raw: dict[str, Any], where: str, problems: _Problems) -> MapSpec | None:
    kind = next(k for k in _MAP_KINDS if k in raw)
    default_as = _argument_name(raw["each"]) if kind == "each" else "item"
    as_name = raw.get("as", default_as)
    if "stream" in raw and kind != "each":
        problems.add(f"{where}.stream", "only used with each; remove 'stream'")
    if kind == "each":
        if not re.fullmatch(IDENTIFIER_PATTERN[:-1] + r"\Z", as_name) or keyword.iskeyword(as_name):
            problems.add(
                f"{where}.as" if "as" in raw else f"{where}.each",
                f"{_short(as_name)} cannot be an argument name: give 'as' a {_PATTERN_HINTS[IDENTIFIER_PATTERN]}, not a Python keyword",
            )
        return MapSpec(
            "each", each=raw["each"], stream=raw.get("stream", True), as_name=as_name, origin=where
        )
    if not re.fullmatch(IDENTIFIER_PATTERN[:-1] + r"\Z", as_name) or keyword.iskeyword(as_name):
        problems.add(
            f"{where}.as",
            f"{_short(as_name)} cannot be an argument name: {_PATTERN_HINTS[IDENTIFIER_PATTERN]}, not a Python keyword",
        )
    if kind == "grid":
        if "as" in raw:
            problems.add(
                f"{where}.as",
                "not used with grid: each grid item's keys are passed as keyword arguments; remove 'as'",
            )
        for key in raw["grid"]:
            if not re.fullmatch(IDENTIFIER_PATTERN[:-1] + r"\Z", key) or keyword.iskeyword(key):
                problems.add(
                    f"{where}.grid",
                    f"key {_short(key)} cannot be an argument name: {_PATTERN_HINTS[IDENTIFIER_PATTERN]}, not a Python keyword",
                )
        return MapSpec("grid", grid=raw["grid"], origin=where)
    if kind == "over":
        return MapSpec("over", over=raw["over"], as_name=as_name, origin=where)
    if kind == "files":
        pattern = raw["files"]["glob"]
        if "\x00" in pattern:
            problems.add(f"{where}.files.glob", "must not contain a NUL character")
        return MapSpec("files", glob=pattern, as_name=as_name, origin=where)
    r = raw["range"]
    spec = MapSpec(
        "range",
        start=r.get("start", 0),
        stop=r["stop"],
        step=r.get("step", 1),
        as_name=as_name,
        origin=where,
    )
    if spec.count() == 0:
        problems.add(
            f"{where}.range",
            f"is empty (start {spec.start}, stop {spec.stop}, step {spec.step}): no task would run",
        )
    return spec


def _parse_size_field(raw: dict[str, Any], key: str, where: str, problems: _Problems) -> int | None:
    if key not in raw:
        return None
    try:
        return parse_size(raw[key])
    except UsageError as exc:
        problems.add(f"{where}.{key}", str(exc))
        return None


def _build_stage(
    raw: dict[str, Any], where: str, job_priority: int, problems: _Problems, job_replicas: int = 1
) -> StageSpec | None:
    name = raw["name"]
    if not re.fullmatch(STAGE_NAME_PATTERN[:-1] + r"\Z", name):  # `$` would let a final newline in
        problems.add(
            f"{where}.name", f"{_short(name)} is not allowed: {_PATTERN_HINTS[STAGE_NAME_PATTERN]}"
        )
    try:
        run = RunTarget.parse(raw["run"], f"{where}.run")
    except SpecError as exc:
        problems.extend(exc.problems)
        return None

    params: dict[str, Any] = raw.get("params", {})
    args: list[Any] = raw.get("args", [])
    outputs: list[str] = raw.get("outputs", [])
    if args and run.kind == "shell":
        problems.add(
            f"{where}.args",
            "a shell command takes no positional args; use params and {name} placeholders",
        )
    if outputs and run.kind == "function":
        problems.add(
            f"{where}.outputs",
            "only shell and file stages declare output files; a function's return value is its output",
        )
    for i, pattern in enumerate(outputs):
        parts = PurePosixPath(pattern.replace("\\", "/")).parts
        if pattern.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", pattern) or ".." in parts:
            problems.add(
                f"{where}.outputs[{i}]",
                f"{_short(pattern)} must stay inside the task's folder: a relative pattern without '..'",
            )

    map_spec = _build_map(raw["map"], f"{where}.map", problems) if "map" in raw else None

    res = raw.get("resources", {})
    resources = Resources(
        cpus=float(res.get("cpus", 1)),
        gpus=float(res.get("gpus", 0)),
        memory=_parse_size_field(res, "memory", f"{where}.resources", problems),
        gpu_memory=_parse_size_field(res, "gpu_memory", f"{where}.resources", problems),
    )
    if resources.gpu_memory is not None and resources.gpus == 0:
        problems.add(
            f"{where}.resources.gpu_memory", "is set but gpus is 0; ask for gpus: 1 (or more)"
        )

    timeout: float | None = None
    if "timeout" in raw:
        try:
            timeout = parse_duration(raw["timeout"])
        except UsageError as exc:
            problems.add(f"{where}.timeout", str(exc))
        else:
            if timeout <= 0:
                problems.add(f"{where}.timeout", "must be more than 0 seconds")

    # Names that reach the function (or command): they must not collide.
    sources: dict[str, str] = {key: f"{where}.params.{key}" for key in params}
    supplied = map_spec.argument_names() if map_spec else []
    for arg in supplied:
        if arg in sources:
            problems.add(
                sources[arg],
                f"{arg!r} is also supplied by the map ({where}.map); set it in one place",
            )
        sources.setdefault(arg, f"{where}.map")
    each = map_spec.each if map_spec is not None and map_spec.kind == "each" else None
    for i, need in enumerate(raw.get("needs", [])):
        arg = _argument_name(need)
        if need == each:
            continue  # its items arrive one by one, under the map's `as`
        if need in raw["needs"][:i]:
            problems.add(f"{where}.needs[{i}]", f"{need!r} is listed twice; list each stage once")
            continue
        if arg in sources:
            problems.add(
                f"{where}.needs[{i}]",
                f"the outputs of {need!r} arrive as argument {arg!r}, which {sources[arg]} also sets; rename one",
            )
        sources.setdefault(arg, f"{where}.needs[{i}]")
    if run.kind == "shell":
        for placeholder in run.placeholders():
            if placeholder not in sources:
                known = ", ".join("{" + s + "}" for s in sources) or "none (set values in params)"
                problems.add(
                    f"{where}.run.shell", f"unknown placeholder {{{placeholder}}}; known: {known}"
                )

    return StageSpec(
        name=name,
        run=run,
        args=args,
        params=params,
        map=map_spec,
        needs=list(raw.get("needs", []))
        + ([each] if each and each not in raw.get("needs", []) else []),
        resources=resources,
        where=raw.get("where"),
        retries=raw.get("retries"),
        timeout=timeout,
        priority=raw.get("priority", job_priority),
        outputs=outputs,
        replicas=raw.get("replicas", job_replicas),
        fail=raw.get("fail", "item"),
    )


def _order(stages: list[StageSpec], problems: _Problems) -> list[StageSpec]:
    """Topological order, keeping the written order where needs allow; reports a cycle."""
    index = {s.name: i for i, s in enumerate(stages)}
    missing = [len(set(s.needs)) for s in stages]  # needs not yet placed
    dependents: list[list[int]] = [[] for _ in stages]
    for i, stage in enumerate(stages):
        for need in set(stage.needs):
            dependents[index[need]].append(i)
    ready = [i for i, n in enumerate(missing) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents[i]:
            missing[j] -= 1
            if missing[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(stages):
        # Every stage left waits on another one left: follow needs until a stage repeats.
        left = set(range(len(stages))) - set(order)
        trail: list[int] = []
        current = min(left)
        while current not in trail:
            trail.append(current)
            current = min(index[n] for n in stages[current].needs if index[n] in left)
        cycle = trail[trail.index(current) :] + [current]
        shown = " -> ".join(stages[i].name for i in cycle)
        problems.add(
            f"stages[{cycle[0]}].needs",
            f"the needs form a cycle: {shown} (each needs the next); remove one of these needs",
        )
        return stages
    return [stages[i] for i in order]


def _build(doc: dict[str, Any], base_dir: Path) -> JobSpec:
    problems = _Problems()
    name = doc["name"]
    if not re.fullmatch(JOB_NAME_PATTERN[:-1] + r"\Z", name):
        problems.add("name", f"{_short(name)} is not allowed: {_PATTERN_HINTS[JOB_NAME_PATTERN]}")
    job_priority = doc.get("priority", 0)

    stages: list[StageSpec] = []
    first_seen: dict[str, int] = {}
    argument_of: dict[str, int] = {}
    for i, raw in enumerate(doc["stages"]):
        stage_name = raw["name"]
        if stage_name in first_seen:
            problems.add(
                f"stages[{i}].name",
                f"duplicate stage name {stage_name!r} (also stages[{first_seen[stage_name]}]); give each stage its own name",
            )
        elif _argument_name(stage_name) in argument_of:
            other = doc["stages"][argument_of[_argument_name(stage_name)]]["name"]
            problems.add(
                f"stages[{i}].name",
                f"{stage_name!r} and {other!r} would both pass their outputs as argument "
                f"{_argument_name(stage_name)!r}; rename one",
            )
        first_seen.setdefault(stage_name, i)
        argument_of.setdefault(_argument_name(stage_name), i)
        stage = _build_stage(raw, f"stages[{i}]", job_priority, problems, doc.get("replicas", 1))
        if stage is not None:
            stages.append(stage)

    known = list(first_seen)

    def refers(path: str, name: str, own: str, itself: str) -> bool:
        """Does ``name`` (at ``path``, in stage ``own``) name another stage? If not, say why."""
        if name not in first_seen:
            problems.add(
                path,
                f"unknown stage {name!r}{_did_you_mean(name, known)}; known stages: {', '.join(known)}",
            )
            return False
        if name == own:
            problems.add(path, f"stage {name!r} cannot {itself}")
            return False
        return True

    needs_ok = True
    for i, raw in enumerate(doc["stages"]):
        for j, need in enumerate(raw.get("needs", [])):
            if not refers(f"stages[{i}].needs[{j}]", need, raw["name"], "need itself"):
                needs_ok = False
            elif keyword.iskeyword(_argument_name(need)) and not isinstance(raw.get("run"), dict):
                problems.add(
                    f"stages[{i}].needs[{j}]",
                    f"{need!r} is a Python keyword, so its outputs cannot be passed as an argument; rename that stage",
                )

    for i, raw in enumerate(doc["stages"]):
        each = raw.get("map", {}).get("each")
        if each is None:
            continue
        if not refers(f"stages[{i}].map.each", each, raw["name"], "map over itself"):
            needs_ok = False
        elif "map" not in doc["stages"][first_seen[each]]:
            problems.add(
                f"stages[{i}].map.each",
                f"stage {each!r} has no map, so it has no items to map over; use needs: [{each}]",
            )

    # Bound the work before anything is created: map sizes are computed, never materialised.
    by_name = {s.name: s for s in stages}

    def count_of(stage: StageSpec) -> int | None:  # None: a files map, counted later
        seen: set[str] = set()
        while stage.map is not None and stage.map.kind == "each":
            if stage.name in seen or stage.map.each not in by_name:
                return 0  # a cycle or an unknown stage, reported elsewhere
            seen.add(stage.name)
            stage = by_name[str(stage.map.each)]
        if stage.map is None:
            return 0  # reported above: nothing to map over
        return None if stage.map.kind == "files" else stage.map.count()

    total = 0
    for stage in stages:
        if stage.map is None:
            total += stage.replicas
        elif (n := count_of(stage)) is not None:  # a files map is counted when globbed
            if stage.map.kind == "each":
                total += n * stage.replicas
                continue
            if n > MAX_TASKS:
                problems.add(
                    stage.map.origin,
                    f"expands to {n:,} tasks; at most {MAX_TASKS:,} per job: split the job or use coarser items",
                )
            total += n * stage.replicas  # each copy of a replicated task is a task
    if total > MAX_TASKS and not any(p.path.endswith(".map") for p in problems):
        problems.add(
            "stages", f"the stages expand to {total:,} tasks; at most {MAX_TASKS:,} per job"
        )

    if needs_ok and len(stages) == len(first_seen) == len(doc["stages"]):
        stages = _order(stages, problems)
    if problems:
        raise SpecError(problems)
    return JobSpec(name=name, priority=job_priority, stages=stages, base_dir=base_dir)


# --- the public entry point ---------------------------------------------------------------------


def load_spec(
    source: str | Path | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    base_dir: str | Path | None = None,
) -> JobSpec:
    """Read, override, validate and check a job spec; raise SpecError listing every problem.

    ``source`` is a path to a .yaml/.yml/.json file, YAML or JSON text, or a dict.
    ``overrides`` are ``key=value`` settings (``--set`` on the command line) with dotted keys
    (``stages.simulate.params.steps=2000``; stages by name or index), values read as YAML.
    ``base_dir`` is where relative files are found: the file's folder, else the current one.
    """
    raw, folder = _read_source(source, base_dir)
    if raw is None:
        raise SpecError("the job spec is empty; it needs at least a name and stages")
    if not isinstance(raw, Mapping):
        hint = ""
        if isinstance(source, str) and "\n" not in source and isinstance(raw, str):
            hint = f"; if {source!r} is a file, it was not found"
        raise SpecError(
            f"a job spec must be a mapping with a name and stages, not {_type_name(raw)}{hint}"
        )
    doc = _plain(raw)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    if overrides:
        for text in overrides:
            _apply_override(doc, text)
        doc = _plain(doc)  # the overrides' values count towards the limits too
    _validate(doc)
    return _build(doc, folder)
