"""Requirement expressions (grid_portal.requirements.matching): parsing, matching, explain, errors.

Nodes are built from the real grid_portal.model dataclasses; nothing of ours is mocked.
"""

from __future__ import annotations

import contextlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grid_portal.errors import UsageError
from grid_portal.model import GpuInfo, NetworkInfo, Node, NodeState, Offer, StaticCapacity
from grid_portal.requirements.matching import (
    ATTRIBUTES,
    MAX_DEPTH,
    MAX_LENGTH,
    Expression,
    ExpressionError,
    compile_requirement,
    node_attributes,
)
from grid_portal.units import parse_size

DOCS = Path(__file__).resolve().parents[1] / "docs" / "requirements.md"


def make_node(
    name: str = "n1",
    *,
    cpus: int = 4,
    memory: str = "16GB",
    gpus: tuple[tuple[str, str, str | None], ...] = (),
    offered: list[int] | None = None,
    os: str = "linux",
    arch: str = "x86_64",
    python: str = "3.11.9",
    cpu_model: str = "AMD EPYC 7763",
    labels: dict[str, str] | None = None,
    packages: dict[str, str] | None = None,
    disk: str | None = None,
    bandwidth: float | None = None,
    rtt: float | None = None,
    state: NodeState = NodeState.ONLINE,
) -> Node:
    """A node as the registry would hold it; ``gpus`` is (name, memory, capability) per device."""
    infos = [
        GpuInfo(index=i, name=gname, memory_total=parse_size(gmem), capability=cap)
        for i, (gname, gmem, cap) in enumerate(gpus)
    ]
    capacity = StaticCapacity(
        cpu_model=cpu_model,
        cores_physical=8,
        cores_logical=16,
        memory_total=parse_size("64GB"),
        disk_free=parse_size(disk) if disk else None,
        os=os,
        arch=arch,
        python=python,
        gpus=infos,
        network=NetworkInfo(bandwidth=bandwidth, rtt=rtt),
        packages=dict(packages or {}),
    )
    offer = Offer(
        cpus=cpus,
        memory=parse_size(memory),
        gpus=list(range(len(infos))) if offered is None else offered,
    )
    return Node(name=name, state=state, capacity=capacity, offer=offer, labels=dict(labels or {}))


def matches(text: str, node: Node) -> bool:
    return compile_requirement(text).matches(node_attributes(node))


def explain(text: str, node: Node) -> list[str]:
    return compile_requirement(text).explain(node_attributes(node))


GPU_BOX = make_node(
    "gpu-box",
    gpus=(("A100", "40GB", "8.0"), ("T4", "16GB", "7.5")),
    labels={"lab": "physics", "room": "B12"},
    packages={"numpy": "1.26.4", "torch": "2.3.0+cu121", "scikit-learn": "1.5.0"},
    disk="500GB",
    bandwidth=100e6,
    rtt=0.002,
)
LAPTOP = make_node(
    "alice-laptop",
    cpus=2,
    memory="8GiB",
    os="darwin",
    arch="aarch64",
    cpu_model="Apple M2",
    packages={"numpy": "1.9.3"},
)


# --------------------------------------------------------------------------------------------
# node_attributes


def test_node_attributes_builds_the_namespace_from_a_node() -> None:
    attrs = node_attributes(GPU_BOX)
    assert attrs["name"] == "gpu-box"
    assert attrs["state"] == "online"
    assert (attrs["os"], attrs["arch"], attrs["python"]) == ("linux", "x86_64", "3.11.9")
    assert (attrs["cpus"], attrs["cores"], attrs["cores_physical"]) == (4, 16, 8)
    assert attrs["memory"] == 16 * 10**9
    assert attrs["memory_total"] == 64 * 10**9
    assert attrs["disk"] == 500 * 10**9
    assert attrs["gpus"] == 2
    assert attrs["gpu.memory"] == 40 * 10**9  # the largest offered GPU
    assert attrs["gpu.capability"] == "8.0"
    assert attrs["gpu.name"] == "A100"
    assert attrs["labels"] == {"lab": "physics", "room": "B12"}
    assert attrs["packages"]["scikit-learn"] == "1.5.0"
    assert (attrs["bandwidth"], attrs["rtt"]) == (100e6, 0.002)


