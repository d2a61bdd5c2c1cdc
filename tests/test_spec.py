"""The job format: parsing, overrides, schema and semantic errors, limits, importing targets."""

from __future__ import annotations

import datetime
import json
import pickle
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grid_portal.errors import UsageError
from grid_portal.jobs.spec import (
    MAX_STAGES,
    JobSpec,
    MapSpec,
    RunTarget,
    SpecError,
    SpecProblem,
    check_importable,
    job_schema,
    load_spec,
    resolve_callable,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "job-format.md"

FULL_YAML = """\
name: encode videos
priority: 3
stages:
  - name: plot
    run: mypkg.plot:main
    needs: [analyse]
  - name: simulate
    run: mypkg.sim:run
    params: {steps: 1000}
    args: [1, 2]
    map: {over: [1, 2, 3], as: x}
    resources: {cpus: 2, gpus: 1, memory: 2GB, gpu_memory: 16GB}
    where: 'gpu.capability >= 8.0'
    retries: 2
    timeout: 10m
    priority: 5
  - name: analyse
    run: {shell: "analyse --in {simulate} --out out/{label}.txt"}
    params: {label: run1}
    needs: [simulate]
    outputs: ["out/*.txt"]
"""


def problems_of(source, overrides=(), **kwargs) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(source, overrides, **kwargs)
    return str(info.value).splitlines()


def one_stage(**stage) -> dict:
    return {"name": "job", "stages": [{"name": "a", "run": "m:f", **stage}]}


# --- valid specs --------------------------------------------------------------------------------


def test_full_spec_from_yaml_text():
    spec = load_spec(FULL_YAML)
    assert spec.name == "encode videos"
    assert spec.priority == 3
    # Needs decide the order; otherwise the written order is kept.
    assert [s.name for s in spec.stages] == ["simulate", "analyse", "plot"]
    sim = spec.stage("simulate")
    assert sim.run == RunTarget("function", module="mypkg.sim", function="run")
    assert sim.args == [1, 2]
    assert sim.params == {"steps": 1000}
    assert sim.map == MapSpec("over", over=[1, 2, 3], as_name="x")
    assert sim.resources.cpus == 2.0 and sim.resources.gpus == 1.0
    assert sim.resources.memory == 2_000_000_000
    assert sim.resources.gpu_memory == 16_000_000_000
    assert sim.where == "gpu.capability >= 8.0"
    assert (sim.retries, sim.timeout, sim.priority) == (2, 600.0, 5)
    analyse = spec.stage("analyse")
    assert analyse.run.kind == "shell"
    assert analyse.needs == ["simulate"]
    assert analyse.outputs == ["out/*.txt"]
    # Defaults, and the job priority inherited.
    plot = spec.stage("plot")
    assert (plot.resources.cpus, plot.resources.gpus, plot.resources.memory) == (1.0, 0.0, None)
    # retries not given: None, so Dask's own rule holds for a lost node (portal/retries.py)
    assert (plot.retries, plot.timeout, plot.priority, plot.map) == (None, None, 3, None)
    assert plot.requirement().cpus == 1.0


def test_yaml_json_files_text_and_dict_agree(tmp_path):
    doc = yaml.safe_load(FULL_YAML)
    (tmp_path / "job.yaml").write_text(FULL_YAML)
    (tmp_path / "job.json").write_text(json.dumps(doc))
    expected = load_spec(doc)
    for source in (
        json.dumps(doc),
        json.dumps(doc, indent=2),
        tmp_path / "job.yaml",
        str(tmp_path / "job.json"),
    ):
        assert load_spec(source) == expected
    assert load_spec(tmp_path / "job.yaml").base_dir == tmp_path
    assert load_spec(doc, base_dir=tmp_path).base_dir == tmp_path
    assert load_spec(doc).base_dir == Path.cwd()
    assert doc == yaml.safe_load(FULL_YAML), "load_spec must not change the caller's dict"


def test_to_dict_round_trips_through_load_spec_and_json():
    spec = load_spec(FULL_YAML)
    again = load_spec(spec.to_dict())
    assert again == spec
    assert load_spec(json.dumps(spec.to_dict())) == spec
    assert again.to_dict() == spec.to_dict()


def test_run_target_kinds():
    assert RunTarget.parse("a.b.c:Klass.method") == RunTarget(
        "function", module="a.b.c", function="Klass.method"
    )
    assert RunTarget.parse("tools/fit.py") == RunTarget("file", path="tools/fit.py")
    assert RunTarget.parse("tools/fit.py:main") == RunTarget(
        "file", path="tools/fit.py", function="main"
    )
    # A name ending in .py is a file, never a module called "py".
    assert RunTarget.parse("sim.py:run").kind == "file"
    assert RunTarget.parse({"shell": "echo {x}"}) == RunTarget("shell", command="echo {x}")
    for value in ("a.b.c:Klass.method", "tools/fit.py", "tools/fit.py:main", {"shell": "ls"}):
        assert RunTarget.parse(value).to_value() == value


def test_shell_rendering_quotes_values():
    target = RunTarget.parse({"shell": "ffmpeg -i {video} out/{video_stem}.mkv {flags} {{lit}}"})
    assert target.placeholders() == ["video", "video_stem", "flags"]
    command = target.render_shell({"video": "in/my clip.mp4", "flags": ["-y", "a;b"]})
    assert command == "ffmpeg -i 'in/my clip.mp4' out/'my clip'.mkv -y 'a;b' {lit}"
    with pytest.raises(SpecError, match=r"run.shell: no value for placeholder \{video\}"):
        target.render_shell({"flags": []})


def test_script_argv():
    target = RunTarget.parse("tools/fit.py")
    argv = target.script_argv({"steps": 5, "label": "a b", "xs": [1, 2]}, args=["in.csv"])
    assert argv == [
        sys.executable,
        "tools/fit.py",
        "in.csv",
        "--steps=5",
        "--label=a b",
        "--xs=[1, 2]",
    ]


# --- maps ---------------------------------------------------------------------------------------


def test_map_over():
    m = load_spec(one_stage(map={"over": ["a", {"b": 1}]})).stages[0].map
    assert (m.kind, m.count(), list(m.items()), m.as_name) == ("over", 2, ["a", {"b": 1}], "item")
    assert m.bind("a") == {"item": "a"}


@pytest.mark.parametrize(
    ("rng", "expected"),
    [
        ({"stop": 4}, [0, 1, 2, 3]),
        ({"start": 2, "stop": 11, "step": 3}, [2, 5, 8]),
        ({"start": 5, "stop": 0, "step": -2}, [5, 3, 1]),
        ({"start": -3, "stop": -1}, [-3, -2]),
    ],
)
def test_map_range(rng, expected):
    m = load_spec(one_stage(map={"range": rng, "as": "i"})).stages[0].map
    assert m.count() == len(expected) == len(range(m.start, m.stop, m.step))
    assert list(m.items()) == expected
    assert m.bind(7) == {"i": 7}


def test_map_range_count_is_arithmetic():
    # Counting a range never builds it, even far past what len(range(...)) can report.
    m = MapSpec("range", start=0, stop=10**30, step=7)
    assert m.count() == -(-(10**30) // 7)
    assert next(iter(m.items())) == 0


def test_map_grid():
    m = load_spec(one_stage(map={"grid": {"alpha": [0.1, 0.2], "beta": [1, 2, 3]}})).stages[0].map
    assert m.count() == 6
    items = list(m.items())
    assert items[:4] == [
        {"alpha": 0.1, "beta": 1},
        {"alpha": 0.1, "beta": 2},
        {"alpha": 0.1, "beta": 3},
        {"alpha": 0.2, "beta": 1},
    ]
    assert m.bind(items[0]) == {"alpha": 0.1, "beta": 1}
    assert m.argument_names() == ["alpha", "beta"]


def test_map_files_relative_to_the_spec_folder(tmp_path):
    (tmp_path / "inputs" / "deep").mkdir(parents=True)
    for name in ("b.mp4", "a.mp4", "notes.txt", "deep/c.mp4"):
        (tmp_path / "inputs" / name).write_text("x")
    (tmp_path / "inputs" / "folder.mp4").mkdir()  # a folder is not a file to process
    (tmp_path / "job.yaml").write_text(
        "name: enc\nstages:\n  - name: enc\n    run: {shell: 'ffmpeg -i {video} {video_stem}.mkv'}\n"
        "    map: {files: {glob: 'inputs/*.mp4'}, as: video}\n"
    )
    spec = load_spec(tmp_path / "job.yaml")
    m = spec.stages[0].map
    assert m.count(spec.base_dir) == 2
    assert list(m.items(spec.base_dir)) == [tmp_path / "inputs/a.mp4", tmp_path / "inputs/b.mp4"]
    assert spec.task_count() == 2
    deep = MapSpec("files", glob="inputs/**/*.mp4")
    assert [p.name for p in deep.items(tmp_path)] == ["a.mp4", "b.mp4", "c.mp4"]
    assert MapSpec("files", glob="nothing/*.mp4").count(tmp_path) == 0


# --- overrides ----------------------------------------------------------------------------------


def test_overrides_by_stage_name_index_and_top_level():
    spec = load_spec(
        FULL_YAML,
        [
            "stages.simulate.params.steps=2000",
            "name=renamed job",
            "stages[2].retries=4",  # index into the list as written: analyse
            "stages.0.priority=9",  # plot
            "stages.plot.resources.gpus=0.5",  # creates resources
            "stages.simulate.map.over=[4, 5]",
            "stages.analyse.params.label='007'",
        ],
    )
    assert spec.name == "renamed job"
    assert spec.stage("simulate").params == {"steps": 2000}
    assert spec.stage("analyse").retries == 4
    assert spec.stage("plot").priority == 9
    assert spec.stage("plot").resources.gpus == 0.5
    assert list(spec.stage("simulate").map.items()) == [4, 5]
    assert spec.stage("analyse").params["label"] == "007"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "stages.simulat.params.steps=1",
            "--set stages.simulat.params.steps: no stage named 'simulat'; stages are: plot, simulate, analyse",
        ),
        (
            "stages.simulate.retires=3",
            "--set stages.simulate.retires: unknown field 'retires' in stages[1] (did you mean 'retries'?)",
        ),
        ("nmae=x", "--set nmae: unknown field 'nmae' in the spec (did you mean 'name'?)"),
        ("stages[7].retries=1", "--set stages[7].retries: stages has 3 items; no item [7]"),
        ("name.first=x", "--set name.first: name is text, so it has no 'first'"),
        ("steps", "--set 'steps': write key=value, like stages.simulate.params.steps=2000"),
        ("stages..x=1", "--set stages..x: not a dotted path"),
        (
            "name=2024-01-01",
            "name: a date or time is not allowed in a job spec; quote it to make it text",
        ),
        ("stages.simulate.retries=-1", "stages[1].retries: must be >= 0"),
    ],
)
def test_bad_overrides(override, message):
    lines = problems_of(FULL_YAML, [override])
    assert lines[0].startswith(message), lines


