"""The probe pattern: an argument whose unpickling writes a marker naming the process that
unpickled it, so a test sees where code would have run (it never runs anything else).

A sandboxed task may write only to its node's scratch dir, so a probe tries each of its
folders in turn and writes into the first it may.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_MARK = """
import os, uuid
for _d in {dirs!r}:
    try:
        os.makedirs(_d, exist_ok=True)
        with open(os.path.join(_d, "probe-%d-%s" % (os.getpid(), uuid.uuid4().hex)), "wb") as _f:
            _f.write(open("/proc/self/cmdline", "rb").read())
        break
    except OSError:
        pass
"""


class Probe:
    """Unpickling this writes a marker naming the process that unpickled it, into the first
    of ``dirs`` it may write."""

    def __init__(self, *dirs: Path | str) -> None:
        self.dirs = [str(d) for d in dirs]

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (_MARK.format(dirs=self.dirs),))


def probes_opened(*dirs: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every process that opened a probe, from every place it may have
    written."""
    found = []
    for d in dirs:
        if d.exists():
            for path in sorted(d.rglob("probe-*")):
                pid = int(path.name.split("-")[1])
                found.append((pid, path.read_bytes().replace(b"\0", b" ").decode().strip()))
    return found
