"""What a notebook shows while grid work runs: a live status line, a progress bar, the live
capacity table, and job tables.

Each view has three renderings, picked by :func:`frontend`:
- ``"kernel"`` (JupyterLab, Notebook 7, anything speaking the Jupyter protocol): HTML outputs
  updated in place through display ids, and ipywidgets where they are installed;
- ``"terminal"`` (IPython in a terminal): one line on stderr rewritten with ``\\r``;
- ``"plain"`` (no tty, tests, scripts): nothing live, only what the caller prints.
"""

from __future__ import annotations

import html
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from grid_portal.model import Job, Node, NodeState
from grid_portal.units import format_duration, format_size

_STATE_COLOUR = {
    NodeState.ONLINE: "#2e7d32",
    NodeState.BUSY: "#0277bd",
    NodeState.PAUSED: "#b28704",
    NodeState.DRAINING: "#8e24aa",
    NodeState.OFFLINE: "#9e9e9e",
}


def frontend(shell: Any) -> str:
    """ "kernel", "terminal" or "plain" (see the module docstring)."""
    if shell is not None and getattr(shell, "kernel", None) is not None:
        return "kernel"
    stream = sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        return "terminal"
    return "plain"


def have_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def show_widget(widget: Any, text: str) -> None:
    """Display a widget with ``text`` as what viewers without widgets (nbconvert, GitHub) show
    instead of the widget's repr."""
    from IPython.display import display

    data = dict(widget._repr_mimebundle_() or {})
    data["text/plain"] = text
    display(data, raw=True)


def _display(data: dict[str, Any], display_id: str | None = None, update: bool = False) -> None:
    from IPython.display import display, update_display

    if update:
        update_display(data, raw=True, display_id=display_id)
    else:
        display(data, raw=True, display_id=display_id)


# -- the live status line of a running cell --------------------------------------------------
def _line_data(text: str) -> dict[str, str]:
    return {
        "text/plain": text,
        "text/html": "<div style='font-family:monospace;font-size:90%;opacity:.8'>"
        f"{html.escape(text)}</div>",
    }