# --- schema errors with exact paths -------------------------------------------------------------


def test_negative_gpus_names_the_exact_path():
    doc = yaml.safe_load(FULL_YAML)
    doc["stages"][2]["resources"] = {"gpus": -1}
    assert problems_of(doc) == ["stages[2].resources.gpus: must be >= 0"]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"stages": [{"name": "a", "run": "m:f"}]}, ["name: is required"]),
        ({"name": "j"}, ["stages: is required"]),
        ({"name": "j", "stages": []}, ["stages: must not be empty"]),
        (
            {"name": "j", "stages": {"a": {"run": "m:f"}}},
            [
                "stages: must be a list (got a mapping); write stages as a list of mappings, each with a name"
            ],
        ),
        (
            {"name": "a/b", "stages": [{"name": "a", "run": "m:f"}]},
            [
                "name: 'a/b' is not allowed: use 1-100 letters, digits, spaces, '_', '.' or '-' (no space at either end)"
            ],
        ),
        ({"name": "x" * 101, "stages": [{"name": "a", "run": "m:f"}]}, ["name: 'xxxxxxxx"]),
        (one_stage(retires=2), ["stages[0].retires: unknown field (did you mean 'retries'?)"]),
        (one_stage(retries="two"), ["stages[0].retries: must be an integer (got text)"]),
        (one_stage(retries=True), ["stages[0].retries: must be an integer (got a boolean)"]),
        (one_stage(retries=101), ["stages[0].retries: must be <= 100"]),
        (one_stage(timeout=0), ["stages[0].timeout: must be > 0"]),
        (
            one_stage(resources={"cpus": "2"}),
            ["stages[0].resources.cpus: must be a number (got text)"],
        ),
        (
            one_stage(resources={"disk": 1}),
            [
                "stages[0].resources.disk: unknown field; known fields: cpus, gpus, memory, gpu_memory"
            ],
        ),
        (one_stage(map={}), ["stages[0].map: give one of over, range, grid, files or each"]),
        (
            one_stage(map={"over": [1], "range": {"stop": 2}}),
            [
                "stages[0].map: give only one of over, range, grid, files or each (found over and range)"
            ],
        ),
        (one_stage(map={"over": []}), ["stages[0].map.over: must not be empty"]),
        (one_stage(map={"range": {"start": 1}}), ["stages[0].map.range.stop: is required"]),
        (
            one_stage(map={"range": {"stop": 5, "step": 0}}),
            ["stages[0].map.range.step: must not be 0"],
        ),
        (
            one_stage(map={"grid": {"my-key": [1]}}),
            ["stages[0].map.grid: key 'my-key': use a Python name"],
        ),
        (
            one_stage(map={"over": [1], "as": "2x"}),
            ["stages[0].map.as: '2x' is not allowed: use a Python name"],
        ),
        (
            {"name": "j", "stages": [{"name": "a"}]},
            ["stages[0].run: is required (write 'module:function'"],
        ),
        (
            {"name": "j", "stages": [{"name": "a", "run": "nope"}]},
            ["stages[0].run: 'nope' is not allowed: write 'module:function' (like mypkg.sim:run)"],
        ),
        (
            {"name": "j", "stages": [{"name": "a", "run": 5}]},
            ["stages[0].run: must be text or a mapping (got an integer); write 'module:function'"],
        ),
        (
            {"name": "j", "stages": [{"name": "a", "run": {"bash": "ls"}}]},
            ["stages[0].run.shell: is required", "stages[0].run.bash: unknown field"],
        ),
        (
            {"name": "j", "stages": [{"name": "a", "run": "m:f", "where": ""}]},
            ["stages[0].where: must not be empty"],
        ),
        (
            {"name": "j", "stages": [{"name": "1a", "run": "m:f"}]},
            ["stages[0].name: '1a' is not allowed: start with a letter or '_'"],
        ),
    ],
)
def test_schema_errors(doc, expected):
    lines = problems_of(doc)
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), lines


