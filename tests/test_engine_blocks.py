"""How the engine frees an SP block: its members' reports arrive apart.

A scripted executor stands in for the workers, so the order of the replies is
the test's to choose; the policy is a plain one that shows what a plan made
between two members' reports would do.
"""
from __future__ import annotations

import dataclasses
import time

from genserve.config import EngineConfig
from genserve.engine import Engine
from genserve.metrics import Metrics
from genserve.models.base import GenParams
from genserve.scheduler.latency import LatencyModel
from genserve.scheduler.profile import load_profile
from genserve.scheduler.snapshot import finish_plan
from genserve.scheduler.types import Dispatch
from genserve.types import EventType, Request
from genserve.workers import protocol as P
from genserve.workers.executor import Executor, WorkerDied

VIDEO_MODEL = "wan2.1-t2v-1.3b"  # names of the reference profile, which prices the plans
IMAGE_MODEL = "flux.1-dev"


class ScriptedExecutor(Executor):
    """Two devices that run nothing: what they "reply" is fed by the test."""

    def __init__(self, num_devices: int = 2):
        super().__init__([])
        self.specs = {d: None for d in range(num_devices)}
        self.configured_sp_degree = num_devices
        self.sent: list[tuple[int, object]] = []
        self.replies: list[tuple[int, object]] = []

    @property
    def max_sp_degree(self) -> int:
        return len(self.specs)

    def send(self, device_id: int, msg) -> bool:
        self.sent.append((device_id, msg))
        return True

    def wait(self, timeout_s):
        out, self.replies = self.replies, []
        return out

    def respawn(self, device_id: int, standalone: bool = False) -> None:
        pass


class VideoFirst:
    """The video on every device when all are idle, else any image on an
    idle device: a plan made while the video's block is partly free gives the
    free part away."""

    name = "video-first"

    def __init__(self):
        self.plans: list[tuple[tuple, tuple]] = []  # (idle devices, dispatches) of each plan

    def plan(self, now_s, requests, devices, cost):
        idle = [d.device_id for d in devices if d.idle]
        ready = [r for r in requests if not r.running]
        video = next((r for r in ready if r.task == "video"), None)
        images = [r for r in ready if r.task == "image"]
        out = []
        if video is not None and len(idle) == len(devices):
            out.append(Dispatch((video.req_id,), tuple(idle)))
        else:
            for d, r in zip(idle, images):
                out.append(Dispatch((r.req_id,), (d,)))
        self.plans.append((tuple(idle), tuple(out)))
        return finish_plan(requests, out)


def make_engine(num_devices: int = 2):
    executor = ScriptedExecutor(num_devices)
    policy = VideoFirst()
    cards = {VIDEO_MODEL: P.ModelCard(VIDEO_MODEL, "video", None),
             IMAGE_MODEL: P.ModelCard(IMAGE_MODEL, "image", None)}
    engine = Engine(EngineConfig(), executor, lambda spec: policy,
                    LatencyModel(load_profile("reference-h100")), Metrics(), cards)
    return engine, executor, policy


def submit(engine, req_id: str, task: str, steps: int, fingerprint: str = "") -> list:
    model, frames = (VIDEO_MODEL, 9) if task == "video" else (IMAGE_MODEL, 1)
    events: list = []
    params = GenParams("a cat", "", 64, 64, frames, steps, 1.0, 0)
    engine.submit(Request(req_id, model, task, params, "raw", 8, 60_000, time.monotonic(),
                          fingerprint), events.append)
    return events


def done(dispatch_id: int, paused=(), finished=()) -> P.DispatchDone:
    return P.DispatchDone(dispatch_id, tuple(paused), tuple(finished), (), 0.0)


def stepped(dispatch_id: int, req_id: str, steps_done: int) -> P.StepDone:
    return P.StepDone(dispatch_id, (req_id,), (steps_done,), 10.0)


