"""Workflows: job files run on a real grid, in order, with the right data; files travel.

One portal and one volunteer (2 CPUs) serve the whole module. Task functions live in
tests/gridtasks.py; shell stages use only sh and coreutils.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Portal, grid_portal_command, start_portal, start_volunteer, wait_for

from grid_portal.errors import NotFound, UsageError
from grid_portal.jobs.spec import SpecError
from grid_portal.jobs.workflow import (
    StagedFile,
    load_workflow,
    release_outputs,
    save_outputs,
    workflow_outputs,
)
from grid_portal.model import JobState

PIPELINE = {
    "name": "pipeline",
    "stages": [  # written out of order on purpose: `needs` decides
        {"name": "analyse", "run": "gridtasks:wf_analyse", "needs": ["simulate"]},
        {
            "name": "simulate",
            "run": "gridtasks:wf_simulate",
            "map": {"range": {"stop": 6}, "as": "i"},
            "needs": ["seed"],
        },
        {"name": "seed", "run": "gridtasks:wf_seed", "params": {"base": 10}},
    ],
}

ENCODE_JOB = """\
name: encode-clips
stages:
  - name: encode
    run: {shell: "mkdir -p out && tr a-z A-Z < {clip} > out/{clip_stem}.up && echo encoded {clip_name}"}
    map: {files: {glob: "inputs/*.txt"}, as: clip}
    outputs: ["out/*.up"]