def test_node_attributes_count_only_offered_gpus() -> None:
    node = make_node(gpus=(("A100", "40GB", "8.0"), ("T4", "16GB", "7.5")), offered=[1])
    attrs = node_attributes(node)
    assert (attrs["gpus"], attrs["gpu.memory"], attrs["gpu.capability"]) == (1, 16 * 10**9, "7.5")
    assert attrs["gpu.name"] == "T4"


def test_node_without_gpu_has_zero_gpu_memory_and_capability_and_no_unknown_guesses() -> None:
    attrs = node_attributes(LAPTOP)
    assert (attrs["gpus"], attrs["gpu.memory"], attrs["gpu.capability"]) == (0, 0, "0")
    for absent in ("gpu.name", "disk", "bandwidth", "rtt"):
        assert absent not in attrs
    assert set(attrs) <= set(ATTRIBUTES)


def test_packages_names_are_normalized() -> None:
    node = make_node(packages={"Scikit_Learn": "1.5.0"})
    assert node_attributes(node)["packages"] == {"scikit-learn": "1.5.0"}
    for text in (
        '"scikit-learn" in packages',
        "packages.scikit_learn >= 1.5",
        'packages["SciKit.Learn"] == 1.5',
    ):
        assert matches(text, node), text


# --------------------------------------------------------------------------------------------
# Matching: the examples of the brief and the docs


@pytest.mark.parametrize(
    ("text", "gpu_box", "laptop"),
    [
        ('gpu.memory >= 16GB and gpu.capability >= 8.0 and os == "linux"', True, False),
        ('"lab" in labels', True, False),
        ('"lab" not in labels', False, True),
        ('labels.room == "B12"', True, False),
        ('labels["room"] == "B12"', True, False),
        ('cpus >= 4 or (gpus >= 1 and not arch == "aarch64")', True, False),
        ("packages.numpy >= 1.26", True, False),
        ("packages.numpy < 1.26", False, True),
        ('name != "alice-laptop"', True, False),
        ("memory > 8GiB", True, False),
        ("memory >= 8GiB", True, True),
        ("memory >= 8 GiB && cpus > 1", True, True),
        ('cpu_model contains "EPYC"', True, False),
        ('not cpu_model contains "epyc"', False, True),
        ('"torch" in packages', True, False),
        ("packages.torch >= 2.3", True, False),
        ("disk >= 100GB", True, False),
        ("rtt < 5ms and bandwidth >= 50MB/s", True, False),
        ("rtt <= 0.002", True, False),
        ('state == "online"', True, True),
        ('os == "Linux"', True, False),  # strings compare case-insensitively, as in ClassAds
        ("16GB <= gpu.memory", True, False),  # a literal on the left reads the same
        ("gpu.memory == 0", False, True),
        ("python >= 3.11", True, True),
        ('python >= "3.12"', False, False),
        ("true", True, True),
        ("false", False, False),
        ("not false and !(cpus < 1) || false", True, True),
        ("NOT (os == 'darwin') AND cpus >= 1", True, False),
    ],
)
def test_examples_match(text: str, gpu_box: bool, laptop: bool) -> None:
    expr = compile_requirement(text)
    assert (expr.matches(GPU_BOX), expr.matches(LAPTOP)) == (gpu_box, laptop)


@pytest.mark.parametrize(
    ("node_version", "text", "expected"),
    [
        ("1.26.4", "packages.numpy >= 1.26", True),
        ("1.9", "packages.numpy < 1.26", True),
        ("1.10.0", "packages.numpy > 1.9", True),
        ("1.26.0", "packages.numpy == 1.26", True),
        ("1.26.4", "packages.numpy == 1.26", False),
        ("2.0.0rc1", "packages.numpy >= 2.0", False),
        ("2.0.0rc1", 'packages.numpy >= "2.0.0rc1"', True),
        ("2.0.0rc1", "packages.numpy >= 2.0rc1", True),
        ("2.0.0rc1", "packages.numpy > 1.26", True),
        ("2.3.0+cu121", "packages.numpy == 2.3", True),
        ("2.3.0.post1", "packages.numpy >= 2.3", True),
        ("not-a-version", "packages.numpy >= 1", False),
    ],
)
def test_versions_compare_numerically(node_version: str, text: str, expected: bool) -> None:
    assert matches(text, make_node(packages={"numpy": node_version})) is expected