def finished(req_id: str) -> P.Finished:
    return P.Finished(req_id, b"\0" * 64 * 64 * 3, "application/octet-stream", 64, 64, 9, 1.0)


def start_video(engine, executor, policy):
    """A 3-step video running its first step on every device, and an image waiting."""
    video = submit(engine, "v", "video", 3)
    image = submit(engine, "i", "image", 3)
    engine.step()
    assert policy.plans[-1][1] == (Dispatch(("v",), tuple(range(executor.num_devices))),)
    assert engine.tracked["v"].running
    return video, image, engine.tracked["v"].dispatch_id


def test_a_block_frees_only_when_its_last_member_reports():
    engine, executor, policy = make_engine()
    video, image, first = start_video(engine, executor, policy)
    executor.replies = [(0, stepped(first, "v", 1)), (0, done(first, paused=("v",)))]  # the leader first
    engine.step()
    # the video still runs and device 0 is still busy: no plan can give it away
    assert engine.tracked["v"].running and engine.busy == {0: first, 1: first}
    engine._dirty = True
    engine.step()
    assert all(dispatches == () for idle, dispatches in policy.plans[1:]), policy.plans
    executor.replies = [(1, done(first))]  # then the other member's
    engine.step()
    assert engine.busy == {}
    engine.step()  # the plan after it sees the whole block free and continues the video there
    assert policy.plans[-1] == ((0, 1), (Dispatch(("v",), (0, 1)),))
    assert [e.type for e in video] == [EventType.QUEUED, EventType.STARTED, EventType.STEP]  # no PREEMPTED
    assert engine.tracked["v"].num_preemptions == 0


def test_the_report_of_the_leader_counts_whichever_member_reports_last():
    engine, executor, policy = make_engine()
    video, image, first = start_video(engine, executor, policy)
    executor.replies = [(1, done(first))]  # the other member first: device 1 is not given away
    engine.step()
    engine._dirty = True
    engine.step()
    assert engine.busy == {0: first, 1: first} and engine.tracked["v"].running
    executor.replies = [(0, stepped(first, "v", 1)), (0, done(first, paused=("v",)))]
    engine.step()
    engine.step()
    assert policy.plans[-1] == ((0, 1), (Dispatch(("v",), (0, 1)),))
    assert EventType.PREEMPTED not in [e.type for e in video]


def test_a_finishing_dispatch_frees_each_member_as_it_reports():
    # the leader decodes alone: the other member is free as soon as its steps end
    engine, executor, policy = make_engine()
    video, image, first = start_video(engine, executor, policy)
    executor.replies = [(0, stepped(first, "v", 1)), (0, done(first, paused=("v",))), (1, done(first))]
    engine.step()
    engine.step()
    second = engine.tracked["v"].dispatch_id
    executor.replies = [(0, stepped(second, "v", 2)), (0, done(second, paused=("v",))), (1, done(second))]
    engine.step()
    engine.step()
    final = engine.tracked["v"].dispatch_id
    assert engine.inflight[final].finishing == 1
    executor.replies = [(1, done(final))]  # its steps are over; the leader decodes
    engine.step()
    assert engine.busy == {0: final}
    engine.step()
    assert policy.plans[-1] == ((1,), (Dispatch(("i",), (1,)),))  # the freed device is used
    executor.replies = [(0, done(final, finished=[finished("v")]))]
    engine.step()
    assert video[-1].type == EventType.COMPLETED


def test_a_member_that_dies_after_the_leader_reported_frees_the_block():
    engine, executor, policy = make_engine()
    video, image, first = start_video(engine, executor, policy)
    executor.replies = [(0, stepped(first, "v", 1)), (0, done(first, paused=("v",)))]
    engine.step()
    assert engine.tracked["v"].running
    executor.replies = [(1, WorkerDied(1, -9))]
    engine.step()
    # the leader's report takes effect: the video goes on from device 0's copy
    t = engine.tracked["v"]
    assert not t.running and t.holders == {0} and t.steps_done == 1
    assert 0 not in engine.busy and first not in engine.inflight


