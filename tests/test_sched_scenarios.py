"""Scenario tests: the paper's motivating case, a lone request, starvation,
admission control, calibration, odd clusters."""
from dataclasses import replace

import pytest

from genserve.scheduler import (POLICY_NAMES, ClusterSpec, DeviceView, LatencyModel, RequestView,
                                make_policy)
from genserve.scheduler.runner import scaled_profile
from genserve.scheduler.simulator import simulate
from genserve.scheduler.workload import Request, WorkloadSpec, generate, resolve

COST = LatencyModel.load("reference-h100")
FLUX, WAN = "flux.1-dev", "wan2.1-t2v-1.3b"


def iso_ms(task, w, h, frames, steps, devices):
    model = COST.default_model(task)
    return COST.isolated_latency_ms(model, w, h, frames, steps, task, devices)


def motivating_workload():
    """4 videos arrive together on 4 devices with room to spare (2x the time
    each takes on one device); 3 images arrive a second later (SLO 2x)."""
    out = []
    video_alone_ms = (COST.encode_ms(WAN) + 50 * COST.step_ms(WAN, 832, 480, 33, 1, 1)
                      + COST.decode_ms(WAN, 832, 480, 33, 1))
    for i in range(4):
        out.append(Request(f"v{i}", 0.0, "video", WAN, 832, 480, 33, 50, 2 * video_alone_ms))
    for i, size in enumerate((512, 768, 1024)):
        out.append(Request(f"i{i}", 1.0, "image", FLUX, size, size, 1, 28,
                           2 * iso_ms("image", size, size, 1, 28, 4)))
    return out


def run(name, workload, cluster, **options):
    return simulate(make_policy(name, cluster, **options), workload, cluster, COST.fresh())


def test_motivating_case_fcfs_misses_images_genserve_meets_all():
    cluster = ClusterSpec(4)
    workload = motivating_workload()
    fcfs = {o.req_id: o for o in run("fcfs", workload, cluster).outcomes}
    assert not any(fcfs[f"i{i}"].met_slo for i in range(3))  # images wait behind videos
    for fixed in (1, 2, 4):  # whatever fixed degree the videos run at
        res = run("fcfs", workload, cluster, fixed_sp_degree=fixed)
        assert not any(o.met_slo for o in res.outcomes if o.task == "image")
    gen = run("genserve", workload, cluster)
    assert all(o.met_slo for o in gen.outcomes), [(o.req_id, o.finish_s, o.deadline_s)
                                                  for o in gen.outcomes if not o.met_slo]
    assert sum(o.num_preemptions for o in gen.outcomes if o.task == "video") >= 1
    # preemption is what makes room: without it the videos keep every device
    nopre = run("genserve:no-preempt", workload, cluster)
    assert not any(o.num_preemptions for o in nopre.outcomes)
    assert not any(o.met_slo for o in nopre.outcomes if o.task == "image")


def test_no_preempt_pauses_nothing_under_load():
    """Under a load where ``genserve`` pauses videos and images for others,
    ``genserve:no-preempt`` pauses nothing and still finishes everything."""
    cluster = ClusterSpec(8)
    workload = resolve(generate(WorkloadSpec(rate_rps=0.4, num_requests=80, seed=0)), COST, 1.5, 8)
    gen = run("genserve", workload, cluster)
    assert sum(o.num_preemptions for o in gen.outcomes) >= 5
    nopre = run("genserve:no-preempt", workload, cluster)
    assert [o.status for o in nopre.outcomes] == ["done"] * len(workload)
    assert sum(o.num_preemptions for o in nopre.outcomes) == 0


@pytest.mark.parametrize("task,shape", [("image", (1024, 1024, 1)), ("image", (512, 512, 1)),
                                        ("video", (832, 480, 81)), ("video", (832, 480, 33))])
