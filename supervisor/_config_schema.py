"""The configuration's JSON Schema, derived from the readers themselves.

The configuration has no separate declaration: each table is read by code
(``config.read_service_table``, each service type's ``build``) through the
typed accessors of `schema.Table`.  This module watches those readers: it
parses probe documents with every accessor recorded (key, accessor, default,
bounds, choices), and grows the probes until nothing new is read: a sub-table
read but absent is added, an array of tables gets one entry, and each value
of a choice (``ready.type``) is tried, so that keys read only for one
choice are found too, and a key the reader only tests for (``Table.has``)
is given, as an array of tables.  A table is closed (``additionalProperties: false``)
when the reader reports a probe key as unknown, open otherwise (tables of
names, like ``resource-limits``); the probe key's value is itself a probe
table, so that the entries of an open table of tables get a schema too.  So a key added to a reader appears in the
schema with no other change; `python -m supervisor._config_schema` writes
``docs/supervisor.schema.json``, and a test checks that it is current.

Keys read only through ``Table.raw`` (values with a check of their own,
``stop-signal``, libvirt's fields) get an empty schema (any value): the
schema never rejects what the daemon accepts, and ``supervisor --check``
stays the full check.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import ServiceType, discover_service_types, parse_config
from .schema import MISSING, ConfigErrors, Table

__all__ = ["build_schema", "render", "SCHEMA_FILE"]

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "supervisor.schema.json"
SCHEMA_ID = "https://example.invalid/vmhost-supervisor/supervisor.schema.json"
PROBE = "x-schema-probe"
#: The probe's generic service: defaults derived from its name are no defaults.
SERVICE = "x-schema-service"
#: The accessors of `Table` that are recorded, with the name they get in a record.
ACCESSORS = ("has", "raw", "str", "bool", "int", "number", "choice", "str_list", "str_or_int", "octal", "str_map",
             "table", "table_list")
_INDEX = re.compile(r"\[\d+\]")

Record = dict[str, Any]


@contextmanager
def _recording(records: dict[tuple[str, str], Record]) -> Iterator[None]:
    """Within: every accessor call on any `Table` is noted in `records`
    as ``(table path, key) -> {"kind", "args", "kwargs"}``; a typed one wins over ``raw``."""
    originals: dict[str, Callable[..., Any]] = {name: getattr(Table, name) for name in ACCESSORS}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(self: Table, key: str, *args: Any, **kwargs: Any) -> Any:
            slot = (self.path, key)
            if name not in ("has", "raw") or slot not in records:
                records[slot] = {"kind": name, "args": args, "kwargs": kwargs}
            return fn(self, key, *args, **kwargs)
        return recorded

    for name, fn in originals.items():
        setattr(Table, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(Table, name, fn)


def _probe(document: dict[str, Any], types: dict[str, ServiceType]) -> tuple[dict[tuple[str, str], Record], set[str]]:
    """Parse `document` with the accessors recorded: the records, and the
    paths of the tables that report `PROBE` as an unknown key (closed tables)."""
    records: dict[tuple[str, str], Record] = {}
    errors: list[Any] = []
    with _recording(records):
        try:
            parse_config(copy.deepcopy(document), service_types=types, host_checks=False,
                         overrides={"state_dir": Path("/var/lib/x")})
        except ConfigErrors as exc:
            errors = exc.errors
    closed = {e.path[: -len(PROBE) - 1] for e in errors
              if e.path.endswith(f".{PROBE}") and e.message.startswith("unknown key")}
    return records, closed


def _locate(document: dict[str, Any], path: str) -> Any:
    """The table of `document` at a reader's key path (``services.x.ready``, ``hurd-vm[0]``)."""
    node: Any = document
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            node = node[int(part[1:-1])] if isinstance(node, list) else node
        else:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node
    return node


def _probe_table() -> dict[str, Any]:
    """A table in a probe document: its one key is `PROBE`, reported as unknown by a
    closed table, and read by an open one as an entry (a table: its keys are recorded)."""
    return {PROBE: {PROBE: 0}}


def _grow(document: dict[str, Any], records: dict[tuple[str, str], Record]) -> bool:
    """Add the sub-tables and arrays of tables that were read but absent; whether any was."""
    grew = False
    for (path, key), rec in list(records.items()):
        if rec["kind"] not in ("table", "table_list", "has"):
            continue
        table = _locate(document, path)
        if isinstance(table, dict) and key not in table:
            # asked whether it is there: given as an array of tables, the one kind
            # a reader may test for first (`[[ganeti.os]]`); its accessor then says what it is
            table[key] = _probe_table() if rec["kind"] == "table" else [_probe_table()]
            grew = True
    return grew


