"""The engine over the in-process executor: real tiny models, no gRPC."""
from __future__ import annotations

import queue
import time

import numpy as np
import pytest

from genserve.app import build_cost_model
from genserve.config import EngineConfig
from genserve.engine import Engine
from genserve.metrics import Metrics
from genserve.models.base import GenParams
from genserve.scheduler import make_policy
from genserve.types import EventType, Request
from genserve.workers.executor import InProcessExecutor, make_worker_specs


@pytest.fixture(scope="module")
def engine():
    executor = InProcessExecutor(make_worker_specs("cpu", 2, ("sd3-tiny", "wan-tiny")))
    ready = executor.start()
    cards = {c.name: c for c in ready[0].models}
    eng = Engine(EngineConfig(), executor, lambda spec: make_policy("genserve", spec),
                 build_cost_model("", ready), Metrics(), cards)
    eng.start()
    yield eng
    eng.stop()
    executor.shutdown()


def make_request(req_id: str, task: str = "image", steps: int = 3, seed: int = 0, prompt: str = "a cat",
                 fmt: str = "raw", fingerprint: str = "") -> Request:
    model, frames = ("sd3-tiny", 1) if task == "image" else ("wan-tiny", 9)
    params = GenParams(prompt, "", 64, 64, frames, steps, 1.0, seed)
    return Request(req_id, model, task, params, fmt, 8, 0, time.monotonic(), fingerprint)


def run(engine, req: Request, timeout_s: float = 60.0) -> list:
    events: queue.Queue = queue.Queue()
    engine.submit(req, events.put)
    out = []
    deadline = time.monotonic() + timeout_s
    while not out or not out[-1].terminal:
        out.append(events.get(timeout=max(0.01, deadline - time.monotonic())))
    return out


def test_image_runs_to_completion(engine):
    events = run(engine, make_request("e1", steps=3))
    assert [e.type for e in events] == [EventType.QUEUED, EventType.STARTED] + [EventType.STEP] * 3 + [
        EventType.COMPLETED]
    result = events[-1].result
    frames = np.frombuffer(result.data, np.uint8).reshape(1, 64, 64, 3)
    assert frames.std() > 0  # a real decoded image, not a blank
    assert result.slo_ms > 0 and result.latency_ms >= result.queue_ms >= 0


def test_step_failure_fails_only_its_request(engine, monkeypatch):
    """A step that raises fails its requests with INTERNAL; the worker goes on."""
    for worker_models in _worker_models(engine):
        model = worker_models["sd3-tiny"]
        original = model.denoise_step

        def exploding(states, original=original):
            if any(s.params.prompt == "explode" for s in states):
                raise RuntimeError("boom")
            return original(states)

        monkeypatch.setattr(model, "denoise_step", exploding)
    events = run(engine, make_request("bad", prompt="explode"))
    assert events[-1].type == EventType.FAILED and events[-1].status == "INTERNAL"
    assert "boom" in events[-1].reason
    assert run(engine, make_request("good"))[-1].type == EventType.COMPLETED


def test_a_result_that_cannot_be_made_fails_its_request_and_the_engine_goes_on(engine, monkeypatch):
    """A bug after the last step (making the Result) ends the request
    INTERNAL; it once left it tracked with no step left, forever."""
    from genserve.tracked import Tracked

    original = Tracked.result

    def broken(self, now_s, fin):
        if self.req.req_id == "no-result":
            raise TypeError("a bug")
        return original(self, now_s, fin)

    monkeypatch.setattr(Tracked, "result", broken)
    events = run(engine, make_request("no-result"))
    assert events[-1].type == EventType.FAILED and events[-1].status == "INTERNAL"
    assert "no-result" not in engine.tracked
    assert run(engine, make_request("after"))[-1].type == EventType.COMPLETED


def test_a_bug_in_the_loop_ends_the_requests_it_strands(engine, monkeypatch):
    """The loop survives an exception in a reply's handling; the requests of
    that reply, whose outcome was never applied, end INTERNAL (they hung)."""
    original = engine.feedback.done

    def broken(fl, msg, now, params_of):
        if "stranded" in fl.dispatch.req_ids:
            raise RuntimeError("a bug")
        return original(fl, msg, now, params_of)

    monkeypatch.setattr(engine.feedback, "done", broken)
    events = run(engine, make_request("stranded", steps=1))
    assert events[-1].type == EventType.FAILED and events[-1].status == "INTERNAL"
    assert "stranded" not in engine.tracked
    assert run(engine, make_request("not stranded", steps=1))[-1].type == EventType.COMPLETED


