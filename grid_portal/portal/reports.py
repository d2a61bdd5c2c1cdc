"""What a node reports, cleaned before the portal believes any of it.

A volunteer's worker tells the portal what its machine is once, when it registers
(``Worker.startup_information["grid"]``: capacity, offer, labels, sandbox level, benchmark),
and how it is doing in every heartbeat (``Worker.metrics["grid"]``: telemetry, the volunteer's
policy state and reason, the measured network). Anyone holding a node certificate can send
anything there, so the portal reads these reports only through this module:

- a report that is not a dict, is nested deeper than ``MAX_REPORT_DEPTH`` or is larger than
  ``MAX_REPORT_BYTES`` is dropped whole;
- every known field is type-checked and clamped: numbers must be finite and are clamped to
  sane ranges (negative counts become 0, a million cores becomes ``MAX_CORES``), strings are
  cut short and keep printable characters only, lists and dicts are bounded, enumerations
  (sandbox level, policy state) outside their values become None;
- unknown fields are dropped, so nothing the portal does not understand reaches the registry,
  the API, the sidebar or the status page.

Each function returns the cleaned value and a list of problems (short, made of our own words
and field names, never of the node's text) for one log line. ``NodeReports`` is the portal's
use of them: problems logged at most once per node per interval, heartbeats cleaned once each.

Plain code rather than a JSON Schema: every value has to be *clamped*, not only checked, and
the checks must cost microseconds per heartbeat with thousands of nodes. No Dask import.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from itertools import islice
from typing import Any

from grid_portal.benchmark import BENCHMARK_FIELD, MAX_SCORE, MIN_SCORE
from grid_portal.protocol import (
    MAX_GPUS,
    MAX_LABEL_LENGTH,
    MAX_LABELS,
    MAX_PACKAGES,
    MAX_REASON_LENGTH,
    MAX_REPORT_BYTES,
    MAX_REPORT_DEPTH,
    MAX_REPORT_TEXT,
    NODE_POLICY_STATES,
    SANDBOX_LEVELS,
)

# Sane maxima: beyond any machine a volunteer could lend, small enough that sums over 10,000
# nodes stay exact and every face can print them.
MAX_CORES = 4096
MAX_MEMORY = 2**50  # 1 PiB
MAX_DISK = 2**60
MAX_GPU_MEMORY = 2**44  # 16 TiB
MAX_GPU_INDEX = 1023
MAX_FREQ_MHZ = 100_000.0
MAX_BANDWIDTH = 1e12  # bytes/s
MAX_RTT = 3600.0  # s
MAX_TIME = 32503680000.0  # year 3000
MAX_CLOCK_SKEW = 86400.0  # a heartbeat's time may be at most this far ahead of the portal's
MAX_RUNNING_TASKS = 1_000_000
MAX_TEMPERATURE = 200.0
MIN_TEMPERATURE = -100.0
MAX_PROBLEMS = 12  # per report, in one log line
SHORT_TEXT = 64  # OS, architecture, versions

_CAPABILITY = re.compile(r"\d{1,3}(\.\d{1,3}){0,2}")
_MISSING = object()


class _Problems(list):
    """The problems found in one report, bounded: the rest are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.more = 0

    def add(self, text: str) -> None:
        if len(self) < MAX_PROBLEMS:
            self.append(text)
        else:
            self.more += 1

    def done(self) -> list[str]:
        out = list(self)
        if self.more:
            out.append(f"and {self.more} more")
        return out


def _kind(value: Any) -> str:
    return "missing" if value is _MISSING else type(value).__name__


# -- scalars -----------------------------------------------------------------------------------
def _absent(value: Any, where: str, problems: _Problems, required: bool) -> bool:
    """Whether the field is missing or None (a problem only when it is ``required``)."""
    if value is not _MISSING and value is not None:
        return False
    if required:
        problems.add(f"{where}: missing")
    return True


