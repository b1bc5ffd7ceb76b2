"""Health checks: is a running service still answering?

One check runs at a time per service (`run_checks` is a loop: sleep the
interval, check, report), each bounded by its timeout.  The loop is a
worker of the service's actor: it reports each result with a message
(`_HealthResult`) and changes nothing of the service; the actor counts the
failures in a row, forgives those within the start period, and restarts the
service through its normal stop and start path (`service.py`).

A socket check completes an exchange, not just a connect (where the
supervisor holds the listening socket, a connect proves nothing): it sends
`send`, then reads until `expect` shows up.  An ``exec`` check runs its argv
(never through a shell) as the service's user, in the service's cgroup, in
a process group of its own, with its output in the service's log; at the
timeout the whole group is killed.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import structlog
import trio

from . import _proc
from ._actor import _HealthCheckRunning, _HealthResult
from .spec import HealthSpec

if TYPE_CHECKING:
    from .service import Service

__all__ = ["HealthState", "run_checks", "check_once", "kill_check"]

log = structlog.get_logger("supervisor.service")

#: How much a socket check reads at most while it looks for `expect`.
MAX_READ = 64 * 1024


@dataclass(slots=True)
class HealthState:
    """What a service's actor knows of its checks (the actor alone writes it)."""

    last_result: str | None = None  # "passed" or "failed"
    last_detail: str | None = None
    last_check: float | None = None  # when the last check ended (epoch)
    last_success: float | None = None
    failures: int = 0  # failed checks in a row (forgiven ones not counted)
    check_pid: int | None = None  # an exec check running now
    check_start: int | None = None  # its start time (ticks): with the pid, one process exactly

    def to_json(self, spec: HealthSpec) -> dict[str, Any]:
        return {**spec.to_json(), "last-result": self.last_result, "last-detail": self.last_detail,
                "last-check": self.last_check, "last-success": self.last_success,
                "consecutive-failures": self.failures}

    def to_record(self) -> dict[str, Any]:
        return {"last-result": self.last_result, "last-detail": self.last_detail,
                "last-check": self.last_check, "last-success": self.last_success,
                "failures": self.failures, "check-pid": self.check_pid, "check-start": self.check_start}

    @classmethod
    def from_record(cls, data: Any) -> HealthState:
        """The inverse of `to_record` (anything malformed: a fresh state)."""
        state = cls()
        if not isinstance(data, dict):
            return state
        for key, attr, types in (("last-result", "last_result", str), ("last-detail", "last_detail", str),
                                 ("last-check", "last_check", (int, float)),
                                 ("last-success", "last_success", (int, float)),
                                 ("failures", "failures", int), ("check-pid", "check_pid", int),
                                 ("check-start", "check_start", int)):
            value = data.get(key)
            if isinstance(value, types) and not isinstance(value, bool):
                setattr(state, attr, value)
        return state


def kill_check(pid: int, start: int | None) -> bool:
    """A previous supervisor's exec check (re-exec, or a crash of ours): kill
    its process group, if the process is still the one recorded."""
    if start is None or _proc.start_ticks(pid) != start:
        return False
    _kill_group(pid)
    return True


def _kill_group(pid: int) -> None:
    """SIGKILL a check's process group (its own session) and its descendants."""
    victims = _proc.descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in [pid, *victims]:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


async def run_checks(service: Service, run: int) -> None:
    """The check loop of one run of the service (cancelled when it leaves
    `running`): every `interval`, one check, reported to the actor."""
    health = service.spec.health
    assert health is not None
    while True:
        await trio.sleep(health.interval)
        ok, detail = await check_once(service, health, run)
        service._post(_HealthResult(run, ok, detail))


async def check_once(service: Service, health: HealthSpec, run: int) -> tuple[bool, str]:
    """One check, bounded by its timeout: (passed, what happened).  Never
    raises (but trio.Cancelled): whatever goes wrong is the check's failure."""
    try:
        if health.type == "exec":
            return await _exec_check(service, health, run)
        with trio.fail_after(health.timeout):
            if health.type == "udp":
                return await _udp_check(health)
            return await _stream_check(health)
    except trio.TooSlowError:
        return False, f"no answer within {health.timeout:g} s"
    except (OSError, ssl.SSLError, trio.BrokenResourceError) as exc:
        return False, _os_error(exc)
    except Exception as exc:  # a bug of ours must not take the service's actor down
        log.exception("health check failed unexpectedly")
        return False, f"{type(exc).__name__}: {exc}"


