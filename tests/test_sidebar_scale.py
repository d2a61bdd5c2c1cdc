"""The sidebar with a few hundred nodes, in a real Chromium: the virtualised node list shows
the right nodes where it is scrolled to, and live deltas change the rows in view.

A real portal whose registry holds 300 simulated nodes of real size (joined through
``run_on_scheduler``, as ``bench/bench_sidebar.py`` does for 1,000: no volunteer processes), a
real ``jupyter lab`` with this checkout's build of the extension, and headless Chromium. The
timing of the same set-up at 1,000 nodes is the benchmark's business; this checks behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from browser import ConsoleLog, Lab, launch_chromium, start_lab, why_no_browser_tests
from conftest import Portal, start_portal

_WHY_NOT = why_no_browser_tests()
if _WHY_NOT:
    print(f"SKIP: tests/test_sidebar_scale.py: {_WHY_NOT}")
pytestmark = pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT or "")

# The scheduler cannot import tests/: send this module's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

NODES = 300
ROW = 64  # NODE_ROW_HEIGHT in labextension/src/views.ts
MEMORY = 16_000_000_000  # each simulated node's memory: "16.0 GB" in its row
WAIT_MS = 30_000

# Keep the last `nodes` delta the page received, to check what travelled.
RECORD_DELTAS = r"""
(() => {
  window.__gpDeltas = [];
  const desc = Object.getOwnPropertyDescriptor(WebSocket.prototype, 'onmessage');
  Object.defineProperty(WebSocket.prototype, 'onmessage', {
    configurable: true,
    get() { return desc.get.call(this); },
    set(fn) {
      if (typeof fn === 'function' && String(this.url).includes('/grid/api/events')) {
        const inner = fn;
        fn = function (event) {
          try {
            const m = JSON.parse(event.data);
            if (m.type === 'nodes') window.__gpDeltas.push(m);
          } catch (e) {}
          return inner.call(this, event);
        };
      }
      desc.set.call(this, fn);
    }
  });
})();
"""


# -- run on the portal's scheduler ------------------------------------------------------------


def _telemetry(cpu: float) -> dict[str, Any]:
    return {
        "time": time.time(),
        "cpu_percent": cpu,
        "grid_cpu_percent": 0.0,
        "memory_used": 4_000_000_000,
        "memory_percent": 25.0,
        "running_tasks": 0,
        "gpus": [],
        "policy": {"state": None, "reason": None},
    }


def _address(i: int) -> str:
    return f"tls://10.9.{i // 256}.{i % 256}:40000"


def join_nodes(start: int, stop: int, capacity: dict[str, Any], dask_scheduler: Any = None) -> int:
    registry = dask_scheduler.plugins["grid-portal"].registry
    for i in range(start, stop):
        name = f"sim-{i:05d}"
        registry.join(
            name=name,
            address=_address(i),
            capacity=capacity,
            offer={"cpus": 4, "memory": MEMORY, "gpus": []},
            labels={"room": f"B{i % 20}"},
        )
        registry.update(
            _address(i),
            state=registry.nodes[name].state,
            reason=None,
            telemetry=_telemetry(float(i % 50)),
            used_resources={},
        )
    return len(registry.nodes)


def report_cpu(i: int, cpu: float, dask_scheduler: Any = None) -> None:
    registry = dask_scheduler.plugins["grid-portal"].registry
    record = registry.nodes[f"sim-{i:05d}"]
    registry.update(
        _address(i), state=record.state, reason=None, telemetry=_telemetry(cpu), used_resources={}
    )


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def jp_asyncio_loop() -> Iterator[None]:
    """Playwright's sync API runs its own loop for this module (see test_sidebar_e2e.py)."""
    yield None


@pytest.fixture(autouse=True)
def jp_server_cleanup() -> Iterator[None]:
    yield None


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sidebar-scale")


@pytest.fixture(scope="module")
def grid(tmp: Path) -> Iterator[tuple[Portal, Any, dict[str, Any]]]:
    from grid_portal import Grid
    from grid_portal.node.probe import probe_static

    capacity = json.loads(json.dumps(dataclasses.asdict(probe_static())))
    capacity["memory_total"] = MEMORY
    portal = start_portal(tmp)
    client = None
    try:
        client = Grid(portal.connection_file, start_embedded=False)
        assert client.client.run_on_scheduler(join_nodes, 0, NODES, capacity) == NODES
        yield portal, client, capacity
    finally:
        if client is not None:
            client.close()
        portal.stop()


@pytest.fixture(scope="module")
def lab(grid: tuple[Portal, Any, dict[str, Any]], tmp: Path) -> Iterator[Lab]:
    server = start_lab(tmp / "lab", grid[0].connection_file)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(lab: Lab) -> Iterator[Any]:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    console = ConsoleLog()
    with launch_chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            console.attach(page)
            page.add_init_script(RECORD_DELTAS)
            page.goto(lab.url)
            page.locator('li[data-id="grid-portal:sidebar"]').click(timeout=60_000)
            expect(page.locator(".gp-conn")).to_have_text("live")
            yield page
            ours = console.ours()
            assert not ours, "browser console errors from the Grid extension:\n" + "\n".join(ours)
        finally:
            context.close()


