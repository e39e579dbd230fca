"""Shortcuts of the request-level baselines that must not change a plan:
the queue order (``RequestLevelPolicy._ordered``: edf looks up one best
remaining time per lane, as the waiting requests of one class and step count
share every prediction) must be the sort by the documented keys, and the
quick test that a decision places nothing (``_may_start``) must never skip
a decision that places something."""

from hypothesis import given, settings, strategies as st

from genserve.scheduler import ClusterSpec, DeviceView, LatencyModel, RequestView, make_policy
from genserve.scheduler.snapshot import Snapshot

COST = LatencyModel.load("reference-h100")
CLUSTER = ClusterSpec(8)
FLUX, WAN = "flux.1-dev", "wan2.1-t2v-1.3b"
NOW = 100.0
# lanes (task, model, width, height, frames, steps); some share a class and
# differ only in steps, so a lane that forgot the steps would mix them up
LANES = [("image", FLUX, 512, 512, 1, 28), ("image", FLUX, 512, 512, 1, 8),
         ("image", FLUX, 1024, 1024, 1, 28), ("video", WAN, 832, 480, 33, 50),
         ("video", WAN, 832, 480, 33, 10), ("video", WAN, 832, 480, 81, 50)]


def snapshot(requests):
    devices = [DeviceView(d, True, NOW) for d in range(CLUSTER.num_devices)]
    return Snapshot(NOW, requests, devices, COST.fresh(), CLUSTER)


@st.composite
def waiting_requests(draw, lanes=LANES, max_size=30):
    """Requests not started, deadlines from long past to far ahead (on both
    sides of every lane's best remaining time), with ties in arrival and deadline."""
    out = []
    for i in range(draw(st.integers(0, max_size))):
        task, model, w, h, frames, steps = draw(st.sampled_from(lanes))
        left = draw(st.one_of(st.sampled_from([-1.0, 0.5, 2.0, 5.0, 30.0]),
                              st.floats(-5.0, 200.0, allow_nan=False)))
        arrival = NOW - draw(st.sampled_from([0.0, 1.0, 3.5]))
        out.append(RequestView(f"r{draw(st.integers(0, 10**6)):07d}-{i}", task, model, w, h,
                               frames, steps, 0, arrival, NOW + left))
    return out


@settings(max_examples=300, deadline=None)
@given(waiting_requests(), st.sampled_from(["fcfs", "sjf", "edf", "static", "fixed-sp"]))
def test_queue_order_is_the_sort_by_the_documented_key(waiting, name):
    policy = make_policy(name, CLUSTER)
    snap = snapshot(waiting)
    order = policy.options.order
    if order == "fcfs":
        key = lambda r: (r.arrival_s, r.req_id)
    elif order == "sjf":
        key = lambda r: (snap.remaining_s(r, policy._degree(r)), r.arrival_s, r.req_id)
    else:
        key = lambda r: (snap.hopeless(r), r.deadline_s, r.req_id)
    got = [r.req_id for r in policy._ordered(snap, list(waiting))]
    assert got == [r.req_id for r in sorted(waiting, key=key)]


@st.composite
def states(draw):
    """Waiting, started (paused or not) and running requests, some devices idle."""
    requests = []
    for r in draw(waiting_requests(max_size=12)):
        kind = draw(st.sampled_from(["waiting", "waiting", "started", "running"]))
        if kind == "waiting":
            requests.append(r)
            continue
        degree = 1 if r.task == "image" else 4
        start = draw(st.sampled_from(range(0, CLUSTER.num_devices, degree)))
        requests.append(RequestView(r.req_id, r.task, r.model, r.width, r.height, r.num_frames,
                                    r.num_steps, draw(st.integers(1, r.num_steps - 1)),
                                    r.arrival_s, r.deadline_s, 0,
                                    tuple(range(start, start + degree)), kind == "running",
                                    kind == "started" and draw(st.booleans())))
    idle = draw(st.lists(st.booleans(), min_size=CLUSTER.num_devices,
                         max_size=CLUSTER.num_devices))
    devices = [DeviceView(d, idle[d], NOW if idle[d] else NOW + 5.0) for d in range(len(idle))]
    return requests, devices


@settings(max_examples=300, deadline=None)
@given(states(), st.sampled_from(["fcfs", "edf", "static", "fixed-sp"]))
def test_a_decision_skipped_as_empty_would_place_nothing(state, name):
    requests, devices = state
    policy = make_policy(name, CLUSTER)
    full = make_policy(name, CLUSTER)
    full._may_start = lambda requests, idle: True  # always the whole decision
    assert policy.plan(NOW, requests, devices, COST) == full.plan(NOW, requests, devices, COST)