def test_lone_request_runs_at_its_isolated_latency(task, shape):
    cluster = ClusterSpec(8)
    steps = 28 if task == "image" else 50
    iso = iso_ms(task, *shape, steps, 8)
    req = Request("solo", 5.0, task, COST.default_model(task), *shape, steps, 3 * iso)
    for name in ("genserve", "edf-step"):
        out = run(name, [req], cluster).outcomes[0]
        assert out.latency_s * 1e3 == pytest.approx(iso, rel=1e-6), name


def test_videos_do_not_starve_under_an_endless_image_stream():
    """Images alone saturate the devices; a video still finishes within the
    aging bound (starvation_factor x its SLO, then its run), and is paused at
    most max_preemptions times."""
    cluster = ClusterSpec(4)
    factor, max_preemptions = 2.0, 3
    images = [Request(f"img{i}", 0.4 * i, "image", FLUX, 768, 768, 1, 28,
                      2 * iso_ms("image", 768, 768, 1, 28, 4)) for i in range(150)]
    alone_s = 50 * COST.step_ms(WAN, 832, 480, 33, 1, 1) / 1e3 + 2.0  # degree 1, + slack
    for slo_ms in (3 * iso_ms("video", 832, 480, 33, 50, 4), 3000.0):  # feasible, hopeless
        video = Request("video", 1.0, "video", WAN, 832, 480, 33, 50, slo_ms)
        res = run("genserve", [video] + images, cluster, starvation_factor=factor,
                  max_preemptions=max_preemptions)
        out = {o.req_id: o for o in res.outcomes}
        assert sum(o.met_slo for o in res.outcomes if o.task == "image") < 120  # saturated
        assert out["video"].status == "done"
        assert out["video"].finish_s <= video.arrival_s + factor * slo_ms / 1e3 + alone_s
        assert out["video"].finish_s < images[-1].arrival_s  # not just after the stream
        assert out["video"].num_preemptions <= max_preemptions


def test_a_hopeless_image_behind_running_videos_is_served_once_aged():
    """Each of 2 devices runs a video with hours of slack; an image arrives with
    an SLO shorter than one video step (hopeless at once). The starvation
    guard runs it at a step boundary once it has waited 4x its SLO (it used to
    wait for the videos to end: aged images that could not be on time formed
    no batch for the joint search)."""
    cluster = ClusterSpec(2)
    videos = [Request(f"v{i}", 0.0, "video", WAN, 832, 480, 81, 50, 3_600_000.0) for i in range(2)]
    image = Request("late", 1.0, "image", FLUX, 512, 512, 1, 28, 100.0)
    video_step_s = COST.step_ms(WAN, 832, 480, 81, 1, 1) / 1e3
    for name in ("genserve", "edf-step"):
        out = {o.req_id: o for o in run(name, videos + [image], cluster).outcomes}
        assert out["late"].status == "done" and not out["late"].met_slo
        waited = out["late"].first_start_s - image.arrival_s
        assert waited <= 4 * 0.1 + video_step_s + 0.1, (name, waited)
        assert out["late"].finish_s < min(out[v.req_id].finish_s for v in videos), name
        assert all(out[v.req_id].met_slo for v in videos), name


def _given_up_videos():
    """Two videos long past their deadlines: one running a step on device 1,
    one paused with its state on device 0."""
    late = dict(task="video", model=WAN, width=832, height=480, num_frames=81, num_steps=50,
                arrival_s=0.0, deadline_s=50.0)
    running = RequestView("running-late", steps_done=30, device_ids=(1,), running=True, **late)
    paused = RequestView("paused-late", steps_done=10, device_ids=(0,), num_preemptions=1,
                         paused=True, **late)
    return running, paused