def test_every_problem_is_reported_most_basic_first():
    doc = {
        "priority": "high",
        "stages": [
            {"name": "a", "run": "m:f", "resources": {"gpus": -1}},
            {"name": "b", "run": "m:f", "retries": -2, "colour": "red"},
        ],
    }
    assert problems_of(doc) == [
        "name: is required",
        "priority: must be an integer (got text)",
        "stages[1].colour: unknown field; known fields: name, run, params, args, map, needs, resources, where, retries, timeout, priority, outputs, replicas, fail",
        "stages[1].retries: must be >= 0",
        "stages[0].resources.gpus: must be >= 0",
    ]


# --- semantic errors ----------------------------------------------------------------------------


def stages(*items: dict) -> dict:
    return {"name": "job", "stages": list(items)}


def test_duplicate_stage_names():
    doc = stages(
        {"name": "a", "run": "m:f"}, {"name": "b", "run": "m:f"}, {"name": "a", "run": "m:g"}
    )
    assert problems_of(doc) == [
        "stages[2].name: duplicate stage name 'a' (also stages[0]); give each stage its own name"
    ]
    doc = stages({"name": "a-b", "run": "m:f"}, {"name": "a_b", "run": "m:f"})
    assert problems_of(doc) == [
        "stages[1].name: 'a_b' and 'a-b' would both pass their outputs as argument 'a_b'; rename one"
    ]


