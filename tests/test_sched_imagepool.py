"""Image batching (``ImagePool.form``): the units it forms for a device budget
keep the rules of imagepool.py whatever the mix of classes, progress and
deadlines: within the budget, one class and at most ``max_batch`` per unit,
each image in one unit at most, and no on-time member pushed past its
deadline by the batch's step time. And batching does happen when deadlines
allow it (a unit that can take no one more is skipped without being tried)."""

from hypothesis import given, settings, strategies as st

from genserve.scheduler import ClusterSpec, DeviceView, LatencyModel, RequestView
from genserve.scheduler.imagepool import ImagePool
from genserve.scheduler.snapshot import Snapshot

COST = LatencyModel.load("reference-h100")
CLUSTER = ClusterSpec(8)
FLUX = "flux.1-dev"
NOW = 100.0
SIZES = (512, 768, 1024)


def snapshot(requests):
    devices = [DeviceView(d, True, NOW) for d in range(CLUSTER.num_devices)]
    return Snapshot(NOW, requests, devices, COST.fresh(), CLUSTER)


def image(i, size, left_s, steps_done=0, device=None):
    return RequestView(f"i{i:03d}", "image", FLUX, size, size, 1, 28, steps_done, NOW - 1.0,
                       NOW + left_s, 0, (device,) if device is not None else ())


@st.composite
def images(draw):
    out = []
    for i in range(draw(st.integers(1, 40))):
        done = draw(st.sampled_from([0, 0, 0, 5, 27]))
        out.append(image(i, draw(st.sampled_from(SIZES)),
                         draw(st.floats(-1.0, 30.0, allow_nan=False)), done,
                         draw(st.integers(0, 7)) if done else None))
    return out


@settings(max_examples=300, deadline=None)
@given(images(), st.integers(1, 8), st.sampled_from([1, 4, 8]), st.sampled_from([1, 4]),
       st.booleans())
def test_units_keep_the_batching_rules(reqs, slots, max_batch, max_degree, only_on_time):
    snap = snapshot(reqs)
    pool = ImagePool(snap, reqs, max_batch, max_degree)
    units, used = pool.form(slots, only_on_time=only_on_time)
    assert used == sum(u.degree for u in units) <= slots
    ids = [r.req_id for u in units for r in u.members]
    assert len(ids) == len(set(ids))
    need = dict(zip((r.req_id for r in reqs), pool.need))
    for u in units:
        assert 1 <= len(u.members) <= max_batch
        assert len({snap.class_key(r) for r in u.members}) == 1
        step = snap.step_s(u.members[0], u.degree, len(u.members))
        for r in u.members:
            if only_on_time:
                assert need[r.req_id] > 0
            if need[r.req_id] > 0:  # on time alone: still on time in the batch
                finish = r.steps_left * step + snap.overhead_s(r, u.degree, r.steps_left)
                assert finish <= r.deadline_s - NOW + 1e-9


def test_loose_deadlines_batch_and_tight_ones_do_not():
    loose = [image(i, 512, 60.0) for i in range(10)]
    snap = snapshot(loose)
    units, used = ImagePool(snap, loose, 8, 1).form(1)
    assert used == 1 and [len(u.members) for u in units] == [8]
    # alone on time with little to spare: a second member's longer step
    # would push the first past its deadline, so each stays alone
    alone = snapshot([image(0, 512, 1.0)]).remaining_s(image(0, 512, 1.0), 1)
    tight = [image(i, 512, alone * 1.02) for i in range(10)]
    units, used = ImagePool(snapshot(tight), tight, 8, 1).form(3)
    assert used == 3 and [len(u.members) for u in units] == [1, 1, 1]
