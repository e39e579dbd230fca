"""One member of a running SP group dies on its own: its peer must not.

The peer's next collective with the dead one fails (gloo raises within
milliseconds), so the peer drops that dispatch's requests, answers the
dispatch and serves on; the engine, which takes the death first, starts the
requests over from step 0 and brings SP back once the restarted worker and
the peer have joined a new world. A worker with a fake world and model
covers each collective that can fail; live workers cover the whole story.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from genserve.models.base import GenParams, RequestState, collective
from genserve.types import EventType
from genserve.workers import protocol as P
from genserve.workers.executor import MultiprocessExecutor, make_worker_specs
from genserve.workers.startup import worker_main
from genserve.workers.worker import Worker, WorkerSpec, _LockedConn
from test_step_execution import (drain, events_until, frames, restarts, run_video, start_engine, stop_engine,
                                 submit, video, wait_until)

BLOCK = (0, 1)
PARAMS = GenParams("a boat", "", 64, 64, 9, 4, 5.0, 0)


class PeerGone:
    """A world whose other member died after ``good`` collectives: every later
    one fails as a real one does (torch raises RuntimeError, made a
    CollectiveError). ``calls`` names every collective tried."""

    def __init__(self, good: int = 0):
        self.good, self.calls = good, []
        self.closed = False
        self.others = None  # the other members' votes in the step's agreement (None: as this one's)

    def close(self):  # this member leaves the world
        self.closed = True

    def group(self, block):
        return None

    def agree(self, votes, block):
        self.collective("flag")
        return votes if self.others is None else [min(a, b) for a, b in zip(votes, self.others)]

    def broadcast_object(self, obj, src, block):
        self.collective("state")
        return obj

    def collective(self, what: str) -> None:
        self.calls.append(what)
        if len(self.calls) > self.good:
            with collective(what):
                raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")


class FakeVideo:
    """A model whose step over an SP group makes one collective in ``world``
    (the all_to_all of the transformer's attention)."""

    name, task = "wan-tiny", "video"

    def __init__(self, world: PeerGone):
        self.world = world

    def encode_prompt(self, params):
        return None

    def prepare(self, params, cond):
        return RequestState(params, cond, None, None, None)

    def denoise_step(self, states, sp=None):
        if sp is not None:
            self.world.collective("attention")
        for s in states:
            s.step_index += 1


class FailsHere(FakeVideo):
    """A model whose step fails on this member alone after ``good`` steps (out
    of device memory there), or whose preparation does."""

    def __init__(self, world: PeerGone, good: int = 0, at: str = "step"):
        super().__init__(world)
        self.good, self.at = good, at

    def prepare(self, params, cond):
        if self.at == "prepare":
            raise RuntimeError("out of memory (prepare)")
        return super().prepare(params, cond)

    def denoise_step(self, states, sp=None):
        if self.good <= 0:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.good -= 1
        super().denoise_step(states, sp)


def run(world: PeerGone, msg: P.RunSteps, device_id: int = 0, held: bool = False, model=None):
    """``msg`` on a worker in ``world``: its report, the steps it reported, the worker."""
    engine_end, worker_end = mp.Pipe()
    worker = Worker(WorkerSpec(device_id, "cpu", ()), {"wan-tiny": model or FakeVideo(world)}, world)
    if held:
        worker._admit(P.NewRequest("v", "wan-tiny", PARAMS, "raw", 8))
    report = worker.run_steps(msg, _LockedConn(worker_end))
    steps = []
    while engine_end.poll():
        steps.append(engine_end.recv())
    return report, steps, worker


def sp_steps(num_steps: int, new=(P.NewRequest("v", "wan-tiny", PARAMS, "raw", 8),), state_src=-1) -> P.RunSteps:
    return P.RunSteps(7, "wan-tiny", ("v",), num_steps, tuple(new), BLOCK, state_src)


def assert_group_lost(report: P.DispatchDone, worker: Worker) -> None:
    """The request's state is gone and reported UNAVAILABLE (a stale report the
    engine ignores: it restarted the request on the death); the worker stays."""
    assert report.dispatch_id == 7 and report.paused == () and report.finished == ()
    assert [(f.req_id, f.status) for f in report.failed] == [("v", "UNAVAILABLE")]
    assert report.failed[0].message.startswith(f"worker {worker.spec.device_id} lost its SP group [0, 1]: ")
    assert "Connection closed by peer" in report.failed[0].message
    assert worker.live == {} and report.group_lost
    assert worker.groups.closed  # left at once: a third member may wait on it in the collective


def test_the_step_flag_broadcast_fails():
    world = PeerGone(good=4)  # two steps (flag, attention), then the third flag
    report, steps, worker = run(world, sp_steps(4))
    assert_group_lost(report, worker)
    assert world.calls == ["flag", "attention", "flag", "attention", "flag"]
    assert [s.step_indices for s in steps] == [(1,), (2,)]  # the leader reported the steps it made


def test_a_collective_inside_the_step_fails_and_no_other_follows(caplog):
    world = PeerGone(good=1)
    report, steps, worker = run(world, sp_steps(4), device_id=1)  # the non-leader
    assert_group_lost(report, worker)
    assert world.calls == ["flag", "attention"]  # no flag after a broken step: the group is gone
    assert steps == []  # (only the leader reports steps)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("worker 1: SP group [0, 1] broke in dispatch 7; dropping v and going on") for m in messages)
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in caplog.records)