def test_unknown_need_names_the_known_stages():
    doc = stages(
        {"name": "simulate", "run": "m:f"},
        {"name": "analyse", "run": "m:f", "needs": ["simulate", "simulat"]},
    )
    assert problems_of(doc) == [
        "stages[1].needs[1]: unknown stage 'simulat' (did you mean 'simulate'?); known stages: simulate, analyse"
    ]


def test_cycle_is_shown():
    doc = stages(
        {"name": "start", "run": "m:f"},
        {"name": "a", "run": "m:f", "needs": ["b", "start"]},
        {"name": "b", "run": "m:f", "needs": ["c"]},
        {"name": "c", "run": "m:f", "needs": ["a"]},
        {"name": "after", "run": "m:f", "needs": ["a"]},
    )
    assert problems_of(doc) == [
        "stages[1].needs: the needs form a cycle: a -> b -> c -> a (each needs the next); remove one of these needs"
    ]
    assert problems_of(stages({"name": "a", "run": "m:f", "needs": ["a"]})) == [
        "stages[0].needs[0]: stage 'a' cannot need itself"
    ]


def test_grid_keys_must_be_argument_names():
    assert problems_of(one_stage(map={"grid": {"lambda": [1], "ok\n": [2]}})) == [
        "stages[0].map.grid: key 'lambda' cannot be an argument name: use a Python name: letters, digits and '_', not starting with a digit, not a Python keyword",
        "stages[0].map.grid: key 'ok\\n' cannot be an argument name: use a Python name: letters, digits and '_', not starting with a digit, not a Python keyword",
    ]


def test_a_need_listed_twice():
    doc = stages({"name": "b", "run": "m:f"}, {"name": "a", "run": "m:f", "needs": ["b", "b"]})
    assert problems_of(doc) == ["stages[1].needs[1]: 'b' is listed twice; list each stage once"]