def test_image_keeps_the_block_it_waits_for_from_leftover_work():
    """A device frees while its buddy finishes a step; an image that needs
    both (degree 1 would miss) is held the free one, instead of a given-up
    video taking it for a step long enough to make the image miss."""
    now = 100.0
    running, paused = _given_up_videos()
    deg1 = iso_ms("image", 1024, 1024, 1, 28, 1) / 1e3
    deg2 = iso_ms("image", 1024, 1024, 1, 28, 2) / 1e3
    image = RequestView("img", "image", FLUX, 1024, 1024, 1, 28, 0, now, now + (deg1 + deg2) / 2)
    assert deg2 + 0.1 < (deg1 + deg2) / 2 < deg1  # on time at degree 2 only
    devices = [DeviceView(0, True, now), DeviceView(1, False, now + 0.1)]
    plan = make_policy("genserve", ClusterSpec(2)).plan(now, [running, paused, image], devices,
                                                        COST.fresh())
    assert plan.dispatches == ()
    # with the buddy free the image takes the block at once
    devices = [DeviceView(0, True, now), DeviceView(1, True, now)]
    plan = make_policy("genserve", ClusterSpec(2)).plan(now, [running, paused, image], devices,
                                                        COST.fresh())
    assert [(d.req_ids, d.device_ids) for d in plan.dispatches] == [(("img",), (0, 1))]


def test_given_up_video_fills_whole_blocks_only():
    """Leftover devices serve a given-up video on a block of 2 or more, not
    on one device alone (a step there is long and breaks the block)."""
    now = 100.0
    running, paused = _given_up_videos()
    devices = [DeviceView(0, True, now), DeviceView(1, False, now + 1.0)]
    cluster = ClusterSpec(2)
    plan = make_policy("genserve", cluster).plan(now, [running, paused], devices, COST.fresh())
    assert plan.dispatches == ()
    plan = make_policy("genserve", cluster, fill_min_degree=1).plan(
        now, [running, paused], devices, COST.fresh())
    assert [(d.req_ids, d.device_ids) for d in plan.dispatches] == [(("paused-late",), (0,))]
    devices = [DeviceView(0, True, now), DeviceView(1, True, now)]
    plan = make_policy("genserve", cluster).plan(now, [paused], devices, COST.fresh())
    assert [(d.req_ids, d.device_ids) for d in plan.dispatches] == [(("paused-late",), (0, 1))]


def test_a_given_up_video_runs_at_its_fastest_degree_where_sp_does_not_pay():
    """On workers where SP steps are slower than one device (a small video
    on CPU processes sharing cores), a video past saving fills one device,
    not a block of 4: the same policy on the reference profile takes 4."""
    from genserve.scheduler.profile import Profile, StepSample

    steps = [StepSample("vid", "video", 64, 64, 9, k, 1, ms) for k, ms in ((1, 8.0), (2, 12.0), (4, 16.0))]
    steps.append(StepSample("img", "image", 64, 64, 1, 1, 1, 5.0))
    cost = LatencyModel(Profile.from_measurements("sp-slower", steps))
    late = RequestView("late", "video", "vid", 64, 64, 9, 20, 0, 0.0, 0.01)
    cluster, now = ClusterSpec(4), 1.0
    devices = [DeviceView(d, True, now) for d in range(4)]
    plan = make_policy("genserve", cluster).plan(now, [late], devices, cost.fresh())
    assert [len(d.device_ids) for d in plan.dispatches] == [1]
    res = simulate(make_policy("genserve", cluster), [Request("late", 0.0, "video", "vid", 64, 64, 9, 20, 1.0)],
                   cluster, cost.fresh())
    assert res.outcomes[0].max_sp_degree == 1
    assert res.outcomes[0].latency_s == pytest.approx(20 * 8.0 / 1e3, rel=1e-6)
    ref = RequestView("late", "video", WAN, 832, 480, 81, 50, 0, 0.0, 0.01)
    plan = make_policy("genserve", cluster).plan(now, [ref], devices, COST.fresh())
    assert [len(d.device_ids) for d in plan.dispatches] == [4]
    # a video no degree keeps on time is given the degree that finishes it first
    from genserve.scheduler.genserve_values import need_degree
    from genserve.scheduler.snapshot import Snapshot

    for c, video, fastest in ((cost, late, 1), (COST, ref, 4)):
        snap = Snapshot(now, [video], devices, c.fresh(), cluster)
        assert need_degree(snap, video, snap.allowed_degrees(video)) == fastest