def test_gpu_capability_compares_as_a_version() -> None:
    turing = make_node(gpus=(("T4", "16GB", "7.5"),))
    hopper = make_node(gpus=(("H100", "80GB", "9.0"),))
    blackwell = make_node(gpus=(("B200", "180GB", "10.0"),))
    expr = compile_requirement("gpu.capability >= 8.0")
    assert [expr.matches(n) for n in (turing, hopper, blackwell, LAPTOP)] == [
        False,
        True,
        True,
        False,
    ]


def test_sizes_accept_decimal_and_binary_units() -> None:
    node = make_node(memory="512MiB")
    assert matches("memory >= 512MiB", node)
    assert matches("memory > 512MB", node)  # 536.9 MB
    assert not matches("memory >= 1GB", node)
    assert matches("memory >= 0.5GiB", node)


def test_strings_take_both_quotes_and_escapes() -> None:
    node = make_node(labels={"motto": 'say "hi"\\now', "it's": "yes"})
    assert matches(r'labels.motto == "say \"hi\"\\now"', node)
    assert matches(r"labels.motto == 'say \"hi\"\\now'", node)
    assert matches('labels["it\'s"] == "yes"', node)
    assert matches(r"labels['it\'s'] == 'yes'", node)


def test_expression_accepts_a_node_directly() -> None:
    expr = compile_requirement("gpus >= 1")
    assert expr.matches(GPU_BOX) and not expr.matches(LAPTOP)
    assert expr.explain(LAPTOP) == ["gpus is 0, needs >= 1"]


def test_missing_attribute_makes_a_comparison_false_and_not_makes_it_true() -> None:
    attrs = node_attributes(LAPTOP)  # no disk, no rtt, no labels.room
    for text in (
        "disk >= 1GB",
        "disk < 1GB",
        "rtt < 1s",
        'labels.room == "B12"',
        'labels.room != "B12"',
    ):
        assert not compile_requirement(text).matches(attrs), text
        assert compile_requirement(f"not ({text})").matches(attrs), text
    assert not compile_requirement("cpus >= 1").matches({})
    assert not compile_requirement('"x" in labels').matches({})


def test_values_of_the_wrong_type_count_as_unknown() -> None:
    expr = compile_requirement("cpus >= 2")
    for bad in ("four", None, True, [4], {"n": 4}, float("nan")):
        assert not expr.matches({"cpus": bad}), bad
    assert expr.explain({"cpus": "four"}) == ["cpus has an unusable value on this node: 'four'"]


# --------------------------------------------------------------------------------------------
# explain


def test_explain_lists_each_failing_comparison() -> None:
    node = make_node(gpus=(("RTX 3060", "12GB", "8.6"),), os="darwin")
    text = 'gpu.memory >= 16GB and gpu.capability >= 8.0 and os == "linux"'
    assert explain(text, node) == [
        "gpu.memory is 12.0 GB, needs >= 16.0 GB",
        'os is "darwin", needs == "linux"',
    ]
    assert explain(text, GPU_BOX) == []


def test_explain_or_gives_the_cheapest_branch_then_the_others() -> None:
    text = 'cpus >= 4 or (gpus >= 1 and not arch == "aarch64")'
    assert explain(text, LAPTOP) == [
        "cpus is 2, needs >= 4",
        'or else: gpus is 0, needs >= 1; arch is "aarch64", needs != "aarch64"',
    ]


@pytest.mark.parametrize(
    ("text", "reasons"),
    [
        ("disk >= 10GB", ["disk is unknown on this node"]),
        ('labels.room == "B12"', ['no label "room" on this node']),
        ('"lab" in labels', ['no label "lab" on this node']),
        ('"torch" in packages', ['no package "torch" on this node']),
        ("packages.numpy >= 1.26", ["packages.numpy is 1.9.3, needs >= 1.26"]),
        ('cpu_model contains "EPYC"', ['cpu_model is "Apple M2", needs to contain "EPYC"']),
        ('not cpu_model contains "M2"', ['cpu_model is "Apple M2", needs not to contain "M2"']),
        ("not memory <= 16GB", ["memory is 8.6 GB, needs > 16.0 GB"]),
        ('name != "alice-laptop"', ['name is "alice-laptop", needs != "alice-laptop"']),
        ("false", ["the requirement contains a condition that is always false"]),
    ],
)
def test_explain_reasons(text: str, reasons: list[str]) -> None:
    assert explain(text, LAPTOP) == reasons


