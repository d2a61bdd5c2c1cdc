"""The volunteer's rules: when may the grid use this machine?

Like BOINC's or Folding@home's preferences: run only when idle, only within some hours, not on
battery, not when hot, not while the owner's own programs need the CPU. The rules are pure
functions of an :class:`Observation` (time, owner load, battery, temperature, input idle), so
they are trivially testable; the only state is the little that grace periods need, held by
:class:`PolicyEngine` and passed in and out of :func:`evaluate` as a :class:`PolicyState` value.

Time comes only from ``Observation.now``, never from the system clock, so tests control it.
:func:`observe` is the one impure helper: it reads the real machine with psutil.

No Dask imports here: the node plugin applies decisions; this module only makes them.
See docs/volunteer-policy.md for the rules as a volunteer reads them.
"""

from __future__ import annotations

import calendar
import difflib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from grid_portal.errors import UsageError
from grid_portal.units import parse_duration, parse_size

# When idle-only is on but no desktop session tells us about keyboard and mouse, the owner counts
# as active while their own programs use more than this share of the machine's CPU.
IDLE_OWNER_LOAD = 10.0
# After a pause for heat, resume only this many degrees below the limit: pausing cools a machine
# within seconds, and without a margin it would flap between run and pause.
TEMPERATURE_RESUME_MARGIN = 5.0


def _suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _num(x: float) -> str:
    """92.0 -> '92', 85.5 -> '85.5': numbers in reasons shown as people write them."""
    return f"{round(float(x), 1):g}"


# ---------------------------------------------------------------------------------------------
# Hours
# ---------------------------------------------------------------------------------------------

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
_DAY_NAMES = {name: i for i, name in enumerate(_DAYS)}
_DAY_NAMES.update({calendar.day_name[i].lower(): i for i in range(7)})  # "monday", ...
_ALL_DAYS = frozenset(range(7))
_MINUTES_PER_DAY = 24 * 60


def _format_minute(m: int) -> str:
    return f"{m // 60:02d}:{m % 60:02d}"


def _format_days(days: frozenset[int]) -> str:
    """Days in week order, consecutive runs of three or more as ranges: 'mon-fri', 'sat,sun'."""
    parts: list[str] = []
    ordered = sorted(days)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{_DAYS[ordered[i]]}-{_DAYS[ordered[j]]}")
        else:
            parts.extend(_DAYS[d] for d in ordered[i : j + 1])
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class _Rule:
    """Time ranges on some days. A range whose end is before its start runs past midnight,
    into the next day: 'fri 18:00-08:00' allows Friday 18:00 to Saturday 08:00."""

    days: frozenset[int]
    ranges: tuple[tuple[int, int], ...]  # (start, end) in minutes after midnight; end <= 1440

    def allows(self, weekday: int, minute: int) -> bool:
        yesterday = (weekday - 1) % 7
        for start, end in self.ranges:
            if start < end:
                if weekday in self.days and start <= minute < end:
                    return True
            elif (weekday in self.days and minute >= start) or (
                yesterday in self.days and minute < end
            ):
                return True
        return False

    def __str__(self) -> str:
        ranges = ",".join(f"{_format_minute(s)}-{_format_minute(e)}" for s, e in self.ranges)
        if self.days == _ALL_DAYS:
            return ranges
        return f"{_format_days(self.days)} {ranges}"


@dataclass(frozen=True)
class Hours:
    """When the grid may run, in the machine's local wall-clock time.

    Syntax (see docs/volunteer-policy.md)::

        18:00-08:00                          every day; past midnight is fine
        12:00-13:00,18:00-23:59              several ranges
        mon-fri 18:00-08:00; sat,sun 00:00-24:00
                                             groups split by ';', each optionally led by days

    Ranges include their start and exclude their end, to the minute.
    """

    rules: tuple[_Rule, ...]

    @classmethod
    def parse(cls, text: str) -> Hours:
        if not isinstance(text, str):
            raise UsageError(
                f'invalid hours {text!r}: write them as text, like "mon-fri 18:00-08:00"'
            )
        rules = tuple(_parse_group(text, group) for group in text.split(";") if group.strip())
        if not rules:
            raise UsageError(
                f"invalid hours {text!r}: give at least one time range, like 18:00-08:00"
            )
        return cls(rules)

    def allows(self, dt: datetime) -> bool:
        """True when ``dt`` (its own wall clock, aware or naive) falls inside the hours."""
        minute = dt.hour * 60 + dt.minute
        return any(rule.allows(dt.weekday(), minute) for rule in self.rules)

    def __str__(self) -> str:
        return "; ".join(str(rule) for rule in self.rules)

    def __repr__(self) -> str:
        return f"Hours({str(self)!r})"


