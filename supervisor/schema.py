"""Strict, typed reading of TOML tables, with errors that name the key path.

Used by the engine's own loader and by every service type under
``services/``: each reads its table through a `Table`, which records an
error for a wrong type or value and, on `Table.finish`, for every key nobody
asked for.  Reading never stops at the first error, so `supervisor --check`
prints them all.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["ConfigError", "ConfigErrors", "Table", "describe", "unusable_values", "MISSING"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One problem in the configuration, at a key path (or about services)."""

    path: str
    message: str

    def __str__(self) -> str:
        # A key may hold a newline or a NUL: escaped, so one error stays one line.
        return f"{printable(self.path)}: {self.message}" if self.path else self.message


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """`text` with control characters escaped (``\\n``, ``\\x00``), for one-line messages."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


class ConfigErrors(Exception):
    """The configuration has one or more errors; `errors` lists them all."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def describe(value: Any) -> str:
    """A value as the user wrote it, for messages: strings quoted, tables as tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # as TOML spells it: nan, inf, -inf
    if isinstance(value, int) and abs(value) >= 10**40:
        return f"an integer of {len(str(abs(value)))} digits"
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _as_float(value: Any) -> float | None:
    """A TOML number as a float (an integer too large for one: infinity); None for anything else."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


_OCTAL = re.compile(r"^0?o?[0-7]{1,4}$")


class Table:
    """A TOML table being read, with its key path for messages."""

    def __init__(self, data: Any, path: str, errors: list[ConfigError]) -> None:
        self.path = path
        self.errors = errors
        self.seen: set[str] = set()
        if isinstance(data, dict):
            self.data: dict[str, Any] = data
            self.ok = True
        else:
            self.data = {}
            self.ok = False
            self.error(None, f"expected a table, got {describe(data)}")

    # -- plumbing -----------------------------------------------------------------

    def key_path(self, key: str | None) -> str:
        if key is None:
            return self.path
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, message: str) -> None:
        self.errors.append(ConfigError(self.key_path(key), message))

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = MISSING) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def finish(self) -> None:
        """Report every key that no reader asked for."""
        for key in self.data:
            if key not in self.seen:
                from herd.suggest import did_you_mean

                known = ", ".join(sorted(self.seen)) or "none"
                self.error(key, f"unknown key{did_you_mean(key, self.seen)} (known keys: {known})")

    def _get(self, key: str, default: Any, required: bool, check: Callable[[Any], T | None], expected: str) -> Any:
        value = self.raw(key)
        if value is MISSING:
            if required:
                self.error(key, f"missing; expected {expected}")
            return default
        result = check(value)
        if result is None:
            self.error(key, f"expected {expected}, got {describe(value)}")
            return default
        return result

    # -- typed readers ------------------------------------------------------------

    def str(self, key: str, default: Any = None, *, required: bool = False, nonempty: bool = False) -> Any:
        def check(v: Any) -> Any:
            return v if isinstance(v, str) and (v or not nonempty) else None

        return self._get(key, default, required, check, "a non-empty string" if nonempty else "a string")

    def bool(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        return self._get(key, default, required, lambda v: v if isinstance(v, bool) else None, "true or false")

    def int(self, key: str, default: Any = None, *, min: int | None = None, max: int | None = None,
            required: bool = False) -> Any:
        value = self._get(key, default, required,
                          lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None,
                          "an integer")
        return self._bounded(key, value, default, min, max)

    def number(self, key: str, default: Any = None, *, min: float | None = None, max: float | None = None,
               exclusive_min: bool = False, required: bool = False) -> Any:
        value = self._get(key, default, required, _as_float, "a number")
        if value is not default and not math.isfinite(value):
            raw = self.data[key]
            self.error(key, f"{'is too large' if isinstance(raw, int) else 'expected a finite number'}, "
                            f"got {describe(raw)}")
            return default
        if value is not default and min is not None and exclusive_min and value <= min:
            self.error(key, f"must be greater than {min:g}, got {describe(self.data[key])}")
            return default
        return self._bounded(key, value, default, None if exclusive_min else min, max)

    def _bounded(self, key: str, value: Any, default: Any, lo: Any, hi: Any) -> Any:
        if value is default or value is None:
            return value
        if lo is not None and value < lo:
            self.error(key, f"must be at least {lo}, got {describe(self.data[key])}")
            return default
        if hi is not None and value > hi:
            self.error(key, f"must be at most {hi}, got {describe(self.data[key])}")
            return default
        return value

    def choice(self, key: str, choices: Iterable[str], default: Any = None, *, required: bool = False) -> Any:
        options = list(choices)
        expected = "one of " + ", ".join(json.dumps(c) for c in options)
        return self._get(key, default, required, lambda v: v if v in options else None, expected)

    def str_list(self, key: str, default: Any = (), *, required: bool = False, nonempty: bool = False) -> Any:
        def check(v: Any) -> Any:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                return None
            if nonempty and not v:
                return None
            return tuple(v)

        expected = "a non-empty array of strings" if nonempty else "an array of strings"
        return self._get(key, default, required, check, expected)

    def str_or_int(self, key: str, default: Any = None) -> Any:
        def check(v: Any) -> Any:
            if isinstance(v, bool):
                return None
            if isinstance(v, str) and v:
                return v
            if isinstance(v, int) and v >= 0:
                return v
            return None

        return self._get(key, default, False, check, "a name or a non-negative integer id")

    def octal(self, key: str, default: Any = None) -> Any:
        """A permission or umask: ``"0022"`` (string, octal) or an integer."""
        def check(v: Any) -> Any:
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0o7777:
                return v
            if isinstance(v, str) and _OCTAL.match(v):
                return int(v.replace("o", ""), 8)
            return None

        return self._get(key, default, False, check, 'an octal string like "0022"')

    def str_map(self, key: str) -> dict[str, str]:
        value = self.raw(key)
        if value is MISSING:
            return {}
        if not isinstance(value, dict):
            self.error(key, f"expected a table of strings, got {describe(value)}")
            return {}
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, str):
                self.error(f"{key}.{k}", f"expected a string, got {describe(v)}")
            else:
                out[k] = v
        return out

    def table(self, key: str, *, required: bool = False) -> Table | None:
        """A sub-table, or None when absent (errors recorded by the sub-table)."""
        value = self.raw(key)
        if value is MISSING:
            if required:
                self.error(key, "missing; expected a table")
            return None
        return Table(value, self.key_path(key), self.errors)

    def table_list(self, key: str) -> list[Table]:
        """An array of tables (``[[key]]``)."""
        value = self.raw(key)
        if value is MISSING:
            return []
        if not isinstance(value, list):
            self.error(key, f"expected an array of tables ([[{self.key_path(key)}]]), got {describe(value)}")
            return []
        return [Table(item, f"{self.key_path(key)}[{i}]", self.errors) for i, item in enumerate(value)]


def unusable_values(data: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(key path, problem) for every value no service can be given: a number
    that is not finite (``nan``, ``inf``) or a string or key holding a NUL
    (no argument, path or environment variable can), anywhere in `data`."""
    if isinstance(data, dict):
        for key, value in data.items():
            sub = f"{path}.{key}" if path else key
            if "\0" in key:
                yield sub, "a key cannot contain a NUL character"
            yield from unusable_values(value, sub)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from unusable_values(value, f"{path}[{i}]")
    elif isinstance(data, float) and not math.isfinite(data):
        yield path, f"expected a finite number, got {describe(data)}"
    elif isinstance(data, str) and "\0" in data:
        yield path, "a NUL character cannot be passed to a program; remove it"
