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