@pytest.mark.parametrize("spare", [0.15, 0.0])
def test_video_admission_margin_follows_the_image_load(spare):
    """Two videos arrive together with no images in sight, the first needing
    all 8 devices; the second is on time only after it, with less than the
    full admission margin (30% of its run time) spare, or none at all (when
    its turn comes it is on time only without the 2% planning margin, and
    must still be run, not left idle). The admission margin is room for
    images to come, so without images the second is taken on, and both are
    on time; with the full margin the first is refused (5% spare) and misses,
    unless a video that can start at once on idle devices is taken on
    without it (``start_now_s``, on by default)."""
    cluster = ClusterSpec(8)
    run8_ms = iso_ms("video", 832, 480, 81, 50, 8)
    first = Request("v1", 0.0, "video", WAN, 832, 480, 81, 50, 1.05 * run8_ms)
    second = Request("v2", 0.0, "video", WAN, 832, 480, 81, 50, (2 + spare) * run8_ms)

    def met(**options):
        res = run("genserve", [first, second], cluster, **options)
        return {o.req_id: o.met_slo for o in res.outcomes}

    assert met(start_now_s=0.0) == {"v1": True, "v2": True}
    assert met(admit_margin_share=0.0, start_now_s=0.0) == {"v1": False, "v2": True}
    assert met(admit_margin_share=0.0) == {"v1": True, "v2": True}


def test_committed_video_keeps_its_devices_when_the_plan_cannot_fit_it():
    """A committed video that the stretched plan (room for images to come)
    no longer fits is still a target and will run: a newcomer must not be
    planned into its devices. Here the committed video needs all 8 devices
    now; the newcomer would fit only if they were free."""
    from genserve.scheduler.snapshot import Snapshot
    from genserve.scheduler.targets import Commitments

    now, cluster, cost = 10.0, ClusterSpec(8), COST.fresh()
    rest8_ms = (20 * COST.step_ms(WAN, 832, 480, 81, 8, 1)
                + COST.decode_ms(WAN, 832, 480, 81, 8))
    old = RequestView("old", "video", WAN, 832, 480, 81, 50, 30, 0.0,
                      now + 1.05 * rest8_ms / 1e3, device_ids=tuple(range(8)), paused=True)
    new = RequestView("new", "video", WAN, 832, 480, 33, 50, 0, now,
                      now + 1.5 * iso_ms("video", 832, 480, 33, 50, 8) / 1e3)
    devices = [DeviceView(d, True, now) for d in range(8)]
    snap = Snapshot(now, [old, new], devices, cost, cluster)
    com = Commitments(admit_margin=0.0)
    com.ids = {"old"}
    com.stretch = 1.2  # images to come: "old" no longer fits the plan
    plans, _, dropped, _ = com.update(snap, [old, new], 0.0)
    assert "old" not in plans and com.ids == {"old"} and dropped == {"new"}
    com.ids, com.stretch = set(), 1.0  # without "old", "new" would be taken on
    com.update(snap, [new], 0.0)
    assert com.ids == {"new"}


