"""Parse and format sizes (``16GB``, ``512MiB``) and durations (``90s``, ``1h30m``).

Hand-written because the rules are ours: a clear message for every mistake, never ``eval``.
"""

from __future__ import annotations

import re

from grid_portal.errors import UsageError

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "p": 10**15,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """``"16GB"`` -> ``16_000_000_000`` bytes; plain numbers are bytes.

    >>> parse_size("1.5 GiB")
    1610612736
    """
    if isinstance(text, bool):
        raise UsageError(f"invalid size {text!r}: use a number of bytes or a size like 4GB")
    if isinstance(text, (int, float)):
        if text < 0:
            raise UsageError(f"invalid size {text!r}: a size cannot be negative")
        return int(text)
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UsageError(
            f"invalid size {text!r}: write a number and a unit, like 512MB, 4GB or 1.5GiB"
        )
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise UsageError(
            f"invalid size {text!r}: unknown unit {unit!r}; use B, KB, MB, GB, TB "
            "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    return int(float(number) * factor)


def format_size(n: float | None) -> str:
    """Bytes as a short human string: ``format_size(16e9) == "16.0 GB"``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | int | float) -> float:
    """``"90s"``, ``"1h30m"``, ``"2m"``, ``"500ms"`` or a plain number of seconds -> seconds."""
    if isinstance(text, bool):
        raise UsageError(f"invalid duration {text!r}: use seconds or a duration like 30s, 5m, 1h")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        raw = str(text).strip()
        try:
            seconds = float(raw)
        except ValueError:
            parts = _DURATION_PART.findall(raw)
            if not parts or "".join(f"{n}{u}" for n, u in parts) != raw.replace(" ", ""):
                raise UsageError(
                    f"invalid duration {text!r}: write it like 30s, 5m, 1h30m or 2d"
                ) from None
            seconds = sum(float(n) * _DURATION_FACTORS[u.lower()] for n, u in parts)
    if seconds < 0:
        raise UsageError(f"invalid duration {text!r}: a duration cannot be negative")
    return seconds


def format_duration(seconds: float | None) -> str:
    """``format_duration(3725) == "1h 2m"``; short and readable, for tables and status lines."""
    if seconds is None:
        return "-"
    s = max(0.0, float(seconds))
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(s), 60)
    if minutes < 60:
        return f"{minutes}m {sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


# -- as argparse types (the CLI and the magics share them) ------------------------------------
def size_arg(text: str) -> int:
    """``type=`` for an argparse option that takes a size: its error is argparse's own."""
    import argparse

    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def duration_arg(text: str) -> float:
    """``type=`` for an argparse option that takes a duration."""
    import argparse

    try:
        return parse_duration(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``counted(1, "task") == "1 task"``, ``counted(3, "task") == "3 tasks"``: messages
    read as sentences, not as "1 task(s)". ``plural`` for nouns that take more than an -s."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"
