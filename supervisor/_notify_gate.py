"""Rate limits for the notify socket, which every user may write to.

A flood must cost the supervisor little and must not keep a service's
``READY=1`` out.  Per datagram, before anything else is done with it:

* A sending process (pid and uid, from the kernel's credentials) has a token
  bucket: `RATE` messages per second, bursts of `BURST`.  Services send a
  handful (READY, STATUS, WATCHDOG); what goes beyond is dropped.
* A process that belongs to no service (the router said so) is ignored for
  `STRANGER_TTL` seconds: its messages are dropped unread, with no log line
  each.  The key includes the uid, so a process of another user that later
  gets the same pid is not affected.
* A user whose processes keep being refused (a flood from ever new
  processes) may have new processes looked at only `STRANGERS_RATE` times a
  second (bursts of `STRANGERS_BURST`); root and the supervisor's own user
  are exempt, and processes already known to belong to a service too.

What is dropped is counted and logged once per `REPORT_EVERY` seconds.  The
receive loop itself reads at most `READ_RATE` datagrams a second (see
`supervisor._notify_server`): the rest waits in the kernel, whose small
queue then blocks the flooding senders, so a flood costs a bounded share of
one CPU whatever its rate.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["NotifyGate", "TokenBucket", "READ_RATE", "READ_BURST", "REPORT_EVERY"]

RATE: Final = 100.0
BURST: Final = 200.0
STRANGER_TTL: Final = 5.0
STRANGERS_RATE: Final = 1.0
STRANGERS_BURST: Final = 10.0
READ_RATE: Final = 2000.0
READ_BURST: Final = 500.0
REPORT_EVERY: Final = 10.0
#: Senders remembered at once (least recently heard from forgotten first).
MAX_SENDERS: Final = 4096


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def available(self, now: float) -> bool:
        """Whether a token is there (refilled up to `now`)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= 1.0

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take `n` tokens if there is at least one (the bucket may go below zero)."""
        if not self.available(now):
            return False
        self.tokens -= n
        return True

    def wait(self, now: float, n: float = 1.0) -> float:
        """Seconds until `n` tokens are there, when not even one is (else 0)."""
        return 0.0 if self.available(now) else (min(n, self.burst) - self.tokens) / self.rate


@dataclass(slots=True)
class _Sender:
    bucket: TokenBucket
    member: bool = False  # the router delivered one of its messages
    ignored_until: float = 0.0  # refused by the router: dropped unread until then


@dataclass
class _Drops:
    rate: int = 0
    stranger: int = 0
    top: Counter[tuple[int, int]] = field(default_factory=Counter)


class NotifyGate:
    """Decides, per datagram, whether it is read further (see the module docstring)."""

    def __init__(self, exempt_uids: frozenset[int] = frozenset({0, os.getuid()})) -> None:
        self.exempt = exempt_uids
        self._senders: OrderedDict[tuple[int, int], _Sender] = OrderedDict()
        self._strangers_of: dict[int, TokenBucket] = {}
        self._drops = _Drops()
        self._reported = 0.0

    def admit(self, pid: int, uid: int, now: float) -> bool:
        """Whether to route this sender's message (else it is dropped and counted)."""
        key = (pid, uid)
        sender = self._senders.get(key)
        if sender is None:
            sender = self._senders[key] = _Sender(TokenBucket(RATE, BURST, now))
            if len(self._senders) > MAX_SENDERS:
                self._senders.popitem(last=False)
        else:
            self._senders.move_to_end(key)
        if sender.ignored_until > now:
            return self._drop(key, stranger=True)
        if not sender.bucket.take(now):
            return self._drop(key, stranger=False)
        if not sender.member and uid not in self.exempt:
            strangers = self._strangers_of.get(uid)
            if strangers is not None and not strangers.available(now):
                return self._drop(key, stranger=True)
        return True

    def routed(self, pid: int, uid: int, delivered: bool, now: float) -> None:
        """What the router made of an admitted message."""
        sender = self._senders.get((pid, uid))
        if sender is None:
            return
        if delivered:
            sender.member = True
            return
        sender.member = False
        sender.ignored_until = now + STRANGER_TTL
        if uid not in self.exempt:
            bucket = self._strangers_of.setdefault(uid, TokenBucket(STRANGERS_RATE, STRANGERS_BURST, now))
            bucket.take(now)
            if len(self._strangers_of) > MAX_SENDERS:
                self._strangers_of.pop(next(iter(self._strangers_of)))

    def _drop(self, key: tuple[int, int], *, stranger: bool) -> bool:
        if stranger:
            self._drops.stranger += 1
        else:
            self._drops.rate += 1
        self._drops.top[key] += 1
        return False

    def report(self, now: float) -> dict[str, Any] | None:
        """The drops since the last report, once per `REPORT_EVERY` seconds (None: nothing to say yet)."""
        drops = self._drops
        if not (drops.rate or drops.stranger) or now - self._reported < REPORT_EVERY:
            return None
        self._drops, self._reported = _Drops(), now
        return {"dropped": drops.rate + drops.stranger, "over-rate": drops.rate,
                "not-from-a-service": drops.stranger,
                "top-senders": [{"pid": pid, "uid": uid, "dropped": n} for (pid, uid), n in drops.top.most_common(3)]}

    def pending_report(self) -> float | None:
        """When the next report is due, if drops are waiting for one."""
        if self._drops.rate or self._drops.stranger:
            return self._reported + REPORT_EVERY
        return None
