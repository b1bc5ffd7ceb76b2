"""Generated documentation matches the code it is generated from."""

from __future__ import annotations

from pathlib import Path

from supervisor import lifecycle

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_lifecycle_table_in_the_docs_is_the_codes() -> None:
    text = (DOCS / "lifecycle.md").read_text()
    assert lifecycle.render_doc(text) == text, "docs/lifecycle.md is stale: run python -m supervisor.lifecycle"
    for edge in lifecycle.EDGES:
        assert f"| `{edge.source.value}` | `{edge.target.value}` |" in text


def test_the_actor_refuses_an_edge_not_in_the_table() -> None:
    S = lifecycle.State
    lifecycle.check(S.STOPPED, S.STARTING)
    try:
        lifecycle.check(S.STOPPED, S.RUNNING)
    except lifecycle.IllegalTransition as exc:
        assert "stopped → running" in str(exc)
    else:
        raise AssertionError("stopped → running was allowed")
