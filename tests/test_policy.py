"""Volunteer policy: decisions as pure functions of time, owner load, battery, heat and input.

Time is never read from a clock here: every observation carries its own ``now``.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from grid_portal.errors import UsageError
from grid_portal.node.policy import (
    CONFIG_KEYS,
    IDLE_OWNER_LOAD,
    POLICY_OPTIONS,
    Decision,
    Hours,
    Observation,
    Policy,
    PolicyEngine,
    PolicyState,
    evaluate,
    load_policy_config,
    observe,
    policy_from_options,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "volunteer-policy.md"

# 2026-06-01 is a Monday.
MON = datetime(2026, 6, 1)


def at(day: int, hh: int, mm: int = 0, ss: float = 0) -> datetime:
    """Monday-based: at(0, 9) is Monday 09:00, at(5, 7) is Saturday 07:00."""
    return MON + timedelta(days=day, hours=hh, minutes=mm, seconds=ss)


def obs(now: datetime, **kw) -> Observation:
    return Observation(now=now, **kw)


def run_series(policy: Policy, samples: list[tuple[float, dict]]) -> list[Decision]:
    """Feed observations taken `t` seconds after Monday 12:00; return each decision."""
    engine = PolicyEngine(policy)
    start = at(0, 12)
    return [engine.decide(obs(start + timedelta(seconds=t), **kw)) for t, kw in samples]


def actions(decisions: list[Decision]) -> list[str]:
    return [d.action for d in decisions]


# --------------------------------------------------------------------------------- Hours


@pytest.mark.parametrize(
    ("when", "allowed"),
    [((0, 8, 59), False), ((0, 9, 0), True), ((0, 16, 59), True), ((0, 17, 0), False)],
)
def test_hours_daytime_range_includes_start_excludes_end(when, allowed):
    assert Hours.parse("09:00-17:00").allows(at(*when)) is allowed


@pytest.mark.parametrize(
    ("when", "allowed"),
    [
        ((0, 17, 59), False),
        ((0, 18, 0), True),
        ((0, 23, 59), True),
        ((1, 0, 0), True),
        ((1, 7, 59), True),
        ((1, 8, 0), False),
        ((1, 12, 0), False),
    ],
)
def test_hours_wrap_past_midnight(when, allowed):
    assert Hours.parse("18:00-08:00").allows(at(*when)) is allowed


def test_hours_several_ranges():
    hours = Hours.parse("12:00-13:00,18:00-23:59")
    assert hours.allows(at(2, 12, 30))
    assert hours.allows(at(2, 20))
    assert not hours.allows(at(2, 13))
    assert not hours.allows(at(2, 23, 59))
    assert not hours.allows(at(3, 0, 30))


@pytest.mark.parametrize(
    ("when", "allowed", "why"),
    [
        ((0, 19), True, "Monday evening"),
        ((0, 12), False, "Monday noon"),
        ((0, 7), False, "Monday early: Sunday night is not a mon-fri night"),
        ((1, 7, 59), True, "Tuesday early: Monday night"),
        ((4, 19), True, "Friday evening"),
        ((5, 7), True, "Saturday early: Friday night, and the weekend anyway"),
        ((5, 12), True, "Saturday noon: weekend"),
        ((6, 23, 59), True, "Sunday late: weekend"),
    ],
)
def test_hours_per_weekday(when, allowed, why):
    hours = Hours.parse("mon-fri 18:00-08:00; sat,sun 00:00-24:00")
    assert hours.allows(at(*when)) is allowed, why


def test_hours_night_belongs_to_the_day_it_starts():
    hours = Hours.parse("fri 22:00-02:00")
    assert hours.allows(at(4, 23))  # Friday 23:00
    assert hours.allows(at(5, 1))  # Saturday 01:00, still Friday's night
    assert not hours.allows(at(4, 1))  # Friday 01:00 is Thursday's night
    assert not hours.allows(at(5, 23))


def test_hours_day_ranges_wrap_the_week_and_take_full_names():
    hours = Hours.parse("Friday-Monday 09:00-10:00")
    allowed_days = [d for d in range(7) if hours.allows(at(d, 9, 30))]
    assert allowed_days == [0, 4, 5, 6]
    assert str(hours) == "mon,fri-sun 09:00-10:00"


def test_hours_use_the_wall_clock_of_an_aware_datetime():
    hours = Hours.parse("09:00-17:00")
    tz = timezone(timedelta(hours=-5))
    assert hours.allows(datetime(2026, 6, 1, 10, tzinfo=tz))
    assert not hours.allows(datetime(2026, 6, 1, 20, tzinfo=tz))


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("18:00-08:00", "18:00-08:00"),
        ("  9:00 - 17:00 ", "09:00-17:00"),
        ("18:00-23:59,12:00-13:00", "12:00-13:00,18:00-23:59"),
        ("MON-FRI 18:00-08:00;SAT, SUN 0:00-24:00", "mon-fri 18:00-08:00; sat,sun 00:00-24:00"),
        ("mon-sun 10:00-11:00", "10:00-11:00"),
        ("mon,tue,wed,fri 10:00-11:00;", "mon-wed,fri 10:00-11:00"),
    ],
)
def test_hours_canonical_text_round_trips(text, canonical):
    hours = Hours.parse(text)
    assert str(hours) == canonical
    assert Hours.parse(str(hours)) == hours


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("25:00-08:00", "invalid hours '25:00-08:00': hour must be 0-24"),
        ("10:60-11:00", "minute must be 0-59"),
        ("24:30-01:00", "24:00 is the latest time"),
        ("24:00-08:00", "cannot start at 24:00"),
        ("08:00-08:00", "is empty; use 00:00-24:00"),
        ("", "give at least one time range"),
        (" ; ", "give at least one time range"),
        ("10:00", "not a time range; write HH:MM-HH:MM"),
        ("18-08", "not a time; write HH:MM"),
        ("18:00-08:00 mon-fri", "with any days first"),
        ("mon-fri", "has no time range"),
        ("mnn 10:00-11:00", "unknown day 'mnn' (did you mean 'mon'?)"),
        ("mon,,tue 10:00-11:00", "empty day"),
        ("mon-wed-fri 10:00-11:00", "not a day or a range of days"),
    ],
)
def test_malformed_hours_name_the_problem(text, problem):
    with pytest.raises(UsageError, match=re.escape(problem)):
        Hours.parse(text)


_times = st.integers(0, 23).flatmap(lambda h: st.integers(0, 59).map(lambda m: f"{h:02d}:{m:02d}"))


@given(a=_times, b=_times, day=st.integers(0, 6), minute=st.integers(0, 24 * 60 - 1))
def test_a_range_and_its_reverse_split_the_day(a, b, day, minute):
    """Every day, 'a-b' and 'b-a' together cover each minute exactly once."""
    assume(a != b)
    when = at(day, 0) + timedelta(minutes=minute)
    assert Hours.parse(f"{a}-{b}").allows(when) != Hours.parse(f"{b}-{a}").allows(when)


# ------------------------------------------------------------------------- Simple rules


def test_a_bare_policy_always_runs():
    decision, _ = evaluate(
        Policy(),
        obs(at(6, 3), owner_load=100, battery_plugged=False, temperature=110, input_idle_seconds=0),
    )
    assert decision == Decision("run")


def test_outside_hours_pauses_with_the_hours_in_the_reason():
    policy = Policy(hours=Hours.parse("18:00-08:00"))
    assert evaluate(policy, obs(at(0, 12)))[0].reason == "outside hours 18:00-08:00"
    assert evaluate(policy, obs(at(0, 22)))[0].action == "run"


@pytest.mark.parametrize(
    ("pause_on_battery", "plugged", "action"),
    [
        (True, False, "pause"),
        (True, True, "run"),
        (True, None, "run"),  # no battery: a desktop
        (False, False, "run"),
    ],
)
def test_battery(pause_on_battery, plugged, action):
    policy = Policy(pause_on_battery=pause_on_battery)
    decision, _ = evaluate(policy, obs(at(0, 12), battery_plugged=plugged, battery_percent=64))
    assert decision.action == action
    assert decision.reason == ("on battery" if action == "pause" else None)


def test_temperature_pauses_when_hot_and_resumes_only_after_cooling():
    decisions = run_series(
        Policy(max_temperature=85),
        [(0, {"temperature": 70}), (5, {"temperature": 92}), (10, {"temperature": 83})]
        + [(15, {"temperature": 80.5}), (20, {"temperature": 80}), (25, {"temperature": 84})],
    )
    assert actions(decisions) == ["run", "pause", "pause", "pause", "run", "run"]
    assert decisions[1].reason == "too hot (92°C > 85°C)"
    assert decisions[2].reason == "cooling down (83°C, resumes at 80°C)"


def test_temperature_without_a_sensor_never_pauses():
    decision, _ = evaluate(Policy(max_temperature=60), obs(at(0, 12), temperature=None))
    assert decision.action == "run"


# ----------------------------------------------------------------------- Grace periods


def test_a_load_spike_shorter_than_the_grace_does_not_pause():
    decisions = run_series(
        Policy(max_owner_load=50, owner_load_grace=30),
        [(0, {"owner_load": 90}), (10, {"owner_load": 90}), (29, {"owner_load": 95})]
        + [(31, {"owner_load": 20}), (40, {"owner_load": 90}), (65, {"owner_load": 90})],
    )
    assert actions(decisions) == ["run"] * 6


def test_a_load_longer_than_the_grace_pauses_then_resumes_after_the_same_grace():
    decisions = run_series(
        Policy(max_owner_load=50, owner_load_grace=30),
        [
            (0, {"owner_load": 20}),
            (5, {"owner_load": 90}),  # over: the count starts here
            (20, {"owner_load": 90}),
            (35, {"owner_load": 90}),  # 30 s over: pause
            (50, {"owner_load": 10}),  # under: the resume count starts
            (60, {"owner_load": 70}),  # a blip over: the resume count restarts
            (70, {"owner_load": 10}),
            (95, {"owner_load": 10}),  # 25 s under: still paused
            (100, {"owner_load": 10}),  # 30 s under: run
        ],
    )
    assert actions(decisions) == ["run"] * 3 + ["pause"] * 5 + ["run"]
    assert decisions[3].reason == "owner busy"


def test_load_exactly_at_the_limit_is_not_over_it():
    decisions = run_series(Policy(max_owner_load=50, owner_load_grace=0), [(0, {"owner_load": 50})])
    assert actions(decisions) == ["run"]


def test_zero_grace_follows_the_load_at_once():
    decisions = run_series(
        Policy(max_owner_load=50, owner_load_grace=0),
        [(0, {"owner_load": 90}), (1, {"owner_load": 10}), (2, {"owner_load": 90})],
    )
    assert actions(decisions) == ["pause", "run", "pause"]


def test_a_clock_stepping_back_does_not_undo_the_grace_already_counted():
    engine = PolicyEngine(Policy(max_owner_load=50, owner_load_grace=30))
    engine.decide(obs(at(0, 12), owner_load=90))
    engine.decide(obs(at(0, 12, 0, 20), owner_load=90))
    engine.decide(obs(at(0, 11, 0, 30), owner_load=90))  # DST ended: one hour back
    assert engine.decide(obs(at(0, 11, 0, 39), owner_load=90)).action == "run"
    assert engine.decide(obs(at(0, 11, 0, 40), owner_load=90)).action == "pause"


def test_aware_and_naive_times_can_be_mixed():
    engine = PolicyEngine(Policy(max_owner_load=50, owner_load_grace=10))
    engine.decide(obs(at(0, 12), owner_load=90))
    aware = at(0, 12, 0, 10).replace(tzinfo=timezone.utc)
    assert engine.decide(obs(aware, owner_load=90)).action == "pause"


# --------------------------------------------------------------------------- Idle-only


def test_idle_only_with_a_desktop_session_follows_keyboard_and_mouse():
    decisions = run_series(
        Policy(idle_only=True, idle_input_seconds=300),
        [
            (0, {"input_idle_seconds": 10}),
            (290, {"input_idle_seconds": 300}),  # untouched 5 minutes: run
            (291, {"input_idle_seconds": 0.5}),  # touched: pause at once
        ],
    )
    assert actions(decisions) == ["pause", "run", "pause"]
    assert decisions[0].reason == "owner active (idle-only)"


def test_idle_only_with_a_desktop_session_ignores_cpu_load():
    decision, _ = evaluate(
        Policy(idle_only=True), obs(at(0, 12), owner_load=95, input_idle_seconds=3600)
    )
    assert decision.action == "run"


def test_idle_only_without_a_desktop_session_judges_by_owner_load():
    over = IDLE_OWNER_LOAD + 5
    decisions = run_series(
        Policy(idle_only=True, owner_load_grace=30),
        [
            (0, {"owner_load": 2}),
            (10, {"owner_load": over}),
            (40, {"owner_load": over}),  # busy for the grace: owner active
            (50, {"owner_load": 2}),
            (80, {"owner_load": 2}),  # quiet for the grace: run again
        ],
    )
    assert actions(decisions) == ["run", "run", "pause", "pause", "run"]
    assert decisions[2].reason == "owner active (idle-only)"


# ------------------------------------------------------------- Suspend limit, priority


def test_move_tasks_after_the_suspend_limit_and_not_before():
    decisions = run_series(
        Policy(pause_on_battery=True, suspend_limit=600),
        [
            (0, {"battery_plugged": False}),
            (599, {"battery_plugged": False}),
            (600, {"battery_plugged": False}),
            (700, {"battery_plugged": True}),
            (800, {"battery_plugged": False}),  # a fresh pause counts from zero
        ],
    )
    assert actions(decisions) == ["pause", "pause", "pause", "run", "pause"]
    assert [d.move_tasks for d in decisions] == [False, False, True, False, False]


def test_the_suspend_limit_counts_one_pause_even_when_its_reason_changes():
    decisions = run_series(
        Policy(pause_on_battery=True, max_temperature=85, suspend_limit=60),
        [
            (0, {"battery_plugged": False, "temperature": 50}),
            (30, {"battery_plugged": True, "temperature": 90}),
            (60, {"battery_plugged": True, "temperature": 90}),
        ],
    )
    assert [d.reason for d in decisions] == [
        "on battery",
        "too hot (90°C > 85°C)",
        "too hot (90°C > 85°C)",
    ]
    assert decisions[-1].move_tasks


def test_every_reason_is_listed_and_the_first_is_shown():
    policy = Policy(
        hours=Hours.parse("18:00-08:00"),
        pause_on_battery=True,
        max_temperature=85,
        idle_only=True,
        max_owner_load=50,
        owner_load_grace=0,
    )
    decision, _ = evaluate(
        policy,
        obs(
            at(0, 12),
            owner_load=90,
            battery_plugged=False,
            temperature=92,
            input_idle_seconds=1,
        ),
    )
    assert decision.reasons == (
        "outside hours 18:00-08:00",
        "on battery",
        "too hot (92°C > 85°C)",
        "owner active (idle-only)",
        "owner busy",
    )
    assert decision.reason == "outside hours 18:00-08:00"


def test_grace_keeps_counting_while_another_rule_pauses():
    """Hours end while the owner has been busy a while: the owner rule is already due."""
    engine = PolicyEngine(
        Policy(hours=Hours.parse("00:00-12:00"), max_owner_load=50, owner_load_grace=60)
    )
    engine.decide(obs(at(0, 11, 59), owner_load=90))
    assert engine.decide(obs(at(0, 12, 0), owner_load=90)).reasons == (
        "outside hours 00:00-12:00",
        "owner busy",
    )


def test_evaluate_is_pure():
    policy = Policy(max_owner_load=50, owner_load_grace=30)
    state = PolicyState(last_now=at(0, 12), owner_busy_pending=20.0)
    o = obs(at(0, 12, 0, 10), owner_load=90)
    first = evaluate(policy, o, state)
    assert evaluate(policy, o, state) == first
    assert state == PolicyState(last_now=at(0, 12), owner_busy_pending=20.0)
    assert first[0].action == "pause"


def test_replacing_the_policy_keeps_the_grace_in_progress():
    engine = PolicyEngine(Policy(max_owner_load=80, owner_load_grace=30))
    engine.decide(obs(at(0, 12), owner_load=60))
    engine.policy = Policy(max_owner_load=50, owner_load_grace=30)
    engine.decide(obs(at(0, 12, 0, 1), owner_load=60))
    assert engine.decide(obs(at(0, 12, 0, 31), owner_load=60)).action == "pause"
    assert engine.last is not None and engine.last.reason == "owner busy"


# ---------------------------------------------------------------------------- Options


def test_policy_from_options_accepts_cli_strings_and_skips_none():
    policy = policy_from_options(
        idle_only=None,
        max_owner_load="50%",
        owner_load_grace="1m",
        hours="mon-fri 18:00-08:00",
        max_temperature="85°C",
        suspend_limit="15m",
        idle_input_seconds=120,
    )
    assert policy == Policy(
        max_owner_load=50,
        owner_load_grace=60,
        hours=Hours.parse("mon-fri 18:00-08:00"),
        max_temperature=85,
        suspend_limit=900,
        idle_input_seconds=120,
    )


@pytest.mark.parametrize(
    ("opts", "problem"),
    [
        ({"max_owner_load": 0}, "invalid max_owner_load 0: give a percent from 1 to 100"),
        ({"max_owner_load": 101}, "give a percent from 1 to 100"),
        ({"max_owner_load": "lots"}, "invalid max_owner_load 'lots': give a number"),
        ({"max_owner_load": True}, "give a number"),
        ({"owner_load_grace": -1}, "cannot be negative"),
        ({"owner_load_grace": "soon"}, "write it like 30s"),
        ({"max_temperature": 0}, "give degrees C above 0"),
        ({"idle_only": "yes"}, "invalid idle_only 'yes': use true or false"),
        ({"hours": "25:00-08:00"}, "hour must be 0-24"),
        ({"max_load": 50}, "unknown policy option 'max_load' (did you mean 'max_owner_load'?)"),
    ],
)
def test_policy_from_options_rejects_bad_values(opts, problem):
    with pytest.raises(UsageError, match=re.escape(problem)):
        policy_from_options(**opts)


# ------------------------------------------------------------------------- Config file


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "volunteer.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_documented_example_configs_load(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    assert blocks, f"{DOCS} has no toml example"
    for block in blocks:
        config = load_policy_config(write(tmp_path, block))
        policy = policy_from_options(**{k: v for k, v in config.items() if k in POLICY_OPTIONS})
        assert isinstance(policy, Policy)


def test_config_file_values_come_back_validated(tmp_path):
    path = write(
        tmp_path,
        """