def _collect(base: dict[str, Any], types: dict[str, ServiceType]) -> tuple[dict[tuple[str, str], Record], set[str]]:
    """Probe from `base` until nothing new is read, trying each choice's values."""
    records: dict[tuple[str, str], Record] = {}
    closed: set[str] = set()
    documents = [base]
    tried: set[tuple[str, str, str]] = set()
    while documents:
        document = documents.pop()
        for _ in range(10):
            found, shut = _probe(document, types)
            for slot, rec in found.items():
                if slot not in records or records[slot]["kind"] in ("raw", "has"):
                    records[slot] = rec
            closed |= shut
            if not _grow(document, found):
                break
        for (path, key), rec in found.items():
            if rec["kind"] != "choice":
                continue
            for value in rec["args"][0] if rec["args"] else rec["kwargs"]["choices"]:
                if (path, key, value) not in tried:
                    tried.add((path, key, value))
                    variant = copy.deepcopy(document)
                    table = _locate(variant, path)
                    if isinstance(table, dict):
                        table[key] = value
                        documents.append(variant)
    return records, closed


def _default(value: Any) -> Any:
    if value is MISSING or value is None or (isinstance(value, str) and SERVICE in value):
        return MISSING
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return MISSING
    return value


def _leaf(rec: Record) -> dict[str, Any]:
    """The schema of one key from its record."""
    kind, args, kw = rec["kind"], rec["args"], rec["kwargs"]
    default = _default(args[0] if args and kind not in ("choice",) else kw.get("default", MISSING))
    out: dict[str, Any]
    if kind == "str":
        out = {"type": "string", **({"minLength": 1} if kw.get("nonempty") else {})}
    elif kind == "bool":
        out = {"type": "boolean"}
    elif kind in ("int", "number"):
        out = {"type": "integer" if kind == "int" else "number"}
        if kw.get("min") is not None:
            out["exclusiveMinimum" if kw.get("exclusive_min") else "minimum"] = kw["min"]
        if kw.get("max") is not None:
            out["maximum"] = kw["max"]
    elif kind == "choice":
        choices = list(args[0] if args else kw["choices"])
        out = {"enum": choices}
        default = _default(args[1] if len(args) > 1 else kw.get("default", MISSING))
    elif kind == "str_list":
        out = {"type": "array", "items": {"type": "string", **({"minLength": 1} if kw.get("nonempty") else {})}}
    elif kind in ("str_or_int", "octal"):
        out = {"type": ["string", "integer"]}
    elif kind == "str_map":
        out = {"type": "object", "additionalProperties": {"type": "string"}}
    else:  # raw: checked by the reader itself
        out = {}
    if default is not MISSING and kind not in ("str_map", "octal"):
        out["default"] = default
    return out


def _table_schema(path: str, records: dict[tuple[str, str], Record], closed: set[str],
                  description: str = "") -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for (p, key), rec in sorted(records.items()):
        if p != path or key == PROBE:
            continue
        sub = f"{path}.{key}" if path else key
        if rec["kind"] == "table":
            properties[key] = _table_schema(sub, records, closed)
        elif rec["kind"] == "table_list":
            item = _table_schema(f"{sub}[0]", records, closed)
            properties[key] = {"type": "array", "items": item}
        else:
            properties[key] = _leaf(rec)
    out: dict[str, Any] = {"type": "object"}
    if description:
        out["description"] = description
    out["properties"] = properties
    entry = f"{path}.{PROBE}" if path else PROBE
    if path in closed:
        out["additionalProperties"] = False
    elif any(p == entry for p, _ in records):  # a table of names whose entries are tables
        out["additionalProperties"] = _table_schema(entry, records, closed)
    return out


def build_schema(service_types: dict[str, ServiceType] | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the configuration file, from the readers
    (of `service_types`, by default those of the ``services`` package)."""
    types = discover_service_types() if service_types is None else service_types
    base: dict[str, Any] = {"supervisor": _probe_table(),
                            "services": {SERVICE: {"command": ["/bin/true"], **_probe_table()}}}
    for name, stype in types.items():
        base[name] = [_probe_table()] if stype.array else _probe_table()
    records, closed = _collect(base, types)
    service = _table_schema(f"services.{SERVICE}", records, closed, "A generic service (docs/configuration.md).")
    service["required"] = ["command"]
    properties: dict[str, Any] = {
        "supervisor": _table_schema("supervisor", records, closed, "The supervisor's own settings."),
        "services": {"type": "object", "description": "Generic services, one table per service name.",
                     "additionalProperties": service},
    }
    for name, stype in sorted(types.items()):
        doc = stype.documentation.strip().splitlines()[0] if stype.documentation.strip() else ""
        if stype.array:
            item = _table_schema(f"{name}[0]", records, closed, doc)
            properties[name] = {"oneOf": [{"type": "array", "items": item}, item]}
        else:
            properties[name] = _table_schema(name, records, closed, doc)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "supervisor configuration (init.toml)",
        "description": "Generated by `python -m supervisor._config_schema` from the configuration's readers; "
                       "do not edit. `supervisor --check` is the full check.",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }


def render() -> str:
    """The schema file's text."""
    return json.dumps(build_schema(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    SCHEMA_FILE.write_text(render())
    print(SCHEMA_FILE, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