def _number(
    value: Any,
    where: str,
    problems: _Problems,
    lo: float,
    hi: float,
    *,
    integer: bool = False,
    default: Any = None,
    required: bool = False,
) -> Any:
    """A finite number clamped to [lo, hi] (an int when ``integer``), else ``default``.

    Missing or None is quietly ``default`` unless the field is ``required``."""
    if _absent(value, where, problems, required):
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(f"{where}: {_kind(value)}, not a number")
        return default
    if isinstance(value, float) and not math.isfinite(value):
        problems.add(f"{where}: not finite")
        return default
    if value < lo:
        problems.add(f"{where}: below {lo}, clamped")
        value = lo
    elif value > hi:
        problems.add(f"{where}: above {hi}, clamped")
        value = hi
    return int(value) if integer else float(value)


def clean_text(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, printable ones only (no control, format or
    separator characters but the plain space: no terminal escapes, no bidi overrides)."""
    head = value[: limit * 4]
    if not head.isprintable():
        head = "".join(ch for ch in head if ch.isprintable())
    return head[:limit].strip()


def _text(
    value: Any,
    where: str,
    problems: _Problems,
    limit: int = MAX_REPORT_TEXT,
    *,
    default: Any = None,
    required: bool = False,
) -> Any:
    if _absent(value, where, problems, required):
        return default
    if not isinstance(value, str):
        problems.add(f"{where}: {_kind(value)}, not text")
        return default
    cleaned = clean_text(value, limit)
    if len(value) > limit:
        problems.add(f"{where}: longer than {limit} characters, cut")
    elif len(cleaned) != len(value.strip()):
        problems.add(f"{where}: unprintable characters removed")
    return cleaned


def _choice(value: Any, where: str, problems: _Problems, choices: tuple[Any, ...]) -> Any:
    if value is _MISSING or value is None:
        return None
    if isinstance(value, str) and value in choices:
        return value
    problems.add(f"{where}: {_kind(value)} not one of {', '.join(str(c) for c in choices)}")
    return None


def _dict(value: Any, where: str, problems: _Problems) -> dict[Any, Any] | None:
    if value is _MISSING or value is None:
        return None
    if not isinstance(value, dict):
        problems.add(f"{where}: {_kind(value)}, not a mapping")
        return None
    return value


def _list(value: Any, where: str, problems: _Problems, limit: int) -> list[Any]:
    if value is _MISSING or value is None:
        return []
    if not isinstance(value, (list, tuple)):
        problems.add(f"{where}: {_kind(value)}, not a list")
        return []
    if len(value) > limit:
        problems.add(f"{where}: more than {limit} entries, cut")
    return list(value[:limit])


def _text_map(
    value: Any, where: str, problems: _Problems, max_items: int, key_limit: int, value_limit: int
) -> dict[str, str]:
    """A bounded dict of short, non-empty, printable text to short printable text."""
    data = _dict(value, where, problems)
    if data is None:
        return {}
    if len(data) > max_items:
        problems.add(f"{where}: more than {max_items} entries, cut")
    out: dict[str, str] = {}
    dropped = 0
    for k, v in islice(data.items(), max_items):
        if not isinstance(k, str) or not isinstance(v, str):
            dropped += 1
            continue
        key = clean_text(k, key_limit)
        if not key:
            dropped += 1
            continue
        if len(k) > key_limit or len(v) > value_limit:
            problems.add(f"{where}: an entry longer than {max(key_limit, value_limit)}, cut")
        out[key] = clean_text(v, value_limit)
    if dropped:
        problems.add(f"{where}: {dropped} entries that are not text dropped")
    return out


# -- size ----------------------------------------------------------------------------------------
def report_problem(report: Any, limit: int = MAX_REPORT_BYTES) -> str | None:
    """Why a raw report is unusable as a whole (not a dict, too deep, too large), or None.

    The size is JSON's, estimated without encoding and cut short once over ``limit``, so a
    10 MB string or a million-entry dict costs no more than a ``limit``-sized one."""
    if not isinstance(report, dict):
        return f"{_kind(report)}, not a mapping"
    budget = limit
    stack: list[tuple[Any, int]] = [(report, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_REPORT_DEPTH:
            return f"nested deeper than {MAX_REPORT_DEPTH}"
        if isinstance(item, str):
            budget -= len(item) + 2
        elif isinstance(item, (bytes, bytearray, memoryview)):
            budget -= len(item) * 2 + 2  # as hex or escapes; no honest report has bytes
        elif isinstance(item, dict):
            budget -= 2 + 2 * len(item)
            if budget >= 0:
                for k, v in item.items():
                    stack.append((k, depth + 1))
                    stack.append((v, depth + 1))
        elif isinstance(item, (list, tuple, set, frozenset)):
            budget -= 2 + len(item)
            if budget >= 0:
                stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, bool) or item is None:
            budget -= 5
        elif isinstance(item, int):
            budget -= 2 + item.bit_length() * 3 // 10  # about its decimal digits
        else:
            budget -= 24
        if budget < 0:
            return f"larger than {limit} bytes"
    return None


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` as JSON (UTF-8); the bound every cleaned report stays within."""
    return len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode())