def test_explain_a_label_that_should_be_absent() -> None:
    assert explain('"lab" not in labels', GPU_BOX) == ['label "lab" is present, needs it absent']


def test_explain_shows_exact_values_when_rounding_would_hide_the_difference() -> None:
    node = make_node(memory="15990000000")
    assert explain("memory >= 16GB", node) == [
        "memory is 15,990,000,000 B, needs >= 16,000,000,000 B"
    ]


# --------------------------------------------------------------------------------------------
# Errors: each kind, with the caret under the right place


def caret_span(error: ExpressionError) -> tuple[int, int]:
    """Where the carets point, as a slice of the shown expression."""
    lines = str(error).splitlines()
    shown, carets = lines[1], lines[2]
    start = carets.index("^")
    assert shown.startswith("  ") and carets.startswith("  ")
    return start - 2, len(carets) - 2


@pytest.mark.parametrize(
    ("text", "problem", "fix", "underlined"),
    [
        ("gpu.mem >= 16GB", "unknown attribute 'gpu.mem'", "did you mean gpu.memory", "gpu.mem"),
        ("label.room == 'x'", "unknown attribute", "did you mean labels.room", "label.room"),
        ("room == 'B12'", "unknown attribute 'room'", "labels.room", "room"),
        ('memory >= "16GB"', "memory is a size, not text", "without quotes", '"16GB"'),
        ("memory > 8", "no unit", "8GB or 8GiB", "8"),
        ("cpus >= 4GB", "plain number", "cpus >= 4", "4GB"),
        ("disk >= 10GB/s", "a size, not a rate", "10GB", "10GB/s"),
        ("memory >= 16XB", "not a size", "GiB", "16XB"),
        ("rtt < 5 parsecs", "unexpected 'parsecs'", "and / or", "parsecs"),
        ("rtt < 5q", "not a duration", "5ms", "5q"),
        ("packages.numpy >= 'new'", "is not a version", "1.26", "'new'"),
        ("os == linux", "linux is not quoted", 'os == "linux"', "linux"),
        ("os < 'x'", "only with ==, != or contains", "", "<"),
        ("state == 'onlin'", 'state is never "onlin"', 'did you mean "online"', "'onlin'"),
        ('"x" in cpus', "'in' needs labels or packages", '"lab" in labels', "cpus"),
        ("lab in labels", "must be quoted", 'write "lab" in labels', "lab"),
        ("labels == 'x'", "set of keys", '"key" in labels', "=="),
        ("labels contains 'x'", "set of keys", '"x" in labels', "contains"),
        ("memory contains 'x'", "contains works on text", "", "contains"),
        ("cpus[0] > 1", "cannot be indexed", 'labels["room"]', "["),
        ("cpus", "cpus alone is not a condition", "cpus >= 4", "cpus"),
        ("labels", "labels alone is not a condition", '"key" in labels', "labels"),
        ("1 < 2", "two values", "attribute", "1"),
        ("cpus > cores", "two attributes", "", "cores"),
        ("cpus >= 2 >= 1", "cannot be chained", "cpus >= 2 and cpus <= 8", ">="),
        ("true == false", "cannot be compared", "", "true"),
        ("cpus = 4", "'=' is not an operator", "use ==", "="),
        ("cpus > 1 & gpus > 1", "'&' is not an operator", "and / or", "&"),
        ("cpus > 1 gpus > 1", "unexpected 'gpus'", "and / or", "gpus"),
        ("(cpus > 1", "expected ')'", "column 1", ""),
        ("cpus > 1)", "unexpected ')'", "'('", ")"),
        ("cpus >=", "ends too early", "cpus >= 2", ""),
        ("os == 'linux", "never closed", "end it with '", "'"),
        (r"os == 'a\qb'", r"unknown escape \q", r"\\", r"\q"),
        ("cpus > 1 ; rm", "unexpected character ';'", "", ";"),
        ("cpus > 1 \x00", "unexpected character U+0000", "", "?"),
        ("   ", "empty", "cpus >= 2", " "),
    ],
)
def test_errors_name_the_problem_point_at_it_and_say_the_fix(
    text: str, problem: str, fix: str, underlined: str
) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_requirement(text)
    error = info.value
    assert isinstance(error, UsageError)
    assert problem in error.problem and problem in str(error)
    assert fix in error.fix
    assert str(error).startswith("invalid requirement: ")
    assert text.strip() == "" or text.replace("\x00", "?") in str(error)
    if underlined:
        start, end = caret_span(error)
        assert str(error).splitlines()[1][2:][start:end] == underlined