def test_the_state_broadcast_growing_the_group_fails():
    world = PeerGone(good=0)
    report, _, worker = run(world, sp_steps(2, new=(), state_src=0), held=True)  # worker 0 holds the state
    assert_group_lost(report, worker)
    assert world.calls == ["state"]


def test_after_its_group_broke_the_worker_serves_single_device_steps():
    world = PeerGone(good=0)
    _, _, worker = run(world, sp_steps(2))
    engine_end, worker_end = mp.Pipe()
    alone = P.RunSteps(8, "wan-tiny", ("w",), 2, (P.NewRequest("w", "wan-tiny", PARAMS, "raw", 8),))
    report = worker.run_steps(alone, _LockedConn(worker_end))
    assert report.paused == ("w",) and report.failed == () and worker.live["w"].state.step_index == 2
    assert world.calls == ["flag"]  # a single-device dispatch uses no collective


@pytest.mark.parametrize("device_id", [0, 1], ids=["leader", "non-leader"])
def test_a_member_whose_own_step_fails_leaves_the_world_so_its_peers_do_not_wait(device_id, caplog):
    # Its peers are in (or about to enter) a collective with it: staying in
    # the world would leave them waiting for gloo's 30 minutes.
    world = PeerGone(good=100)
    report, _, worker = run(world, sp_steps(4), device_id=device_id, model=FailsHere(world, good=1))
    assert world.calls == ["flag", "attention", "flag"]  # no collective after the failed step
    assert world.closed and report.group_lost
    assert report.paused == () and report.finished == () and worker.live == {}
    assert [(f.req_id, f.status) for f in report.failed] == [("v", "INTERNAL")]
    assert report.failed[0].message == "denoising step failed: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert any(r.getMessage() == f"worker {device_id}: leaving SP group [0, 1] in dispatch 7: its step failed"
               for r in caplog.records)


def test_a_non_leader_whose_preparation_failed_stops_with_the_leader_and_the_world_stays():
    """The leader holds the video, this member does not: they agree on an
    empty batch, so neither steps (the leader alone would wait for it in the
    step's collective) and nobody leaves the world: SP stays on."""
    world = PeerGone(good=100)
    world.others = [1, 1]  # the leader: go on, and it holds "v"
    report, _, worker = run(world, sp_steps(4), device_id=1, model=FailsHere(world, at="prepare"))
    assert world.calls == ["flag"]
    assert not world.closed and not report.group_lost and worker.live == {}
    assert [(f.req_id, f.status) for f in report.failed] == [("v", "INTERNAL")]
    assert report.failed[0].message == "prepare failed: out of memory (prepare)"


