"""Task functions for tests/test_batching.py (importable on the test volunteers)."""

from __future__ import annotations

import time


class SweepError(Exception):
    """Not a builtin exception: a kernel that does not trust the node gets a RemoteError."""


def square_or_fail(i: int, bad: tuple[int, ...] = ()) -> int:
    if i in bad:
        raise ValueError(f"bad item {i}")
    return i * i


def custom_fail(i: int) -> int:
    if i == 3:
        raise SweepError(f"custom trouble at {i}")
    return i


def nap(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i
