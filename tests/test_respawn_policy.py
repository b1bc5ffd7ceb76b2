"""Unit tests of the pure respawn policy (supervisor/respawn.py)."""

from __future__ import annotations

import signal

from supervisor import respawn
from supervisor.respawn import Backoff, Exit, History, Policy, Verdict, decide


def crash(t: float, code: int | None = 1, sig: int | None = None) -> Exit:
    return Exit(t, code, sig)


def test_respawns_after_the_delay() -> None:
    d = decide(Policy(delay=0.25), History(), crash(100.0), enabled=True)
    assert d.verdict is Verdict.RESPAWN and d.delay == 0.25
    assert d.reason == "exited with code 1; respawning"


def test_more_than_the_limit_within_the_window_disables() -> None:
    policy, history = Policy(limit_count=5, limit_seconds=7.0), History()
    verdicts = [decide(policy, history, crash(100.0 + i), enabled=True).verdict for i in range(6)]
    assert verdicts == [Verdict.RESPAWN] * 5 + [Verdict.DISABLE]
    last = decide(policy, History(), crash(0.0, None, signal.SIGKILL), enabled=True)
    assert last.verdict is Verdict.RESPAWN and "terminated by SIGKILL" in last.reason


def test_the_limit_counts_only_the_window() -> None:
    policy, history = Policy(limit_count=2, limit_seconds=7.0), History()
    assert [decide(policy, history, crash(t), enabled=True).verdict for t in (0, 1, 10, 11, 30, 31)] == \
        [Verdict.RESPAWN] * 6
    d = decide(policy, history, crash(32.0), enabled=True)
    assert d.verdict is Verdict.DISABLE
    assert d.reason == "Respawning too fast: more than 2 respawns within 7 s; last exited with code 1"


def test_a_zero_limit_disables_at_once() -> None:
    assert decide(Policy(limit_count=0), History(), crash(1.0), enabled=True).verdict is Verdict.DISABLE


def test_stay_down_exits_and_respawn_off() -> None:
    policy = Policy(stay_down={11: "not a master candidate"})
    d = decide(policy, History(), crash(1.0, 11), enabled=True)
    assert (d.verdict, d.reason) == (Verdict.STAY_DOWN, "not a master candidate")
    assert decide(policy, History(), crash(1.0, 12), enabled=True).verdict is Verdict.RESPAWN
    assert decide(Policy(respawn=False), History(), crash(1.0), enabled=True).verdict is Verdict.STOP
    assert decide(Policy(), History(), crash(1.0), enabled=False).verdict is Verdict.STOP


def test_history_is_bounded_and_survives_a_record() -> None:
    h = History()
    for i in range(200):
        decide(Policy(limit_count=1000, limit_seconds=1.0), h, crash(float(i), None, 9), enabled=True)
    assert len(h.exits) == 64 and len(h.respawns) == 64
    back = History.from_record(h.to_record(now=200.0, wall=5000.0), now=50.0, wall=5000.0)
    assert [e.time for e in back.exits] == [t - 150.0 for t in (e.time for e in h.exits)]
    assert back.exits[-1].signal == 9 and list(back.respawns) == [t - 150.0 for t in h.respawns]
    assert History.from_record("garbage", 0.0, 0.0).exits == respawn.History().exits


def test_backoff_grows_caps_and_resets() -> None:
    policy, h = Policy(backoff=Backoff(initial=0.1, factor=2, max=1.0, reset_after=60)), History()
    delays = [decide(policy, h, crash(float(i)), enabled=True).delay for i in range(6)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    h.started = 10.0  # the last respawn ran 100 s: the next crash starts over
    assert decide(policy, h, crash(110.0), enabled=True).delay == 0.1
    # never disabled by the limit while backoff is set
    many = [decide(Policy(limit_count=1, backoff=Backoff()), h, crash(200.0 + i), enabled=True).verdict
            for i in range(10)]
    assert set(many) == {Verdict.RESPAWN}


def test_backoff_says_when_it_started_over_and_the_run_start_is_kept_in_the_record() -> None:
    policy, h = Policy(backoff=Backoff(initial=1, factor=3, max=100, reset_after=10)), History()
    assert decide(policy, h, crash(0.0), enabled=True).reason == "exited with code 1; respawning in 1 s"
    h.started = 5.0
    d = decide(policy, h, crash(7.0), enabled=True)
    assert (d.delay, d.reason) == (3, "exited with code 1; respawning in 3 s")
    h.started = 8.0
    d = decide(policy, h, crash(30.0), enabled=True)
    assert (d.delay, d.reason) == (1, "exited with code 1; respawning in 1 s (up 22 s: backoff reset)")
    back = History.from_record(h.to_record(now=30.0, wall=1000.0), now=500.0, wall=1000.0)
    assert back.started == 478.0
    # a huge factor does not overflow: the cap holds
    big = Policy(backoff=Backoff(initial=1, factor=1e300, max=50, reset_after=10))
    assert [decide(big, History(), crash(0.0), enabled=True).delay] == [1]
    h2 = History()
    assert [decide(big, h2, crash(float(i)), enabled=True).delay for i in range(4)] == [1, 50, 50, 50]


def test_a_health_restart_is_described_by_its_cause() -> None:
    d = decide(Policy(), History(), Exit(1.0, None, 15, "health check failed 3 times in a row: refused"),
               enabled=True)
    assert d.reason == "health check failed 3 times in a row: refused; respawning"