def test_the_leader_fails_a_request_another_member_could_not_prepare():
    world = PeerGone(good=100)
    world.others = [1, 0]  # a member: go on, but it holds no "v"
    report, steps, worker = run(world, sp_steps(4))
    assert world.calls == ["flag"] and steps == [] and not world.closed and not report.group_lost
    assert worker.live == {} and report.paused == ()
    assert [(f.req_id, f.status) for f in report.failed] == [("v", "INTERNAL")]
    assert report.failed[0].message == ("its preparation failed on another member of its SP group [0, 1] "
                                        "(that worker logged why)")


def test_a_request_one_member_lacks_leaves_the_batch_and_the_rest_steps_on():
    world = PeerGone(good=100)
    world.others = [1, 0, 1]  # the other member holds "w" but not "v"
    new = (P.NewRequest("v", "wan-tiny", PARAMS, "raw", 8), P.NewRequest("w", "wan-tiny", PARAMS, "raw", 8))
    msg = P.RunSteps(7, "wan-tiny", ("v", "w"), 2, new, BLOCK)
    report, steps, worker = run(world, msg)
    assert [s.req_ids for s in steps] == [("w",), ("w",)] and report.paused == ("w",)
    assert [(f.req_id, f.status) for f in report.failed] == [("v", "INTERNAL")]
    assert set(worker.live) == {"w"} and worker.live["w"].state.step_index == 2


def test_a_leader_told_to_stop_mid_dispatch_stops_its_members_too():
    """A Shutdown reaching the leader during an SP dispatch: its vote stops
    the group (before, it left the loop and its members waited in the next
    step flag); what is held stays, paused."""
    world = PeerGone(good=100)
    engine_end, worker_end = mp.Pipe()
    worker = Worker(WorkerSpec(0, "cpu", ()), {"wan-tiny": FakeVideo(world)}, world)
    votes = []
    world.agree = lambda v, block: (votes.append(list(v)), v)[1]  # the members vote as it does
    engine_end.send(P.Shutdown())
    report = worker.run_steps(sp_steps(4), _LockedConn(worker_end))
    assert votes == [[1, 1], [0, 1]]  # one step, then the leader's stop
    assert report.paused == ("v",) and report.failed == () and worker.live["v"].state.step_index == 1


def test_a_peer_whose_collective_fails_reports_the_group_lost():
    report, _, worker = run(PeerGone(good=1), sp_steps(4))
    assert report.group_lost and worker.live == {}


def test_a_step_failing_on_one_device_alone_keeps_the_world():
    world = PeerGone(good=100)
    alone = P.RunSteps(8, "wan-tiny", ("w",), 2, (P.NewRequest("w", "wan-tiny", PARAMS, "raw", 8),))
    report, _, worker = run(world, alone, model=FailsHere(world, good=0))
    assert not world.closed and not report.group_lost and world.calls == []
    assert [(f.req_id, f.status) for f in report.failed] == [("w", "INTERNAL")]


STEPS = 30  # a dispatch of them runs ~0.5 s here: the kill after its first step lands inside it


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1], ids=["leader-killed", "non-leader-killed"])
def test_the_peer_of_a_killed_sp_member_serves_on_and_the_video_completes(victim, capfd):
    """SIGKILL one member of a running SP-2 video. Its peer keeps its process
    (before, its next collective raised out of the worker loop: it exited with
    code 1 and was restarted too, reloading its models); the video starts
    over on the peer and ends bit-identical to an uninterrupted run; SP comes
    back, and no traceback is logged."""
    survivor = 1 - victim
    eng = start_engine(("wan-tiny",))  # its own: capfd sees its workers' logs
    try:
        pids = {d: eng.executor.pid(d) for d in BLOCK}
        v = video(steps=STEPS, seed=41)
        events = submit(eng, v, [(BLOCK, STEPS)])
        events_until(events, EventType.STEP)
        os.kill(pids[victim], signal.SIGKILL)
        assert events_until(events, EventType.PREEMPTED)[-1].reason == (
            f"worker {victim} crashed (exit code -9); restarting from step 0")
        eng.policy.scripts[v.req_id] = [((survivor,), STEPS)]  # SP is off until the new world
        rest = drain(events, timeout_s=60)
        assert rest[-1].type == EventType.COMPLETED, rest[-1]
        assert [e.step for e in rest if e.type == EventType.STEP] == list(range(1, STEPS + 1))
        assert eng.executor.pid(survivor) == pids[survivor], f"worker {survivor} exited and was restarted"
        assert eng.executor.procs[survivor].is_alive()
        assert wait_until(lambda: eng.max_sp_degree == 2, 120), "sequence parallelism did not come back"
        assert restarts(eng) == {str(victim): 1.0}  # the victim only
        alone = run_video(eng, [((survivor,), STEPS)], steps=STEPS, seed=41)
        assert frames(alone[-1]).tobytes() == frames(rest[-1]).tobytes()
        assert run_video(eng, [(BLOCK, 2)], steps=2)[-1].result.sp_degrees == (2,)  # in the new world
    finally:
        stop_engine(eng)
    log = capfd.readouterr().err
    assert f"worker {survivor}: SP group [0, 1] broke in dispatch " in log
    assert "Traceback" not in log, log[-3000:]


