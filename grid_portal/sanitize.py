"""Inert display: rich output from a node the researcher does not trust.

JupyterLab runs the HTML and JavaScript of a notebook's outputs as trusted output, so a
display bundle published verbatim from a volunteer's machine would run that machine's script
in the researcher's browser session. :func:`inert_bundle` keeps only text/plain, image/png,
image/jpeg, application/json and text/html cleaned by ``nh3`` (the Rust Ammonia sanitiser):
no scripts, no event handlers, no styles, no frames or embedded objects, and no URL except
``data:`` images and ``#fragment`` links, so nothing is fetched from anywhere. What was taken
out is said in one text/plain line.
"""

from __future__ import annotations

from typing import Any

KEPT = ("text/plain", "image/png", "image/jpeg", "application/json", "text/html")
_URL_ATTRIBUTES = {"href", "src", "srcset", "cite", "longdesc", "action", "formaction", "poster"}


def _url_filter(element: str, attribute: str, value: str) -> str | None:
    if attribute not in _URL_ATTRIBUTES:
        return value
    text = value.strip().lower()
    if attribute == "src" and element == "img" and text.startswith("data:image/"):
        return value
    if attribute == "href" and text.startswith("#"):
        return value
    return None  # any other URL would fetch from somewhere, or run (javascript:)


def clean_html(html: str) -> str:
    """HTML with scripts, handlers, styles and remote resources removed."""
    import nh3

    return nh3.clean(
        html, attribute_filter=_url_filter, url_schemes={"data"}, strip_comments=True, link_rel=None
    )


def inert_bundle(
    data: dict[str, Any], metadata: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parts of a display bundle that run nothing in the browser, and a note of the rest."""
    kept: dict[str, Any] = {}
    removed = []
    for mime, value in data.items():
        if mime not in KEPT:
            removed.append(mime)
        elif mime == "text/html":
            text = "".join(value) if isinstance(value, list) else value
            if isinstance(text, str):
                kept[mime] = clean_html(text)
            else:
                removed.append(mime)
        elif mime == "application/json" or isinstance(value, str):
            kept[mime] = value
        else:
            removed.append(mime)
    if removed:
        note = (
            f"[grid: {', '.join(sorted(removed))} removed from the output of a node you do not "
            "trust; trusted nodes' output is shown as is (docs/security.md)]"
        )
        plain = kept.get("text/plain")
        kept["text/plain"] = f"{plain}\n{note}" if isinstance(plain, str) and plain else note
    meta = {
        k: v
        for k, v in (metadata or {}).items()
        if k in kept and isinstance(v, dict) and all(isinstance(x, int | float) for x in v.values())
    }
    return kept, meta