def test_unknown_attribute_lists_the_known_ones() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_requirement("gpu.mem >= 16GB")
    for name in ("gpu.memory", "gpu.capability", "cpus", "labels", "packages.<name>"):
        assert name in info.value.fix


def test_too_long_is_an_error() -> None:
    text = "cpus >= 1 or " * 200 + "true"
    assert len(text) > MAX_LENGTH
    with pytest.raises(ExpressionError, match="limit is 2000"):
        compile_requirement(text)
    assert compile_requirement(text[-MAX_LENGTH:].partition("or ")[2]).matches({"cpus": 1})


@pytest.mark.parametrize(
    "text",
    [
        "(" * (MAX_DEPTH + 1) + "true" + ")" * (MAX_DEPTH + 1),
        "not " * (MAX_DEPTH + 1) + "true",
        "!" * 1999,
        "(" * 1999,
        "not (" * 300,
    ],
)
def test_deep_nesting_is_an_error_never_a_recursion_error(text: str) -> None:
    with pytest.raises(ExpressionError, match="nested more than"):
        compile_requirement(text)


def test_nesting_up_to_the_limit_works() -> None:
    assert compile_requirement("(" * MAX_DEPTH + "cpus >= 1" + ")" * MAX_DEPTH).matches({"cpus": 1})
    assert compile_requirement("not " * MAX_DEPTH + "true").matches({})
    assert not compile_requirement("not " * (MAX_DEPTH - 1) + "true").matches({})


def test_a_long_flat_chain_is_fine() -> None:
    text = " and ".join(["cpus >= 1"] * 120)
    assert compile_requirement(text).matches({"cpus": 2})


def test_non_text_is_an_error() -> None:
    with pytest.raises(ExpressionError, match="must be text"):
        compile_requirement(42)  # type: ignore[arg-type]


def test_error_survives_pickling() -> None:
    # Errors travel from the scheduler plugin to the client through Dask comms.
    with pytest.raises(ExpressionError) as info:
        compile_requirement("gpu.mem >= 16GB")
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value) and copy.position == 0 and copy.length == 7


def test_error_window_keeps_the_caret_under_the_problem_in_long_text() -> None:
    text = "cpus >= 1 and " * 60 + "gpu.mem >= 1GB"
    with pytest.raises(ExpressionError) as info:
        compile_requirement(text)
    shown = str(info.value).splitlines()[1]
    start, end = caret_span(info.value)
    assert len(shown) < 100 and shown[2:][start:end] == "gpu.mem"


def test_user_text_is_never_evaluated_as_python() -> None:
    for text in ('__import__("os").system("true")', "().__class__", "[x for x in ()]"):
        with pytest.raises(ExpressionError):
            compile_requirement(text)