def test_order_of_a_diamond():
    doc = stages(
        {"name": "d", "run": "m:f", "needs": ["b", "c"]},
        {"name": "c", "run": "m:f", "needs": ["a"]},
        {"name": "b", "run": "m:f", "needs": ["a"]},
        {"name": "a", "run": "m:f"},
    )
    assert [s.name for s in load_spec(doc).stages] == ["a", "c", "b", "d"]


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (
            {"resources": {"memory": "lots"}},
            "stages[0].resources.memory: invalid size 'lots': write a number and a unit",
        ),
        (
            {"resources": {"gpu_memory": "16 parsecs"}, "run": "m:f"},
            "stages[0].resources.gpu_memory: invalid size '16 parsecs': unknown unit 'parsecs'",
        ),
        (
            {"resources": {"gpu_memory": "16GB"}},
            "stages[0].resources.gpu_memory: is set but gpus is 0; ask for gpus: 1 (or more)",
        ),
        (
            {"timeout": "ten minutes"},
            "stages[0].timeout: invalid duration 'ten minutes': write it like 30s, 5m, 1h30m or 2d",
        ),
        ({"timeout": "0s"}, "stages[0].timeout: must be more than 0 seconds"),
        (
            {"map": {"range": {"start": 5, "stop": 1}}},
            "stages[0].map.range: is empty (start 5, stop 1, step 1): no task would run",
        ),
        ({"map": {"grid": {"a": [1]}, "as": "x"}}, "stages[0].map.as: not used with grid"),
        (
            {"map": {"over": [1], "as": "class"}},
            "stages[0].map.as: 'class' cannot be an argument name",
        ),
        (
            {"params": {"alpha": 1}, "map": {"grid": {"alpha": [1, 2]}}},
            "stages[0].params.alpha: 'alpha' is also supplied by the map (stages[0].map); set it in one place",
        ),
        (
            {"params": {"item": 1}, "map": {"over": [1]}},
            "stages[0].params.item: 'item' is also supplied by the map",
        ),
        (
            {"outputs": ["*.txt"]},
            "stages[0].outputs: only shell and file stages declare output files",
        ),
        (
            {"run": {"shell": "cp a b"}, "outputs": ["../secret"]},
            "stages[0].outputs[0]: '../secret' must stay inside the task's folder",
        ),
        (
            {"run": {"shell": "cp a b"}, "outputs": ["/etc/*"]},
            "stages[0].outputs[0]: '/etc/*' must stay inside the task's folder",
        ),
        (
            {"run": {"shell": "ls"}, "args": [1]},
            "stages[0].args: a shell command takes no positional args",
        ),
        (
            {"run": {"shell": "echo {x}"}, "params": {"y": 1}},
            "stages[0].run.shell: unknown placeholder {x}; known: {y}",
        ),
        (
            {"run": {"shell": "echo {x.__class__}"}, "params": {"x": 1}},
            "stages[0].run.shell: placeholder {x.__class__} is not allowed: write a plain {name}",
        ),
        (
            {"run": {"shell": "echo {x!r}"}, "params": {"x": 1}},
            "stages[0].run.shell: placeholder {x!r} is not allowed",
        ),
        ({"run": {"shell": "echo }"}}, "stages[0].run.shell: bad placeholder in the shell command"),
    ],
)
def test_semantic_errors(stage, expected):
    lines = problems_of(one_stage(**stage))
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_shell_placeholders_from_every_source():
    doc = stages(
        {"name": "prep", "run": "m:f"},
        {
            "name": "enc",
            "run": {"shell": "ffmpeg -i {video} -p {prep} {crf} out/{video_stem}.mkv"},
            "params": {"crf": 23},
            "map": {"files": {"glob": "*.mp4"}, "as": "video"},
            "needs": ["prep"],
            "outputs": ["out/*.mkv"],
        },
    )
    assert load_spec(doc).stage("enc").run.placeholders() == ["video", "prep", "crf", "video_stem"]


def test_a_need_colliding_with_a_param():
    doc = stages(
        {"name": "prep", "run": "m:f"},
        {"name": "b", "run": "m:f", "needs": ["prep"], "params": {"prep": 1}},
    )
    assert problems_of(doc) == [
        "stages[1].needs[0]: the outputs of 'prep' arrive as argument 'prep', which stages[1].params.prep also sets; rename one"
    ]


# --- limits on hostile input --------------------------------------------------------------------


def test_huge_range_refused_fast():
    start = time.perf_counter()
    lines = problems_of(one_stage(map={"range": {"stop": 10**12}}))
    assert time.perf_counter() - start < 0.5
    assert lines == [
        "stages[0].map: expands to 1,000,000,000,000 tasks; at most 100,000 per job: split the job or use coarser items"
    ]


def test_huge_grid_refused_fast():
    grid = {f"p{i}": list(range(10)) for i in range(12)}  # 10**12 combinations
    start = time.perf_counter()
    lines = problems_of(one_stage(map={"grid": grid}))
    assert time.perf_counter() - start < 0.5
    assert lines[0].startswith("stages[0].map: expands to 1,000,000,000,000 tasks")


def test_total_tasks_over_all_stages():
    doc = stages(
        *({"name": f"s{i}", "run": "m:f", "map": {"range": {"stop": 60_000}}} for i in range(2))
    )
    assert problems_of(doc) == [
        "stages: the stages expand to 120,000 tasks; at most 100,000 per job"
    ]


def test_too_many_stages():
    doc = stages(*({"name": f"s{i}", "run": "m:f"} for i in range(MAX_STAGES + 1)))
    assert problems_of(doc) == ["stages: has 1,001; at most 1,000 are allowed"]
    assert len(load_spec(stages(*doc["stages"][:MAX_STAGES])).stages) == MAX_STAGES


def test_document_too_large():
    text = "name: x\nstages: []\n# " + "x" * 1_000_000
    start = time.perf_counter()
    assert problems_of(text)[0].startswith("the job spec is larger than 1,000,000 bytes")
    assert problems_of(one_stage(params={"blob": "x" * 1_000_001}))[0].startswith(
        "stages[0].params.blob: the job spec is too large"
    )
    assert time.perf_counter() - start < 1


def test_big_file_refused_before_reading(tmp_path):
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(50_000_000)
    assert problems_of(big)[0] == f"{big} is 50,000,000 bytes; a job spec may be at most 1,000,000"


def test_nesting_too_deep():
    deep: list = []
    for _ in range(40):
        deep = [deep]
    lines = problems_of(one_stage(params={"x": deep}))
    assert lines[0].endswith("nested more than 32 levels deep; flatten it")
    assert problems_of("[" * 5_000 + "]" * 5_000)  # the parsers' own recursion is contained


