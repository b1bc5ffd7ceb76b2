"""The configuration's JSON Schema (docs/supervisor.schema.json, issue 16).

It is generated from the configuration's readers (supervisor/_config_schema.py):
the committed file must be current; a validator (``jsonschema``) accepts every
example configuration the project ships (contrib/examples, the demo, and every
TOML block of the docs that the daemon accepts) and rejects wrong ones, as the
daemon does.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from supervisor import ConfigErrors
from supervisor._config_schema import SCHEMA_FILE, render
from supervisor.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads(SCHEMA_FILE.read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def daemon_accepts(document: dict[str, Any]) -> bool:
    try:
        parse_config(document, host_checks=False, overrides={"state_dir": Path("/var/lib/x")})
    except ConfigErrors:
        return False
    return True


def schema_errors(document: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(document)]


def shipped() -> list[tuple[str, dict[str, Any]]]:
    """Every configuration the project ships: files, and the docs' TOML blocks."""
    out = [(str(p.relative_to(ROOT)), tomllib.loads(p.read_text().replace("@DEMO@", "/srv/demo").replace(
        "@REPO@", "/srv/repo"))) for p in sorted((ROOT / "contrib").glob("**/*.toml"))]
    for md in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]):
        for i, block in enumerate(re.findall(r"^```toml\n(.*?)^```", md.read_text(), flags=re.S | re.M)):
            try:
                out.append((f"{md.relative_to(ROOT)} block {i}", tomllib.loads(block)))
            except tomllib.TOMLDecodeError:
                continue  # a fragment (a key without its table)
    return out


def test_the_committed_schema_is_generated_from_the_readers() -> None:
    assert SCHEMA_FILE.read_text() == render(), "docs/supervisor.schema.json is stale: run python -m supervisor._config_schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_shipped_configuration_validates() -> None:
    configs = shipped()
    accepted = [(name, doc) for name, doc in configs if daemon_accepts(doc)]
    assert len(accepted) >= 15, [name for name, _ in configs]
    for name, doc in accepted:
        assert schema_errors(doc) == [], name
    for path in ("contrib/examples/vm-host.toml", "contrib/examples/chain.toml", "contrib/demo/vm-host.toml"):
        assert path in [name for name, _ in accepted], f"{path}: the daemon rejects it"


@pytest.mark.parametrize("text, where", [
    ('[services.web]\ncommand = ["/bin/true"]\nstop-timeout = "ten"\n', "services.web.stop-timeout"),
    ('[services.web]\ncommand = ["/bin/true"]\nstop-timout = 3\n', "services.web"),
    ('[services.web]\nrequires = ["db"]\n', "services.web"),
    ('[services.web]\ncommand = ["/bin/true"]\nready = { type = "socket" }\n', "services.web.ready.type"),
    ('[services.web]\ncommand = ["/bin/true"]\nrespawn-limit = { count = -1 }\n', "services.web.respawn-limit.count"),
    ('[supervisor]\nlog-format = "xml"\n', "supervisor.log-format"),
    ('[libvirt]\nlisten-tls = "no"\n', "libvirt.listen-tls"),
    ('[[hurd-vm]]\nmemory-size = "lots"\n', "hurd-vm"),
    ('[qemu-binfmt]\nflags = 3\n', "qemu-binfmt.flags"),
    ('[ganeti.noded]\nport = 70000\n', "ganeti.noded.port"),
    ('[libvrt]\n', ""),
])
def test_a_wrong_configuration_is_rejected_by_both(text: str, where: str) -> None:
    doc = tomllib.loads(text)
    assert not daemon_accepts(doc)
    errors = schema_errors(doc)
    assert errors, f"the schema accepts {text!r}"
    assert any(e.split(":")[0].startswith(where) for e in errors), errors


def test_a_key_added_to_a_reader_is_in_the_schema() -> None:
    """The schema follows the readers: a service type's new keys appear with no other
    change, including keys read for one value of a choice, keys only tested for, and
    the entries of a table of names (like ``[services.NAME.actions.ACTION]``)."""
    from supervisor import ServiceType, Table
    from supervisor._config_schema import build_schema

    def build(t: Table, context: Any) -> list[Any]:
        t.int("size", 3, min=1)
        check = t.table("check")
        if check is not None and check.ok:
            if check.choice("type", ("tcp", "exec"), "tcp") == "exec":
                check.str_list("command", required=True)
            check.finish()
        actions = t.table("actions")
        if actions is not None and actions.ok:
            for name in actions.data:
                actions.seen.add(name)
                action = Table(actions.data[name], actions.key_path(name), actions.errors)
                action.str("documentation", "")
                action.bool("read-only", False)
                action.finish()
        if t.has("extra"):
            t.str_list("extra")
        t.finish()
        return []

    schema = build_schema({"probe-type": ServiceType("probe-type", build, documentation="A probe type.")})
    table = schema["properties"]["probe-type"]
    assert table["description"] == "A probe type." and table["additionalProperties"] is False
    props = table["properties"]
    assert props["size"] == {"type": "integer", "minimum": 1, "default": 3}
    assert set(props["check"]["properties"]) == {"type", "command"}
    assert props["check"]["properties"]["type"] == {"enum": ["tcp", "exec"], "default": "tcp"}
    assert props["actions"]["additionalProperties"]["properties"] == {
        "documentation": {"type": "string", "default": ""}, "read-only": {"type": "boolean", "default": False}}
    assert props["extra"]["type"] == "array"
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors({"probe-type": {"actions": {"backup": {"read-only": True}}}}))
    assert list(validator.iter_errors({"probe-type": {"actions": {"backup": {"readonly": True}}}}))
