"""One side of bench/bench_versions.py: a portal, a volunteer and a kernel of ONE checkout.

Run by bench_versions.py with the checkout's root first on PYTHONPATH and as the working
directory, so that this process, its portal and its volunteer all run that checkout's code.
It prints ``ready`` once the grid is up, then answers one command per line on stdin with one
JSON line on stdout:

- ``submit``: seconds for one ``Grid.submit(inc, i).result()``;
- ``cell``: seconds for one trivial ``%%grid`` cell (``x = 1``, brought back);
- ``map N``: seconds for ``Grid.map`` of N tiny tasks, gathered;
- ``quit``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def inc(x: int) -> int:
    return x + 1


def main() -> None:
    root = Path.cwd()
    sys.path.insert(0, str(root / "tests"))
    from conftest import start_portal, start_volunteer  # that checkout's own test helpers
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from grid_portal.notebook.magics import magics_for

    tmp = Path(tempfile.mkdtemp(prefix="grid-bench-side-"))
    portal = start_portal(tmp)
    try:
        start_volunteer(portal, tmp, "bench", "--cpus", "2", "--memory", "2GB")
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "grid_portal")
        with capture_output():
            shell.run_line_magic("grid", f"connect {portal.connection_file}")
        magics = magics_for(shell)
        assert magics is not None
        grid = magics.grid
        for i in range(20):  # warm up connections, caches and the node's processes
            grid.submit(inc, i).result()
            with capture_output():
                shell.run_cell_magic("grid", "", "x = 1")
        print("ready", flush=True)
        for i, line in enumerate(sys.stdin, start=1):
            command, *rest = line.split()
            started = time.perf_counter()
            if command == "submit":
                grid.submit(inc, i).result()
            elif command == "cell":
                with capture_output():
                    shell.run_cell_magic("grid", "", "x = 1")
                assert shell.user_ns["x"] == 1
            elif command == "map":
                grid.gather(grid.map(inc, range(int(rest[0]))))
            elif command == "quit":
                break
            print(json.dumps(time.perf_counter() - started), flush=True)
    finally:
        portal.stop()


if __name__ == "__main__":
    main()
