"""The hung-worker watchdog's decisions over a fake executor: which dispatch
gets its workers killed, which workers, and only once. (A live worker
stopped with SIGSTOP is in test_step_execution.)"""
from __future__ import annotations

import logging

from genserve.config import EngineConfig
from genserve.engine import Engine
from genserve.inflight import InFlight
from genserve.metrics import Metrics
from genserve.models.base import GenParams
from genserve.scheduler import make_policy
from genserve.scheduler.types import Dispatch
from genserve.tracked import Tracked
from genserve.types import Request


class HangingExecutor:
    """Eight devices whose workers never answer; records what is killed."""

    num_devices, max_sp_degree, configured_sp_degree = 8, 2, 2

    def __init__(self):
        self.killed: list[list[int]] = []

    def kill(self, device_ids) -> None:
        self.killed.append(list(device_ids))

    def wake(self) -> None:
        pass


def engine(hung_worker_s: float, *flights: InFlight) -> Engine:
    eng = Engine(EngineConfig(hung_worker_s=hung_worker_s), HangingExecutor(),
                 lambda spec: make_policy("fcfs", spec), None, Metrics(), {})
    eng.dispatcher.inflight = dict(enumerate(flights, 1))
    return eng


def flight(req_id: str, block: tuple[int, ...], predicted_s: float, pending=None) -> InFlight:
    """A one-step dispatch sent at time 0, predicted to take ``predicted_s``."""
    return InFlight(Dispatch((req_id,), block, 1), "wan-tiny", 0.0, predicted_s * 1e3,
                    set(block if pending is None else pending))


def test_a_dispatch_past_the_bound_and_ten_times_its_prediction_has_its_workers_killed_once(caplog):
    eng = engine(30.0, flight("sp", (0, 1), 1.0), flight("half", (2, 3), 1.0, {3}), flight("long", (4,), 5.0))
    with caplog.at_level(logging.ERROR, logger="genserve.engine"):
        eng.loss.watch_overdue(30.9)  # 29.9 s late: under the bound
        assert eng.executor.killed == []
        eng.loss.watch_overdue(31.5)
        # an SP dispatch: every member (the stopped one cannot be told from its blocked peers);
        # of a half-reported one, only the member yet to report; not the one predicted at 5 s
        assert eng.executor.killed == [[0, 1], [3]]
        eng.loss.watch_overdue(55.9)  # 50.9 s late: over the bound but not 10x its 5 s
        eng.loss.watch_overdue(56.1)
        eng.loss.watch_overdue(600.0)  # each only once
    assert eng.executor.killed == [[0, 1], [3], [4]]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and errors[0] == (
        "dispatch 1 of sp on device(s) [0, 1] is 30 s past its predicted 1 s, over --hung-worker-s 30: "
        "a worker there hangs; killing worker(s) [0, 1] to restart them (their requests go on as after a crash)")


def test_a_dispatch_waiting_for_a_state_move_kills_the_worker_exporting_it():
    """Its own devices are idle, waiting: the hung one is the state's holder."""
    params = GenParams("a boat", "", 64, 64, 9, 4, 5.0, 0)
    t = Tracked(Request("v", "wan-tiny", "video", params, "raw", 8, 0, 0.0), 1000, [], holders={4, 5})
    moving = flight("v", (0, 1), 1.0)
    moving.moving["v"] = None  # its Export went to worker 4 and is unanswered
    eng = engine(30.0, moving)
    eng.tracked["v"] = t
    eng.loss.watch_overdue(60.0)
    assert eng.executor.killed == [[4]]


def test_a_bound_of_zero_never_kills_but_still_warns(caplog):
    eng = engine(0.0, flight("sp", (0, 1), 1.0))
    with caplog.at_level(logging.WARNING, logger="genserve.engine"):
        for now in (100.0, 1e6):
            eng.loss.watch_overdue(now)
    assert eng.executor.killed == []
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].endswith("past its predicted 1 s: a worker there may be hung")


def test_members_of_a_broken_sp_dispatch_that_never_answer_are_killed_after_the_grace(caplog):
    """A member left its SP group (or died) at 2 s; on NCCL its peers wait for
    it in the step's collective instead of failing. They are killed once
    BROKEN_GRACE_S has passed since both the break and the predicted end,
    long before --hung-worker-s; members that answered are not."""
    from genserve.worker_loss import BROKEN_GRACE_S

    broke = flight("sp4", (0, 1, 2, 3), 5.0, pending={1, 2})
    broke.broken, broke.broken_s = True, 2.0
    early = flight("early", (4, 5), 60.0, pending={5})  # broke before its predicted end at 60 s
    early.broken, early.broken_s = True, 1.0
    whole = flight("whole", (6, 7), 5.0)  # not broken: the plain bound applies
    eng = engine(300.0, broke, early, whole)
    with caplog.at_level(logging.ERROR, logger="genserve.engine"):
        eng.loss.watch_overdue(5.0 + BROKEN_GRACE_S - 0.5)
        assert eng.executor.killed == []
        eng.loss.watch_overdue(5.0 + BROKEN_GRACE_S + 0.5)
        assert eng.executor.killed == [[1, 2]]
        eng.loss.watch_overdue(60.0 + BROKEN_GRACE_S + 0.5)
        eng.loss.watch_overdue(200.0)
    assert eng.executor.killed == [[1, 2], [5]]
    assert eng.loss.hung == {d: "was stuck in a collective with a lost SP member and was killed"
                             for d in (1, 2, 5)}
    assert caplog.records[0].getMessage() == (
        "dispatch 1 of sp4 on device(s) [0, 1, 2, 3] broke 34 s ago (a member died or left its SP group) and "
        "worker(s) [1, 2] have not answered: stuck in a collective with it; killing them to restart them")


def test_a_broken_dispatch_is_never_killed_with_the_watchdog_off():
    broke = flight("sp", (0, 1), 1.0, pending={1})
    broke.broken, broke.broken_s = True, 1.0
    eng = engine(0.0, broke)
    eng.loss.watch_overdue(1e6)
    assert eng.executor.killed == []
