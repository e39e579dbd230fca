"""Property tests: every policy's plans keep the invariants, for any state.

States are drawn from a seed: a cluster (any device count, SP limit,
migratable or not, batch limit), in-flight groups on aligned blocks, and
requests that are new, running, paused or waiting at a step boundary.
"""
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.scheduler import POLICY_NAMES, ClusterSpec, DeviceView, LatencyModel, RequestView, make_policy
from genserve.scheduler.blocks import degrees_upto
from genserve.scheduler.check import check_plan
from genserve.scheduler.simulator import Simulator, simulate
from genserve.scheduler.types import Dispatch, StepPlan
from genserve.scheduler.workload import Request

COST = LatencyModel.load("reference-h100")
IMAGE_SHAPES = ((512, 512), (768, 768), (1024, 1024))
VIDEO_FRAMES = (33, 81)


def random_cluster(rng: random.Random) -> ClusterSpec:
    n = rng.choice((1, 2, 3, 4, 6, 8, 12))
    # sometimes the video model's heads split over fewer devices than the cluster's SP limit
    limits = ((COST.default_model("video"), rng.choice((1, 2, 4))),) if rng.random() < 0.3 else ()
    return ClusterSpec(n, rng.choice((1, 2, 4, 8)), rng.random() < 0.7, rng.choice((1, 2, 4, 16)),
                       rng.choice((1, 2, 8)), limits)


def _block(rng, cluster, free, task="video"):
    """An aligned block of the cluster among ``free`` devices that ``task``
    may run on, or None."""
    cap = (cluster.video_sp_limit(COST.default_model("video")) if task == "video"
           else min(cluster.max_sp_degree, cluster.max_image_sp_degree))
    sizes = [k for k in degrees_upto(min(cluster.num_devices, cap))]
    k = rng.choice(sizes)
    starts = [s for s in range(0, cluster.num_devices - k + 1, k)
              if all(d in free for d in range(s, s + k))]
    if not starts:
        return None
    s = rng.choice(starts)
    return tuple(range(s, s + k))


def _request(rng, i, now, task, **kw):
    if task == "image":
        w, h = rng.choice(IMAGE_SHAPES)
        frames, steps = 1, 28
    else:
        (w, h), frames, steps = (832, 480), rng.choice(VIDEO_FRAMES), 50
    arrival = now - rng.uniform(0, 30)
    slo = rng.uniform(0.2, 4.0) * COST.isolated_latency_ms(
        COST.default_model(task), w, h, frames, steps, task, 8) / 1e3
    return RequestView(f"q{i}", task, COST.default_model(task), w, h, frames, steps,
                       kw.pop("steps_done", 0), arrival, arrival + slo, **kw)


def random_state(seed: int):
    rng = random.Random(seed)
    cluster = random_cluster(rng)
    now = 100.0
    free = set(range(cluster.num_devices))
    requests, busy = [], {}
    for _ in range(rng.randint(0, cluster.num_devices)):  # work in flight
        task = "video" if rng.random() < 0.5 else "image"
        block = _block(rng, cluster, free, task)
        if block is None:
            continue
        free -= set(block)
        end = now + rng.uniform(0.01, 2.0)
        busy.update({d: end for d in block})
        model_req = _request(rng, len(requests), now, task)
        batch = 1 if task == "video" else rng.randint(1, cluster.max_image_batch)
        for _ in range(batch):
            r = _request(rng, len(requests), now, task)
            r = RequestView(r.req_id, r.task, r.model, model_req.width, model_req.height,
                            model_req.num_frames, r.num_steps, rng.randint(0, r.num_steps - 1),
                            r.arrival_s, r.deadline_s, rng.randint(0, 3), block, True)
            requests.append(r)
    for _ in range(rng.randint(0, 3 * cluster.num_devices + 2)):  # not running
        task = "video" if rng.random() < 0.4 else "image"
        r = _request(rng, len(requests), now, task)
        if rng.random() < 0.5:  # started: its state lives on some aligned block
            block = _block(rng, cluster, set(range(cluster.num_devices)), task)
            if block is not None and (task == "video" or len(block) <= 4):
                r = RequestView(r.req_id, r.task, r.model, r.width, r.height, r.num_frames,
                                r.num_steps, rng.randint(1, r.num_steps - 1), r.arrival_s,
                                r.deadline_s, rng.randint(0, 6), block, False,
                                paused=rng.random() < 0.5)
        requests.append(r)
    rng.shuffle(requests)
    devices = [DeviceView(d, d not in busy, busy.get(d, now)) for d in range(cluster.num_devices)]
    return cluster, now, requests, devices


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(POLICY_NAMES),
       admission=st.booleans())