def _parse_group(text: str, group: str) -> _Rule:
    """One ';'-separated group: optional days, then comma-separated HH:MM-HH:MM ranges."""
    group = group.strip()
    first_digit = next((i for i, ch in enumerate(group) if ch.isdigit()), len(group))
    days_text, ranges_text = group[:first_digit].strip(), group[first_digit:].strip()
    if not ranges_text:
        raise UsageError(
            f"invalid hours {text!r}: {group!r} has no time range; write days then times, "
            f"like 'mon-fri 09:00-17:00' (00:00-24:00 for the whole day)"
        )
    days = _parse_days(text, days_text) if days_text else _ALL_DAYS
    ranges = sorted({_parse_range(text, piece) for piece in ranges_text.split(",")})
    return _Rule(days, tuple(ranges))


def _parse_days(text: str, days_text: str) -> frozenset[int]:
    days: set[int] = set()
    for token in days_text.replace(" ", "").lower().split(","):
        if not token:
            raise UsageError(
                f"invalid hours {text!r}: empty day in {days_text!r}; separate days with "
                "commas, like 'sat,sun'"
            )
        ends = token.split("-")
        if len(ends) > 2:
            raise UsageError(
                f"invalid hours {text!r}: {token!r} is not a day or a range of days; "
                "write one like 'mon-fri'"
            )
        indices = []
        for name in ends:
            if name not in _DAY_NAMES:
                raise UsageError(
                    f"invalid hours {text!r}: unknown day {name!r}{_suggest(name, _DAYS)}; "
                    f"use {', '.join(_DAYS)}, or a range like mon-fri"
                )
            indices.append(_DAY_NAMES[name])
        first, last = indices[0], indices[-1]
        # A range of days may wrap the week: fri-mon is fri, sat, sun, mon.
        days.update((first + k) % 7 for k in range((last - first) % 7 + 1))
    return frozenset(days)


def _parse_range(text: str, piece: str) -> tuple[int, int]:
    ends = [p.strip() for p in piece.split("-")]
    if len(ends) != 2:
        raise UsageError(
            f"invalid hours {text!r}: {piece.strip()!r} is not a time range; write "
            "HH:MM-HH:MM, like 18:00-08:00, with any days first: 'mon-fri 18:00-08:00'"
        )
    start, end = (_parse_time(text, e) for e in ends)
    if start == _MINUTES_PER_DAY:
        raise UsageError(f"invalid hours {text!r}: a range cannot start at 24:00; use 00:00")
    if start == end:
        raise UsageError(
            f"invalid hours {text!r}: range {piece.strip()!r} is empty; "
            "use 00:00-24:00 for the whole day"
        )
    return start, end


def _parse_time(text: str, token: str) -> int:
    hh, sep, mm = token.partition(":")
    if not sep or not (hh.isdigit() and 1 <= len(hh) <= 2) or not (mm.isdigit() and len(mm) == 2):
        raise UsageError(
            f"invalid hours {text!r}: {token!r} is not a time; write HH:MM, like 08:00"
        )
    hour, minute = int(hh), int(mm)
    if hour > 24:
        raise UsageError(f"invalid hours {text!r}: hour must be 0-24 (got {token!r})")
    if minute > 59:
        raise UsageError(f"invalid hours {text!r}: minute must be 0-59 (got {token!r})")
    if hour == 24 and minute:
        raise UsageError(f"invalid hours {text!r}: 24:00 is the latest time (got {token!r})")
    return hour * 60 + minute