def test_a_request_that_cannot_be_admitted_ends_internal_and_is_counted(engine, monkeypatch):
    """An exception while admitting (its default SLO could not be computed)
    left the caller with no event at all, and the request uncounted."""
    original = engine.requests.default_slo_ms

    def broken(req):
        if req.req_id == "unadmittable":
            raise OverflowError("cannot convert float infinity to integer")
        return original(req)

    monkeypatch.setattr(engine.requests, "default_slo_ms", broken)
    before = _count(engine, "INTERNAL")
    events = run(engine, make_request("unadmittable"), timeout_s=10)
    assert [e.type for e in events] == [EventType.FAILED] and events[0].status == "INTERNAL"
    assert "unadmittable" not in engine.tracked and _count(engine, "INTERNAL") == before + 1
    assert run(engine, make_request("admitted"))[-1].type == EventType.COMPLETED


def test_a_submit_being_taken_from_the_inbox_counts_as_unfinished(engine, monkeypatch):
    """A drain waits while ``num_unfinished`` is above 0. Between the engine
    thread taking a submit from its inbox and tracking it, the count read 0,
    so a drain starting then could stop the server under a new request."""
    import threading
    held, release = threading.Event(), threading.Event()
    original = engine.requests.default_slo_ms

    def slow(req):  # runs inside admission: taken from the inbox, not tracked yet
        if req.req_id == "in-hand":
            held.set()
            release.wait(10)
        return original(req)

    monkeypatch.setattr(engine.requests, "default_slo_ms", slow)
    events: queue.Queue = queue.Queue()
    engine.submit(make_request("in-hand"), events.put)
    try:
        assert held.wait(10)
        assert engine._inbox.qsize() == 0 and "in-hand" not in engine.tracked
        assert engine.num_unfinished >= 1
    finally:
        release.set()
    while True:
        event = events.get(timeout=60)
        if event.terminal:
            break
    assert event.type == EventType.COMPLETED
    deadline = time.monotonic() + 5
    while engine.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_unfinished == 0


def test_default_slo_fits_the_api(engine, monkeypatch):
    """A huge --default-slo-scale made an SLO over uint32: the result, counted
    OK, then failed to convert and the caller got UNKNOWN."""
    monkeypatch.setattr(engine, "config", EngineConfig(default_slo_scale=1e12))
    result = run(engine, make_request("huge slo", steps=1))[-1].result
    assert result.slo_ms == 2**32 - 1 and result.slo_met


def _count(engine, status: str) -> float:
    return sum(s.value for m in engine.metrics.registry.collect() if m.name == "genserve_requests"
               for s in m.samples if s.name.endswith("_total") and s.labels.get("status") == status)


def test_a_dispatch_far_past_its_prediction_is_logged(engine, monkeypatch, caplog):
    """A hung worker (a stopped SP peer) stalled its dispatch with no sign at all."""
    import genserve.engine as engine_module
    import genserve.worker_loss as worker_loss

    monkeypatch.setattr(worker_loss, "OVERDUE_MIN_S", 0.3)
    monkeypatch.setattr(worker_loss, "OVERDUE_FACTOR", 1.0)
    monkeypatch.setattr(engine_module, "WATCHDOG_S", 0.05)
    for worker_models in _worker_models(engine):
        model = worker_models["sd3-tiny"]
        original = model.denoise_step

        def stalled(states, original=original):
            if any(s.params.prompt == "stall" for s in states):
                time.sleep(1.5)
            return original(states)

        monkeypatch.setattr(model, "denoise_step", stalled)
    with caplog.at_level("WARNING", logger="genserve.engine"):
        assert run(engine, make_request("stalled", prompt="stall", steps=1))[-1].type == EventType.COMPLETED
    overdue = [r.getMessage() for r in caplog.records if "past its predicted" in r.getMessage()]
    assert len(overdue) == 1 and "stalled" in overdue[0] and "may be hung" in overdue[0], overdue


def test_cancel_queued_and_duplicate_id_attaches(engine):
    a: queue.Queue = queue.Queue()
    b: queue.Queue = queue.Queue()
    req = make_request("dup", task="video", steps=6)
    ok = _count(engine, "OK")
    engine.submit(req, a.put)
    engine.submit(req, b.put)  # same id while running: attach, don't run twice
    last_a = _last(a)
    last_b = _last(b)
    assert last_a.type == last_b.type == EventType.COMPLETED
    assert last_a.result is last_b.result
    assert _count(engine, "OK") == ok + 2  # the counter counts calls (it counted 1)


def test_a_caller_that_leaves_does_not_end_the_request_for_the_others(engine):
    """Attached callers share one request: one abandoning it (its deadline,
    its closed stream) leaves it running for the rest; the last one to
    leave cancels it."""
    a: queue.Queue = queue.Queue()
    b: queue.Queue = queue.Queue()
    req = make_request("shared", task="video", steps=6)
    ok, late = _count(engine, "OK"), _count(engine, "DEADLINE_EXCEEDED")
    engine.submit(req, a.put)
    engine.submit(req, b.put)
    engine.abandon("shared", a.put, "DEADLINE_EXCEEDED")
    assert _last(b).type == EventType.COMPLETED
    # each caller counted with the status it saw (the one that left was not counted)
    assert (_count(engine, "OK"), _count(engine, "DEADLINE_EXCEEDED")) == (ok + 1, late + 1)
    c: queue.Queue = queue.Queue()
    engine.submit(make_request("alone", task="video", steps=40), c.put)
    _wait_for(c, EventType.STEP)
    engine.abandon("alone", c.put)
    _wait_until(lambda: "alone" not in engine.tracked)


