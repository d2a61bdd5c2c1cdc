"""grid_portal.proctree: a process's descendants and their memory, read from /proc."""

from __future__ import annotations

import subprocess
import sys

import psutil
from conftest import wait_for

from grid_portal.proctree import descendants, tree_rss

# A child that starts a grandchild holding 64 MB, then waits.
_PARENT = (
    "import subprocess, sys; "
    "subprocess.Popen([sys.executable, '-c', "
    '\'import sys, time; b = bytearray(64 << 20); sys.stdout.write("ready\\\\n"); '
    "sys.stdout.flush(); time.sleep(60)']).wait()"
)


def test_descendants_and_their_memory_match_psutil() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT])
    try:
        ps = psutil.Process(parent.pid)
        wait_for(lambda: ps.children(), timeout=30, what="the grandchild to start")
        (grandchild,) = ps.children()
        wait_for(
            lambda: grandchild.memory_info().rss > 64 << 20,
            timeout=30,
            what="the grandchild to take its memory",
        )
        assert descendants(parent.pid) == [grandchild.pid]
        expected = ps.memory_info().rss + grandchild.memory_info().rss
        assert abs(tree_rss(parent.pid) - expected) < 4 << 20
        assert tree_rss(parent.pid) > 64 << 20
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()
    assert descendants(parent.pid) == [] and tree_rss(parent.pid) == 0