def rendered_rows(page: Any) -> list[tuple[str, int]]:
    """(node name, row index from its position) of every row in the DOM."""
    return page.evaluate(
        f"""() => Array.from(document.querySelectorAll('.gp-node-row')).map(row => [
            row.dataset.node,
            Math.round(new DOMMatrix(getComputedStyle(row).transform).m42 / {ROW})
        ])"""
    )


def scroll_to(page: Any, row: int) -> None:
    page.locator(".gp-node-list").evaluate("(list, top) => { list.scrollTop = top; }", row * ROW)


def node_row(page: Any, name: str) -> Any:
    return page.locator(f'.gp-node-row[data-node="{name}"]')


# -- tests ------------------------------------------------------------------------------------


def test_a_few_hundred_nodes_are_counted_and_only_rows_in_view_are_rendered(page: Any) -> None:
    from playwright.sync_api import expect

    expect(page.locator(".gp-node-count")).to_have_text(f"{NODES} nodes")
    expect(page.locator('.gp-total[data-total="nodes"] .gp-total-num')).to_have_text(f"{NODES}")
    expect(node_row(page, "sim-00000")).to_be_visible()
    rows = rendered_rows(page)
    assert 3 <= len(rows) < 40, rows  # virtualised: a viewport's worth plus a few
    # Sorted by name: the row at index i is node i.
    assert all(name == f"sim-{i:05d}" for name, i in rows), rows
    spacer = page.locator(".gp-node-spacer").evaluate("e => e.getBoundingClientRect().height")
    assert spacer == NODES * ROW


def test_the_rows_in_view_after_scrolling_are_the_right_nodes(page: Any) -> None:
    from playwright.sync_api import expect

    for target in (150, 57, NODES - 1, 0):
        scroll_to(page, target)
        expect(node_row(page, f"sim-{target:05d}")).to_be_in_viewport()
        rows = rendered_rows(page)
        assert all(name == f"sim-{i:05d}" for name, i in rows), (target, rows)
        indices = sorted(i for _, i in rows)
        assert indices == list(range(indices[0], indices[-1] + 1)), rows  # no holes
        assert indices[0] <= target <= indices[-1] and len(rows) < 40, (target, rows)
        if target >= 10:
            expect(node_row(page, "sim-00000")).to_have_count(0)  # scrolled away: gone


def test_a_delta_changes_the_visible_row_and_keeps_its_capacity(
    page: Any, grid: tuple[Portal, Any, dict[str, Any]]
) -> None:
    from playwright.sync_api import expect

    _, client, capacity = grid
    scroll_to(page, 150)
    row = node_row(page, "sim-00150")
    expect(row).to_be_in_viewport()
    expect(row.locator(".gp-bar-cpu .gp-bar-label")).to_have_text("CPU 0%")  # 150 % 50
    element = row.element_handle()
    page.evaluate("() => { window.__gpDeltas = []; }")

    client.client.run_on_scheduler(report_cpu, 150, 77.0)
    expect(row.locator(".gp-bar-cpu .gp-bar-label")).to_have_text("CPU 77%")
    fill = row.locator(".gp-bar-cpu .gp-bar-fill").evaluate("e => e.style.width")
    assert fill == "77%", fill
    # The row element is kept (updated, not replaced), and its neighbours are untouched.
    assert row.element_handle().evaluate("(e, old) => e === old", element)
    expect(node_row(page, "sim-00151").locator(".gp-bar-cpu .gp-bar-label")).to_have_text("CPU 1%")
    # The delta left the unchanged static capacity out; the row still knows it.
    sent = page.evaluate(
        "() => window.__gpDeltas.flatMap(m => m.nodes).filter(n => n.name === 'sim-00150')"
    )
    assert sent and all("capacity" not in n for n in sent), sent
    expect(row.locator(".gp-bar-mem")).to_have_attribute("title", re.compile(r"of 16\.0 GB$"))

    # A node that joins now arrives with its capacity, and is counted and listed in order.
    assert client.client.run_on_scheduler(join_nodes, NODES, NODES + 1, capacity) == NODES + 1
    expect(page.locator(".gp-node-count")).to_have_text(f"{NODES + 1} nodes")
    joined = page.evaluate(
        "() => window.__gpDeltas.flatMap(m => m.nodes).filter(n => n.name === 'sim-00300')"
    )
    assert joined and "capacity" in joined[0], joined
    scroll_to(page, NODES)
    last = node_row(page, f"sim-{NODES:05d}")
    expect(last).to_be_in_viewport()
    expect(last.locator(".gp-bar-mem")).to_have_attribute("title", re.compile(r"of 16\.0 GB$"))