def test_a_broken_block_frees_each_member_as_it_reports():
    # SP 4, the leader killed mid-step: two peers' collectives fail at once and
    # they report; the third may stay stuck in the collective a while. The two
    # that reported are free for other work meanwhile; the video starts over.
    engine, executor, policy = make_engine(4)
    video, image, first = start_video(engine, executor, policy)
    lost = P.DispatchDone(first, (), (), (P.Failed("v", "UNAVAILABLE", "lost its SP group"),), 0.0,
                          group_lost=True)
    executor.replies = [(0, WorkerDied(0, -9)), (1, lost), (3, lost)]
    engine.step()
    assert engine.busy == {2: first} and engine.max_sp_degree == 1
    assert engine.sp_degree_of(VIDEO_MODEL) == 1  # what ListModels says until the workers regroup
    assert video[-1].type == EventType.PREEMPTED and video[-1].reason.endswith("restarting from step 0")
    engine.step()
    assert policy.plans[-1] == ((1, 3), (Dispatch(("i",), (1,)),))
    executor.replies = [(2, lost)]
    engine.step()
    assert first not in engine.inflight and engine.busy == {1: engine.tracked["i"].dispatch_id}


def test_each_video_model_keeps_within_its_own_sp_limit():
    """Wan 2.1 1.3B's 12 heads split over 4 devices, not 8, while a model
    with 40 heads splits over 8: each card's limit caps that model's blocks
    (and its default SLO's allocation, and what ListModels says), not the
    other's; a plan that breaks it is not run."""
    big = "wan-big"
    ref = load_profile("reference-h100")
    profile = dataclasses.replace(ref, models=(*ref.models, dataclasses.replace(ref.model(VIDEO_MODEL), name=big)))
    executor, specs = ScriptedExecutor(8), []
    cards = {VIDEO_MODEL: P.ModelCard(VIDEO_MODEL, "video", None, max_sp_degree=4),
             big: P.ModelCard(big, "video", None, max_sp_degree=8),
             IMAGE_MODEL: P.ModelCard(IMAGE_MODEL, "image", None, max_sp_degree=1)}
    policy = VideoFirst()
    engine = Engine(EngineConfig(), executor, lambda spec: specs.append(spec) or policy,
                    LatencyModel(profile), Metrics(), cards)
    assert engine.max_sp_degree == 8 and specs[-1].max_sp_degree == 8
    assert specs[-1].video_sp_limit(VIDEO_MODEL) == 4 and specs[-1].video_sp_limit(big) == 8
    # ListModels' figures; an image model's limit of 1 caps nothing (images run on one device)
    assert [engine.sp_degree_of(m) for m in (VIDEO_MODEL, big, IMAGE_MODEL)] == [4, 8, 1]
    # VideoFirst puts the 1.3B video on all 8 devices: refused, and fcfs decides instead
    submit(engine, "v", "video", 3)
    engine.step()
    assert engine.num_invalid_dispatches == 1
    runs = [m for _, m in executor.sent if isinstance(m, P.RunSteps)]
    assert runs and all(m.req_ids == ("v",) and 1 <= len(m.device_ids or (0,)) <= 4 for m in runs)
    # the 40-head model's video runs on all 8 (another engine: the same cards)
    executor = ScriptedExecutor(8)
    engine = Engine(EngineConfig(), executor, lambda spec: VideoFirst(),
                    LatencyModel(profile), Metrics(), cards)
    params = GenParams("a cat", "", 64, 64, 9, 3, 1.0, 0)
    engine.submit(Request("w", big, "video", params, "raw", 8, 60_000, time.monotonic(), ""), [].append)
    engine.step()
    runs = [m for _, m in executor.sent if isinstance(m, P.RunSteps)]
    assert engine.num_invalid_dispatches == 0 and {m.device_ids for m in runs} == {tuple(range(8))}