class StepFailsOnce(MultiprocessExecutor):
    """Live workers; on ``victim`` the second SP step of the video model
    raises, as an out-of-memory error on that device alone would."""

    def __init__(self, specs, victim: int):
        super().__init__(specs)
        self.victim = victim

    def entry(self):
        """The worker process's main (spec, conn, victim)."""
        return _worker_whose_sp_step_fails_once

    def _start_one(self, device_id: int) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=self.entry(), args=(self.specs[device_id], child, self.victim),
                                 daemon=True)
        proc.start()
        child.close()
        self.conns[device_id], self.procs[device_id] = parent, proc


def _worker_whose_sp_step_fails_once(spec, conn, victim: int) -> None:
    if spec.device_id == victim:
        from genserve.models import wan

        original, calls = wan.WanAdapter.denoise_step, []

        def step(self, states, attention_kwargs=None, sp=None):
            if sp is not None:
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("CUDA out of memory (injected by the test)")
            return original(self, states, attention_kwargs, sp)

        wan.WanAdapter.denoise_step = step
    worker_main(spec, conn)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1], ids=["leader-fails", "non-leader-fails"])
def test_a_step_failing_on_one_sp_member_ends_the_dispatch_at_once(victim, capfd, caplog):
    """Before, the member whose step raised went on to the next step flag
    while its peer waited in the step's all_to_all: both sat there until the
    hung-worker watchdog (300 s by default) killed them. Now the video fails
    within seconds, neither worker restarts, and SP comes back in a new world."""
    specs = make_worker_specs("cpu", 2, ("wan-tiny",), num_threads=1)
    eng = start_engine(executor=StepFailsOnce(specs, victim))
    try:
        pids = {d: eng.executor.pid(d) for d in BLOCK}
        v = video(steps=STEPS, seed=41)
        t0 = time.monotonic()
        rest = drain(submit(eng, v, [(BLOCK, STEPS)]), timeout_s=60)
        assert time.monotonic() - t0 < 30
        end = rest[-1]
        assert end.type == EventType.FAILED, end
        if victim == 0:  # the leader reports: its own failure
            assert (end.status, end.reason) == (
                "INTERNAL", "denoising step failed: CUDA out of memory (injected by the test)")
        else:  # the leader's collective with the member that left failed
            assert end.status == "UNAVAILABLE" and end.reason.startswith("worker 0 lost its SP group [0, 1]: ")
        assert {d: eng.executor.pid(d) for d in BLOCK} == pids and restarts(eng) == {}
        assert wait_until(lambda: eng.max_sp_degree == 2, 120), "sequence parallelism did not come back"
        again = run_video(eng, [(BLOCK, 3)], steps=3)
        assert again[-1].type == EventType.COMPLETED and again[-1].result.sp_degrees == (2,)
    finally:
        stop_engine(eng)
    log = capfd.readouterr().err
    assert f"worker {victim}: leaving SP group [0, 1] in dispatch " in log
    assert "Traceback" not in log.split("leaving SP group")[1], log[-3000:]  # (the failed step's is logged)
    assert sum("lost its SP group in dispatch" in r.getMessage() for r in caplog.records) == 1


