"""Requirement expressions (``where``) and refusal messages, shared by the client, the portal
and workflows: one parser, one matcher, one wording. Plain Python, no Dask."""

from grid_portal.requirements.matching import (
    Expression,
    ExpressionError,
    compile_requirement,
    node_attributes,
)
from grid_portal.requirements.refusal import describe_refusal, match_report

__all__ = [
    "Expression",
    "ExpressionError",
    "compile_requirement",
    "describe_refusal",
    "match_report",
    "node_attributes",
]
