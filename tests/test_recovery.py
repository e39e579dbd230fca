"""SPRecovery: the rounds that bring sequence parallelism back after a crash
(the live path, with real workers, is in test_step_execution)."""
from __future__ import annotations

import itertools
import logging

from genserve.recovery import SPRecovery
from genserve.workers import protocol as P
from genserve.workers.parallel import DistSpec


class FakeExecutor:
    def __init__(self, num_devices=4, sp=4):
        self.num_devices, self.configured_sp_degree = num_devices, sp
        self.sent: list[tuple[int, object]] = []
        self.unreachable: set[int] = set()
        self._worlds = itertools.count()

    def new_world(self):
        return DistSpec(f"file:///tmp/world-{next(self._worlds)}", self.num_devices, "gloo", self.configured_sp_degree)

    def send(self, device_id, msg) -> bool:
        if device_id in self.unreachable:
            return False
        self.sent.append((device_id, msg))
        return True


def answers(rec, world, devices, ok=True):
    return [rec.answered(P.Rejoined(d, world, ok, "" if ok else "timed out")) for d in devices]


def test_a_round_starts_once_every_worker_is_up_and_ends_when_all_joined():
    ex = FakeExecutor()
    rec = SPRecovery(ex)
    rec.tick(set())
    assert not ex.sent  # nothing was lost
    rec.lost(2)
    rec.tick({2})
    assert not ex.sent  # worker 2 still restarting
    rec.tick(set())
    assert sorted(d for d, _ in ex.sent) == [0, 1, 2, 3]
    world = ex.sent[0][1].dist.init_method
    assert {m.dist.init_method for _, m in ex.sent} == {world}
    assert answers(rec, world, [0, 1, 2]) == [None] * 3
    assert rec.answered(P.Rejoined(3, "file:///tmp/stale", True)) is None  # another round's answer
    assert answers(rec, world, [3]) == [True]
    assert not rec.wanted and not rec.in_progress


def test_a_death_during_a_round_fails_it_and_the_next_round_joins_a_new_world():
    ex = FakeExecutor(num_devices=2, sp=2)
    now = [100.0]
    rec = SPRecovery(ex, clock=lambda: now[0])
    rec.lost(1)
    rec.tick(set())
    first = ex.sent[0][1].dist.init_method
    assert answers(rec, first, [1]) == [None]  # worker 1 joined ...
    rec.lost(1)  # ... and died again: the world it joined is broken
    rec.tick(set())
    assert len(ex.sent) == 2  # no second round while the first awaits worker 0
    assert answers(rec, first, [0], ok=False) == [False]  # worker 0's join timed out
    rec.tick(set())
    assert len(ex.sent) == 2  # backing off: 1 s after the first failure
    now[0] += 1.0
    rec.tick(set())
    second = ex.sent[-1][1].dist.init_method
    assert second != first and len(ex.sent) == 4
    assert answers(rec, second, [0, 1], ok=False) == [None, False]
    now[0] += 1.5
    rec.tick(set())
    assert len(ex.sent) == 4  # 2 s after the second failure in a row
    now[0] += 0.5
    rec.tick(set())
    third = ex.sent[-1][1].dist.init_method
    assert answers(rec, third, [0, 1]) == [None, True]
    assert rec.failures == 0 and not rec.wanted


def test_an_unreachable_worker_fails_the_round_and_no_sp_means_no_round():
    ex = FakeExecutor(num_devices=2, sp=2)
    ex.unreachable = {0}
    rec = SPRecovery(ex)
    rec.lost(1)
    rec.tick(set())
    world = ex.sent[0][1].dist.init_method
    assert answers(rec, world, [1]) == [False]
    assert rec.wanted and not rec.in_progress
    single = FakeExecutor(num_devices=2, sp=1)
    rec = SPRecovery(single)
    rec.lost(0)
    rec.tick(set())
    assert not single.sent and not rec.wanted


def test_a_round_with_an_overdue_answer_is_given_up_and_retried():
    ex = FakeExecutor(num_devices=2, sp=2)
    now = [0.0]
    rec = SPRecovery(ex, clock=lambda: now[0])
    rec.lost(0)
    rec.tick(set())
    first = ex.sent[0][1].dist.init_method
    assert answers(rec, first, [0]) == [None]  # worker 1's join hangs
    now[0] += SPRecovery.ROUND_TIMEOUT_S + 1
    rec.tick(set())
    assert not rec.in_progress and rec.failures == 1 and len(ex.sent) == 2
    now[0] += 1.0
    rec.tick(set())
    assert len(ex.sent) == 4 and ex.sent[-1][1].dist.init_method != first
    assert answers(rec, first, [1]) == [None]  # the hung join's late answer is stale