class RunStatus:
    """One line that follows a cell: queued, then running on NODE, then done in T s.

    A --map sweep gets a progress bar instead (ipywidgets when available, else text).
    Updates are throttled: a state change shows at once, the ticking clock at most every 0.5 s.
    """

    def __init__(self, mode: str, job_id: str, total: int = 1) -> None:
        self.mode = mode
        self.job_id = job_id
        self.total = total
        self.done = 0
        self.failed = 0
        self.nodes: list[str] = []
        self.begun = time.monotonic()
        self.running_since: float | None = None
        self.final: str | None = None
        self._last_draw = 0.0
        self._display_id = f"grid-status-{uuid.uuid4().hex}"
        self._bar: Any = None
        self._label: Any = None
        if mode == "kernel" and total > 1 and have_widgets():
            import ipywidgets

            self._bar = ipywidgets.IntProgress(min=0, max=total, value=0)
            self._label = ipywidgets.HTML()
            show_widget(ipywidgets.HBox([self._bar, self._label]), f"{total} runs (job {job_id})")
        self._draw(force=True, first=True)

    # events ----------------------------------------------------------------------------------
    def started(self, node: str) -> None:
        if self.running_since is None:
            self.running_since = time.monotonic()
        if node not in self.nodes:
            self.nodes.append(node)
        self._draw(force=True)

    def finished(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        self._draw(force=True)

    def tick(self) -> None:
        self._draw()

    def close(self, text: str, ok: bool = True) -> None:
        self.final = ("✓ " if ok else "✗ ") + text
        if self.mode == "kernel" and self._bar is None:
            # The live line stood above the cell's output while it ran; the verdict goes after
            # the output, where a reader looks last (as %%time's does), and the live line goes.
            _display({"text/plain": ""}, self._display_id, update=True)
            _display(_line_data(self.final))
            return
        self._draw(force=True)
        if self.mode == "terminal":
            sys.stderr.write("\n")
            sys.stderr.flush()

    # drawing ---------------------------------------------------------------------------------
    def text(self) -> str:
        if self.final is not None:
            return self.final
        where = ", ".join(self.nodes[:3]) + (" …" if len(self.nodes) > 3 else "")
        if self.total > 1:
            state = f"{self.done}/{self.total} done"
            if self.failed:
                state += f", {self.failed} failed"
            if where:
                state += f" on {where}"
        elif self.running_since is None:
            state = "queued"
        else:
            state = f"running on {where}"
        clock = format_duration(time.monotonic() - self.begun)
        return f"⏳ {state} · {clock} (job {self.job_id})"

    def _draw(self, force: bool = False, first: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.5:
            return
        self._last_draw = now
        text = self.text()
        if self.mode == "kernel":
            if self._bar is not None:
                self._bar.value = self.done
                self._bar.bar_style = (
                    "danger" if self.failed else ("success" if self.final is not None else "")
                )
                self._label.value = (
                    f"<span style='font-family:monospace'>{html.escape(text)}</span>"
                )
                return
            _display(_line_data(text), self._display_id, update=not first)
        elif self.mode == "terminal":
            bar = ""
            if self.total > 1:
                filled = int(20 * self.done / self.total)
                bar = "[" + "#" * filled + "." * (20 - filled) + "] "
            sys.stderr.write(f"\r{bar}{text}\x1b[K")
            sys.stderr.flush()


# -- the live capacity table -------------------------------------------------------------------
def node_rows(nodes: Sequence[Node]) -> list[list[str]]:
    rows = []
    now = time.time()
    for n in sorted(nodes, key=lambda n: (not n.online, n.name)):
        t = n.telemetry
        state = n.state.value
        if n.reason and n.state is not NodeState.BUSY:
            state += f": {n.reason}"
        if n.state is NodeState.OFFLINE and n.last_seen:
            state = f"offline, seen {format_duration(now - n.last_seen)} ago"
        gpus = ", ".join(g.name for g in n.capacity.gpus if g.index in n.offer.gpus) or "-"
        rows.append(
            [
                n.name,
                state,
                f"{n.cpus_in_use:g}/{n.offer.cpus}",
                "-" if t is None else f"{t.cpu_percent:.0f}%",
                format_size(n.offer.memory),
                gpus,
                "-" if t is None else str(t.running_tasks),
                " ".join(f"{k}={v}" for k, v in n.labels.items()) or "-",
            ]
        )
    return rows


NODE_HEADERS = ["node", "state", "CPUs used", "CPU load", "memory", "GPUs", "tasks", "labels"]


def html_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return (
        f"<div><b>{html.escape(title)}</b><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


def text_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def show_table(
    mode: str, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]
) -> None:
    text = text_table(title, headers, rows)
    if mode == "kernel":
        _display({"text/plain": text, "text/html": html_table(title, headers, rows)})
    else:
        print(text)


def nodes_title(nodes: Sequence[Node]) -> str:
    return f"{sum(n.online for n in nodes)} of {len(nodes)} nodes online"


class NodesView:
    """``%grid nodes`` in a notebook: a table that keeps itself up to date.

    A daemon thread long-polls the portal (``grid.changes``), so it costs nothing while nothing
    changes. It stops when :meth:`stop` is called (a newer view replaces it), when its widget
    is closed, or after ``lifetime`` seconds.
    """

    def __init__(self, grid: Any, lifetime: float = 3600.0) -> None:
        import ipywidgets

        self.grid = grid
        self.nodes: dict[str, Node] = {n.name: n for n in grid.nodes()}
        self.widget = ipywidgets.HTML(value=self.render())
        self.lifetime = lifetime
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="grid-nodes", daemon=True)

    def render(self, note: str = "") -> str:
        nodes = list(self.nodes.values())
        table = html_table(nodes_title(nodes), NODE_HEADERS, node_rows(nodes))
        return table + (f"<div style='opacity:.7'>{html.escape(note)}</div>" if note else "")

    def show(self) -> NodesView:
        nodes = list(self.nodes.values())
        show_widget(self.widget, text_table(nodes_title(nodes), NODE_HEADERS, node_rows(nodes)))
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        since = 0
        ends = time.monotonic() + self.lifetime
        while not self._stop.is_set() and time.monotonic() < ends:
            if getattr(self.widget, "comm", True) is None:
                return  # the widget was closed
            try:
                changes = self.grid.changes(since=since, timeout=10)
            except Exception:  # noqa: BLE001 - the portal went away: say so, try again
                self.widget.value = self.render("the portal is not answering; retrying")
                self._stop.wait(5)
                continue
            since = changes.get("version", since)
            for data in changes.get("nodes") or ():
                node = Node.from_dict(data)
                self.nodes[node.name] = node
            for name in changes.get("removed") or ():
                self.nodes.pop(name, None)
            if not self._stop.is_set():
                self.widget.value = self.render()
        self.widget.value = self.render("stopped updating: run %grid nodes again")


# -- jobs ----------------------------------------------------------------------------------------
JOB_HEADERS = ["job", "name", "state", "nodes", "submitted", "ran", "result kept", "error"]


def job_rows(jobs: Sequence[Job]) -> list[list[str]]:
    now = time.time()
    rows = []
    for j in jobs:
        error = (j.error or "").splitlines()[0][:60] if j.error else ""
        rows.append(
            [
                j.id,
                j.name[:40],
                j.state.value,
                ", ".join(j.nodes) or "-",
                f"{format_duration(now - j.submitted)} ago",
                format_duration(j.elapsed) if j.elapsed is not None else "-",
                "yes" if j.has_result else "-",
                error,
            ]
        )
    return rows