def test_module_does_not_import_dask() -> None:
    code = (
        "import sys, grid_portal.requirements.matching; "
        "assert not {'dask', 'distributed'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docs_cover_every_attribute() -> None:
    docs = DOCS.read_text()
    for name, spec in ATTRIBUTES.items():
        assert f"`{name}`" in docs and spec.type in docs, name


# --------------------------------------------------------------------------------------------
# Properties


def quote(text: str) -> str:
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


TOKENS = [
    "cpus", "gpu.memory", "gpu.mem", "labels", "labels.room", "packages", "packages.numpy", "os",
    "rtt", "bandwidth", "state", "python", "cpu_model", '"linux"', "'x'", '"lab"', '"online"',
    "16GB", "16 GB", "512MiB", "100MB/s", "5ms", "1.26.4", "8.0", "4", "0", "and", "or", "not",
    "in", "contains", "==", "!=", "<", "<=", ">", ">=", "=", "(", ")", "[", "]", "true", "false",
    "&&", "||", "!", "&", '"', "'", "\\", ".", ",", "-", "\n", "\t", "é", "\x00",
]  # fmt: skip

ORDER_OPS = ["==", "!=", "<", "<=", ">", ">="]
KEYS = st.sampled_from(["room", "lab", "numpy", "torch", "a.b", "Room", ""]) | st.text(max_size=6)


def _leaves() -> st.SearchStrategy[str]:
    def pick(
        names: list[str], ops: list[str], values: st.SearchStrategy[str]
    ) -> st.SearchStrategy[str]:
        return st.builds(
            lambda a, o, v, flip: f"{v} {o} {a}" if flip and o in ORDER_OPS else f"{a} {o} {v}",
            st.sampled_from(names),
            st.sampled_from(ops),
            values,
            st.booleans(),
        )

    sizes = st.builds(
        lambda n, u: f"{n}{u}",
        st.integers(0, 999),
        st.sampled_from(["GB", "GiB", "MB", "B", " KiB"]),
    )
    versions = st.lists(st.integers(0, 30), min_size=1, max_size=4).map(
        lambda p: ".".join(map(str, p))
    )
    strings = st.text(max_size=8).map(quote)
    return st.one_of(
        pick(["memory", "memory_total", "disk", "gpu.memory"], ORDER_OPS, sizes),
        pick(["bandwidth"], ORDER_OPS, sizes.map(lambda s: s.replace(" ", "") + "/s")),
        pick(["rtt"], ORDER_OPS, st.sampled_from(["5ms", "1s", "0.5", "2m", "1h30m"])),
        pick(["cpus", "cores", "gpus", "cpu_freq"], ORDER_OPS, st.integers(0, 64).map(str)),
        pick(["python", "gpu.capability", "packages.numpy", "packages.torch"], ORDER_OPS, versions),
        pick(["os", "arch", "name", "labels.room", "gpu.name"], ["==", "!=", "contains"], strings),
        st.builds(lambda k, neg, d: f"{quote(k)} {'not in' if neg else 'in'} {d}", KEYS, st.booleans(), st.sampled_from(["labels", "packages"])),
        st.builds(lambda k, v: f"labels[{quote(k)}] == {quote(v)}", KEYS, st.text(max_size=4)),
        st.sampled_from(["true", "false"]),
    )  # fmt: skip


EXPRESSIONS = st.recursive(
    _leaves(),
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"{a} and {b}", inner, inner),
        st.builds(lambda a, b: f"{a} or {b}", inner, inner),
        inner.map(lambda e: f"not {e}"),
        inner.map(lambda e: f"({e})"),
    ),
    max_leaves=8,
)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(
        ["linux", "1.26.4", "8.0", "2.0rc1", "online", 10**400, 10**5000, float("inf")]
    ),
    st.lists(st.integers(), max_size=2),
)
ATTRS = st.dictionaries(
    st.sampled_from(sorted(ATTRIBUTES)) | st.text(max_size=6),
    SCALARS | st.dictionaries(KEYS, SCALARS, max_size=4),
    max_size=14,
)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_any_text_compiles_or_raises_expression_error(text: str) -> None:
    try:
        assert isinstance(compile_requirement(text), Expression)
    except ExpressionError as error:
        assert str(error).startswith("invalid requirement: ")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=20), st.sampled_from([" ", ""]))
def test_any_token_soup_compiles_or_raises_expression_error(tokens: list[str], sep: str) -> None:
    with contextlib.suppress(ExpressionError):
        compile_requirement(sep.join(tokens))


@settings(max_examples=300, deadline=None)
@given(EXPRESSIONS, ATTRS)
def test_grammar_built_expressions_compile_and_never_raise_when_evaluated(
    text: str, attrs: dict
) -> None:
    expr = compile_requirement(text)  # built from the grammar: must compile
    matched = expr.matches(attrs)
    reasons = expr.explain(attrs)
    assert isinstance(matched, bool)
    assert (reasons == []) == matched
    assert all(isinstance(r, str) and r for r in reasons)
    assert compile_requirement(f"not ({text})").matches(attrs) is (not matched)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20), st.text(max_size=20))
def test_string_literals_round_trip(key: str, value: str) -> None:
    attrs = {"labels": {key: value}}
    assert compile_requirement(f"labels[{quote(key)}] == {quote(value)}").matches(attrs)
    assert compile_requirement(f"{quote(key)} in labels").matches(attrs)
