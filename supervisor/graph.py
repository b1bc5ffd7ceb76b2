"""The service graph: provisions, requirements, dependents, cycles.

Immutable once built.  Every name a user types (a service's name or any of
its provisions) resolves to one canonical service name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .schema import ConfigError

if TYPE_CHECKING:
    from .spec import ServiceSpec

__all__ = ["Graph"]


class Graph:
    """Name resolution and dependency edges between canonical service names."""

    def __init__(self, specs: Iterable[ServiceSpec]) -> None:
        self.specs: dict[str, ServiceSpec] = {s.name: s for s in specs}
        self._names: dict[str, str] = {}
        for spec in self.specs.values():
            for name in spec.names:
                self._names.setdefault(name, spec.name)
        self._requires: dict[str, tuple[str, ...]] = {}
        self._dependents: dict[str, list[str]] = {name: [] for name in self.specs}
        for spec in self.specs.values():
            reqs = tuple(dict.fromkeys(self._names[r] for r in spec.requires if r in self._names))
            self._requires[spec.name] = reqs
            for req in reqs:
                self._dependents[req].append(spec.name)

    @classmethod
    def build(cls, specs: Sequence[ServiceSpec], errors: list[ConfigError],
              rejected: frozenset[str] = frozenset()) -> Graph:
        """Validate provisions, requirements and cycles, recording errors.

        A requirement on a `rejected` name (a service whose own error is
        reported already) is not reported again."""
        owner: dict[str, ServiceSpec] = {}
        for spec in specs:
            for name in spec.names:
                other = owner.get(name)
                if other is not None and other is not spec:
                    where = other.source or other.name
                    errors.append(ConfigError(
                        f"{spec.source}.provides" if name != spec.name and spec.source else (spec.source or spec.name),
                        f"{name!r} is also provided by {where}",
                    ))
                else:
                    owner[name] = spec
        for spec in specs:
            for req in spec.requires:
                if req in rejected:
                    continue
                if req not in owner:
                    from herd.suggest import did_you_mean

                    errors.append(ConfigError(
                        spec.key_path("requires") if spec.source else spec.name,
                        # (a near name that is another service's is a typo; not this one's)
                        f"{req!r} is provided by no service"
                        f"{did_you_mean(req, (n for n in owner if owner[n] is not spec), cutoff=0.75)}",
                    ))
                elif owner[req] is spec:
                    errors.append(ConfigError(
                        spec.key_path("requires") if spec.source else spec.name,
                        f"{spec.name!r} requires itself",
                    ))
        graph = cls(s for s in specs if owner.get(s.name) is s)
        for cycle in graph.cycles():
            errors.append(ConfigError("", "dependency cycle: " + " -> ".join(cycle)))
        return graph

    # -- queries -------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self.specs)

    def resolve(self, name: str) -> str | None:
        """The canonical name for a name or provision, or None."""
        return self._names.get(name)

    def names(self) -> list[str]:
        """Every name and provision."""
        return list(self._names)

    def requirements(self, name: str) -> tuple[str, ...]:
        return self._requires.get(name, ())  # (a transient service is in no graph)

    def dependents(self, name: str) -> tuple[str, ...]:
        return tuple(self._dependents.get(name, ()))

    def order(self) -> list[str]:
        """Canonical names, requirements before dependents (ties by name)."""
        done: set[str] = set()
        out: list[str] = []

        def visit(name: str, stack: set[str]) -> None:
            if name in done or name in stack:
                return
            stack.add(name)
            for req in sorted(self._requires[name]):
                visit(req, stack)
            stack.discard(name)
            done.add(name)
            out.append(name)

        for name in sorted(self.specs):
            visit(name, set())
        return out

    def cycles(self) -> list[list[str]]:
        """Each dependency cycle once, as a path that returns to its start."""
        white, grey, black = 0, 1, 2
        color = dict.fromkeys(self.specs, white)
        found: list[list[str]] = []
        seen: set[frozenset[str]] = set()

        for start in sorted(self.specs):
            if color[start] != white:
                continue
            stack: list[tuple[str, list[str]]] = [(start, sorted(self._requires[start]))]
            path = [start]
            color[start] = grey
            while stack:
                node, pending = stack[-1]
                if not pending:
                    stack.pop()
                    path.pop()
                    color[node] = black
                    continue
                nxt = pending.pop(0)
                if color[nxt] == white:
                    color[nxt] = grey
                    path.append(nxt)
                    stack.append((nxt, sorted(self._requires[nxt])))
                elif color[nxt] == grey:
                    cycle = path[path.index(nxt):] + [nxt]
                    key = frozenset(cycle)
                    if key not in seen:
                        seen.add(key)
                        found.append(cycle)
        return found

    def to_dot(self) -> str:
        """Graphviz DOT: an edge A -> B means A requires B."""
        lines = ["digraph services {", "  rankdir=LR;"]
        for name in sorted(self.specs):
            lines.append(f"  {_quote(name)};")
        for name in sorted(self.specs):
            for req in self._requires[name]:
                lines.append(f"  {_quote(name)} -> {_quote(req)};")
        lines.append("}")
        return "\n".join(lines) + "\n"


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