def _bounded(cleaned: dict[str, Any], problems: _Problems) -> dict[str, Any] | None:
    # Cleaning only cuts, but text measured in characters can grow in UTF-8 bytes: check.
    try:
        size = encoded_size(cleaned)
    except (TypeError, ValueError):  # cannot happen for our own output; never trust it
        problems.add("cleaned report not encodable")
        return None
    if size > MAX_REPORT_BYTES:
        problems.add(f"larger than {MAX_REPORT_BYTES} bytes once cleaned")
        return None
    return cleaned


# -- the startup report -------------------------------------------------------------------------
def _network(value: Any, where: str, problems: _Problems) -> dict[str, float | None] | None:
    data = _dict(value, where, problems)
    if data is None:
        return None
    return {
        "bandwidth": _number(
            data.get("bandwidth"), f"{where}.bandwidth", problems, 0.0, MAX_BANDWIDTH
        ),
        "rtt": _number(data.get("rtt"), f"{where}.rtt", problems, 0.0, MAX_RTT),
        "measured_at": _number(
            data.get("measured_at"), f"{where}.measured_at", problems, 0.0, MAX_TIME
        ),
    }


def _gpu_index(data: dict[str, Any], where: str, problems: _Problems) -> Any:
    """A GPU's NVML index, which startup reports and heartbeats both carry; None if unusable."""
    return _number(
        data.get("index", _MISSING),
        f"{where}.index",
        problems,
        0,
        MAX_GPU_INDEX,
        integer=True,
        required=True,
    )


def _gpu_info(value: Any, where: str, problems: _Problems) -> dict[str, Any] | None:
    data = _dict(value, where, problems)
    if data is None:
        return None
    index = _gpu_index(data, where, problems)
    if index is None:
        return None
    capability = _text(data.get("capability"), f"{where}.capability", problems, 16)
    if capability is not None and not _CAPABILITY.fullmatch(capability):
        problems.add(f"{where}.capability: not a version")
        capability = None
    return {
        "index": index,
        "name": _text(data.get("name"), f"{where}.name", problems) or f"GPU {index}",
        "memory_total": _number(
            data.get("memory_total"),
            f"{where}.memory_total",
            problems,
            0,
            MAX_GPU_MEMORY,
            integer=True,
            default=0,
        ),
        "capability": capability,
        "driver": _text(data.get("driver"), f"{where}.driver", problems, SHORT_TEXT),
        "uuid": _text(data.get("uuid"), f"{where}.uuid", problems, SHORT_TEXT * 2),
    }


def _unique_by_index(items: list[dict[str, Any] | None], where: str, problems: _Problems) -> list:
    out, seen = [], set()
    for item in items:
        if item is None:
            continue
        if item["index"] in seen:
            problems.add(f"{where}: index {item['index']} listed twice")
            continue
        seen.add(item["index"])
        out.append(item)
    return out