# ---------------------------------------------------------------------------------------------
# Policy, observations, decisions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """What the volunteer allows. Every rule is off by default: a bare volunteer always runs."""

    idle_only: bool = False
    max_owner_load: float | None = None  # percent of the machine used by non-grid processes
    owner_load_grace: float = 30.0  # seconds the owner's load must stay over (under) the limit
    hours: Hours | None = None
    pause_on_battery: bool = False
    max_temperature: float | None = None  # degrees C
    idle_input_seconds: float = 300.0  # idle-only: keyboard and mouse untouched this long
    suspend_limit: float = 600.0  # paused longer than this: move tasks elsewhere

    def __post_init__(self) -> None:
        if self.max_owner_load is not None and not 1 <= self.max_owner_load <= 100:
            raise UsageError(
                f"invalid max_owner_load {_num(self.max_owner_load)}: give a percent from 1 to 100"
            )
        if self.max_temperature is not None and self.max_temperature <= 0:
            raise UsageError(
                f"invalid max_temperature {_num(self.max_temperature)}: give degrees C above 0, like 85"
            )
        for name in ("owner_load_grace", "idle_input_seconds", "suspend_limit"):
            if getattr(self, name) < 0:
                raise UsageError(f"invalid {name} {getattr(self, name)!r}: cannot be negative")
        if self.hours is not None and not isinstance(self.hours, Hours):
            raise UsageError(
                f"invalid hours {self.hours!r}: use Hours.parse(text) or policy_from_options"
            )


@dataclass(frozen=True)
class Observation:
    """One look at the machine. ``now`` is local wall-clock time, aware or naive."""

    now: datetime
    owner_load: float = 0.0  # percent of the whole machine's CPU used by non-grid processes
    battery_plugged: bool | None = None  # None: no battery (or unknown)
    battery_percent: float | None = None
    temperature: float | None = None  # hottest CPU sensor, degrees C; None: no sensor
    input_idle_seconds: float | None = None  # None: no desktop session known


@dataclass(frozen=True)
class Decision:
    action: Literal["run", "pause"]
    reason: str | None = None  # the first reason, short, for display
    move_tasks: bool = False  # paused past suspend_limit: move running tasks elsewhere
    reasons: tuple[str, ...] = ()  # every rule that currently says pause, in priority order


@dataclass(frozen=True)
class PolicyState:
    """What grace periods need to remember between observations. A plain value: evaluate()
    takes one and returns the next; nothing in here is read from a clock."""

    last_now: datetime | None = None
    owner_busy: bool = False  # max_owner_load rule, after its grace period
    owner_busy_pending: float | None = None  # seconds the load has disagreed with owner_busy
    owner_active: bool = False  # idle-only rule
    owner_active_pending: float | None = None  # same, for idle-only without a desktop session
    too_hot: bool = False
    paused_for: float | None = None  # seconds continuously paused; None while running


def _elapsed(prev: datetime | None, now: datetime) -> float:
    """Seconds from ``prev`` to ``now``, never negative.

    A clock that steps back (NTP, or naive local time when DST ends) counts as no time passing
    rather than undoing the time already counted towards a grace period.
    """
    if prev is None:
        return 0.0
    try:
        seconds = (now - prev).total_seconds()
    except TypeError:  # one aware, one naive: compare the wall clocks
        seconds = (now.replace(tzinfo=None) - prev.replace(tzinfo=None)).total_seconds()
    return max(0.0, seconds)


def _hysteresis(
    flag: bool, pending: float | None, want: bool, dt: float, grace: float
) -> tuple[bool, float | None]:
    """Follow ``want`` only once it has held for ``grace`` seconds; returns (flag, pending).

    ``pending`` counts from the first observation that disagreed with ``flag``: we cannot know
    when between two observations the change happened, so we assume the later moment.
    """
    if want == flag:
        return flag, None
    pending = 0.0 if pending is None else pending + dt
    if pending >= grace:
        return want, None
    return flag, pending