def test_a_tight_newcomer_is_tried_ahead_of_looser_committed_videos():
    """Eight loose committed videos (not started) book every device, one
    each, far ahead; a short video whose deadline needs it to start now
    fits only ahead of them, and they stay on time behind it. It must reach
    the trial that replans them all, not be skipped because the booked plan
    leaves no device free in time."""
    from genserve.scheduler.snapshot import Snapshot
    from genserve.scheduler.targets import Commitments

    now, cluster, cost = 10.0, ClusterSpec(8), COST.fresh()
    devices = [DeviceView(d, True, now) for d in range(8)]
    short = RequestView("short", "video", WAN, 832, 480, 33, 50, 0, now,
                        now + 1.3 * iso_ms("video", 832, 480, 33, 50, 8) / 1e3)
    snap = Snapshot(now, [short], devices, cost, cluster)
    loose_deadline = now + snap.remaining_s(short, 8) + 1.5 * iso_ms("video", 832, 480, 81, 50, 1) / 1e3
    loose = [RequestView(f"loose{i}", "video", WAN, 832, 480, 81, 50, 0, now - 1.0, loose_deadline)
             for i in range(8)]
    snap = Snapshot(now, loose + [short], devices, cost, cluster)
    com = Commitments(admit_margin=0.0)
    com.ids = {v.req_id for v in loose}
    plans, _, dropped, _ = com.update(snap, loose + [short], 0.0)
    assert com.ids == {v.req_id for v in loose} | {"short"} and not dropped
    assert plans["short"].start_s == now and all(plans[v.req_id].start_s > now for v in loose)


def _one_device(now, deadlines):
    """Committed videos (not started) on one device, ``deadlines``: req_id ->
    deadline as a function of (L, s), the run times alone of an 81-frame
    ("long...") and a 33-frame ("short...") video."""
    from genserve.scheduler.snapshot import Snapshot

    cluster, devices = ClusterSpec(1, max_sp_degree=1), [DeviceView(0, True, now)]

    def video(rid, deadline_s):
        return RequestView(rid, "video", WAN, 832, 480, 81 if rid.startswith("long") else 33,
                           50, 0, now, deadline_s)

    probe = Snapshot(now, [], devices, COST.fresh(), cluster)
    L, s = (probe.remaining_s(video(rid, now), 1) for rid in ("long", "short"))
    videos = [video(rid, now + f(L, s)) for rid, f in deadlines.items()]
    return videos, Snapshot(now, videos, devices, COST.fresh(), cluster)


def test_an_overload_gives_up_the_longest_committed_video_not_the_shorter_ones():
    """Moore-Hodgson: one device, one long and two short committed videos;
    the long one first leaves both short ones late, the short ones first
    leave the long one late. Giving up the long one keeps two on time, and
    the next plan does not take it back."""
    from genserve.scheduler.targets import Commitments

    videos, snap = _one_device(10.0, {"long": lambda L, s: L + 1.0,
                                      "short0": lambda L, s: s + 0.5,
                                      "short1": lambda L, s: 2 * s + 0.5})
    com = Commitments(admit_margin=0.0)
    com.ids = {v.req_id for v in videos}
    plans, hopeless, dropped, _ = com.update(snap, videos, 0.0)
    assert com.ids == {"short0", "short1"} and dropped == {"long"} and not hopeless
    deadline = {v.req_id: v.deadline_s for v in videos}
    assert set(plans) == {"short0", "short1"}
    assert all(p.finish_s <= deadline[rid] for rid, p in plans.items())
    com.update(snap, videos, 0.0)
    assert com.ids == {"short0", "short1"}


def test_a_video_taken_on_behind_another_keeps_its_place_in_the_next_plan():
    """The short video's deadline is earlier, the long one's latest start is:
    least slack first places the long one first and makes the short one
    late, the other order fits both. A plan in that order (the one that took
    them on) is kept rather than give one up."""
    from genserve.scheduler.targets import Commitments

    deadlines = {"long": lambda L, s: L + 1.2 * s, "short": lambda L, s: 2.3 * s}
    videos, snap = _one_device(10.0, deadlines)
    com = Commitments(admit_margin=0.0)
    com.ids = {"long", "short"}
    com.update(snap, videos, 0.0)
    assert com.ids == {"short"}  # least slack first alone: the long one is given up
    com = Commitments(admit_margin=0.0)
    com.ids, com.order = {"long", "short"}, {"short": 0, "long": 1}
    plans, _, dropped, _ = com.update(snap, videos, 0.0)
    assert com.ids == {"long", "short"} and not dropped
    assert plans["short"].start_s == 10.0 and plans["long"].start_s == plans["short"].finish_s
    assert com.order == {"short": 0, "long": 1}