def test_yaml_alias_bombs_and_cycles():
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(9)
    )
    start = time.perf_counter()
    assert "too large" in problems_of(laughs)[0]
    assert time.perf_counter() - start < 5
    assert "nested more than 32 levels" in problems_of("name: &a [*a]\nstages: []")[0]
    loop: dict = {"name": "x"}
    loop["stages"] = [{"name": "a", "run": "m:f", "params": loop}]
    assert "nested more than 32 levels" in problems_of(loop)[0]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"n": 10**30}, "stages[0].params.n: integer too large"),
        ({"n": float("nan")}, "stages[0].params.n: nan is not allowed; use a finite number"),
        (
            {"d": datetime.date(2024, 1, 1)},
            "stages[0].params.d: a date or time is not allowed in a job spec; quote it",
        ),
        ({"b": b"\x00"}, "stages[0].params.b: binary data is not allowed in a job spec"),
        ({"s": {1, 2}}, "stages[0].params.s: a set is not allowed in a job spec"),
        ({1: "one"}, "stages[0].params: key 1 is an integer, not text; quote it"),
    ],
)
def test_values_that_are_not_json(params, expected):
    assert problems_of(one_stage(params=params))[0].startswith(expected)


def test_tuples_become_lists():
    assert load_spec(one_stage(args=(1, (2, 3)))).stages[0].args == [1, [2, 3]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: [unclosed\n",
            "not valid YAML: while parsing a flow sequence: expected ',' or ']', but got '<stream end>' at line 2, column 1",
        ),
        ('{"name": "a", "name": "b"}', "key 'name' appears twice in one mapping; keep one"),
        ("", "the job spec is empty"),
        ("- 1\n- 2\n", "a job spec must be a mapping with a name and stages, not a list"),
        ("jobs/missing.yaml", "no such job file: jobs/missing.yaml"),
        (
            "a: 1\n---\nb: 2\n",
            "not valid YAML: expected a single document in the stream: but found another document at line 2, column 1",
        ),
    ],
)
def test_unreadable_text(text, expected):
    assert problems_of(text)[0].startswith(expected)


def test_json_file_errors_name_the_position(tmp_path):
    bad = tmp_path / "job.json"
    bad.write_text('{"name": "x",\n "stages": [}\n')
    assert problems_of(bad) == ["not valid JSON: Expecting value at line 2, column 13"]
    assert (
        problems_of(tmp_path)[0]
        == f"{tmp_path} is a folder; give the job file (.yaml, .yml or .json)"
    )
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in problems_of(tmp_path / "latin1.yaml")[0]


# --- SpecError ----------------------------------------------------------------------------------


def test_spec_error_shape():
    err = SpecError([SpecProblem("a", "one"), SpecProblem("b[0]", "two"), SpecProblem("", "three")])
    assert isinstance(err, UsageError)
    assert str(err) == "a: one\nb[0]: two\nthree"
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == err.problems and str(back) == str(err)
    assert SpecError("bad", "x.y").problems == [SpecProblem("x.y", "bad")]


# --- the schema ---------------------------------------------------------------------------------