def _slo(engine, outcome: str) -> float:
    return sum(s.value for m in engine.metrics.registry.collect() if m.name == "genserve_slo"
               for s in m.samples if s.name.endswith("_total") and s.labels.get("outcome") == outcome)


def test_a_request_its_caller_ends_after_its_slo_is_a_miss_before_it_neither(engine):
    """A caller gone at its deadline (or cancelling) after the SLO had passed
    leaves a request that missed it; before, nobody can tell whether it
    would have been on time."""
    from dataclasses import replace

    missed, met = _slo(engine, "missed"), _slo(engine, "met")
    late: queue.Queue = queue.Queue()
    engine.submit(replace(make_request("late", task="video", steps=40), slo_ms=1), late.put)
    _wait_for(late, EventType.STEP)  # well past its 1 ms SLO
    engine.abandon("late", late.put, "DEADLINE_EXCEEDED")
    _wait_until(lambda: "late" not in engine.tracked)
    assert _slo(engine, "missed") == missed + 1
    early: queue.Queue = queue.Queue()
    engine.submit(replace(make_request("early", task="video", steps=40), slo_ms=600_000), early.put)
    _wait_for(early, EventType.STEP)
    assert engine.cancel("early")
    _wait_until(lambda: "early" not in engine.tracked)
    assert (_slo(engine, "missed"), _slo(engine, "met")) == (missed + 1, met)


def test_a_different_request_on_a_running_id_is_refused(engine):
    """An id is an idempotency key: the same request attaches, another one
    gets ALREADY_EXISTS, and the running one is untouched."""
    a: queue.Queue = queue.Queue()
    b: queue.Queue = queue.Queue()
    engine.submit(make_request("key", task="video", steps=6, fingerprint="a video of a cat"), a.put)
    engine.submit(make_request("key", steps=3, prompt="a dog", fingerprint="an image of a dog"), b.put)
    refused = _last(b)
    assert refused.type == EventType.FAILED and refused.status == "ALREADY_EXISTS"
    assert "request_id" in refused.reason
    assert _last(a).type == EventType.COMPLETED


def test_an_id_cancelled_while_running_can_be_reused_at_once(engine, monkeypatch):
    """Cancel answers True before a running request reaches its step
    boundary; a resubmission of the id meanwhile is a new request that
    runs to the end, not the old one's CANCELLED."""
    for worker_models in _worker_models(engine):  # steps long enough to resubmit inside one
        model = worker_models["wan-tiny"]

        def slow(states, original=model.denoise_step):
            time.sleep(0.3)
            return original(states)

        monkeypatch.setattr(model, "denoise_step", slow)
    a: queue.Queue = queue.Queue()
    engine.submit(make_request("again", task="video", steps=40), a.put)
    _wait_for(a, EventType.STEP)
    assert engine.cancel("again")
    b: queue.Queue = queue.Queue()
    engine.submit(make_request("again", task="video", steps=3), b.put)
    assert _last(a).type == EventType.CANCELLED
    last = _last(b)
    assert last.type == EventType.COMPLETED and last.result.num_steps == 3


def _wait_for(q: queue.Queue, kind: EventType, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while (e := q.get(timeout=max(0.01, deadline - time.monotonic()))).type != kind:
        assert not e.terminal, e
    return e


def _wait_until(cond, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _last(q: queue.Queue, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        e = q.get(timeout=max(0.01, deadline - time.monotonic()))
        if e.terminal:
            return e


def _worker_models(engine):
    return [w.models for w in engine.executor.workers.values()]


def _dispatch_overheads(engine) -> int:
    text = engine.metrics.render().decode()
    line = next(x for x in text.splitlines() if x.startswith("genserve_dispatch_overhead_seconds_count"))
    return int(float(line.split()[-1]))


def test_dispatch_overhead_is_measured_and_calibrates_the_cost_model(engine):
    """Every dispatch's wall time beyond its reported compute is observed:
    a histogram sample each, and the cost model's dispatch_ms follows it."""
    before = _dispatch_overheads(engine)
    events = run(engine, make_request("ovh", steps=4))
    assert events[-1].type == EventType.COMPLETED
    assert _dispatch_overheads(engine) >= before + 4  # genserve dispatches one step at a time
    assert engine.cost.dispatch_ms() > 0.0  # a round trip is never free