def test_on_one_device_an_image_that_cannot_wait_a_video_step_goes_first():
    """One device, idle: a committed video with time to spare has its last
    step to run (then its decode), and an image arrives with less laxity
    than twice a video step (plus its patience share). Nothing is in flight,
    so no device is about to free, yet left waiting the image would wait
    for that step and the decode, and miss. It runs first."""
    now, cluster, cost = 100.0, ClusterSpec(1), COST.fresh()
    video_step_s = COST.step_ms(WAN, 832, 480, 33, 1, 1) / 1e3
    decode_s = COST.decode_ms(WAN, 832, 480, 33, 1) / 1e3
    image_s = iso_ms("image", 512, 512, 1, 28, 1) / 1e3
    laxity_s = 3 * video_step_s
    assert laxity_s < video_step_s + decode_s  # behind the video it would miss
    video = RequestView("v", "video", WAN, 832, 480, 33, 50, 49, now - 20.0, now + 600.0,
                        device_ids=(0,))
    image = RequestView("i", "image", FLUX, 512, 512, 1, 28, 0, now, now + image_s + laxity_s)
    plan = make_policy("genserve", cluster).plan(now, [video, image], [DeviceView(0, True, now)], cost)
    assert [d.req_ids for d in plan.dispatches] == [("i",)]


def test_dispatch_overhead_is_paid_per_dispatch():
    """A profile's per-dispatch overhead lengthens every dispatch: a lone
    image run step by step (genserve) pays it once per step, run whole
    (fcfs) once."""
    from dataclasses import replace
    cluster = ClusterSpec(1)
    img = Request("i", 1.0, "image", FLUX, 512, 512, 1, 28, 1e6)
    slow = LatencyModel(replace(COST.profile, dispatch_ms=5.0))
    for name, dispatches in (("genserve", 28), ("fcfs", 1)):
        base = simulate(make_policy(name, cluster), [img], cluster, COST.fresh()).outcomes[0]
        over = simulate(make_policy(name, cluster), [img], cluster, slow.fresh()).outcomes[0]
        assert over.latency_s - base.latency_s == pytest.approx(dispatches * 5e-3, rel=1e-6)


def _state_with_infeasible():
    now = 10.0
    ok = RequestView("ok", "image", FLUX, 512, 512, 1, 28, 0, now, now + 10.0)
    bad = RequestView("bad", "video", WAN, 832, 480, 81, 50, 0, now, now + 2.0)  # < isolated
    devices = [DeviceView(d, True, now) for d in range(8)]
    return now, [ok, bad], devices


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_admission_control_rejects_infeasible(name):
    now, requests, devices = _state_with_infeasible()
    cluster = ClusterSpec(8)
    plan = make_policy(name, cluster, admission_control=True).plan(now, requests, devices,
                                                                   COST.fresh())
    assert [r.req_id for r in plan.rejected] == ["bad"]
    rej = plan.rejected[0]
    assert "after its deadline" in rej.reason and rej.estimated_finish_s > now + 2.0
    assert "ok" in {rid for d in plan.dispatches for rid in d.req_ids}
    served = make_policy(name, cluster).plan(now, requests, devices, COST.fresh())
    assert served.rejected == ()  # without admission control it is served, last


def test_admission_control_refuses_what_the_load_makes_late():
    cluster = ClusterSpec(4)
    isolated = iso_ms("video", 832, 480, 81, 50, 4)
    busy = [Request(f"v{i}", 0.0, "video", WAN, 832, 480, 81, 50, 1.2 * isolated) for i in range(3)]
    late = Request("late", 0.5, "video", WAN, 832, 480, 81, 50, 1.2 * isolated)
    for name in ("genserve", "edf", "fcfs"):
        res = run(name, busy + [late], cluster, admission_control=True)
        status = {o.req_id: o.status for o in res.outcomes}
        assert status["late"] == "rejected", name
        assert status["v0"] == "done"
    assert all(o.status == "done" for o in run("genserve", busy + [late], cluster).outcomes)