def _capacity(value: Any, problems: _Problems) -> dict[str, Any]:
    data = _dict(value, "capacity", problems)
    if data is None:
        return {}
    p = problems
    gpus = [
        _gpu_info(g, f"capacity.gpus[{i}]", p)
        for i, g in enumerate(_list(data.get("gpus"), "capacity.gpus", p, MAX_GPUS))
    ]
    out: dict[str, Any] = {
        "cpu_model": _text(data.get("cpu_model"), "capacity.cpu_model", p, default=""),
        "cores_physical": _number(
            data.get("cores_physical"), "capacity.cores_physical", p, 1, MAX_CORES, integer=True
        ),
        "cores_logical": _number(
            data.get("cores_logical"),
            "capacity.cores_logical",
            p,
            1,
            MAX_CORES,
            integer=True,
            default=1,
        ),
        "cpu_freq_mhz": _number(
            data.get("cpu_freq_mhz"), "capacity.cpu_freq_mhz", p, 0.0, MAX_FREQ_MHZ
        ),
        "memory_total": _number(
            data.get("memory_total"),
            "capacity.memory_total",
            p,
            0,
            MAX_MEMORY,
            integer=True,
            default=0,
        ),
        "disk_free": _number(
            data.get("disk_free"), "capacity.disk_free", p, 0, MAX_DISK, integer=True
        ),
        "os": _text(data.get("os"), "capacity.os", p, SHORT_TEXT, default=""),
        "os_release": _text(data.get("os_release"), "capacity.os_release", p, default=""),
        "arch": _text(data.get("arch"), "capacity.arch", p, SHORT_TEXT, default=""),
        "python": _text(data.get("python"), "capacity.python", p, SHORT_TEXT, default=""),
        "gpus": _unique_by_index(gpus, "capacity.gpus", p),
        "network": _network(data.get("network"), "capacity.network", p)
        or {"bandwidth": None, "rtt": None, "measured_at": None},
        "packages": _text_map(
            data.get("packages"), "capacity.packages", p, MAX_PACKAGES, SHORT_TEXT, SHORT_TEXT
        ),
    }
    if data.get(BENCHMARK_FIELD) is not None:
        score = _number(
            data[BENCHMARK_FIELD], f"capacity.{BENCHMARK_FIELD}", p, MIN_SCORE, MAX_SCORE
        )
        if score is not None:
            out[BENCHMARK_FIELD] = score
    return out


def _offer(value: Any, problems: _Problems) -> dict[str, Any] | None:
    """What the node lends, or None (the portal then uses Dask's own thread and memory
    counts): an offer without its CPUs or memory is no offer."""
    data = _dict(value, "offer", problems)
    if data is None:
        return None
    cpus = _number(
        data.get("cpus", _MISSING),
        "offer.cpus",
        problems,
        0,
        MAX_CORES,
        integer=True,
        required=True,
    )
    memory = _number(
        data.get("memory", _MISSING),
        "offer.memory",
        problems,
        0,
        MAX_MEMORY,
        integer=True,
        required=True,
    )
    if cpus is None or memory is None:
        problems.add("offer: dropped")
        return None
    gpus: list[int] = []
    for i, g in enumerate(_list(data.get("gpus"), "offer.gpus", problems, MAX_GPUS)):
        index = _number(g, f"offer.gpus[{i}]", problems, 0, MAX_GPU_INDEX, integer=True)
        if index is not None and index not in gpus:
            gpus.append(index)
    return {"cpus": cpus, "memory": memory, "gpus": gpus}


def clean_startup(info: Any) -> tuple[dict[str, Any], list[str]]:
    """A node's startup report as the registry may store it, and the problems found.

    The result has ``capacity`` (every ``StaticCapacity`` field, plus the benchmark score when
    reported), ``labels`` and ``sandbox``, and ``offer`` only when the node sent a usable one.
    No report at all (None) is ``{}`` with no problem: a plain worker has none."""
    problems = _Problems()
    if info is None:
        return {}, []
    whole = report_problem(info)
    if whole is not None:
        problems.add(f"report dropped: {whole}")
        return {}, problems.done()
    out: dict[str, Any] = {
        "capacity": _capacity(info.get("capacity"), problems),
        "labels": _text_map(
            info.get("labels"), "labels", problems, MAX_LABELS, MAX_LABEL_LENGTH, MAX_LABEL_LENGTH
        ),
        "sandbox": _choice(info.get("sandbox"), "sandbox", problems, SANDBOX_LEVELS),
    }
    offer = _offer(info.get("offer"), problems)
    if offer is not None:
        out["offer"] = offer
    bounded = _bounded(out, problems)
    return (bounded if bounded is not None else {}), problems.done()


