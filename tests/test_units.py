"""Counted nouns in messages: "1 task", "2 tasks", never "1 task(s)"."""

from __future__ import annotations

from grid_portal.requirements.refusal import describe_refusal
from grid_portal.units import counted


def test_counted_says_one_or_many() -> None:
    assert counted(1, "task") == "1 task"
    assert counted(2, "queued task") == "2 queued tasks"
    assert counted(0, "connected node") == "0 connected nodes"
    assert counted(12_000, "file") == "12,000 files"
    assert counted(3, "copy", "copies") == "3 copies"


def test_a_refusal_counts_the_connected_nodes_in_words() -> None:
    closest = [{"name": "lab-1", "reasons": ["has 2 CPUs, needs 8"]}]
    one = describe_refusal("cpus >= 8", {"online": 1, "closest": closest})
    assert one.startswith("the one connected node does not meet cpus >= 8. Closest: lab-1: ")
    two = describe_refusal("cpus >= 8", {"online": 2, "closest": closest})
    assert two.startswith("none of the 2 connected nodes meets cpus >= 8.")