def evaluate(
    policy: Policy, obs: Observation, state: PolicyState | None = None
) -> tuple[Decision, PolicyState]:
    """Decide run or pause from one observation and the state left by the previous one.

    Pure: the same arguments always give the same answer. Every rule is evaluated on every
    call, even when an earlier one already pauses, so grace periods keep counting.
    """
    state = state or PolicyState()
    dt = _elapsed(state.last_now, obs.now)
    reasons: list[str] = []

    if policy.hours is not None and not policy.hours.allows(obs.now):
        reasons.append(f"outside hours {policy.hours}")

    if policy.pause_on_battery and obs.battery_plugged is False:
        reasons.append("on battery")

    too_hot = False
    if policy.max_temperature is not None and obs.temperature is not None:
        limit = policy.max_temperature
        if obs.temperature > limit:
            too_hot = True
            reasons.append(f"too hot ({_num(obs.temperature)}°C > {_num(limit)}°C)")
        elif state.too_hot and obs.temperature > limit - TEMPERATURE_RESUME_MARGIN:
            too_hot = True
            reasons.append(
                f"cooling down ({_num(obs.temperature)}°C, resumes at "
                f"{_num(limit - TEMPERATURE_RESUME_MARGIN)}°C)"
            )

    owner_active, active_pending = False, None
    if policy.idle_only:
        if obs.input_idle_seconds is not None:
            # Keyboard and mouse are the owner's own signal: pause at once when touched. The
            # idle time itself is the grace period for resuming.
            owner_active = obs.input_idle_seconds < policy.idle_input_seconds
        else:
            # No desktop session to ask: judge idleness by the owner's CPU use instead.
            owner_active, active_pending = _hysteresis(
                state.owner_active,
                state.owner_active_pending,
                obs.owner_load > IDLE_OWNER_LOAD,
                dt,
                policy.owner_load_grace,
            )
        if owner_active:
            reasons.append("owner active (idle-only)")

    owner_busy, busy_pending = False, None
    if policy.max_owner_load is not None:
        owner_busy, busy_pending = _hysteresis(
            state.owner_busy,
            state.owner_busy_pending,
            obs.owner_load > policy.max_owner_load,
            dt,
            policy.owner_load_grace,
        )
        if owner_busy:
            reasons.append("owner busy")

    if reasons:
        paused_for = 0.0 if state.paused_for is None else state.paused_for + dt
        decision = Decision(
            "pause",
            reasons[0],
            move_tasks=paused_for >= policy.suspend_limit,
            reasons=tuple(reasons),
        )
    else:
        paused_for = None
        decision = Decision("run")

    new_state = PolicyState(
        last_now=obs.now,
        owner_busy=owner_busy,
        owner_busy_pending=busy_pending,
        owner_active=owner_active,
        owner_active_pending=active_pending,
        too_hot=too_hot,
        paused_for=paused_for,
    )
    return decision, new_state


class PolicyEngine:
    """Holds a policy and the state its grace periods need; feed it observations in time order.

    The policy may be replaced while running (``engine.policy = ...``): the state is kept, so a
    grace period in progress carries on under the new limits.
    """

    def __init__(self, policy: Policy, state: PolicyState | None = None) -> None:
        self.policy = policy
        self.state = state or PolicyState()
        self.last: Decision | None = None

    def decide(self, obs: Observation) -> Decision:
        self.last, self.state = evaluate(self.policy, obs, self.state)
        return self.last


# ---------------------------------------------------------------------------------------------
# Options and the config file
# ---------------------------------------------------------------------------------------------


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise UsageError(f"invalid {key} {value!r}: use true or false")


