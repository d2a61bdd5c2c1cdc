"""The Grid sidebar at 1,000 nodes, measured in the browser (issue 17, target 5).

    python bench/bench_sidebar.py [--nodes 1000] [--every 2] [--seconds 60] [--scroll-frames 600]

What runs: a real portal (``grid-portal serve``, mutual TLS), a real ``jupyter lab`` with the
grid_portal server extension and this checkout's build of the labextension
(``tests/browser.py``), and Debian's headless Chromium through Python playwright. The portal's
registry holds ``--nodes`` simulated nodes of real size (``bench_api.fill_registry``: a real
probe's capacity, an offer, labels, telemetry) and each of them reports fresh telemetry every
``--every`` seconds (``bench_api.start_reporting``: 1/20 of the nodes every ``every/20`` s, on a
timer in the scheduler). The portal and its simulated reporting run at nice 10: on a real grid
the portal is another machine, not a competitor for the researcher's CPU.

Measured inside the page, with ``performance.now()`` (an init script wraps the events
websocket's ``onmessage``; the sidebar widget's ``_render`` is wrapped once the page is up):

- each message on the events websocket: the extension's handler (JSON parse, applying the delta
  to the model, the change signal, the status bar);
- each render of the sidebar: its JavaScript, and the whole frame it ran in up to the next task
  (a ``MessageChannel`` message posted from the render: style, layout and paint included);
- per update: a ``nodes`` message's handler plus the frame of the render that follows it;
- long tasks (``PerformanceObserver``, type ``longtask``: main-thread tasks over 50 ms);
- scrolling: the node list scrolled programmatically by ``--scroll-step`` px every animation
  frame while the updates keep coming; the deltas between frames (``requestAnimationFrame``
  timestamps), and how many exceed 1.5 frames (25 ms at 60 Hz: a dropped frame). The same
  number of frames with no scrolling is measured first, as the machine's own baseline.

Prints p50/p95/max and a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import bench_api  # noqa: E402  (the simulated registry and its reporting timer)
import browser  # noqa: E402
import cloudpickle  # noqa: E402
from browser import launch_chromium, start_lab, why_no_browser_tests  # noqa: E402
from conftest import start_portal  # noqa: E402

# The scheduler cannot import bench/: send these functions by value.
cloudpickle.register_pickle_by_value(bench_api)

FRAME_MS = 1000 / 60
DROPPED_MS = FRAME_MS * 1.5

# Runs before any of the page's scripts: time every message of the events websocket, and
# collect long tasks.
INIT_SCRIPT = r"""
(() => {
  const perf = (window.__gpPerf = { messages: [], renders: [], longtasks: [], sockets: 0 });
  const desc = Object.getOwnPropertyDescriptor(WebSocket.prototype, 'onmessage');
  Object.defineProperty(WebSocket.prototype, 'onmessage', {
    configurable: true,
    enumerable: desc.enumerable,
    get() {
      return desc.get.call(this);
    },
    set(fn) {
      if (typeof fn === 'function' && String(this.url).includes('/grid/api/events')) {
        perf.sockets++;
        const inner = fn;
        fn = function (event) {
          const t0 = performance.now();
          try {
            return inner.call(this, event);
          } finally {
            const head = typeof event.data === 'string' ? event.data.slice(0, 40) : '';
            const m = /"type"\s*:\s*"(\w+)"/.exec(head);
            perf.messages.push({
              start: t0,
              ms: performance.now() - t0,
              bytes: typeof event.data === 'string' ? event.data.length : 0,
              type: m ? m[1] : '?'
            });
          }
        };
      }
      desc.set.call(this, fn);
    }
  });
  try {
    new PerformanceObserver(list => {
      for (const e of list.getEntries()) {
        perf.longtasks.push({ start: e.startTime, ms: e.duration });
      }
    }).observe({ type: 'longtask', buffered: true });
  } catch (e) {
    perf.noLongtask = String(e);
  }
})();
"""

# Wrap the sidebar widget's render (called from its requestAnimationFrame callback).
WRAP_RENDER = r"""
() => {
  const perf = window.__gpPerf;
  const sidebar = Array.from(window.jupyterapp.shell.widgets('left')).find(
    w => w.id === 'grid-portal:sidebar'
  );
  if (!sidebar || typeof sidebar._render !== 'function') {
    return 'no sidebar render to wrap';
  }
  const render = sidebar._render;
  sidebar._render = function () {
    const t0 = performance.now();
    render.call(this);
    const rec = { start: t0, js: performance.now() - t0, frame: null, rows: 0 };
    rec.rows = document.querySelectorAll('.gp-node-row').length;
    perf.renders.push(rec);
    // Runs as the next task, after this frame's style, layout and paint.
    const channel = new MessageChannel();
    channel.port1.onmessage = () => {
      rec.frame = performance.now() - t0;
      channel.port1.close();
    };
    channel.port2.postMessage(0);
  };
  return 'ok';
}
"""

# rAF deltas over `frames` frames; scrolls the node list by `step` px each frame if step > 0.
FRAMES = r"""
({ frames, step }) => new Promise(resolve => {
  const list = document.querySelector('.gp-node-list');
  const deltas = [];
  let last = null;
  let n = 0;
  let dir = 1;
  const seen = new Set();
  const tick = t => {
    if (last !== null) deltas.push(t - last);
    last = t;
    if (step > 0) {
      const max = list.scrollHeight - list.clientHeight;
      let next = list.scrollTop + dir * step;
      if (next >= max) { next = max; dir = -1; }
      if (next <= 0) { next = 0; dir = 1; }
      list.scrollTop = next;
      for (const row of list.querySelectorAll('.gp-node-row')) seen.add(row.dataset.node);
    }
    if (++n <= frames) requestAnimationFrame(tick);
    else resolve({ deltas, rowsSeen: seen.size, scrollTop: list.scrollTop });
  };
  requestAnimationFrame(tick);
})
"""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    if not values:
        return "none"
    return (
        f"p50 {statistics.median(values):.1f} ms, p95 {pct(values, 0.95):.1f} ms, "
        f"max {max(values):.1f} ms (n={len(values)})"
    )


def frames_summary(deltas: list[float]) -> str:
    dropped = sum(1 for d in deltas if d > DROPPED_MS)
    return (
        f"{len(deltas)} frames, median {statistics.median(deltas):.1f} ms, "
        f"p95 {pct(deltas, 0.95):.1f} ms, max {max(deltas):.1f} ms, "
        f"{dropped} over {DROPPED_MS:.1f} ms"
    )


def renice(pid: int, value: int) -> None:
    """Renice a process and all its threads (the portal's Dask threads included)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, int(task.name), value)


def per_update(perf: dict[str, Any]) -> list[float]:
    """A ``nodes`` message's handler plus the frame of the first render after it."""
    renders = sorted(perf["renders"], key=lambda r: r["start"])
    out = []
    for msg in perf["messages"]:
        if msg["type"] != "nodes":
            continue
        after = next((r for r in renders if r["start"] >= msg["start"]), None)
        if after is None or after["frame"] is None:
            continue
        out.append(msg["ms"] + after["frame"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--every", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--scroll-frames", type=int, default=600)
    parser.add_argument("--scroll-step", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    parser.add_argument(
        "--labextension",
        type=Path,
        help="serve this build of the labextension instead of grid_portal/labextension "
        "(an older commit's, built in a git worktree, for a before/after comparison)",
    )
    args = parser.parse_args()

    if args.labextension is not None:
        browser.BUILT_EXTENSION = args.labextension.resolve()
    why = why_no_browser_tests()
    if why:
        sys.exit(f"cannot run: {why}")

    from grid_portal import Grid
    from grid_portal.node.probe import probe_static

    capacity = json.loads(json.dumps(dataclasses.asdict(probe_static())))
    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-sidebar-"))
    print(f"load average at start: {os.getloadavg()}", flush=True)
    portal = start_portal(tmp)
    renice(portal.process.pid, 10)
    lab = None
    grid = None
    rows: list[tuple[str, str]] = []
    try:
        grid = Grid(portal.connection_file, start_embedded=False)
        grid.client.run_on_scheduler(bench_api.fill_registry, args.nodes, capacity)
        lab = start_lab(tmp / "lab", portal.connection_file)
        grid.client.run_on_scheduler(bench_api.start_reporting, args.every)
        renice(portal.process.pid, 10)  # threads started since
        with launch_chromium() as chromium:
            context = chromium.new_context(viewport={"width": 1280, "height": 900})
            try:
                page = context.new_page()
                page.set_default_timeout(120_000)
                page.add_init_script(INIT_SCRIPT)
                page.goto(lab.url)
                page.locator('li[data-id="grid-portal:sidebar"]').click()
                page.wait_for_function(
                    "n => document.querySelector('.gp-node-count')?.textContent === `${n} nodes`",
                    arg=f"{args.nodes:,}".replace(",", ""),
                )
                print(page.evaluate(WRAP_RENDER), flush=True)
                page.wait_for_timeout(3000)  # settle after the snapshot
                page.evaluate(
                    "() => { const p = window.__gpPerf; p.messages = []; p.renders = [];"
                    " p.longtasks = []; }"
                )
                print(f"measuring updates for {args.seconds:g} s ...", flush=True)
                page.wait_for_timeout(args.seconds * 1000)
                updates = page.evaluate("() => window.__gpPerf")
                page.evaluate(
                    "() => { const p = window.__gpPerf; p.messages = []; p.renders = [];"
                    " p.longtasks = []; }"
                )
                print("frames: baseline, then scrolling ...", flush=True)
                baseline = page.evaluate(FRAMES, {"frames": args.scroll_frames, "step": 0})
                scrolling = page.evaluate(
                    FRAMES, {"frames": args.scroll_frames, "step": args.scroll_step}
                )
                during_scroll = page.evaluate("() => window.__gpPerf")
            finally:
                context.close()
        grid.client.run_on_scheduler(bench_api.stop_reporting)
    finally:
        if grid is not None:
            grid.close()
        if lab is not None:
            lab.stop()
        portal.stop()

    nodes_msgs = [m for m in updates["messages"] if m["type"] == "nodes"]
    renders = [r for r in updates["renders"] if r["frame"] is not None]
    node_updates = per_update(updates)
    rows += [
        (
            f"`nodes` deltas received in {args.seconds:g} s",
            f"{len(nodes_msgs)} ({len(nodes_msgs) / args.seconds:.1f}/s, median "
            f"{statistics.median([m['bytes'] for m in nodes_msgs]) / 1000:.0f} kB); all "
            f"messages {len(updates['messages'])}",
        ),
        (
            "message handler (parse, model, signal, status bar)",
            summary([m["ms"] for m in nodes_msgs]),
        ),
        ("sidebar render, JavaScript", summary([r["js"] for r in renders])),
        (
            "sidebar render, whole frame (style, layout, paint)",
            summary([r["frame"] for r in renders]),
        ),
        ("**per update: handler + its render's frame**", summary(node_updates)),
        (
            "long tasks (> 50 ms) during the updates",
            f"{len(updates['longtasks'])}"
            + (
                f", longest {max(t['ms'] for t in updates['longtasks']):.0f} ms"
                if updates["longtasks"]
                else ""
            ),
        ),
        ("rows in the DOM", f"{max((r['rows'] for r in renders), default=0)} at most"),
        ("frames, no scrolling (the machine's baseline)", frames_summary(baseline["deltas"])),
        (
            f"**frames while scrolling** {args.scroll_step} px per frame",
            frames_summary(scrolling["deltas"]) + f"; {scrolling['rowsSeen']} distinct rows shown",
        ),
        (
            "sidebar renders during both",
            summary([r["frame"] for r in during_scroll["renders"] if r["frame"] is not None]),
        ),
    ]
    print(f"load average at end: {os.getloadavg()}")
    print("\n| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "updates": updates,
                    "baseline": baseline,
                    "scrolling": scrolling,
                    "during_scroll": during_scroll,
                    "time": time.time(),
                }
            )
        )


if __name__ == "__main__":
    main()