def _refused_us(exc: BaseException) -> bool:
    """A TLS alert from the server (it is there, and refuses an anonymous client)."""
    cause = exc.__cause__
    return isinstance(cause, ssl.SSLError) and "ALERT" in str(cause.reason or "")


def _os_error(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(exc, OSError) and not exc.strerror and isinstance(cause, BaseExceptionGroup) \
            and len(cause.exceptions) == 1 and isinstance(cause.exceptions[0], OSError):
        exc = cause.exceptions[0]  # trio's "all attempts to connect … failed": the one attempt's error
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def _stream_check(health: HealthSpec) -> tuple[bool, str]:
    stream: trio.abc.Stream
    if health.type == "unix":
        assert health.path is not None
        stream = await trio.open_unix_socket(health.path)
    else:
        assert health.address is not None
        stream = await trio.open_tcp_stream(*_split(health.address))
    async with stream:
        if health.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            stream = trio.SSLStream(stream, context)
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                if _refused_us(exc):  # it answered: a server that wants a client certificate (Ganeti's noded)
                    return True, "TLS handshake answered (the server wants a client certificate)"
                raise
        if health.send:
            await stream.send_all(health.send)
        if health.expect is None and not health.send:
            return True, "TLS handshake completed" if health.tls else "connected"
        return _verdict(health, await _read_until(stream, health.expect))


async def _read_until(stream: trio.abc.ReceiveStream, expect: bytes | None) -> bytes:
    """What comes back: up to `expect` (or any bytes, without one), EOF or MAX_READ."""
    got = b""
    while len(got) < MAX_READ:
        chunk = await stream.receive_some(MAX_READ)
        if not chunk:
            break
        got += chunk
        if expect is None or expect in got:
            break
    return got


def _verdict(health: HealthSpec, got: bytes) -> tuple[bool, str]:
    if health.expect is None:
        return (True, f"answered ({len(got)} bytes)") if got else (False, "closed without an answer")
    if health.expect in got:
        return True, "answered as expected"
    return False, f"answer without the expected {health.expect[:40]!r}: {got[:60]!r}"


async def _udp_check(health: HealthSpec) -> tuple[bool, str]:
    assert health.address is not None and health.send is not None
    host, port = _split(health.address)
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, kind, proto, _, addr = infos[0]
    with trio.socket.socket(family, kind, proto) as sock:
        await sock.connect(addr)
        while True:  # a datagram may be lost: ask again now and then, until the timeout
            await sock.send(health.send)
            with trio.move_on_after(max(0.2, health.timeout / 4)):
                got = await sock.recv(MAX_READ)
                ok, detail = _verdict(health, got)
                if ok or health.expect is not None:
                    return ok, detail


async def _exec_check(service: Service, health: HealthSpec, run: int) -> tuple[bool, str]:
    assert health.command is not None and service._nursery is not None
    spec = replace(service.spec, command=health.command)
    try:
        cgroup_fd = service.containment.open_for_spawn()
    except OSError as exc:
        return False, f"cannot use the cgroup of {service.name}: {exc.strerror or exc}"
    try:
        with service.output.writers(service._nursery) as (out, err):
            child = _proc.spawn(spec, stdout=out, stderr=err, cgroup_fd=cgroup_fd)
    except _proc.SpawnError as exc:
        return False, str(exc)
    finally:
        if cgroup_fd is not None:
            os.close(cgroup_fd)
    service._post(_HealthCheckRunning(run, child.pid, child.start_time_ticks))
    try:
        with trio.move_on_after(health.timeout) as scope:
            status = await child.wait()
    except trio.Cancelled:  # the service is stopping: the check goes with it
        _kill_group(child.pid)
        with trio.CancelScope(shield=True):
            await child.wait()
        raise
    if scope.cancelled_caught:
        _kill_group(child.pid)
        with trio.CancelScope(shield=True):
            await child.wait()
        return False, f"{_describe(health.command)} timed out after {health.timeout:g} s (killed)"
    if status.code == 0:
        return True, f"{_describe(health.command)} exited with code 0"
    return False, f"{_describe(health.command)} {status.describe()}"


def _describe(command: tuple[str, ...]) -> str:
    return os.path.basename(command[0])