def test_a_worker_that_keeps_dying_at_start_is_restarted_ever_later():
    from genserve.recovery import RestartBackoff

    now = [0.0]
    r = RestartBackoff(clock=lambda: now[0])
    r.started(0)
    now[0] = 500.0  # ran a while: restarted at once
    assert r.died(0) == 0.0 and r.due() == [0] and r.next_in_s() is None
    delays = []
    for _ in range(9):  # then it dies 5 s after every start
        now[0] += 5.0
        delays.append(r.died(0))
        assert r.due() == ([0] if delays[-1] == 0 else [])
        now[0] += delays[-1]
        assert r.due() == ([] if delays[-1] == 0 else [0])
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    now[0] += 200.0  # this start held: the next death restarts at once again
    assert r.died(0) == 0.0


def test_restart_delays_are_per_device():
    from genserve.recovery import RestartBackoff

    now = [0.0]
    r = RestartBackoff(clock=lambda: now[0])
    for d in (0, 1):
        r.started(d)
    r.died(0)
    r.due()
    now[0] = 2.0
    assert r.died(0) == 1.0 and r.died(1) == 0.0
    assert r.due() == [1] and r.next_in_s() == 1.0


def test_after_a_reported_break_the_round_waits_a_moment_for_the_death_that_caused_it():
    # A peer's report of the break can reach the engine just before the death
    # behind it; a round started in between waited for the dead worker until
    # the join timed out (120 s), SP off all the while.
    ex = FakeExecutor()
    now = [10.0]
    rec = SPRecovery(ex, clock=lambda: now[0])
    rec.broken()
    rec.tick(set())
    assert not ex.sent and rec.wanted
    now[0] += 0.01
    rec.lost(1)  # the death arrives
    rec.tick({1})
    now[0] += SPRecovery.BREAK_GRACE_S
    rec.tick({1})
    assert not ex.sent  # worker 1 is restarting
    rec.tick(set())
    assert sorted(d for d, _ in ex.sent) == [0, 1, 2, 3]


def test_a_break_with_no_death_starts_a_round_after_the_grace():
    ex = FakeExecutor(num_devices=2, sp=2)
    now = [10.0]
    rec = SPRecovery(ex, clock=lambda: now[0])
    rec.broken()
    now[0] += SPRecovery.BREAK_GRACE_S - 0.01
    rec.tick(set())
    assert not ex.sent
    now[0] += 0.01
    rec.tick(set())
    world = ex.sent[0][1].dist.init_method
    assert answers(rec, world, [0, 1]) == [None, True] and not rec.wanted


def test_a_death_reported_twice_during_a_round_is_one_problem(caplog):
    ex = FakeExecutor(num_devices=2, sp=2)
    rec = SPRecovery(ex)
    rec.lost(0)
    rec.tick(set())
    world = ex.sent[0][1].dist.init_method
    rec.lost(1)  # its pipe broke as the round's Rejoin went out, and then the executor saw it die
    rec.lost(1)
    assert answers(rec, world, [0], ok=False) == [False]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["sequence parallelism stays off (worker 1 died during the round; worker 0: timed out); "
                        "next try in 1 s"]


def test_the_engine_is_woken_when_a_round_may_start_or_is_overdue():
    ex = FakeExecutor(num_devices=2, sp=2)
    now = [10.0]
    rec = SPRecovery(ex, clock=lambda: now[0])
    assert rec.next_in_s() is None  # nothing to bring back
    rec.broken()
    assert rec.next_in_s() == SPRecovery.BREAK_GRACE_S
    now[0] += SPRecovery.BREAK_GRACE_S
    assert rec.next_in_s() == 0.0
    rec.tick(set())
    assert rec.in_progress and rec.next_in_s() == SPRecovery.ROUND_TIMEOUT_S


def test_no_round_starts_while_a_worker_is_stuck_in_a_broken_sp_dispatch():
    """It would put the Rejoin off until that dispatch ends (on NCCL: until
    the watchdog kills it), while the others waited for it in the new world's
    rendezvous for 120 s; nor does a held round wake the engine."""
    ex = FakeExecutor(num_devices=2, sp=2)
    now = [100.0]
    rec = SPRecovery(ex, clock=lambda: now[0])
    rec.broken()
    now[0] += 5.0
    rec.tick(set(), stuck=True)
    assert not ex.sent and rec.next_in_s() is None
    rec.tick(set())  # it answered (or died and came back)
    assert sorted(d for d, _ in ex.sent) == [0, 1] and rec.in_progress