name = "lab-pc-3"
portal = "10.0.0.5:8786"
token_file = "~/.grid/token"
cpus = 4
memory = "8GB"
gpus = [0, 1]
idle_only = false
max_owner_load = 50
owner_load_grace = "45s"
hours = "mon-fri 18:00-08:00; sat,sun 00:00-24:00"
pause_on_battery = true
max_temperature = 85.5
suspend_limit = 900

[labels]
room = "B12"
cuda = true
rack = 3
""",
    )
    config = load_policy_config(path)
    assert config == {
        "name": "lab-pc-3",
        "portal": "10.0.0.5:8786",
        "token_file": "~/.grid/token",
        "cpus": 4,
        "memory": "8GB",
        "gpus": [0, 1],
        "idle_only": False,
        "max_owner_load": 50,
        "owner_load_grace": "45s",
        "hours": "mon-fri 18:00-08:00; sat,sun 00:00-24:00",
        "pause_on_battery": True,
        "max_temperature": 85.5,
        "suspend_limit": 900,
        "labels": {"room": "B12", "cuda": "true", "rack": "3"},
    }
    policy = policy_from_options(**{k: v for k, v in config.items() if k in POLICY_OPTIONS})
    assert policy.owner_load_grace == 45
    assert str(policy.hours) == "mon-fri 18:00-08:00; sat,sun 00:00-24:00"


def test_an_empty_config_is_an_empty_dict(tmp_path):
    assert load_policy_config(write(tmp_path, "# nothing set\n")) == {}


def test_unknown_key_is_named_with_a_suggestion_and_the_known_keys(tmp_path):
    path = write(tmp_path, "max_load = 50\n")
    with pytest.raises(UsageError) as info:
        load_policy_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown key 'max_load' (did you mean 'max_owner_load'?)")
    assert all(key in message for key in CONFIG_KEYS)


def test_a_section_header_is_an_unknown_key(tmp_path):
    with pytest.raises(UsageError, match="unknown key 'volunteer'"):
        load_policy_config(write(tmp_path, "[volunteer]\ncpus = 2\n"))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('cpus = "four"', "cpus must be a whole number of cores, like 4, not str 'four'"),
        ("cpus = 2.5", "cpus must be a whole number"),
        ('idle_only = "yes"', "idle_only must be true or false, not str 'yes'"),
        ("max_owner_load = true", "max_owner_load must be a percent, like 50, not bool True"),
        ("hours = 18", 'hours must be a string, like "mon-fri 18:00-08:00", not int 18'),
        ('gpus = ["a"]', "gpus must be a list of GPU indices"),
        ("labels = { room = { floor = 1 } }", "labels must be a table of names and values"),
        ("memory = 8.5", 'memory must be a size, like "8GB"'),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(tmp_path, line, problem):
    path = write(tmp_path, line + "\n")
    with pytest.raises(UsageError, match=re.escape(f"{path}: {problem}")):
        load_policy_config(path)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('hours = "25:00-08:00"', "invalid hours '25:00-08:00': hour must be 0-24"),
        ("max_owner_load = 150", "give a percent from 1 to 100"),
        ('owner_load_grace = "a while"', "invalid duration 'a while'"),
        ("max_temperature = -5", "give degrees C above 0"),
        ('memory = "8 parsecs"', "unknown unit"),
        ("cpus = 0", "invalid cpus 0: give at least 1"),
    ],
)
def test_bad_values_in_a_config_name_the_file(tmp_path, line, problem):
    path = write(tmp_path, line + "\n")
    with pytest.raises(UsageError, match=re.escape(problem)) as info:
        load_policy_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_invalid_toml_and_missing_files(tmp_path):
    with pytest.raises(UsageError, match="not valid TOML"):
        load_policy_config(write(tmp_path, "cpus = = 4\n"))
    with pytest.raises(UsageError, match="not found: check the --config path"):
        load_policy_config(tmp_path / "absent.toml")


def test_without_tomllib_or_tomli_the_error_says_what_to_install(tmp_path, monkeypatch):
    # Simulates Python 3.10 without the backport; an absent library, not our own code.
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(UsageError, match="pip install tomli"):
        load_policy_config(write(tmp_path, "cpus = 1\n"))


# ----------------------------------------------------------------------------- observe


def test_observe_reads_this_machine():
    o = observe()
    assert o.now.tzinfo is not None
    assert 0.0 <= o.owner_load <= 100.0
    assert o.battery_plugged in (True, False, None)
    assert o.temperature is None or o.temperature > 0
    assert o.input_idle_seconds is None or o.input_idle_seconds >= 0


def test_observe_subtracts_the_grids_own_cpu():
    now = at(0, 12)
    assert observe(now, cpu_percent=70, grid_cpu_percent=25).owner_load == 45
    assert observe(now, cpu_percent=30, grid_cpu_percent=50).owner_load == 0
    assert observe(now, cpu_percent=30).now == now
