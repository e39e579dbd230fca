"""Interleavings of cancel, abandon and resubmission with worker loss,
driven through a scripted executor."""
from __future__ import annotations

import threading
import time

from genserve.types import EventType
from genserve.workers import protocol as P
from genserve.workers.executor import WorkerDied

from tests.test_engine_blocks import make_engine, submit


def cancel(engine, req_id: str) -> bool:
    answer, ev = [False], threading.Event()
    engine._post(("cancel", req_id, answer, ev))
    engine.step()
    assert ev.is_set()
    return answer[0]


def requests_total(engine, status: str) -> float:
    return sum(s.value for m in engine.metrics.registry.collect() if m.name == "genserve_requests"
               for s in m.samples if s.name.endswith("_total") and s.labels.get("status") == status)


def test_a_cancelled_request_whose_worker_dies_before_it_stops_still_ends():
    engine, executor, policy = make_engine(2)
    events = submit(engine, "i", "image", 3)
    engine.step()
    t = engine.tracked["i"]
    assert t.running and t.device_ids == (0,)
    assert cancel(engine, "i")  # Drop sent; the worker would stop at its next step boundary...
    executor.replies = [(0, WorkerDied(0, -9))]  # ...but it dies (or hung and was killed) first
    for _ in range(5):
        engine._dirty = True
        engine.step()
    assert events[-1].type == EventType.CANCELLED, [(e.type, e.reason) for e in events]
    assert "i" not in engine.tracked


def test_an_abandoned_request_whose_worker_dies_frees_its_id():
    engine, executor, policy = make_engine(2)
    a = submit(engine, "v", "video", 3)
    engine.step()
    engine.abandon("v", a.append, "DEADLINE_EXCEEDED")  # its only caller's deadline passed
    engine.step()
    assert engine.tracked["v"].cancel_requested
    executor.replies = [(0, WorkerDied(0, -9))]  # the leader hung and the watchdog killed it
    engine.step()
    b = submit(engine, "v", "video", 3)  # a retry of the id
    for _ in range(5):
        engine._dirty = True
        engine.step()
    assert "v" not in engine.tracked or engine.tracked["v"].sinks == [b.append], engine.tracked
    assert b and b[0].type == EventType.QUEUED, b


def test_after_cancel_a_different_request_on_the_id_starts_afresh():
    # proto: "After Cancel, or once every caller has left, the id starts a new request."
    engine, executor, policy = make_engine(2)
    a = submit(engine, "x", "image", 3, "first")
    engine.step()
    assert engine.tracked["x"].running
    assert cancel(engine, "x")  # answered True; the worker stops at its next step boundary
    b = submit(engine, "x", "image", 3, "second")
    engine.step()
    assert not (b and b[-1].status == "ALREADY_EXISTS"), b


def cancel_and_resubmit(engine) -> tuple[list, list, int]:
    """Start x, cancel it, and submit it again while it stops: (the first
    call's events, the second's, the first's dispatch id)."""
    a = submit(engine, "x", "image", 3, "same")
    engine.step()
    first = engine.tracked["x"].dispatch_id
    assert cancel(engine, "x")
    b = submit(engine, "x", "image", 3, "same")  # a new request, admitted when the first stops
    engine.step()
    return a, b, first


def test_a_second_cancel_reaches_the_resubmission_waiting_on_the_id():
    engine, executor, policy = make_engine(2)
    a, b, first = cancel_and_resubmit(engine)
    assert cancel(engine, "x")  # answered True: the caller believes id x is cancelled
    executor.replies = [(0, P.DispatchDone(first, (), (), (P.Failed("x", "CANCELLED", "cancelled"),), 0.0))]
    for _ in range(3):
        engine._dirty = True
        engine.step()
    assert a[-1].type == EventType.CANCELLED
    assert b and b[-1].type == EventType.CANCELLED, [(e.type, e.reason) for e in b]


def test_a_cancelled_request_whose_step_then_fails_ends_cancelled():
    engine, executor, policy = make_engine(2)
    a = submit(engine, "x", "image", 3)
    engine.step()
    first = engine.tracked["x"].dispatch_id
    assert cancel(engine, "x")  # answered True...
    failed = P.Failed("x", "INTERNAL", "out of memory")  # ...but its step fails before it stops
    executor.replies = [(0, P.DispatchDone(first, (), (), (failed,), 0.0))]
    engine._dirty = True
    engine.step()
    assert a[-1].type == EventType.CANCELLED and a[-1].status == "CANCELLED", a[-1]
    assert requests_total(engine, "CANCELLED") == 1 and requests_total(engine, "INTERNAL") == 0


def test_a_resubmission_that_leaves_before_it_starts_is_counted():
    engine, executor, policy = make_engine(2)
    a, b, first = cancel_and_resubmit(engine)
    before = requests_total(engine, "DEADLINE_EXCEEDED")
    engine.abandon("x", b.append, "DEADLINE_EXCEEDED")  # its caller's deadline: the call ends
    engine.step()
    assert requests_total(engine, "DEADLINE_EXCEEDED") == before + 1


def test_a_restart_that_fails_to_spawn_is_tried_again():
    engine, executor, policy = make_engine(2)
    calls = []

    def respawn(device_id, standalone=False):
        calls.append(device_id)
        if len(calls) == 1:
            raise OSError(11, "Resource temporarily unavailable")  # fork/spawn failed this once
    executor.respawn = respawn
    executor.replies = [(1, WorkerDied(1, -9))]
    for _ in range(3):
        try:
            engine.step()
        except OSError:
            pass  # (Engine._run logs it and goes on)
    time.sleep(engine.loss.restarts.next_in_s() or 0.0)
    for _ in range(3):
        try:
            engine.step()
        except OSError:
            pass
    assert len(calls) >= 2, "device 1 is never restarted: down for good"