def _as_number(key: str, value: Any, unit: str, example: str) -> float:
    """A number, or text of one with an optional unit: 50, "50", "50%"; 85, "85C", "85°C"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        raw = value.strip()
        for suffix in unit.split("|"):
            if suffix and raw.upper().endswith(suffix.upper()):
                raw = raw[: -len(suffix)].strip()
                break
        try:
            return float(raw)
        except ValueError:
            pass
    raise UsageError(f"invalid {key} {value!r}: give a number, like {example}")


def _as_hours(key: str, value: Any) -> Hours:
    return value if isinstance(value, Hours) else Hours.parse(value)


_POLICY_OPTIONS: dict[str, Callable[[str, Any], Any]] = {
    "idle_only": _as_bool,
    "max_owner_load": lambda k, v: _as_number(k, v, "%", "50"),
    "owner_load_grace": lambda k, v: parse_duration(v),
    "hours": _as_hours,
    "pause_on_battery": _as_bool,
    "max_temperature": lambda k, v: _as_number(k, v, "°C|C", "85"),
    "idle_input_seconds": lambda k, v: parse_duration(v),
    "suspend_limit": lambda k, v: parse_duration(v),
}
POLICY_OPTIONS = tuple(_POLICY_OPTIONS)
assert set(POLICY_OPTIONS) == {f.name for f in fields(Policy)}


def policy_from_options(**opts: Any) -> Policy:
    """Build a validated Policy from CLI options or config values (strings welcome).

    An option given as None counts as not given, so a CLI can pass every option it has.
    Durations take numbers of seconds or text like "30s" and "10m"; hours take the text syntax.
    """
    unknown = sorted(set(opts) - set(POLICY_OPTIONS))
    if unknown:
        key = unknown[0]
        raise UsageError(
            f"unknown policy option {key!r}{_suggest(key, POLICY_OPTIONS)}; "
            f"known: {', '.join(POLICY_OPTIONS)}"
        )
    values = {k: _POLICY_OPTIONS[k](k, v) for k, v in opts.items() if v is not None}
    return Policy(**values)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_labels(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(val, (str, int, float, bool)) for val in v.values()
    )


def _is_gpus(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(_is_int(i) for i in v))


# Each key of volunteer.toml: (type check, what to write instead). Keys mirror the CLI options.
_CONFIG_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str), 'a string, like "lab-pc-3"'),
    "portal": (lambda v: isinstance(v, str), 'a string, like "grid.example.org:8786"'),
    "token_file": (lambda v: isinstance(v, str), 'a path string, like "~/.grid/token"'),
    "cpus": (_is_int, "a whole number of cores, like 4"),
    "memory": (lambda v: isinstance(v, str) or _is_int(v), 'a size, like "8GB"'),
    "gpus": (_is_gpus, 'a list of GPU indices like [0, 1], or "all" or "none"'),
    "labels": (_is_labels, 'a table of names and values, like { room = "B12" }'),
    "idle_only": (lambda v: isinstance(v, bool), "true or false"),
    "max_owner_load": (_is_number, "a percent, like 50"),
    "owner_load_grace": (lambda v: isinstance(v, str) or _is_number(v), 'a duration, like "30s"'),
    "hours": (lambda v: isinstance(v, str), 'a string, like "mon-fri 18:00-08:00"'),
    "pause_on_battery": (lambda v: isinstance(v, bool), "true or false"),
    "max_temperature": (_is_number, "degrees C, like 85"),
    "idle_input_seconds": (lambda v: isinstance(v, str) or _is_number(v), 'a duration, like "5m"'),
    "suspend_limit": (lambda v: isinstance(v, str) or _is_number(v), 'a duration, like "10m"'),
    # Further portals to serve (docs/federation.md); cli_volunteer.py checks each share.
    "portals": (
        lambda v: (
            isinstance(v, list)
            and all(isinstance(e, dict) and isinstance(e.get("url"), str) for e in v)
            and all(set(e) <= {"url", "token", "token_file", "share"} for e in v)
        ),
        '[[portals]] tables of url, token_file (or token) and share, like url = "https://..."',
    ),
}
# The agent's settings (grid-portal.volunteer.* in grid_portal/grid-portal.yaml: durations, and
# the worker's Dask settings), which the file overrides; tests/test_settings.py checks that this
# list names every one.
DURATION_SETTINGS = (
    "telemetry_interval",
    "death_timeout",
    "reconnect_max",
    "drain_timeout",
    "network_refresh",
    "idle_heartbeat_interval",
    "idle_after",
    "lend_bound",
    "job_linger",
)
SETTING_KEYS = (*DURATION_SETTINGS, "memory_pause", "worker_dask")
for _key in DURATION_SETTINGS:
    _CONFIG_KEYS[_key] = (lambda v: isinstance(v, str) or _is_number(v), 'a duration, like "2m"')
_CONFIG_KEYS["memory_pause"] = (
    lambda v: _is_number(v) and 0 < v <= 1,
    "a share of the worker's memory, more than 0 and at most 1, like 0.8",
)
_CONFIG_KEYS["worker_dask"] = (
    lambda v: (
        isinstance(v, dict)
        and all(v_ is None or isinstance(v_, (str, int, float, bool)) for v_ in v.values())
    ),
    'a table of Dask settings, like { "distributed.admin.tick.interval" = "5s" }',
)
CONFIG_KEYS = tuple(_CONFIG_KEYS)


def _toml() -> Any:
    """tomllib (Python 3.11+), else the tomli backport, else a UsageError saying what to do."""
    try:
        import tomllib

        return tomllib
    except ImportError:
        pass
    try:
        import tomli

        return tomli
    except ImportError:
        raise UsageError(
            "reading a config file needs Python 3.11+ or the tomli package: pip install tomli"
        ) from None


def load_policy_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a volunteer.toml; return its values as a plain dict.

    Types and policy values are checked here, so a mistake is reported with the file's name
    before anything starts. Sizes and durations are returned as written (the CLI parses them
    with grid_portal.units); labels come back as strings.
    """
    toml = _toml()
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            data = toml.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {str(p)!r} not found: check the --config path") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    except toml.TOMLDecodeError as e:
        raise UsageError(f"{p}: not valid TOML: {e}") from None

    result: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _CONFIG_KEYS:
            raise UsageError(
                f"{p}: unknown key {key!r}{_suggest(key, CONFIG_KEYS)}; "
                f"known keys: {', '.join(CONFIG_KEYS)}"
            )
        check, expected = _CONFIG_KEYS[key]
        if not check(value):
            raise UsageError(f"{p}: {key} must be {expected}, not {type(value).__name__} {value!r}")
        result[key] = value

    if "labels" in result:
        result["labels"] = {
            str(k): (str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in result["labels"].items()
        }
    try:
        if "memory" in result:
            parse_size(result["memory"])
        if "cpus" in result and result["cpus"] < 1:
            raise UsageError(f"invalid cpus {result['cpus']!r}: give at least 1")
        for key in DURATION_SETTINGS:
            if key in result and parse_duration(result[key]) <= 0:
                raise UsageError(f"invalid {key} {result[key]!r}: give a duration like 2m")
        policy_from_options(**{k: v for k, v in result.items() if k in _POLICY_OPTIONS})
    except UsageError as e:
        raise UsageError(f"{p}: {e}") from None
    return result


# ---------------------------------------------------------------------------------------------
# Observing the real machine (the one impure part)
# ---------------------------------------------------------------------------------------------

# Sensors that measure the CPU itself; when none is present, the hottest sensor of any kind.
_CPU_SENSORS = ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "soc_thermal")