"""


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("workflows")
    p = start_portal(tmp)
    try:
        start_volunteer(p, tmp, "worker", "--cpus", "2", "--memory", "1GB")
        yield p
    finally:
        p.stop()


def cli(portal: Portal, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        grid_portal_command(*args, "--portal", portal.connection_file),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


# -- refused before anything is submitted ----------------------------------------------------


def _with(stage: int, **changes: object) -> dict:
    spec = json.loads(json.dumps(PIPELINE))
    spec["stages"][stage].update(changes)
    return spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_with(0, needs=["simulat"]), "stages[0].needs[0]: unknown stage 'simulat' (did you mean"),
        (_with(2, needs=["analyse"]), "the needs form a cycle: "),
        (_with(2, resources={"gpus": -1}), "stages[2].resources.gpus: must be >= 0"),
        (_with(1, where="gpu.mem >= 16GB"), "stages[1].where: invalid requirement: unknown attribute 'gpu.mem'"),
        (_with(1, where='cpus >= "four"'), "stages[1].where: invalid requirement: cpus is a number, not text"),
        (_with(0, run="gridtasks:no_such_function"), "stages[0].run: 'gridtasks' has no attribute 'no_such_function'"),
        (_with(0, run="missing_module_xyz.sub:f"), None),  # may exist on the nodes: accepted
    ],
    ids=["unknown-need", "cycle", "schema", "unknown-attribute", "type-mismatch", "import", "remote-module"],
)  # fmt: skip
def test_bad_specs_are_refused_with_one_clear_message(spec: dict, message: str | None) -> None:
    if message is None:
        assert load_workflow(spec).stage("analyse").run.module == "missing_module_xyz.sub"
        return
    with pytest.raises(SpecError) as info:
        load_workflow(spec)
    assert isinstance(info.value, UsageError)
    assert message in str(info.value)


def test_nothing_is_submitted_for_a_bad_spec(portal: Portal) -> None:
    with portal.grid() as grid:
        before = len(grid.jobs())
        with pytest.raises(SpecError, match="cycle"):
            grid.run_workflow(_with(2, needs=["analyse"]))
        assert len(grid.jobs()) == before


# -- running ---------------------------------------------------------------------------------


def test_a_three_stage_pipeline_runs_in_order_with_the_right_data(portal: Portal) -> None:
    with portal.grid() as grid:
        job = grid.run_workflow(PIPELINE)  # as the REST API calls it: a dict, no waiting
        assert job.kind == "workflow" and job.name == "pipeline"
        wait_for(lambda: grid.get_job(job.id).state.finished, timeout=60, what="the pipeline")
        assert grid.get_job(job.id).state is JobState.DONE
        outputs = workflow_outputs(grid, job.id)
        assert release_outputs(grid, job.id)
        detail = grid._call("grid_job_tasks", job_id=job.id)
    # seed -> 10; simulate[i] -> 10 + i*i, in map order; analyse gets all of them.
    assert outputs == {"analyse": {"values": [10, 11, 14, 19, 26, 35], "total": 115}}
    tasks = {t["stage"]: [] for t in detail["tasks"]}
    for t in detail["tasks"]:
        tasks[t["stage"]].append(t)
    assert [s["stage"] for s in detail["stages"]] == ["seed", "simulate", "analyse"]
    assert sorted(t["item"] for t in tasks["simulate"]) == list(range(6))
    assert all(t["state"] == "done" and t["node"] == "worker" for t in detail["tasks"])
    # Times are the workers' (Dask corrects them by each worker's clock offset, an estimate
    # that moves by a few ms between heartbeats): allow that much.
    slack = 0.05
    seed_end = tasks["seed"][0]["finished"]
    assert all(t["started"] >= seed_end - slack for t in tasks["simulate"]), detail["tasks"]
    last_simulate = max(t["finished"] for t in tasks["simulate"])
    assert tasks["analyse"][0]["started"] >= last_simulate - slack, detail["tasks"]
    # The spec is kept with the job, so a restarted portal knows what was asked.
    ledger = sqlite3.connect(portal.data_dir / "ledger.sqlite")
    (spec_text,) = ledger.execute("SELECT spec FROM jobs WHERE id = ?", (job.id,)).fetchone()
    assert json.loads(spec_text)["name"] == "pipeline"


def test_every_task_of_a_map_gets_the_whole_output_of_a_needed_map(portal: Portal) -> None:
    spec = json.loads(json.dumps(PIPELINE))
    spec["stages"][0] = {
        "name": "offset",
        "run": "gridtasks:wf_offset",
        "map": {"over": [1, 2], "as": "j"},
        "needs": ["simulate"],
    }
    with portal.grid() as grid:
        job = grid.run_workflow(spec, wait=True)
        assert job.state is JobState.DONE, job.error
        outputs = workflow_outputs(grid, job.id)
        release_outputs(grid, job.id)
    values = [10, 11, 14, 19, 26, 35]
    assert outputs == {"offset": [[100 + v for v in values], [200 + v for v in values]]}


def test_a_map_over_a_folder_brings_every_output_back(portal: Portal, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    clips = {f"clip{i}": f"clip number {i}\n" * (200 * i + 1) for i in range(5)}
    for name, text in clips.items():
        (inputs / f"{name}.txt").write_text(text)
    (tmp_path / "job.yaml").write_text(ENCODE_JOB)
    out = tmp_path / "got"

    result = cli(portal, "submit", str(tmp_path / "job.yaml"), "--wait", "--output", str(out))
    assert "done" in result.stdout and "5 files saved" in result.stdout
    for name, text in clips.items():
        got = (out / "out" / f"{name}.up").read_bytes()
        assert got == text.upper().encode()
    assert sorted(p.name for p in (out / "out").iterdir()) == [f"{n}.up" for n in sorted(clips)]

    job_id = result.stdout.split()[1]
    shown = cli(portal, "job", job_id).stdout
    assert "encode" in shown and "worker" in shown and "5/5 tasks done" in shown
    logs = cli(portal, "logs", job_id, "--item", "3").stdout
    assert "==> encode [3] on worker (done) <==" in logs and "encoded clip3.txt" in logs

    # The records are in the ledger file too: readable with the portal's data dir alone.
    def in_ledger() -> dict | None:
        jobs = json.loads(cli(portal, "jobs", "--json", "--data-dir", str(portal.data_dir)).stdout)
        return next((j for j in jobs if j["id"] == job_id and j["state"] == "done"), None)

    assert wait_for(in_ledger, what="the job in the ledger")["name"] == "encode-clips"


def test_staged_files_carry_their_checksum(tmp_path: Path) -> None:
    good = StagedFile.of("out/a.bin", b"\x00\x01payload")
    assert good.sha256 == hashlib.sha256(b"\x00\x01payload").hexdigest()
    written = save_outputs({"s": [[good], [StagedFile.of("out/a.bin", b"other")]]}, tmp_path)
    # Two tasks wrote the same name with different content: neither is lost.
    assert [p.relative_to(tmp_path).as_posix() for p in written] == ["out/a.bin", "_2/out/a.bin"]
    damaged = StagedFile("x.bin", b"changed", good.sha256)
    with pytest.raises(Exception, match="checksum"):
        save_outputs({"s": damaged}, tmp_path / "d")
    with pytest.raises(Exception, match="inside the task's folder"):
        save_outputs({"s": StagedFile.of("../escape", b"x")}, tmp_path / "e")


def test_a_failing_shell_task_fails_the_job_with_what_it_printed(portal: Portal) -> None:
    spec = {
        "name": "doomed",
        "stages": [
            {
                "name": "fail",
                "run": {"shell": "echo about to fail; echo 'no such input: {n}' >&2; exit 3"},
                "map": {"over": [1, 2], "as": "n"},
            },
            {"name": "timeout", "run": {"shell": "sleep 30"}, "timeout": "0.5s"},
        ],
    }
    with portal.grid() as grid:
        job = grid.run_workflow(spec, wait=True)
        assert job.state is JobState.FAILED
        detail = grid._call("grid_job_tasks", job_id=job.id)
    errors = {(t["stage"], t["item"]): t["error"] for t in detail["tasks"]}
    assert "task 1 of stage 'fail'" in errors[("fail", 1)]
    assert "exited with status 3" in errors[("fail", 1)]
    assert "no such input: 2" in errors[("fail", 1)]
    assert "after the timeout of 0.5 s" in errors[("timeout", None)]


def test_a_submitted_job_can_be_cancelled(portal: Portal) -> None:
    spec = {
        "name": "long",
        "stages": [
            {
                "name": "nap",
                "run": "gridtasks:where_and_what",
                "map": {"range": {"stop": 4}, "as": "value"},
                "params": {"seconds": 30},
            }
        ],
    }
    with portal.grid() as grid:
        job = grid.run_workflow(spec)
        wait_for(lambda: grid.get_job(job.id).state is JobState.RUNNING, what="the job to run")
        assert f"job {job.id} (long): cancelled" in cli(portal, "cancel", job.id).stdout
        assert grid.get_job(job.id).state is JobState.CANCELLED
        wait_for(
            lambda: all(
                t["state"] == "cancelled"
                for t in grid._call("grid_job_tasks", job_id=job.id)["tasks"]
            ),
            what="its tasks to be cancelled",
        )
        with pytest.raises(NotFound, match="cancelled"):
            grid._call("grid_workflow_outputs", job_id=job.id)


def test_stages_free_to_run_go_by_priority() -> None:
    from grid_portal.jobs.workflow import _submission_order

    spec = load_workflow(
        {
            "name": "order",
            "stages": [
                {"name": "low", "run": "gridtasks:wf_seed", "params": {"base": 1}},
                {"name": "high", "run": "gridtasks:wf_seed", "params": {"base": 2}, "priority": 5},
                {"name": "after", "run": "gridtasks:wf_analyse", "needs": ["low"], "priority": 9},
            ],
        }
    )
    assert [s.name for s in _submission_order(spec)] == ["high", "low", "after"]