class FailsAndStaysInTheWorld(StepFailsOnce):
    """As StepFailsOnce, but the failing member's leaving does not free its
    peer: it keeps its old groups (their connections close with the last
    reference to them), so the peer waits in the step's all_to_all, as an
    NCCL peer does (a gloo one fails at once)."""

    def entry(self):
        return _worker_that_fails_and_stays


def _worker_that_fails_and_stays(spec, conn, victim: int) -> None:
    if spec.device_id == victim:
        from genserve.workers import parallel

        real_close, kept = parallel.Groups.close, []

        def close(self):
            kept.append(dict(self.groups))  # held for good: the peer is never told
            real_close(self)

        parallel.Groups.close = close
    _worker_whose_sp_step_fails_once(spec, conn, victim)


@pytest.mark.slow
def test_a_peer_left_waiting_in_a_collective_is_killed_soon_after_the_break(monkeypatch, caplog):
    """The member whose step failed leaves, but its peer (the leader) stays
    blocked in the step's collective, as on NCCL. Before, it sat there until
    --hung-worker-s (300 s); now the engine kills it once BROKEN_GRACE_S
    (here 1 s) has passed since the break, and the video starts over."""
    from genserve import worker_loss

    monkeypatch.setattr(worker_loss, "BROKEN_GRACE_S", 1.0)
    specs = make_worker_specs("cpu", 2, ("wan-tiny",), num_threads=1)
    eng = start_engine(executor=FailsAndStaysInTheWorld(specs, victim=1))
    try:
        v = video(steps=STEPS, seed=41)
        t0 = time.monotonic()
        events = submit(eng, v, [(BLOCK, STEPS)])
        preempted = events_until(events, EventType.PREEMPTED, timeout_s=60)[-1]
        assert time.monotonic() - t0 < 20  # the watchdog looks every 5 s
        assert preempted.reason == ("worker 0 was stuck in a collective with a lost SP member and was "
                                    "killed; restarting from step 0")
        eng.policy.scripts[v.req_id] = [((1,), STEPS)]  # SP is off until the new world
        assert drain(events, timeout_s=60)[-1].type == EventType.COMPLETED
        assert restarts(eng) == {"0": 1.0}
        assert wait_until(lambda: eng.max_sp_degree == 2, 120), "sequence parallelism did not come back"
    finally:
        stop_engine(eng)
    assert any("have not answered: stuck in a collective with it; killing them" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
def test_when_the_leader_of_an_sp4_group_dies_every_peer_is_free_at_once():
    """helper-31's probe: with SP 4, a peer could stay in the step's all_to_all
    waiting on another survivor (its connection to the dead one was not the
    one it waited on) until the rejoin tore down the old world 7.6 s later, and
    the block, freed only as a whole, kept the peers that had reported busy
    too. Now a survivor leaves the broken world at once (its connections
    closing fail the stuck one), and a broken block frees each member as it
    reports."""
    block = (0, 1, 2, 3)
    eng = start_engine(("wan-tiny",), MultiprocessExecutor(make_worker_specs("cpu", 4, ("wan-tiny",),
                                                                             num_threads=1)))
    try:
        v = video(steps=STEPS, seed=41)
        events = submit(eng, v, [(block, STEPS)])
        events_until(events, EventType.STEP)
        os.kill(eng.executor.pid(0), signal.SIGKILL)
        events_until(events, EventType.PREEMPTED)
        assert wait_until(lambda: not any(d in eng.busy for d in (1, 2, 3)), 5.0), eng.busy
        eng.policy.scripts[v.req_id] = [((1,), STEPS)]
        assert drain(events, timeout_s=60)[-1].type == EventType.COMPLETED
        assert wait_until(lambda: eng.max_sp_degree == 4, 120), "sequence parallelism did not come back"
        assert run_video(eng, [(block, 2)], steps=2)[-1].result.sp_degrees == (4,)
    finally:
        stop_engine(eng)