def _temperature(psutil: Any) -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)  # absent on macOS and Windows
    if read is None:
        return None
    try:
        sensors = read() or {}
    except (OSError, RuntimeError):
        return None
    preferred = {k: v for k, v in sensors.items() if k in _CPU_SENSORS} or sensors
    # Some drivers report 0 or nonsense for unused channels; keep plausible readings only.
    readings = [
        t.current for entries in preferred.values() for t in entries if t.current and t.current > 0
    ]
    return max(readings) if readings else None


def _input_idle_seconds() -> float | None:
    """Keyboard/mouse idle time from ``xprintidle`` in an X session; None when unknown."""
    exe = shutil.which("xprintidle")
    if exe is None or not os.environ.get("DISPLAY"):
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=1.0, check=True).stdout
        return int(out.strip()) / 1000.0
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def observe(
    now: datetime | None = None,
    *,
    grid_cpu_percent: float = 0.0,
    cpu_percent: float | None = None,
) -> Observation:
    """Look at the real machine. Blocking (a subprocess may run): call it off the event loop.

    ``grid_cpu_percent`` is the grid's own processes' share of the WHOLE machine, 0-100, the
    unit of ``psutil.cpu_percent()``; ``psutil.Process.cpu_percent()`` counts per core, so
    divide its sum by ``psutil.cpu_count()``. ``cpu_percent`` may pass a machine reading the
    caller already has; otherwise it is read here (since the previous call, as psutil does).
    """
    import psutil

    if now is None:
        now = datetime.now().astimezone()
    machine = psutil.cpu_percent(interval=None) if cpu_percent is None else cpu_percent
    owner_load = min(100.0, max(0.0, machine - grid_cpu_percent))

    plugged = percent = None
    read_battery = getattr(psutil, "sensors_battery", None)
    battery = read_battery() if read_battery is not None else None
    if battery is not None:
        plugged, percent = battery.power_plugged, battery.percent

    return Observation(
        now=now,
        owner_load=owner_load,
        battery_plugged=plugged,
        battery_percent=percent,
        temperature=_temperature(psutil),
        input_idle_seconds=_input_idle_seconds(),
    )


__all__ = [
    "CONFIG_KEYS",
    "IDLE_OWNER_LOAD",
    "POLICY_OPTIONS",
    "TEMPERATURE_RESUME_MARGIN",
    "Decision",
    "Hours",
    "Observation",
    "Policy",
    "PolicyEngine",
    "PolicyState",
    "evaluate",
    "load_policy_config",
    "observe",
    "policy_from_options",
]