def test_calibration_learns_a_slower_machine():
    cluster = ClusterSpec(8)
    trace = generate(WorkloadSpec(rate_rps=0.3, num_requests=40, seed=3))
    workload = resolve(trace, COST, 3.0, 8)
    plan_cost = COST.fresh()
    true_cost = LatencyModel(scaled_profile(COST.profile, 1.3))
    simulate(make_policy("genserve", cluster), workload, cluster, plan_cost, true_cost,
             noise_cv=0.05, seed=1)
    errors = plan_cost.prediction_error()
    assert errors and abs(plan_cost.last_rel_error) < 0.15
    early = max(e.mean_abs_rel_error for e in errors)
    assert early > 0.05  # it started 30% off ...
    assert plan_cost.step_ms(FLUX, 768, 768, 1, 1, 1) == pytest.approx(
        1.3 * COST.step_ms(FLUX, 768, 768, 1, 1, 1), rel=0.1)  # ... and learned it
    # encodes and decodes slow down with the machine too, and are learned the same way
    assert plan_cost.encode_ms(FLUX) == pytest.approx(1.3 * COST.encode_ms(FLUX), rel=0.05)
    assert plan_cost.decode_ms(FLUX, 768, 768, 1, 1) == pytest.approx(
        1.3 * COST.decode_ms(FLUX, 768, 768, 1, 1), rel=0.1)


@pytest.mark.parametrize("cluster", [ClusterSpec(6), ClusterSpec(5, max_sp_degree=2),
                                     ClusterSpec(2, max_sp_degree=1, migratable=False,
                                                 max_image_batch=2)])
def test_every_policy_completes_on_odd_clusters(cluster):
    trace = generate(WorkloadSpec(rate_rps=0.2, num_requests=24, seed=5))
    workload = resolve(trace, COST, 4.0, min(cluster.num_devices, cluster.max_sp_degree))
    for name in POLICY_NAMES:
        res = run(name, workload, cluster)
        assert all(o.status == "done" for o in res.outcomes), name


def test_each_video_model_runs_within_its_own_sp_limit():
    """Two video models on 8 devices, one whose heads split over at most 4
    (Wan 1.3B's 12) and one over 8: each lone video runs as fast as its own
    limit lets it, under every policy; the capped one never above 4."""
    big = "wan-big"
    profile = COST.profile
    profile = type(profile)(profile.name, (*profile.models, replace(profile.model(WAN), name=big)),
                            profile.default_models, dispatch_ms=profile.dispatch_ms)
    cost = LatencyModel(profile)
    cluster = ClusterSpec(8, video_sp_limits=((WAN, 4),))
    workload = [Request(f"{m}-{i}", 100.0 * i + (50.0 if m == big else 0.0), "video", m, 832, 480, 81, 50,
                        1.05 * cost.isolated_latency_ms(m, 832, 480, 81, 50, "video", 4 if m == WAN else 8))
                for i in range(2) for m in (WAN, big)]
    for name in POLICY_NAMES:
        res = simulate(make_policy(name, cluster), workload, cluster, cost.fresh())
        assert res.invalid_plans == 0 and all(o.status == "done" for o in res.outcomes), name
        degrees = {o.req_id: o.max_sp_degree for o in res.outcomes}
        assert all(degrees[f"{WAN}-{i}"] <= 4 for i in range(2)), (name, degrees)
        if name.startswith(("genserve", "edf-step", "tetris")) and name != "genserve:no-elastic-sp":
            # elastic SP: each at its own limit, and on time (the SLO needs it)
            assert [degrees[f"{m}-{i}"] for i in range(2) for m in (WAN, big)] == [4, 8, 4, 8], (name, degrees)
            assert all(o.met_slo for o in res.outcomes), name
