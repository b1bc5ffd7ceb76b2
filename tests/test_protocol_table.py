"""The daemon's action table, `herd.protocol` and docs/protocol.md agree on
which built-in actions only read (and so are served on the status socket)."""

from __future__ import annotations

import re

from helpers import REPO

from herd.protocol import READ_ACTIONS, WRITE_ACTIONS
from supervisor._actions import ACTIONS
from supervisor.engine import TRIGGER


def _documented_sockets() -> dict[str, set[str]]:
    """Action name -> the "socket" cells of its rows in §5 of docs/protocol.md."""
    text = (REPO / "docs" / "protocol.md").read_text()
    section = text.split("## 5. Actions", 1)[1].split("## 6.", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("action", "---"):
            continue
        for name in re.findall(r"`([a-z-]+)`", cells[0]):
            rows.setdefault(name, set()).add(cells[4])
    return rows


def test_herd_sets_are_the_tables_names() -> None:
    assert READ_ACTIONS == {a.name for a in ACTIONS if a.read_only}
    assert WRITE_ACTIONS == {a.name for a in ACTIONS if not a.read_only} | {TRIGGER.name}
    assert not TRIGGER.read_only


def test_docs_list_every_built_in_action_on_the_right_socket() -> None:
    documented = _documented_sockets()
    for name in READ_ACTIONS | WRITE_ACTIONS:
        assert name in documented, f"docs/protocol.md §5 does not list {name!r}"
        want = "both" if name in READ_ACTIONS else "control"
        assert documented[name] == {want}, f"{name}: documented for {documented[name]}, is {want}"
