"""Task functions the tests send to real volunteers (importable there via PYTHONPATH)."""

from __future__ import annotations


def where_and_what(value: int, seconds: float = 0.0) -> tuple[str, int]:
    import time as _time

    from distributed import get_worker

    _time.sleep(seconds)
    return get_worker().name, value


def burn(seconds: float) -> str:
    import time as _time

    from distributed import get_worker

    end = _time.perf_counter() + seconds
    while _time.perf_counter() < end:
        pass
    return get_worker().name


def fail(message: str) -> None:
    raise ValueError(message)


# -- workflows, placement and fair share (issue 6) --------------------------------------------


def wf_seed(base: int) -> int:
    return base


def wf_simulate(i: int, seed: int) -> dict:
    from distributed import get_worker

    return {"i": i, "value": seed + i * i, "node": get_worker().name}


def wf_analyse(simulate: list) -> dict:
    values = [r["value"] for r in simulate]
    return {"values": values, "total": sum(values)}


def wf_timed(value: int, seconds: float = 0.0) -> dict:
    """Sleeps, then says where it ran and when (wall clock, the same machine in tests)."""
    import time as _time

    from distributed import get_worker

    start = _time.time()
    _time.sleep(seconds)
    return {"value": value, "node": get_worker().name, "start": start, "end": _time.time()}


def wf_where_ran(anywhere: list) -> dict:
    from distributed import get_worker

    return {"node": get_worker().name, "inputs": len(anywhere)}


def wf_offset(j: int, simulate: list) -> list:
    return [j * 100 + r["value"] for r in simulate]


# -- restarts, load and replicas (issue 8) ------------------------------------------------------


def slow_square(i: int, seconds: float = 0.0) -> int:
    import time as _time

    _time.sleep(seconds)
    return i * i


def total(slow: list) -> int:
    return sum(slow)


def honest_unless_liar(i: int) -> int:
    """``i * 10``, except on a node whose name starts with "liar" (a faulty or malicious node)."""
    from distributed import get_worker

    return i * 10 + (1 if str(get_worker().name).startswith("liar") else 0)


def plus_one(i: int) -> int:
    return i + 1


# -- pipelines (issue 16) -----------------------------------------------------------------------


def pipe_first(item: int, seconds: float = 0.0, size: int = 0) -> dict:
    """Stage 1 of an item: where it ran, and ``size`` bytes of payload for the next stage."""
    import time as _time

    from distributed import get_worker

    _time.sleep(seconds)
    return {"item": item, "path": [get_worker().name], "payload": b"x" * size}


def pipe_next(
    seconds: float = 0.0, fail_item: int = -1, fail_once: int = -1, mark: str = "", **inputs: dict
) -> dict:
    """A later stage: its one input is the item's previous stage's output. Item ``fail_item``
    always fails; item ``fail_once`` fails on its first try on a node and then works (a mark
    named by ``mark`` in the job's own TMPDIR on that node remembers the try)."""
    import os as _os
    import tempfile as _tempfile
    import time as _time

    from distributed import get_worker

    (previous,) = inputs.values()
    if previous["item"] == fail_item:
        raise ValueError(f"item {fail_item} is broken")
    if previous["item"] == fail_once:
        tried = _os.path.join(_tempfile.gettempdir(), f"pipe-tried-{mark}-{fail_once}")
        if not _os.path.exists(tried):
            open(tried, "w").close()
            raise ValueError(f"item {fail_once} failed its first try")
    _time.sleep(seconds)
    return {**previous, "path": [*previous["path"], get_worker().name]}


def two_stage_pipeline(name: str, items: int, seconds: float) -> dict:
    """A workflow spec: ``decode`` (pipe_first) over ``items``, then ``encode`` (pipe_next)
    of each item, each task taking ``seconds``."""
    return {
        "name": name,
        "stages": [
            {
                "name": "decode",
                "run": "gridtasks:pipe_first",
                "map": {"range": {"stop": items}, "as": "item"},
                "params": {"seconds": seconds},
            },
            {
                "name": "encode",
                "run": "gridtasks:pipe_next",
                "map": {"each": "decode"},
                "params": {"seconds": seconds},
            },
        ],
    }


def pipe_count(**inputs: list) -> int:
    (items,) = inputs.values()
    return len(items)


def pipe_work(work: float, speeds: dict, item: int | None = None, **inputs: dict) -> dict:
    """``work`` seconds at speed 1, slower or faster on this node (bench/bench_pipeline.py);
    returns the item's path so far: (node, start, end) per stage."""
    import time as _time

    from distributed import get_worker

    name = str(get_worker().name)
    previous = next(iter(inputs.values()), None)
    start = _time.time()
    _time.sleep(work / speeds.get(name, 1.0))
    step = (name, start, _time.time())
    if previous is None:
        return {"item": item, "path": [step]}
    return {"item": previous["item"], "path": [*previous["path"], step]}


def fib_evolving(n: int) -> int:
    """Dask's evolving-workflow example: a task that submits its own sub-tasks through
    get_client(), leaves its slot while it waits for them (secede) and comes back (rejoin)."""
    from distributed import get_client, rejoin, secede

    if n < 2:
        return n
    client = get_client()
    first, second = client.submit(fib_evolving, n - 1), client.submit(fib_evolving, n - 2)
    secede()
    a, b = client.gather([first, second])
    rejoin()
    return a + b


def hold_own_client(seconds: float) -> int:
    """A task that gets its job's own client (a delegated credential), uses it, and waits."""
    import time as _time

    from distributed import get_client

    value = get_client().submit(plus_one, 1).result()
    _time.sleep(seconds)
    return value


def read_task_credentials() -> list[str]:
    """What this task can read of other task processes' delegated keys (their memory files)."""
    import os as _os

    found = []
    for pid in filter(str.isdigit, _os.listdir("/proc")):
        try:
            fds = _os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if "grid-task-key" not in _os.readlink(f"/proc/{pid}/fd/{fd}"):
                    continue
                with open(f"/proc/{pid}/fd/{fd}") as key:
                    found.append(key.read())
            except OSError:
                continue
    return found