def _property_schemas(node, where="$"):
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            yield f"{where}.{name}", sub
        for key, sub in node.items():
            yield from _property_schemas(sub, f"{where}.{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _property_schemas(sub, f"{where}[{i}]")


def test_schema_is_valid_2020_12_and_documented():
    schema = job_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    missing = []
    for where, sub in _property_schemas(schema):
        target = sub
        if "$ref" in sub and "description" not in sub:
            target = schema["$defs"][sub["$ref"].rsplit("/", 1)[1]]
        if not target.get("description"):
            missing.append(where)
    assert missing == []
    # The examples that pass load_spec also pass a plain validator with the published schema.
    jsonschema.validate(load_spec(FULL_YAML).to_dict(), schema)
    schema["title"] = "changed"
    assert job_schema()["title"] == "Grid Portal job"


def _doc_yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_docs_name_every_field_and_their_examples_load():
    text = DOCS.read_text()
    names = {where.rsplit(".", 1)[1] for where, _ in _property_schemas(job_schema())}
    assert sorted(n for n in names if f"`{n}`" not in text) == []
    blocks = [b for b in _doc_yaml_blocks() if b.lstrip().startswith("name:")]
    assert len(blocks) >= 3
    for block in blocks:
        assert load_spec(block).stages


# --- importing targets --------------------------------------------------------------------------


def test_resolve_callable_module_function():
    assert resolve_callable("json:dumps") is json.dumps
    assert resolve_callable("pathlib:Path.cwd")() == Path.cwd()
    spec = load_spec(stages({"name": "a", "run": "mypkg.sim:run"}))
    with pytest.raises(SpecError) as info:
        resolve_callable(spec.stages[0].run)
    assert (
        str(info.value)
        == "stages[0].run: cannot import module 'mypkg.sim': No module named 'mypkg'"
    )
    with pytest.raises(SpecError, match=r"^run: 'json' has no attribute 'nope'$"):
        resolve_callable("json:nope")
    with pytest.raises(SpecError, match=r"^run: math:pi is a number, not a function$"):
        resolve_callable("math:pi")
    with pytest.raises(SpecError, match="a shell command is not a Python function"):
        resolve_callable(RunTarget.parse({"shell": "ls"}))


def test_resolve_callable_file(tmp_path):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "fit.py").write_text("def main(x, k=1):\n    return x * k\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    fit = resolve_callable("tools/fit.py:main", tmp_path)
    assert fit(3, k=2) == 6
    assert resolve_callable("tools/fit.py:main", tmp_path) is fit  # cached while unchanged
    with pytest.raises(
        SpecError, match=r"run: cannot import file .*broken.py': RuntimeError: boom"
    ):
        resolve_callable("broken.py:main", tmp_path)
    with pytest.raises(SpecError, match=r"run: no file 'gone.py' in "):
        resolve_callable("gone.py:main", tmp_path)
    with pytest.raises(SpecError, match="runs as a script"):
        resolve_callable("tools/fit.py", tmp_path)


def test_check_importable(tmp_path):
    (tmp_path / "ok.py").write_text("import json\ndef main():\n    pass\n")
    (tmp_path / "bad.py").write_text("def main(:\n")
    doc = stages(
        {"name": "a", "run": "json:dumps"},
        {"name": "b", "run": "json:nope"},
        {"name": "c", "run": "not_installed_here_xyz.mod:run"},  # may exist on the nodes only
        {"name": "d", "run": "ok.py:main"},
        {"name": "e", "run": "ok.py:other"},
        {"name": "f", "run": "missing.py"},
        {"name": "g", "run": "bad.py:main"},
        {"name": "h", "run": "ok.py"},
    )
    problems = [str(p) for p in check_importable(load_spec(doc, base_dir=tmp_path))]
    assert problems[:3] == [
        "stages[1].run: 'json' has no attribute 'nope'",
        "stages[4].run: ok.py defines no 'other' at top level",
        f"stages[5].run: no file 'missing.py' in {tmp_path}",
    ]
    assert len(problems) == 4 and problems[3].startswith("stages[6].run: bad.py line 1: "), problems


def test_spec_module_does_not_import_dask():
    code = "import sys, grid_portal.jobs.spec; print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- properties: whatever comes in, only SpecError comes out --------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
odd_scalars = st.dates() | st.binary(max_size=5) | st.frozensets(st.integers(), max_size=2)
values = st.recursive(
    json_scalars | odd_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=10) | st.integers(), inner, max_size=4)
    ),
    max_leaves=20,
)
stage_keys = st.sampled_from(
    [
        "name",
        "run",
        "params",
        "args",
        "map",
        "needs",
        "resources",
        "where",
        "retries",
        "timeout",
        "priority",
        "outputs",
        "other",
    ]
)
map_values = st.fixed_dictionaries(
    {},
    optional={
        "over": values,
        "range": st.dictionaries(
            st.sampled_from(["start", "stop", "step", "x"]), st.integers() | values, max_size=3
        ),
        "grid": st.dictionaries(
            st.text(max_size=5), st.lists(json_scalars, max_size=3) | values, max_size=3
        ),
        "files": st.fixed_dictionaries({"glob": st.text(max_size=10)}) | values,
        "as": st.text(max_size=6) | values,
    },
)
stage_names = st.sampled_from(["a", "b", "c", "a-b", "a_b", "class", ""]) | st.text(max_size=5)
run_values = (
    st.sampled_from(["m:f", "a.py", "a.py:f", "x", "a:b:c", ""])
    | st.fixed_dictionaries(
        {
            "shell": st.sampled_from(["echo {a}", "x {", "{item}", "{b_stem}", "{0}", "{a.b}"])
            | st.text(max_size=8)
        }
    )
    | values
)
resource_values = st.dictionaries(
    st.sampled_from(["cpus", "gpus", "memory", "gpu_memory", "x"]),
    st.sampled_from(["1GB", "lots", "-1", "1e400", "0"]) | st.integers() | st.floats() | values,
    max_size=4,
)
stage_dicts = st.fixed_dictionaries(
    {"name": stage_names, "run": run_values},
    optional={
        "map": map_values | values,
        "needs": st.lists(stage_names, max_size=3) | values,
        "resources": resource_values | values,
        "timeout": st.sampled_from(["10m", "0s", "x", "1h30m"]) | st.floats() | values,
        "params": st.dictionaries(st.text(max_size=5), values, max_size=3) | values,
        "args": values,
        "outputs": st.lists(st.text(max_size=8), max_size=2) | values,
        "retries": st.integers() | values,
        "priority": st.integers() | values,
        "where": values,
    },
)
spec_dicts = st.fixed_dictionaries(
    {"name": st.text(max_size=8) | values, "stages": st.lists(stage_dicts, max_size=4) | values},
    optional={"priority": st.integers() | values, "extra": values},
)
# Specs that mostly pass the schema, so that the cross-checks (needs, cycles, placeholders,
# collisions, sizes, task counts) and the round trip get exercised too.
few_names = st.sampled_from(["a", "b", "c", "a-b", "a_b", "item", "class"])
plausible_map = st.one_of(
    st.fixed_dictionaries(
        {"over": st.lists(json_scalars, min_size=1, max_size=3)}, optional={"as": few_names}
    ),
    st.fixed_dictionaries(
        {
            "range": st.fixed_dictionaries(
                {"stop": st.integers(-5, 10**13)},
                optional={"start": st.integers(-5, 5), "step": st.integers(-3, 3)},
            )
        },
        optional={"as": few_names},
    ),
    st.fixed_dictionaries(
        {
            "grid": st.dictionaries(
                few_names, st.lists(st.integers(), min_size=1, max_size=400), min_size=1, max_size=3
            )
        }
    ),
    st.fixed_dictionaries(
        {"files": st.fixed_dictionaries({"glob": st.sampled_from(["*.x", "in/**/*.y"])})},
        optional={"as": few_names},
    ),
)
plausible_run = st.sampled_from(["m:f", "pkg.mod:C.f", "a.py", "a.py:f", "x.py:f"]) | st.builds(
    lambda parts: {"shell": " ".join(parts)},
    st.lists(
        st.sampled_from(
            ["echo", "{a}", "{b}", "{item}", "{item_stem}", "{alpha}", "{{", "}}", "{x.y}"]
        ),
        min_size=1,
        max_size=4,
    ),
)
plausible_stage = st.fixed_dictionaries(
    {"name": few_names, "run": plausible_run},
    optional={
        "map": plausible_map,
        "needs": st.lists(few_names, max_size=2, unique=True),
        "params": st.dictionaries(few_names, json_scalars, max_size=2),
        "args": st.lists(json_scalars, max_size=2),
        "resources": st.fixed_dictionaries(
            {},
            optional={
                "cpus": st.floats(0, 8),
                "gpus": st.sampled_from([0, 0.5, 1]),
                "memory": st.sampled_from(["1GB", "2 GiB", "lots", 10**9]),
                "gpu_memory": st.sampled_from(["8GB", "1.5GiB", "x"]),
            },
        ),
        "timeout": st.sampled_from(["10m", "0s", "1h30m", "soon", 5, 0.5]),
        "retries": st.integers(0, 3),
        "priority": st.integers(-5, 5),
        "where": st.sampled_from(["gpu.capability >= 8.0"]),
        "outputs": st.lists(st.sampled_from(["out/*.x", "../x", "/abs", "r.txt"]), max_size=2),
    },
)
plausible_specs = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["job", "my job", " bad"]),
        "stages": st.lists(plausible_stage, min_size=1, max_size=4),
    },
    optional={"priority": st.integers(-3, 3)},
)
override_texts = st.lists(
    st.builds(
        "{}={}".format,
        st.sampled_from(
            [
                "name",
                "stages.a.retries",
                "stages[0].params.x",
                "stages.0.map.range.stop",
                "x.y",
                "stages.zz",
                "",
            ]
        )
        | st.text(max_size=10),
        st.text(max_size=10),
    )
    | st.text(max_size=10),
    max_size=2,
)