# -- a heartbeat's metrics ----------------------------------------------------------------------
def _gpu_telemetry(value: Any, where: str, problems: _Problems) -> dict[str, Any] | None:
    data = _dict(value, where, problems)
    if data is None:
        return None
    index = _gpu_index(data, where, problems)
    if index is None:
        return None
    return {
        "index": index,
        "utilization": _number(
            data.get("utilization"), f"{where}.utilization", problems, 0.0, 100.0
        ),
        "memory_used": _number(
            data.get("memory_used"),
            f"{where}.memory_used",
            problems,
            0,
            MAX_GPU_MEMORY,
            integer=True,
        ),
        "temperature": _number(
            data.get("temperature"),
            f"{where}.temperature",
            problems,
            MIN_TEMPERATURE,
            MAX_TEMPERATURE,
        ),
    }


def _policy(value: Any, problems: _Problems) -> dict[str, str | None]:
    data = _dict(value, "policy", problems)
    if data is None:
        return {"state": None, "reason": None}
    return {
        "state": _choice(data.get("state"), "policy.state", problems, NODE_POLICY_STATES[1:]),
        "reason": _text(data.get("reason"), "policy.reason", problems, MAX_REASON_LENGTH),
    }


def _only_time_moved(raw: Any, before: Any) -> float | None:
    """The time of ``raw`` if it is a valid one and the rest of ``raw`` equals ``before`` (a
    report cleaned already), else None. Comparing stops at the first difference, and the
    depth and size of what is compared are ``before``'s, which passed ``report_problem``."""
    if not isinstance(raw, dict) or not isinstance(before, dict) or raw.keys() != before.keys():
        return None
    moment = raw.get("time")
    if type(moment) not in (int, float) or not 0.0 < moment <= time.time() + MAX_CLOCK_SKEW:
        return None  # NaN and infinities fail the comparison too
    for key, value in raw.items():
        if key != "time" and value != before[key]:
            return None
    return float(moment)


def clean_metrics(
    metrics: Any, now: float | None = None
) -> tuple[dict[str, Any] | None, list[str]]:
    """One heartbeat's grid metrics as the registry may store them, and the problems found.

    None when there is nothing usable (no metrics, not a dict, too large or too deep). A dict
    always has every ``Telemetry`` field (missing ones as 0, ``time`` as ``now``), ``gpus``,
    and ``policy`` as ``{"state": None | "paused" | "draining", "reason": str | None}``;
    ``network`` only when the node measured it, ``grid_memory_used`` only when sent."""
    problems = _Problems()
    if metrics is None:
        return None, []
    whole = report_problem(metrics)
    if whole is not None:
        problems.add(f"heartbeat dropped: {whole}")
        return None, problems.done()
    now = time.time() if now is None else float(now)
    p = problems
    m = metrics.get
    gpus = [
        _gpu_telemetry(g, f"gpus[{i}]", p)
        for i, g in enumerate(_list(m("gpus"), "gpus", p, MAX_GPUS))
    ]
    out: dict[str, Any] = {
        "time": _number(
            m("time", _MISSING), "time", p, 0.0, now + MAX_CLOCK_SKEW, default=now, required=True
        ),
        "cpu_percent": _number(
            m("cpu_percent", _MISSING), "cpu_percent", p, 0.0, 100.0, default=0.0, required=True
        ),
        "grid_cpu_percent": _number(
            m("grid_cpu_percent", _MISSING),
            "grid_cpu_percent",
            p,
            0.0,
            100.0 * MAX_CORES,
            default=0.0,
            required=True,
        ),
        "memory_used": _number(
            m("memory_used", _MISSING),
            "memory_used",
            p,
            0,
            MAX_MEMORY,
            integer=True,
            default=0,
            required=True,
        ),
        "memory_percent": _number(
            m("memory_percent", _MISSING),
            "memory_percent",
            p,
            0.0,
            100.0,
            default=0.0,
            required=True,
        ),
        "running_tasks": _number(
            m("running_tasks"), "running_tasks", p, 0, MAX_RUNNING_TASKS, integer=True, default=0
        ),
        "gpus": _unique_by_index(gpus, "gpus", p),
        "policy": _policy(m("policy"), p),
    }
    network = _network(m("network"), "network", p)
    if network is not None and any(v is not None for v in network.values()):
        out["network"] = network
    # What this portal received from the node (a volunteer may serve several portals).
    out["tasks_received"] = _number(
        m("tasks_received"), "tasks_received", p, 0, 2**53, integer=True, default=0
    )
    out["core_seconds_received"] = _number(
        m("core_seconds_received"), "core_seconds_received", p, 0.0, 1e15, default=0.0
    )
    if m("grid_memory_used") is not None:
        out["grid_memory_used"] = _number(
            m("grid_memory_used"), "grid_memory_used", p, 0, MAX_MEMORY, integer=True, default=0
        )
    return _bounded(out, problems), problems.done()


