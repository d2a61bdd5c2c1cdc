"""Whole notebooks in real kernels against a real portal and a real volunteer: every example
notebook, and what only a real kernel shows (Run all stopping at an error, the interrupt
button, a --bg result picked up after a kernel restart)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import Portal, start_portal, start_volunteer, wait_for
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "example-notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp("notebooks")
    p = start_portal(tmp)
    # The volunteer's default sandbox, as researchers meet it.
    start_volunteer(p, tmp, "vol", "--cpus", "2", "--memory", "1GB")
    yield p
    p.stop()


def kernel_env(portal: Portal) -> dict[str, str]:
    """The kernel finds the portal the documented way: GRID_PORTAL_ADDRESS."""
    return {**os.environ, "GRID_PORTAL_ADDRESS": portal.connection_file}


def execute(nb: Any, portal: Portal, tmp_path: Path) -> Any:
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    return client.execute(env=kernel_env(portal))


def text_of(cell: Any) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append("\n".join(out["traceback"]))
    return "".join(parts)


def check_example(stem: str, nb: Any) -> None:
    """What an executed example notebook must show (also used by tests/test_dev_setup.py)."""
    text = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert "Traceback" not in text and "Error" not in text, text
    if stem.startswith("01"):
        assert "hello from" in text and "the grid says 42, computed on" in text
        assert "mean of 4 million uniform numbers: 0.50" in text
    elif stem.startswith("02"):
        assert "pi is about 3.1" in text
    elif stem.startswith("03"):
        assert "β = 0.5: peak of" in text
        assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_notebook_runs(path: Path, portal: Portal, tmp_path: Path) -> None:
    check_example(path.stem, execute(nbformat.read(path, as_version=4), portal, tmp_path))


def test_run_all_stops_at_a_grid_cell_error_with_its_line(portal: Portal, tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("%load_ext grid_portal"),
            nbformat.v4.new_code_cell("%%grid\nx = 1\nraise RuntimeError('remote failure')\n"),
            nbformat.v4.new_code_cell("print('must not run')"),
        ]
    )
    with pytest.raises(CellExecutionError) as info:
        execute(nb, portal, tmp_path)
    message = str(info.value)
    assert "RuntimeError: remote failure" in message and "line 3" in message
    assert "grid_portal/" not in message  # the traceback is the cell's, not ours
    assert nb.cells[2].get("outputs") == [] and nb.cells[2].get("execution_count") is None


# -- a kernel of our own, for the interrupt button and a restart ----------------------------
class Kernel:
    def __init__(self, portal: Portal) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=kernel_env(portal))
        self.connect()

    def connect(self) -> None:
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, on_output: Any = None, timeout: float = 60) -> tuple[dict, str]:
        """Execute; returns the reply's content and all text the cell showed."""
        shown: list[str] = []

        def hook(msg: dict) -> None:
            content = msg["content"]
            kind = msg["msg_type"]
            if kind == "stream":
                shown.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                shown.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                shown.append("\n".join(content["traceback"]))
            if on_output is not None:
                on_output("".join(shown))

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"], "".join(shown)

    def restart(self) -> None:
        self.kc.stop_channels()
        self.km.restart_kernel(now=True)
        self.connect()

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel(portal: Portal) -> Iterator[Kernel]:
    k = Kernel(portal)
    k.run("%load_ext grid_portal")
    yield k
    k.close()


def test_the_interrupt_button_cancels_a_running_cell(kernel: Kernel, portal: Portal) -> None:
    from test_magics import MARKED_SLEEP, cell_processes

    pressed: list[float] = []
    running: list[int] = []

    def press_when_running() -> None:
        running.extend(wait_for(lambda: cell_processes(portal), what="the cell to start"))
        pressed.append(time.monotonic())
        kernel.km.interrupt_kernel()

    threading.Thread(target=press_when_running, daemon=True).start()
    reply, shown = kernel.run("%%grid\n" + MARKED_SLEEP.format(seconds=60))
    took = time.monotonic() - pressed[0]
    assert reply["status"] == "error" and reply["ename"] == "CellInterrupted"
    assert took < 5, f"the cell stopped {took:.1f} s after the interrupt"
    assert "cancelled job" in shown and "vol" in shown
    wait_for(lambda: not any(map(_alive, running)), timeout=5, what="the cell to be killed")
    reply, shown = kernel.run("%%grid --cpus 2\nprint('next')\n")
    assert reply["status"] == "ok" and "next" in shown


def test_the_cells_verdict_comes_after_its_output(kernel: Kernel) -> None:
    reply, shown = kernel.run("%%grid\nprint('the output')\n")
    assert reply["status"] == "ok"
    # The live line (queued, running) is shown first and updated in place; the verdict is
    # shown last, after what the cell printed.
    assert shown.index("queued") < shown.index("the output") < shown.index("✓ done in")


def test_a_background_result_survives_a_kernel_restart(kernel: Kernel, portal: Portal) -> None:
    """The kernel restarts while its --bg cell runs on a sandboxed node: the node keeps the
    result at the portal, and the new kernel loads it."""
    from test_magics import Gate

    gate = Gate()
    reply, shown = kernel.run(
        f"%%grid --bg\n{gate.code}result = sum(range(10))\nprint('bg done', passed)\n"
    )
    assert reply["status"] == "ok"
    job_id = shown.split("grid job ")[1].split(":")[0]
    with portal.grid() as admin:  # the portal's admin may look at anyone's job
        wait_for(lambda: admin.get_job(job_id).state.value == "running", what="the cell")
        kernel.restart()
        gate.open()
        wait_for(lambda: admin.get_job(job_id).has_result, timeout=30, what="a kept result")
    kernel.run("%load_ext grid_portal")
    reply, shown = kernel.run(f"%grid result {job_id}\nprint('result is', result)")
    assert reply["status"] == "ok", shown
    assert "bg done True" in shown and "result is 45" in shown


def test_a_background_sweep_survives_its_kernel_dying(kernel: Kernel, portal: Portal) -> None:
    """The kernel is killed while its --bg --map sweep runs: the portal holds every item's
    result, and a new kernel loads them all, in order, with each item's output."""
    from test_magics import Gate

    gate = Gate()
    reply, shown = kernel.run(
        f"%%grid --bg --map v in [1, 2, 3]\n{gate.code}square = v * v\nprint('item', v, passed)\n"
    )
    assert reply["status"] == "ok", shown
    job_id = shown.split("grid job ")[1].split(":")[0]
    with portal.grid() as admin:  # the portal's admin may look at anyone's job
        wait_for(lambda: admin.get_job(job_id).state.value == "running", what="the sweep")
        kernel.restart()  # the kernel process is killed (now=True) and a new one started
        gate.open()
        done = wait_for(
            lambda: (job := admin.get_job(job_id)).state.finished and job, what="the sweep"
        )
        assert done.state.value == "done" and done.tasks_done == 3, done
    kernel.run("%load_ext grid_portal")
    reply, shown = kernel.run(f"%grid result {job_id}\nprint('squares are', square)")
    assert reply["status"] == "ok", shown
    assert "squares are [1, 4, 9]" in shown
    for v in (1, 2, 3):
        assert f"[v={v}] item {v} True" in shown, shown
    # Loaded once, kept in the ledger: the portal holds nothing more for it.
    with portal.grid() as admin:
        assert admin.get_job(job_id).has_result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
