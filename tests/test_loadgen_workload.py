"""The load generator's workloads: the shared arrival processes have the intended
rate and dispersion, and loadgen fills steps, SLOs and traces as documented."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from genserve.loadgen.cli import build_parser, workload_options
from genserve.loadgen.plan import WorkloadOptions, build_workload
from genserve.scheduler.workload import read_trace, write_trace

N = 20_000


def _gaps(trace) -> list[float]:
    times = [0.0] + [t.arrival_s for t in trace]
    return [b - a for a, b in zip(times, times[1:])]


def _rate_and_cv(trace) -> tuple[float, float]:
    gaps = _gaps(trace)
    mean = statistics.fmean(gaps)
    return 1.0 / mean, statistics.pstdev(gaps) / mean


@pytest.mark.parametrize("arrival,rate,cv", [("poisson", 4.0, 1.0), ("gamma", 2.0, 2.0),
                                            ("gamma", 0.5, 4.0), ("constant", 3.0, 0.0)])
def test_arrivals_have_intended_rate_and_dispersion(arrival, rate, cv):
    trace = build_workload(WorkloadOptions(arrival=arrival, rate_rps=rate, cv=cv, num_requests=N, seed=11))
    got_rate, got_cv = _rate_and_cv(trace)
    # mean of N gaps: relative standard error cv / sqrt(N) (<= 2.8% at cv 4); allow ~3 sigma
    assert got_rate == pytest.approx(rate, rel=max(3 * cv / math.sqrt(N), 1e-9))
    assert got_cv == pytest.approx(cv, abs=0.1 * max(cv, 1.0))
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(trace, trace[1:]))


def test_poisson_counts_per_window_are_poisson():
    trace = build_workload(WorkloadOptions(rate_rps=5.0, duration_s=4000.0, seed=3))
    counts = [0] * 4000
    for t in trace:
        counts[min(int(t.arrival_s), 3999)] += 1
    mean, var = statistics.fmean(counts), statistics.pvariance(counts)
    assert mean == pytest.approx(5.0, rel=0.03)
    assert var / mean == pytest.approx(1.0, abs=0.1)  # index of dispersion 1
    assert max(t.arrival_s for t in trace) <= 4000.0


def test_class_and_shape_mix_and_seed():
    opts = WorkloadOptions(image_fraction=0.9, image_shapes="64x64:3,128x128:1",
                           video_shapes="64x64x9", num_requests=N, seed=5)
    trace = build_workload(opts)
    images = [t for t in trace if t.task == "image"]
    assert len(images) / N == pytest.approx(0.9, abs=0.01)
    assert sum(t.width == 64 for t in images) / len(images) == pytest.approx(0.75, abs=0.02)
    assert {(t.width, t.height, t.num_frames) for t in trace if t.task == "video"} == {(64, 64, 9)}
    assert build_workload(opts) == trace
    assert build_workload(WorkloadOptions(num_requests=N, seed=6)) != build_workload(WorkloadOptions(
        num_requests=N, seed=5))


def test_steps_and_fixed_slos_fill_only_unset_fields(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"arrival_s": 0.5, "task": "image", "width": 64, "height": 64,
                                "num_inference_steps": 7, "slo_ms": 900}) + "\n"
                    + json.dumps({"arrival_s": 0.1, "task": "video", "width": 64, "height": 64,
                                  "num_frames": 9}) + "\n")
    trace = build_workload(WorkloadOptions(trace=str(path), steps_image=2, steps_video=3,
                                           slo_ms_image=100, slo_ms_video=5000))
    assert [(t.task, t.num_inference_steps, t.slo_ms) for t in trace] == [("video", 3, 5000), ("image", 7, 900)]


def test_slo_scale_uses_the_profile_isolated_latency():
    opts = WorkloadOptions(num_requests=50, image_shapes="1024x1024", video_shapes="832x480x81",
                           slo_scale=2.0, profile="reference-h100", max_devices=8, slo_ms_video=1234)
    trace = build_workload(opts)
    image_slos = {t.slo_ms for t in trace if t.task == "image"}
    assert len(image_slos) == 1 and image_slos.pop() > 1000  # ~2 x a 28-step FLUX image on H100s
    assert {t.slo_ms for t in trace if t.task == "video"} == {1234}  # fixed SLOs win
    with pytest.raises(ValueError, match="profile"):
        build_workload(WorkloadOptions(num_requests=5, slo_scale=2.0))


def test_trace_round_trip_and_truncation(tmp_path):
    trace = build_workload(WorkloadOptions(num_requests=30, seed=2, steps_image=2))
    write_trace(tmp_path / "w.jsonl", trace)
    assert read_trace(tmp_path / "w.jsonl") == trace
    again = build_workload(WorkloadOptions(trace=str(tmp_path / "w.jsonl"), num_requests=10))
    assert again == trace[:10]


def test_cli_defaults_bound_the_workload():
    args = build_parser().parse_args(["compare", "--concurrency", "2", "--duration-s", "5"])
    opts = workload_options(args)
    assert args.mode == "compare" and opts.duration_s == 0 and opts.num_requests > 1000


def test_mounts_as_a_subcommand():
    import argparse

    from genserve.loadgen.cli import add_loadgen_parser, cmd_loadgen

    parser = argparse.ArgumentParser(prog="genserve")
    add_loadgen_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["loadgen", "compare", "--policies", "genserve,fcfs", "--rate", "3"])
    assert (args.command, args.mode, args.policies, args.rate) == ("loadgen", "compare", "genserve,fcfs", 3.0)
    assert args.func is cmd_loadgen
    args = parser.parse_args(["loadgen", "--target", "h:1", "--trace", "t.jsonl", "--out", "o"])
    assert (args.mode, args.target, args.trace, args.out) == ("run", "h:1", "t.jsonl", "o")


def test_trace_limits_cut_by_arrival_time_not_file_order(tmp_path):
    """--num-requests cut the file's first lines before sorting (the 3.0 and
    2.0 s arrivals of this trace): the same cut as simulate's now."""
    path = tmp_path / "unsorted.jsonl"
    path.write_text("".join(json.dumps({"arrival_s": t, "task": "image", "width": 64, "height": 64}) + "\n"
                            for t in (3.0, 2.0, 0.2, 0.1)))
    for limits, arrivals in (({"num_requests": 2}, [0.1, 0.2]), ({"duration_s": 1.0}, [0.1, 0.2]),
                             ({"num_requests": 3, "duration_s": 2.5}, [0.1, 0.2, 2.0])):
        trace = build_workload(WorkloadOptions(trace=str(path), **limits))
        assert [t.arrival_s for t in trace] == arrivals
    args = build_parser().parse_args(["--trace", str(path), "--num-requests", "2"])
    assert [t.arrival_s for t in build_workload(workload_options(args))] == [0.1, 0.2]


def test_model_flags_fill_a_traces_unset_models(tmp_path):
    """--image-model / --video-model were ignored with --trace (model "" went
    out: the server's default), though steps and SLOs were filled."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in (
        {"arrival_s": 0, "task": "image", "width": 64, "height": 64},
        {"arrival_s": 1, "task": "image", "width": 64, "height": 64, "model": "kept"},
        {"arrival_s": 2, "task": "video", "width": 64, "height": 64, "num_frames": 9})))
    trace = build_workload(WorkloadOptions(trace=str(path), image_model="img", video_model="vid"))
    assert [t.model for t in trace] == ["img", "kept", "vid"]
    assert [t.model for t in build_workload(WorkloadOptions(trace=str(path)))] == ["", "kept", ""]


def test_a_fixed_slo_under_a_millisecond_is_refused():
    with pytest.raises(ValueError, match="at least 1 ms"):
        build_workload(WorkloadOptions(num_requests=2, slo_ms_image=0.4))