# -- the portal's use of them -------------------------------------------------------------------
class NodeReports:
    """Cleans each node's reports for the portal plugin; logs problems, each node at most once
    per ``log_interval`` seconds (a hostile node must not flood the portal's log).

    A heartbeat's metrics are cleaned once: Dask replaces ``WorkerState.metrics`` with a new
    dict at every heartbeat, so the raw dict last cleaned for an address (held, so its identity
    cannot be reused) says whether the cached result still holds. Addresses not read for
    ``forget_after`` seconds are forgotten, so departed nodes leave nothing behind.
    """

    def __init__(
        self,
        log: logging.Logger,
        log_interval: float = 600.0,
        forget_after: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.log_interval = log_interval
        self.forget_after = forget_after
        self.clock = clock
        self._logged: dict[tuple[str, str], float] = {}  # (node, what) -> when last logged
        self._metrics: dict[str, tuple[Any, dict[str, Any] | None, float]] = {}
        self._swept = clock()

    def startup(self, name: str, info: Any) -> dict[str, Any]:
        cleaned, problems = clean_startup(info)
        if problems:
            self._warn(name, "startup report", problems)
        return cleaned

    def metrics(self, name: str, address: str, raw: Any) -> dict[str, Any] | None:
        now = self.clock()
        cached = self._metrics.get(address)
        if cached is not None and cached[0] is raw:
            self._metrics[address] = (raw, cached[1], now)
            cleaned = cached[1]
        elif (
            cached is not None
            and cached[1] is not None
            and (moved := _only_time_moved(raw, cached[0]))
        ):
            # An idle node's heartbeats differ only in their time; clean that alone (an idle
            # grid of hundreds of nodes would otherwise cost the portal a share of a core).
            cleaned = {**cached[1], "time": moved}
            self._metrics[address] = (raw, cleaned, now)
        else:
            cleaned, problems = clean_metrics(raw)
            self._metrics[address] = (raw, cleaned, now)
            if problems:
                self._warn(name, "heartbeat", problems)
        if now - self._swept > self.forget_after / 10:
            self._sweep(now)
        return cleaned

    def _warn(self, name: str, what: str, problems: list[str]) -> None:
        now = self.clock()
        last = self._logged.get((name, what))
        if last is not None and now - last < self.log_interval:
            return
        self._logged[(name, what)] = now
        self.log.warning(
            "node %s sent a bad %s (%s); ignored what was wrong (logged once per %.0f s)",
            clean_text(name, 64),
            what,
            "; ".join(problems),
            self.log_interval,
        )

    def _sweep(self, now: float) -> None:
        self._swept = now
        for address, (_, _, used) in list(self._metrics.items()):
            if now - used > self.forget_after:
                del self._metrics[address]
        for key, last in list(self._logged.items()):
            if now - last > self.log_interval:
                del self._logged[key]


__all__ = [
    "NodeReports",
    "clean_metrics",
    "clean_startup",
    "clean_text",
    "encoded_size",
    "report_problem",
]
