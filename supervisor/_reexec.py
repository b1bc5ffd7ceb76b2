"""Re-executing the supervisor in place (SIGUSR1, `herd reexec root`): the mechanics.

The procedure (when, waiting for calm, what is handed over) is
`reexec.Reexec`; this module checks the new image, writes and reads the
handover file, and executes.

Before anything is touched, the new image is tried in a child process (it
must import and accept the configuration: ``--check``); if not, the re-exec
is refused and the running supervisor goes on.  Then every descriptor that
must survive (control, status and notify sockets; each service's pidfd, log
pipes and listening sockets) is made inheritable, described in
``STATE_DIR/reexec.json``, and the same command line is executed again.
The hand-over is JSON (C-accelerated): at 1,000 services, TOML took 0.9 s
to write and read back, JSON 0.02 s.  A hand-over in TOML (``reexec.toml``,
from an image of before that change) is still read.
The process keeps its PID, so every service stays our child.

Signals that would act on the supervisor are *blocked* (not ignored) across
the exec: one that arrives in between stays pending and is handled by the
new image once it listens for signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, Final, NoReturn

import structlog
import trio

from herd.protocol import ProtocolError

from . import _memdebug, _proc, _samecode, _threads
from ._fs import replace_file
from ._state import REEXEC_ENV, read_toml
from ._state import _clean as _no_nulls  # TOML had no null: a key is missing, never null

__all__ = ["HELD_SIGNALS", "check_new_image", "exec_self", "take_handover"]

log = structlog.get_logger("supervisor.reexec")

from ._threads import HELD_SIGNALS
CHECK_TIMEOUT: Final = 60.0


def _argv() -> list[str]:
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = sys.executable
    return argv


#: For the check of the new image: a file holding the configuration in force.
CHECK_SOURCE_ENV: Final = "SUPERVISOR_CHECK_SOURCE"


def config_in_force(handover: dict[str, Any] | None, *, check: bool) -> bytes | None:
    """The configuration to run instead of the file on disk: after a re-exec,
    the one the previous image ran; for the new image's check, the same."""
    if check:
        path = os.environ.pop(CHECK_SOURCE_ENV, None)
        if path:
            try:
                return Path(path).read_bytes()
            except OSError:
                return None
        return None
    passed = (handover or {}).get("config")
    if isinstance(passed, dict) and isinstance(passed.get("source"), str):
        return passed["source"].encode("utf-8")
    return None


async def check_new_image(source: bytes | None = None, state_dir: Path | None = None) -> None:
    """Run the new code with ``--check`` in a child process, on the
    configuration in force (`source`), not the file as edited since.  When
    not one file of the code changed since this image started
    (`_samecode`), the new image is this one: the same checks run here, in a
    worker thread, and no interpreter is started.

    Raises:
        ProtocolError: ``action-failed`` with what the check printed.
    """
    if _samecode.unchanged():
        # The new image is this one: check the configuration here, not in a
        # child that would start an interpreter and import everything again.
        from .cli import preflight

        problems = await _threads.run_sync(preflight, source)
        if problems:
            detail = " | ".join(problems[-5:])
            log.error("re-exec refused: the new image failed its check", output=detail)
            raise ProtocolError("action-failed", f"re-exec refused: the new image failed its check: {detail}")
        log.info("re-exec: the code is unchanged; its check ran in this process")
        return
    argv = [*_argv(), "--check"]
    env = dict(os.environ)
    held = None
    if source is not None and state_dir is not None:
        held = tempfile.NamedTemporaryFile(dir=state_dir, prefix=".check-", suffix=".toml")
        held.write(source)
        held.flush()
        env[CHECK_SOURCE_ENV] = held.name
    try:
        await _check(argv, env)
    finally:
        if held is not None:
            held.close()


async def _check(argv: list[str], env: dict[str, str]) -> None:
    # Spawned directly and waited on by pidfd, not with trio.run_process: that
    # would leave an idle worker thread, which could take a signal held for
    # the exec (signals are blocked in the main thread only).
    with tempfile.TemporaryFile() as out:
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     close_fds=True, env=env)
        except OSError as exc:
            raise ProtocolError("action-failed", f"re-exec refused: cannot run the new image: {exc}") from None
        popen.returncode = 0  # reaped through its pidfd below, never by Popen
        child = _proc.Child(popen.pid, os.pidfd_open(popen.pid))
        with trio.move_on_after(CHECK_TIMEOUT) as scope:
            status = await child.wait()
        if scope.cancelled_caught:
            child.signal(signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await child.wait()
            raise ProtocolError("action-failed", f"re-exec refused: the check of the new image took over "
                                                 f"{CHECK_TIMEOUT:g} s")
        out.seek(0)
        text = out.read().decode(errors="replace").strip().splitlines()
    if status.code != 0:
        detail = " | ".join(text[-5:]) or status.describe()
        log.error("re-exec refused: the new image failed its check", output=detail)
        raise ProtocolError("action-failed", f"re-exec refused: the new image failed its check: {detail}")


def exec_self(state_dir: Path, handover: dict[str, Any], fds: list[int],
              last: Callable[[dict[str, Any]], None] | None = None) -> NoReturn:
    """Write the hand-over, keep `fds` open, and execute the same command line.

    The signals that act on the supervisor are blocked first; `last` then
    completes the hand-over with what arrived before (a SIGHUP not yet acted on).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    if last is not None:
        last(handover)
    for fd in fds:
        os.set_inheritable(fd, True)
    path = state_dir / "reexec.json"
    try:
        replace_file(path, json.dumps(_no_nulls(handover)).encode(), 0o600, sync=False, dir_mode=0o700)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        for fd in fds:
            os.set_inheritable(fd, False)
        raise ProtocolError("action-failed", f"re-exec failed: cannot write {path}: {exc}") from None
    os.environ[REEXEC_ENV] = str(path)
    log.info("re-executing", argv=_argv(), kept_fds=len(fds))
    _memdebug.dump("reexec")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, _argv())
    except OSError as exc:  # still us: undo and go on
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        for fd in fds:
            os.set_inheritable(fd, False)
        os.environ.pop(REEXEC_ENV, None)
        raise ProtocolError("action-failed", f"exec failed: {exc}") from None


def take_handover() -> dict[str, Any] | None:
    """In the new image: the previous image's hand-over, if this is a re-exec."""
    path = os.environ.pop(REEXEC_ENV, None)
    if not path:
        return None
    data = read_toml(Path(path)) if path.endswith(".toml") else _read_json(Path(path))
    try:
        os.unlink(path)
    except OSError:
        pass
    return data


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
