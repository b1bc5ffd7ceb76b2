"""Black-box harness: a real `supervisor` daemon per test, driven by the real `herd`.

The `sup` fixture gives an unstarted :class:`helpers.Supervisor`.  A test
builds its configuration (tagging each service's processes with
``sup.marker(name)`` so psutil can find them), then calls
``sup.start(config)``, which launches::

    python -m supervisor -c CONF -s SOCK --status-socket RO_SOCK \
        --state-dir D --log-dir L --log-format json

with ``NOTIFY_SOCKET`` pointing at a datagram socket the harness bound, and
returns once the daemon has sent ``READY=1`` (deadline 10 s).  The object then
offers ``.herd(*args, json=False, check=None)`` (runs ``python -m herd -s SOCK``),
``.status(name=None)``, ``.request(obj)`` and ``.connect()`` (raw protocol),
``.subscribe()``, ``.proc``, ``.stop()`` (SIGTERM, returns the exit code),
``.log_dir`` / ``.log_lines(name)``.

Teardown kills the daemon's process group, every descendant seen, and every
process carrying the test's token (in its argv or environment: the daemon's
environment has ``SVTEST_TOKEN``), then removes the socket directory.  The
daemon's stderr tail is printed, so a failing test shows it.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Supervisor


#: Test modules that run twice: with cgroups, and with the fallback forced
#: (--no-cgroups).  Service-type tests run with cgroups only (CI time).
BOTH_WAYS = ("test_core_", "test_io_", "test_lifecycle_", "test_containment")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "containment" not in metafunc.fixturenames:
        return
    both = metafunc.module.__name__.startswith(BOTH_WAYS)
    if metafunc.definition.get_closest_marker("cgroup_only") is not None:
        both = False  # a case the fallback documents as out of its reach
    containments = ["cgroup", "fallback"] if both else ["cgroup"]
    if "way" in metafunc.fixturenames:  # test_core_spawn: born in the cgroup, or moved; no cgroup: moved only
        pairs = [(c, w) for c in containments for w in ("born", "moved") if (c, w) != ("fallback", "born")]
        metafunc.parametrize(("containment", "way"), pairs, indirect=True)
        return
    metafunc.parametrize("containment", containments, indirect=True)


@pytest.fixture
def containment(request: pytest.FixtureRequest) -> str:
    """How the daemon tracks processes: "cgroup", or "fallback" (--no-cgroups)."""
    return getattr(request, "param", "cgroup")


@pytest.fixture
def sup(tmp_path: Path, containment: str) -> Iterator[Supervisor]:
    """An unstarted :class:`Supervisor`; call ``.start(config)``."""
    s = Supervisor(tmp_path, uuid.uuid4().hex[:12], containment)
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture
def make_sup(tmp_path: Path, containment: str) -> Iterator[Callable[[], Supervisor]]:
    """A factory of further :class:`Supervisor` objects, each in its own directory."""
    made: list[Supervisor] = []

    def make() -> Supervisor:
        d = tmp_path / f"sup{len(made)}"
        d.mkdir()
        s = Supervisor(d, uuid.uuid4().hex[:12], containment)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.cleanup()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Any]:
    """A private sshd on localhost (:class:`sshd.SSHServer`), for ``herd --host`` and the status page."""
    from sshd import SSHServer

    server = SSHServer(tmp_path / "ssh")
    try:
        yield server
    finally:
        server.close()


def pytest_report_header(config: pytest.Config) -> str:
    return f"supervisor black-box tests: python {sys.version.split()[0]}, uid {os.getuid()}"