def _only_spec_errors(source, overrides=()) -> None:
    try:
        spec = load_spec(source, overrides)
    except SpecError as exc:
        assert exc.problems and str(exc)
        return
    assert isinstance(spec, JobSpec)
    assert load_spec(spec.to_dict()) == spec


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_dicts, override_texts)
def test_spec_shaped_dicts_raise_only_spec_errors(doc, overrides):
    _only_spec_errors(doc, overrides)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plausible_specs, override_texts)
def test_plausible_specs_load_or_raise_spec_errors(doc, overrides):
    _only_spec_errors(doc, overrides)


@settings(max_examples=200, deadline=None)
@given(values)
def test_arbitrary_values_raise_only_spec_errors(value):
    _only_spec_errors(value if isinstance(value, dict) else {"name": "x", "stages": value})


def _as_yaml(doc: dict) -> str:
    try:
        return yaml.safe_dump(doc, default_flow_style=True)
    except yaml.YAMLError:  # tuples and frozensets have no safe YAML form
        return json.dumps(doc, default=str)


def _names_a_file(text: str) -> bool:
    try:
        return "\n" not in text and Path(text.strip()).exists()
    except (OSError, ValueError):
        return False


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60) | spec_dicts.map(_as_yaml))
def test_arbitrary_text_raises_only_spec_errors(text):
    if _names_a_file(text):  # such text is read as a path, by design
        return
    _only_spec_errors(text)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="{}[]:-,&*!|>'\"#\n ab1", max_size=40))
def test_yaml_punctuation_raises_only_spec_errors(text):
    _only_spec_errors(textwrap.dedent(text))