def test_every_plan_keeps_the_invariants(seed, name, admission):
    cluster, now, requests, devices = random_state(seed)
    policy = make_policy(name, cluster, admission_control=admission)
    plan = policy.plan(now, requests, devices, COST.fresh())
    assert check_plan(plan, requests, devices, cluster) == []
    # spelled out: devices used once, only idle ones, a request in one group
    used = Counter(d for disp in plan.dispatches for d in disp.device_ids)
    assert all(c == 1 for c in used.values())
    assert all(devices[d].idle for d in used)
    placed = Counter(r for disp in plan.dispatches for r in disp.req_ids)
    assert all(c == 1 for c in placed.values())
    if not admission:
        assert plan.rejected == ()


class StepAudit:
    """Wraps a policy and counts the steps dispatched to each request."""

    def __init__(self, policy):
        self.policy, self.name = policy, policy.name
        self.steps = Counter()
        self.preempted = Counter()

    def plan(self, now_s, requests, devices, cost):
        plan = self.policy.plan(now_s, requests, devices, cost)
        if requests and all(d.idle for d in devices):  # else nothing may ever wake it
            assert plan.dispatches or plan.rejected, f"{self.name} idles at t={now_s}"
        for disp in plan.dispatches:
            for rid in disp.req_ids:
                self.steps[rid] += disp.num_steps
        self.preempted.update(plan.preempted)
        return plan


class Dawdler:
    """Runs a request one step at a time, each only 0.2 s after it arrived."""

    name = "dawdler"

    def __init__(self, give_up: bool = False):
        self.give_up = give_up

    def plan(self, now_s, requests, devices, cost):
        idle = [d.device_id for d in devices if d.idle]
        ready = [r for r in requests if not r.running and now_s >= r.arrival_s + 0.2]
        if self.give_up or not idle or not ready:
            return StepPlan()
        return StepPlan(dispatches=(Dispatch((ready[0].req_id,), (idle[0],)),))


def test_simulator_re_plans_when_a_policy_waits_for_time():
    """Nothing running, nothing to arrive: the simulator asks again after a
    tick, as the engine does, and gives up only after ``max_idle_s``."""
    cluster = ClusterSpec(1)
    workload = [Request("a", 1.0, "image", COST.default_model("image"), 512, 512, 1, 2, 60e3)]
    done = simulate(Dawdler(), workload, cluster, COST.fresh())
    assert [o.status for o in done.outcomes] == ["done"]
    assert done.outcomes[0].first_start_s == pytest.approx(1.2, abs=0.06)
    stuck = Simulator(Dawdler(give_up=True), workload, cluster, COST.fresh(), max_idle_s=1.0).run()
    assert [o.status for o in stuck.outcomes] == ["unfinished"]
    assert 1.0 <= stuck.end_s - 1.0 <= 1.1


