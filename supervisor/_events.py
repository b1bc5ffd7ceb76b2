"""The numbered events subscribers get, and the recent ones kept for replay.

Every event that reaches subscribers gets the next `seq` of this `epoch`
(see ``docs/protocol.md`` §8).  The last `MAX_REPLAY` are kept, so that a
dashboard that reconnects with the last (epoch, seq) it saw gets what it
missed (`replay`), or is told exactly which events it cannot have.  A
re-exec hands the epoch, the counter and the kept events to the next image
(`handover`, `take_over`); a fresh start draws a new epoch and remembers it
with the previous ones in ``STATE_DIR/epochs`` (`remember`), so that a
client coming back after a crash learns its epoch ended, while an epoch
this supervisor never had is refused.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Final

import structlog

from herd.protocol import HEARTBEAT_INTERVAL, MAX_REPLAY, ProtocolError

from . import _fs

__all__ = ["EventLog", "parse_since"]

log = structlog.get_logger("supervisor.engine")

#: Earlier epochs remembered in ``STATE_DIR/epochs``.
KEPT_EPOCHS: Final = 32
_MAX_EPOCH_LEN: Final = 64


def parse_since(args: list[Any]) -> tuple[str, int] | None:
    """`subscribe`'s arguments: ``[]`` or ``[EPOCH, SEQ]``.

    Raises:
        ProtocolError: ``bad-arguments``, naming what is wrong.
    """
    if not args:
        return None
    if len(args) != 2:
        raise ProtocolError("bad-arguments", f"subscribe takes [] or [EPOCH, SEQ], got {args!r}")
    epoch, seq = args
    if not isinstance(epoch, str) or not 0 < len(epoch) <= _MAX_EPOCH_LEN:
        raise ProtocolError("bad-arguments",
                            f"subscribe: EPOCH must be the epoch string of an event, got {epoch!r}")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ProtocolError("bad-arguments",
                            f"subscribe: SEQ must be the seq (an integer >= 0) of the last event seen, got {seq!r}")
    return epoch, seq


class EventLog:
    """The epoch, the event counter, and the last `MAX_REPLAY` events."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex[:16]
        self.seq = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=MAX_REPLAY)
        self.earlier: list[str] = []  # this host's earlier epochs, oldest first

    def number(self, event: dict[str, Any]) -> dict[str, Any]:
        """Give `event` the next seq and keep it; returns it."""
        self.seq += 1
        event["seq"], event["epoch"] = self.seq, self.epoch
        self.recent.append(event)
        return event

    def replay(self, since: tuple[str, int] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The `subscribe` reply for a client that saw everything up to `since`,
        and the kept events it has not seen.

        ``missed`` lists the ranges it cannot have, each ``{"epoch", "first",
        "last"}`` (``last`` null: the rest of an earlier epoch, whose end this
        supervisor does not know).

        Raises:
            ProtocolError: ``bad-arguments`` for a seq this epoch has not
                reached, or an epoch this supervisor never had.
        """
        reply: dict[str, Any] = {"subscribed": True, "epoch": self.epoch, "seq": self.seq,
                                 "heartbeat": HEARTBEAT_INTERVAL}
        if since is None:
            return reply, []
        epoch, seq = since
        missed: list[dict[str, Any]] = []
        if epoch == self.epoch:
            if seq > self.seq:
                raise ProtocolError("bad-arguments", (
                    f"subscribe: seq {seq} is ahead of epoch {epoch}, whose last event is {self.seq}; "
                    "send the seq of the last event you got"))
            first = seq + 1
        elif epoch in self.earlier:
            # the supervisor restarted (or crashed) since: what followed `seq` then is gone
            missed.append({"epoch": epoch, "first": seq + 1, "last": None})
            first = 1
        else:
            known = ", ".join([*self.earlier[-3:], self.epoch])
            raise ProtocolError("bad-arguments", (
                f"subscribe: epoch {epoch!r} is not one of this supervisor's (the latest: {known}); "
                "subscribe without [EPOCH, SEQ] and read status again"))
        held = self.recent[0]["seq"] if self.recent else self.seq + 1
        if first < held:
            missed.append({"epoch": self.epoch, "first": first, "last": held - 1})
            first = held
        events = list(self.recent)[first - held:] if first <= self.seq else []
        reply.update(replayed=len(events), missed=missed, complete=not missed)
        return reply, events

    # -- across a re-exec, and across restarts ------------------------------------------

    def handover(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seq": self.seq, "recent": list(self.recent), "earlier": self.earlier}

    def take_over(self, passed: dict[str, Any]) -> None:
        """The previous image's (a re-exec): the same epoch goes on."""
        self.epoch, self.seq = passed["epoch"], int(passed.get("seq", 0))
        recent = passed.get("recent")
        if isinstance(recent, list):
            self.recent.extend(e for e in recent if isinstance(e, dict) and isinstance(e.get("seq"), int))
        earlier = passed.get("earlier")
        if isinstance(earlier, list):
            self.earlier = [e for e in earlier if isinstance(e, str)]

    def remember(self, state_dir: Path) -> None:
        """A fresh start: read the earlier epochs, and add this one to the file."""
        path = state_dir / "epochs"
        try:
            earlier = json.loads(_fs.read_small(path))
        except FileNotFoundError:
            earlier = []
        except (OSError, ValueError, _fs.UnsafePath) as exc:
            log.warning("cannot read the earlier epochs", path=str(path), error=str(exc))
            earlier = []
        self.earlier = [e for e in earlier if isinstance(e, str)][-KEPT_EPOCHS:] if isinstance(earlier, list) else []
        try:
            _fs.replace_file(path, json.dumps([*self.earlier, self.epoch][-KEPT_EPOCHS:]).encode(), 0o644)
        except (OSError, _fs.UnsafePath) as exc:
            log.warning("cannot record the epoch", path=str(path), error=str(exc))
