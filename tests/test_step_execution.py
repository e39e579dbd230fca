"""Step-level execution on real worker processes (CPU, gloo, 2 workers):
sequence parallelism, reshaping, preemption and image batching are all
invisible in the output.

A scripted policy dictates each request's blocks step by step, so every test
exercises exactly the transition it names.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import time

import numpy as np
import pytest

from genserve.app import build_cost_model
from genserve.config import EngineConfig
from genserve.engine import Engine
from genserve.metrics import Metrics
from genserve.models.base import GenParams
from genserve.scheduler.types import Dispatch, StepPlan
from genserve.types import EventType, Request
from genserve.workers.executor import MultiprocessExecutor, make_worker_specs

pytestmark = pytest.mark.slow
_ids = itertools.count()


class ScriptedPolicy:
    """Runs each scripted request through its list of segments, in order:
    ``(block, num_steps)`` runs that many steps there; ``"pause"`` preempts
    it once; ``"hold"`` keeps it paused until the test pops that entry."""

    name = "scripted"

    def __init__(self):
        self.scripts: dict[str, list] = {}
        self.batches: list[tuple[tuple[str, ...], tuple[int, ...], int]] = []  # image batches to form

    def plan(self, now_s, requests, devices, cost):
        idle = {d.device_id for d in devices if d.idle}
        by_id = {r.req_id: r for r in requests}
        dispatches, preempted = [], []
        for ids, block, steps in list(self.batches):
            if all(i in by_id and not by_id[i].running for i in ids) and set(block) <= idle:
                dispatches.append(Dispatch(ids, block, steps))
                idle -= set(block)
                self.batches.remove((ids, block, steps))
        for r in requests:
            script = self.scripts.get(r.req_id)
            if r.running or not script:
                continue
            if script[0] == "pause":
                script.pop(0)
                preempted.append(r.req_id)
            elif script[0] != "hold" and set(script[0][0]) <= idle:
                block, steps = script.pop(0)
                dispatches.append(Dispatch((r.req_id,), block, steps))
                idle -= set(block)
        return StepPlan(tuple(dispatches), tuple(preempted))


def start_engine(models: tuple[str, ...] = ("sd3-tiny", "wan-tiny"), executor=None) -> Engine:
    executor = executor or MultiprocessExecutor(make_worker_specs("cpu", 2, models, num_threads=1))
    ready = executor.start()
    policy = ScriptedPolicy()
    eng = Engine(EngineConfig(), executor, lambda spec: policy, build_cost_model("", ready), Metrics(),
                 {c.name: c for c in ready[0].models})
    assert eng.max_sp_degree == min(executor.num_devices, 8)
    eng.start()
    return eng


def stop_engine(eng: Engine) -> None:
    eng.stop()
    eng.executor.shutdown()


@pytest.fixture(scope="module")
def engine():
    eng = start_engine()
    yield eng
    stop_engine(eng)


def video(steps=6, seed=11, guidance=5.0) -> Request:
    params = GenParams("a paper boat on a river", "blurry", 64, 64, 9, steps, guidance, seed)
    return Request(f"v{next(_ids)}", "wan-tiny", "video", params, "raw", 8, 0, time.monotonic())


def image(seed=3, steps=4, size=64) -> Request:
    params = GenParams("a red cube", "", size, size, 1, steps, 5.0, seed)
    return Request(f"i{next(_ids)}", "sd3-tiny", "image", params, "raw", 8, 0, time.monotonic())


def submit(engine, req, script=None):
    if script is not None:
        engine.policy.scripts[req.req_id] = list(script)
    events: queue.Queue = queue.Queue()
    engine.submit(req, events.put)
    return events


def drain(events, timeout_s=120.0) -> list:
    out, deadline = [], time.monotonic() + timeout_s
    while not out or not out[-1].terminal:
        out.append(events.get(timeout=max(0.01, deadline - time.monotonic())))
    return out


def frames(event) -> np.ndarray:
    r = event.result
    return np.frombuffer(r.data, np.uint8).reshape(r.num_frames, r.height, r.width, 3)


def run_video(engine, script, **kw):
    return drain(submit(engine, video(**kw), script))


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_sp2_equals_sp1(engine):
    alone = run_video(engine, [((0,), 6)])
    sp2 = run_video(engine, [((0, 1), 6)])
    assert alone[-1].type == sp2[-1].type == EventType.COMPLETED
    assert sp2[-1].result.sp_degrees == (2,)
    assert max_diff(frames(alone[-1]), frames(sp2[-1])) <= 2


def test_reshape_1_2_1_equals_uninterrupted(engine):
    alone = run_video(engine, [((1,), 6)])
    reshaped = run_video(engine, [((1,), 2), ((0, 1), 2), ((0,), 2)])
    types = [e.type for e in reshaped]
    assert types.count(EventType.RESHARDED) == 2
    assert [e.sp_degree for e in reshaped if e.type == EventType.RESHARDED] == [2, 1]
    assert reshaped[-1].result.sp_degrees == (1, 2, 1)
    assert max_diff(frames(alone[-1]), frames(reshaped[-1])) <= 2


def test_preempt_resume_same_degree_is_bit_identical(engine):
    alone = run_video(engine, [((0,), 6)])
    paused = run_video(engine, [((0,), 3), "pause", ((0,), 3)])
    types = [e.type for e in paused]
    assert EventType.PREEMPTED in types and EventType.RESUMED in types
    assert paused[-1].result.num_preemptions == 1
    assert frames(alone[-1]).tobytes() == frames(paused[-1]).tobytes()


def test_preempt_and_move_to_other_device(engine):
    """Resumed on the other worker: its state moves through host memory."""
    alone = run_video(engine, [((0,), 6)])
    moved = run_video(engine, [((0,), 2), "pause", ((1,), 4)])
    assert frames(alone[-1]).tobytes() == frames(moved[-1]).tobytes()


def test_batched_images_equal_unbatched_with_join_and_leave(engine):
    a, b, c = image(seed=1, steps=4), image(seed=2, steps=4), image(seed=3, steps=4)
    alone = {r.req_id: frames(drain(submit(engine, r, [((0,), 4)]))[-1]) for r in (a, b, c)}
    a2, b2, c2 = (Request(r.req_id + "-b", r.model, r.task, r.params, "raw", 8, 0, time.monotonic())
                  for r in (a, b, c))
    engine.policy.scripts[c2.req_id] = [((1,), 2)]  # c runs 2 steps alone, then joins a batch
    engine.policy.batches += [((a2.req_id,), (0,), 1), ((a2.req_id, b2.req_id), (0,), 2),
                              ((a2.req_id, b2.req_id, c2.req_id), (0,), 1), ((b2.req_id, c2.req_id), (0,), 1)]
    qs = {r.req_id: submit(engine, r) for r in (a2, b2, c2)}
    got = {rid[:-2]: frames(drain(q)[-1]) for rid, q in qs.items()}
    for rid, pixels in alone.items():
        assert max_diff(pixels, got[rid]) <= 2, rid


def test_contended_events_and_cancel_of_paused(engine):
    a = submit(engine, video(steps=6, seed=5), [((0,), 2), "pause", ((0, 1), 2), ((0,), 2)])
    b_req = video(steps=6, seed=6)
    b = submit(engine, b_req, [((1,), 2), "pause", "hold"])
    events_a = drain(a)
    assert [e.type for e in events_a].count(EventType.RESHARDED) == 2
    assert {EventType.PREEMPTED, EventType.RESUMED} <= {e.type for e in events_a}
    got_b = []
    deadline = time.monotonic() + 60
    while EventType.PREEMPTED not in [e.type for e in got_b] and time.monotonic() < deadline:
        got_b.append(b.get(timeout=60))
    assert engine.cancel(b_req.req_id)
    rest = drain(b)
    assert rest[-1].type == EventType.CANCELLED
    assert [e.type for e in got_b + rest].count(EventType.CANCELLED) == 1
    assert b_req.req_id not in engine.tracked
    # the server goes on: a fresh request still completes on both devices
    assert run_video(engine, [((0, 1), 2)], steps=2)[-1].type == EventType.COMPLETED


def events_until(events, kind, timeout_s=60.0) -> list:
    out, deadline = [], time.monotonic() + timeout_s
    while kind not in [e.type for e in out]:
        out.append(events.get(timeout=max(0.01, deadline - time.monotonic())))
    return out


def test_worker_dies_while_state_moves_out_of_it_then_sp_comes_back():
    """The worker a paused video's state is being exported from dies before
    it answers: the dispatch waiting for that state must not hold its devices
    forever. The video starts again from step 0; the other device serves on;
    once the restarted worker and its peer have joined a new process group,
    an SP step runs there and matches a single-device one."""
    eng = start_engine()  # its own: a crash turns sequence parallelism off for good
    try:
        v = video(steps=4, seed=21)
        events = submit(eng, v, [((1,), 2), "pause", "hold", ((0,), 2), ((0,), 4)])
        events_until(events, EventType.PREEMPTED)
        source = eng.executor.pid(1)
        os.kill(source, signal.SIGSTOP)  # it will not answer the Export
        eng.policy.scripts[v.req_id].pop(0)  # release the hold: resume on device 0, state from 1
        assert wait_for_move(eng), "the move never started"
        os.kill(source, signal.SIGKILL)
        rest = drain(events, timeout_s=90)
        assert rest[-1].type == EventType.COMPLETED, rest[-1]
        assert any(e.type == EventType.PREEMPTED and "crashed" in e.reason for e in rest)
        assert rest[-1].result.num_frames == 9
        img = image(steps=2)
        assert drain(submit(eng, img, [((0,), 2)]), timeout_s=60)[-1].type == EventType.COMPLETED
        # the workers join a new process group and sequence parallelism comes back, correct
        deadline = time.monotonic() + 120
        while eng.max_sp_degree < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.max_sp_degree == 2
        alone = run_video(eng, [((1,), 4)], steps=4, seed=22)
        sp2 = run_video(eng, [((0, 1), 4)], steps=4, seed=22)
        assert sp2[-1].result.sp_degrees == (2,)
        assert max_diff(frames(alone[-1]), frames(sp2[-1])) <= 2
        # the first world's rendezvous folder and the rejoin's
        folders = [os.path.dirname(w.init_method[len("file://"):]) for w in eng.executor._worlds]
        assert len(folders) >= 2 and all(os.path.isdir(f) for f in folders)
    finally:
        stop_engine(eng)
    assert not any(os.path.exists(f) for f in folders)  # removed at shutdown, not left in /tmp


def test_hung_workers_are_killed_and_their_requests_go_on(engine, monkeypatch):
    """A stopped worker (SIGSTOP) stalls its dispatch, and in an SP group its
    peer waits in a collective with it: past ``hung_worker_s`` the workers the
    dispatch waits for are killed, and their deaths take the crash path: each
    restarts (counted), and the request starts again from step 0 (and
    completes, identical to an uninterrupted run), or, lost a second time,
    ends UNAVAILABLE. A single-device hang kills only its own worker."""
    import genserve.engine as engine_module

    monkeypatch.setattr(engine.loss, "config", EngineConfig(hung_worker_s=2.0))
    monkeypatch.setattr(engine_module, "WATCHDOG_S", 0.5)  # look as often as the short bound needs
    before, stopped = restarts(engine), []

    def stop(device_id: int) -> None:
        stopped.append(engine.executor.pid(device_id))
        os.kill(stopped[-1], signal.SIGSTOP)

    def restarted() -> tuple[float, float]:
        now = restarts(engine)
        return now.get("0", 0) - before.get("0", 0), now.get("1", 0) - before.get("1", 0)

    try:
        v = video(steps=6, seed=31)
        v_events = submit(engine, v, [((0, 1), 1), "hold"] + [((0, 1), 1)] * 5)
        events_until(v_events, EventType.STEP)
        # stopped between steps: one landing after worker 0's reply but before
        # worker 1's left the request on worker 0's copy, with nothing to kill there
        assert wait_until(lambda: not engine.inflight, 10)
        stop(1)
        engine.policy.scripts[v.req_id].pop(0)  # the next SP step: worker 0 waits in it for worker 1
        assert events_until(v_events, EventType.PREEMPTED)[-1].reason.endswith(
            "hung and was killed (--hung-worker-s 2); restarting from step 0")
        engine.policy.scripts[v.req_id] = [((0,), 6)]  # SP is off until new workers join a new group
        rest = drain(v_events, timeout_s=90)
        assert [e.type for e in rest].count(EventType.COMPLETED) == 1 and rest[-1].type == EventType.COMPLETED
        assert [e.step for e in rest if e.type == EventType.STEP] == [1, 2, 3, 4, 5, 6]
        assert restarted() == (1, 1)
        # the server goes on: a new request, the first one again, uninterrupted
        alone = run_video(engine, [((1,), 6)], steps=6, seed=31)
        assert frames(alone[-1]).tobytes() == frames(rest[-1]).tobytes()

        w = video(steps=6, seed=32)
        events = submit(engine, w, [((1,), 1)] * 6)
        events_until(events, EventType.STEP)
        survivor = engine.executor.pid(0)
        stop(1)
        assert "restarting from step 0" in events_until(events, EventType.PREEMPTED)[-1].reason
        assert wait_until(lambda: restarted() == (1, 2), 10)  # (counted just after the event)
        assert engine.executor.pid(0) == survivor
        engine.policy.scripts[w.req_id] = [((0,), 1)] * 6
        events_until(events, EventType.STEP)
        stop(0)  # its second loss
        last = drain(events, timeout_s=60)[-1]
        assert last.type == EventType.FAILED and last.status == "UNAVAILABLE", last
        assert last.reason == ("worker 0 hung and was killed (--hung-worker-s 2) while running this "
                               "request, its second lost worker; not retrying")
        assert wait_until(lambda: restarted() == (2, 2), 10)
        assert v.req_id not in engine.tracked and w.req_id not in engine.tracked
        assert v_events.empty() and events.empty()  # nothing after their end (no late reply)
        # left as found: both workers back, in a new process group
        assert wait_until(lambda: engine.max_sp_degree == 2, 120), "sequence parallelism did not come back"
    finally:
        for pid in stopped:  # (killed, unless the test failed)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def restarts(eng: Engine) -> dict[str, float]:
    """genserve_worker_restarts_total by device."""
    return {s.labels["device"]: s.value for m in eng.metrics.registry.collect()
            if m.name == "genserve_worker_restarts" for s in m.samples if s.name.endswith("_total")}


def wait_until(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def wait_for_move(eng: Engine, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(fl.moving for fl in list(eng.inflight.values())):
            return True
        time.sleep(0.01)
    return False


def test_cancel_of_a_batch_member_while_another_moves_in(engine):
    """A batch waits for one member's state to move in from the other worker;
    the member already on the batch's device is cancelled meanwhile. It ends
    CANCELLED (a Drop sent before the batch would leave the worker without
    its state, and the batch would fail it INTERNAL), and the mover completes."""
    a, b = image(seed=7), image(seed=8)
    ea = submit(engine, a, [((0,), 1), "hold"])
    eb = submit(engine, b, [((1,), 1), "hold"])
    events_until(ea, EventType.STEP)
    events_until(eb, EventType.STEP)
    deadline = time.monotonic() + 30
    while any(engine.tracked[r.req_id].running for r in (a, b)) and time.monotonic() < deadline:
        time.sleep(0.01)
    source = engine.executor.pid(1)
    os.kill(source, signal.SIGSTOP)  # b's state cannot leave worker 1 until it runs again
    try:
        engine.policy.batches.append(((a.req_id, b.req_id), (0,), 3))
        assert wait_for_move(engine), "the move never started"
        assert engine.cancel(a.req_id)
        time.sleep(0.3)  # time for anything sent on the cancel to reach worker 0 first
    finally:
        os.kill(source, signal.SIGCONT)
    assert drain(ea)[-1].type == EventType.CANCELLED
    assert drain(eb)[-1].type == EventType.COMPLETED
    assert a.req_id not in engine.tracked and b.req_id not in engine.tracked


def test_the_start_up_measures_each_sp_degree_and_the_latency_model_uses_it():
    """A start-up profile measured on one device only predicted an SP-2 step
    to take as long as a step on one device, whatever it takes; and a
    process's first SP step paid its one-time costs on a user's video. ``warm_up_sp`` runs and
    measures the SP step on every block before serving."""
    from genserve.profile import warm_up_sp

    executor = MultiprocessExecutor(make_worker_specs("cpu", 2, ("sd3-tiny", "wan-tiny"), num_threads=1))
    try:
        ready = executor.start()
        cards = {c.name: c for c in ready[0].models}
        (sp2,) = warm_up_sp(executor, cards, progress=lambda line: None)
        lim = cards["wan-tiny"].limits
        assert (sp2.model, sp2.sp_degree, sp2.batch_size) == ("wan-tiny", 2, 1)
        assert (sp2.width, sp2.height, sp2.num_frames) == (lim.default_width, lim.default_height,
                                                           lim.default_frames)
        assert 0 < sp2.step_ms < 10_000
        cost = build_cost_model("", ready, [sp2])
        shape = (lim.default_width, lim.default_height, lim.default_frames)
        assert cost.step_ms("wan-tiny", *shape, 2, 1) == pytest.approx(sp2.step_ms)
        one = {w.model: w for r in ready.values() for w in r.warmups}["wan-tiny"]  # (the last worker's)
        assert cost.step_ms("wan-tiny", *shape, 1, 1) == pytest.approx(one.step_ms)  # unchanged
        # without the measurement, SP 2 was guessed at a one-device step
        assert build_cost_model("", ready).step_ms("wan-tiny", *shape, 2, 1) == pytest.approx(one.step_ms)
    finally:
        executor.shutdown()