def random_workload(rng: random.Random, n: int):
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(1.5)
        task = "image" if rng.random() < 0.7 else "video"
        if task == "image":
            (w, h), frames, steps = rng.choice(IMAGE_SHAPES), 1, rng.choice((4, 8))
        else:
            (w, h), frames, steps = (832, 480), rng.choice(VIDEO_FRAMES), rng.choice((3, 6))
        slo = rng.uniform(0.5, 3.0) * COST.isolated_latency_ms(
            COST.default_model(task), w, h, frames, steps, task, 4)
        out.append(Request(f"w{i}", round(t, 3), task, COST.default_model(task), w, h, frames,
                           steps, slo))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(POLICY_NAMES))
def test_simulation_loses_nothing_and_runs_every_step_once(seed, name):
    rng = random.Random(seed)
    cluster = random_cluster(rng)
    workload = random_workload(rng, rng.randint(1, 14))
    audit = StepAudit(make_policy(name, cluster))
    result = simulate(audit, workload, cluster, COST.fresh(), check=True)  # raises on a bad plan
    assert sorted(o.req_id for o in result.outcomes) == sorted(r.req_id for r in workload)
    assert all(o.status == "done" for o in result.outcomes)  # nothing lost or stuck
    for r in workload:  # never skipped or repeated
        assert audit.steps[r.req_id] == r.num_steps
    outcome = {o.req_id: o for o in result.outcomes}
    for rid, n in audit.preempted.items():  # every preempted request resumed and finished
        assert outcome[rid].status == "done" and outcome[rid].num_preemptions == n


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_no_preempt_keeps_every_started_request_on_its_block(seed):
    """``genserve:no-preempt`` never pauses, shrinks or moves a started
    request: one waiting at a step boundary on its own idle block (no other
    waiting request's state on it) runs its next step there, a video on
    exactly that block, an image on it or a larger one holding it."""
    cluster, now, requests, devices = random_state(seed)
    plan = make_policy("genserve:no-preempt", cluster).plan(now, requests, devices, COST.fresh())
    assert check_plan(plan, requests, devices, cluster) == []
    started = [r for r in requests if r.steps_done > 0 and not r.running and r.device_ids]
    owners = Counter(d for r in started for d in r.device_ids)
    where = {rid: disp.device_ids for disp in plan.dispatches for rid in disp.req_ids}
    for r in started:
        if all(devices[d].idle and owners[d] == 1 for d in r.device_ids):
            assert r.req_id in where, r
            assert r.req_id not in plan.preempted
            if r.task == "video":
                assert tuple(where[r.req_id]) == tuple(r.device_ids)
            else:
                assert set(r.device_ids) <= set(where[r.req_id])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_no_batching_and_no_elastic_sp_switch_their_mechanism_off(seed):
    """``genserve:no-batching`` dispatches one request at a time;
    ``genserve:no-elastic-sp`` runs a video at ``fixed_sp_degree`` (capped
    by the cluster) or, once started, at the degree it started at, and an
    image on one device (or on the block its state cannot leave)."""
    cluster, now, requests, devices = random_state(seed)
    by_id = {r.req_id: r for r in requests}
    plan = make_policy("genserve:no-batching", cluster).plan(now, requests, devices, COST.fresh())
    assert check_plan(plan, requests, devices, cluster) == []
    assert all(len(d.req_ids) == 1 for d in plan.dispatches)
    fixed = max(k for k in degrees_upto(min(cluster.num_devices, cluster.video_sp_limit(
        COST.default_model("video")))) if k <= 4)
    plan = make_policy("genserve:no-elastic-sp", cluster).plan(now, requests, devices, COST.fresh())
    assert check_plan(plan, requests, devices, cluster) == []
    for d in plan.dispatches:
        r = by_id[d.req_ids[0]]
        started = [by_id[rid] for rid in d.req_ids if by_id[rid].steps_done > 0]
        if r.task == "video":
            assert len(d.device_ids) == (len(r.device_ids) if r.steps_done else fixed), (r, d)
        elif not cluster.migratable and started:
            assert tuple(d.device_ids) == tuple(started[0].device_ids)
        else:
            assert len(d.device_ids) == 1, (r, d)
