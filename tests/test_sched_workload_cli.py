"""Workloads (generated and traces) and the ``simulate`` command."""
import argparse
import csv
import json
import pickle
import statistics

import pytest

from genserve.scheduler import LatencyModel
from genserve.scheduler.profile import Profile, StepSample, save_profile
from genserve.scheduler.cli import add_simulate_parser, main
from genserve.scheduler.workload import (TraceRequest, WorkloadSpec, generate, parse_shapes,
                                         read_trace, resolve, truncate, write_trace)

COST = LatencyModel.load("reference-h100")


def test_generation_is_seeded_and_matches_its_spec():
    spec = WorkloadSpec(rate_rps=2.0, num_requests=4000, seed=7, image_fraction=0.7)
    a, b = generate(spec), generate(spec)
    assert a == b and len(a) == 4000
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(a, a[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.05)
    assert sum(t.task == "image" for t in a) / len(a) == pytest.approx(0.7, abs=0.03)
    assert {(t.width, t.num_frames) for t in a if t.task == "video"} == {(832, 33), (832, 81)}
    bursty = generate(WorkloadSpec(rate_rps=2.0, num_requests=4000, seed=7, arrival="gamma",
                                   cv=3.0))
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(bursty, bursty[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.15)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(3.0, rel=0.2)
    short = generate(WorkloadSpec(rate_rps=1.0, num_requests=0, duration_s=30.0, seed=1))
    assert short and max(t.arrival_s for t in short) <= 30.0


def test_trace_round_trip_and_defaults(tmp_path):
    trace = [TraceRequest(0.5, "image", 512, 512),
             TraceRequest(1.0, "video", 832, 480, 33, "", 20, 60000.0, (("prompt", "a cat"),))]
    path = tmp_path / "trace.jsonl"
    write_trace(path, trace)
    assert read_trace(path) == tuple(trace)
    assert json.loads(path.read_text().splitlines()[1])["prompt"] == "a cat"
    img, vid = resolve(read_trace(path), COST, 2.0, 8)
    assert img.model == "flux.1-dev" and img.num_steps == 28
    assert img.slo_ms == pytest.approx(2.0 * COST.isolated_latency_ms(
        "flux.1-dev", 512, 512, 1, 28, "image", 8))
    assert vid.num_steps == 20 and vid.slo_ms == 60000.0 and vid.deadline_s == 61.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 0, "task": "audio", "width": 1, "height": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_trace(bad)
    assert parse_shapes("512x512:2,1024x1024", "image")[0].weight == 2.0
    with pytest.raises(ValueError):
        parse_shapes("832x480", "video")


def test_trace_numbers_are_whole_and_bounded_and_a_bom_is_allowed(tmp_path):
    """512.0 is a size, 64.9 and true are refused (int() truncated them);
    a trace saved with a UTF-8 byte-order mark reads like one without."""
    line = {"arrival_s": 0.5, "task": "image", "width": 512.0, "height": 512,
            "num_inference_steps": 10_000}
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(line).encode() + b"\n")
    assert read_trace(path) == (TraceRequest(0.5, "image", 512, 512, num_inference_steps=10_000),)
    for key, value, message in (("width", 64.9, "width must be a finite whole number, got 64.9"),
                                ("height", True, "height must be a number, got true"),
                                ("arrival_s", True, "arrival_s must be a number, got true"),
                                ("slo_ms", 10**400, "slo_ms must be a finite number"),
                                # the API's whole milliseconds sent 0.4 as 0: the default SLO
                                ("slo_ms", 0.4, "slo_ms must be 0 .the default SLO. or at least 1 "
                                                "ms .the API's unit., got 0.4"),
                                ("num_inference_steps", 10_001, "num_inference_steps must be at most 10000"),
                                # int()'s and a KeyError's own messages named neither field nor line
                                ("width", "a", "width must be a whole number, got 'a'"),
                                ("arrival_s", None, "arrival_s must be a number, got None"),
                                ("height", ..., "missing field 'height'")):
        bad = {k: v for k, v in {**line, key: value}.items() if v is not ...}
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"t.jsonl:1: trace line: {message}"):
            read_trace(path)
    path.write_bytes(b"\xff\n")
    with pytest.raises(ValueError, match="t.jsonl: not UTF-8 text"):
        read_trace(path)


def test_simulate_parser_mounts_under_a_main_cli():
    parser = argparse.ArgumentParser(prog="genserve")
    add_simulate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", "--devices", "4", "--policy", "fcfs,genserve"])
    assert args.devices == 4 and callable(args.func)


def test_simulate_json_prints_one_object(capsys):
    assert main(["simulate", "--devices", "4", "--num-requests", "20", "--rate", "0.3",
                 "--policy", "genserve,fcfs,static", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"policies"} and set(out["policies"]) == {"genserve", "fcfs", "static"}
    s = out["policies"]["genserve"]
    for key in ("attainment", "attainment_image", "attainment_video", "goodput_rps",
                "preemptions_per_video", "busy_fraction", "completed", "submitted"):
        assert key in s
    assert set(s["latency_ms"]) == {"image", "video"}
    assert set(s["latency_ms"]["image"]) == {"p50", "p95", "p99"}
    assert set(s["decision_ms"]) >= {"p50", "p99"}
    assert 0.0 <= s["attainment"] <= 1.0 and s["submitted"] == 20


def test_simulate_table_trace_and_sweep(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    assert main(["simulate", "--devices", "4", "--num-requests", "15", "--policy", "edf",
                 "--write-trace", str(trace)]) == 0
    assert "edf" in capsys.readouterr().out and len(read_trace(trace)) == 15
    assert main(["simulate", "--devices", "4", "--trace", str(trace), "--policy", "sjf"]) == 0
    assert "sjf" in capsys.readouterr().out
    assert main(["simulate", "--devices", "4", "--num-requests", "15", "--policy",
                 "genserve,fcfs", "--sweep-slo-scales", "1.5,3", "--out", str(tmp_path),
                 "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    rows = list(csv.DictReader(open(out["sweep"]["csv"])))
    assert [r["policy"] for r in rows] == ["genserve", "fcfs"] * 2
    progress = captured.err.splitlines()  # one line per finished simulation, in finishing order
    assert [line.split("] ")[0] for line in progress] == [f"genserve simulate: [{n}/4" for n in (1, 2, 3, 4)]
    assert sorted(line.split("] ")[1].split(" done")[0] for line in progress) == [
        "fcfs at slo scale 1.5", "fcfs at slo scale 3", "genserve at slo scale 1.5",
        "genserve at slo scale 3"]
    assert out["sweep"]["png"] and (tmp_path / "sweep_slo_scale.png").stat().st_size > 1000
    assert main(["simulate", "--policy", "nope"]) == 2


def test_simulate_progress_lines_and_quiet(capsys):
    flags = ["simulate", "--devices", "4", "--num-requests", "10", "--policy", "fcfs,sjf", "--jobs", "2"]
    assert main(flags) == 0
    err = capsys.readouterr().err
    assert err.count("genserve simulate: [") == 2 and "[2/2]" in err
    assert "fcfs done in" in err and "sjf done in" in err
    assert main(flags + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_a_long_simulation_reports_progress_while_it_runs(capsys):
    from genserve.scheduler import ClusterSpec, load_profile, make_policy
    from genserve.scheduler.cli import heartbeat
    from genserve.scheduler.runner import Experiment, resolve_workload
    from genserve.scheduler.simulator import Simulator

    exp = Experiment(ClusterSpec(4), load_profile("reference-h100"))
    requests = resolve_workload(exp, generate(WorkloadSpec(rate_rps=0.3, num_requests=60)), 2.0)
    cost = LatencyModel(exp.profile)
    beats = []
    result = Simulator(make_policy("genserve", exp.cluster), requests, exp.cluster, cost,
                       on_progress=lambda *b: beats.append(b), progress_every_s=0.0).run()
    assert beats, "no progress while it ran"
    ended = [b[0] for b in beats]
    assert ended == sorted(ended) and ended[-1] < len(result.outcomes) == 60  # mid-run, not after
    assert all(b[1] == 60 and b[2] >= 0 for b in beats)
    # the CLI's reporter is what --jobs workers call: it must pickle, and says where the run is
    assert pickle.loads(pickle.dumps(heartbeat)) is heartbeat
    heartbeat("genserve at rate 0.3", 1234, 20000, 12.4)
    assert capsys.readouterr().err == (
        "genserve simulate: genserve at rate 0.3: 1,234 of 20,000 requests ended after 12 s\n")


def test_simulate_refuses_an_empty_trace(tmp_path, capsys):
    trace = tmp_path / "empty.jsonl"
    trace.write_text("")
    assert main(["simulate", "--trace", str(trace), "--policy", "fcfs"]) == 2
    assert capsys.readouterr().err == f"genserve simulate: --trace {trace}: no requests in it\n"
    trace.write_text('{"arrival_s": 2, "task": "image", "width": 512, "height": 512}\n')
    assert main(["simulate", "--trace", str(trace), "--policy", "fcfs", "--duration-s", "1"]) == 2
    assert capsys.readouterr().err == (
        f"genserve simulate: --trace {trace}: no requests in it within --duration-s 1\n")


@pytest.mark.parametrize("line, message", [
    ('"model": "nope"', "profile 'reference-h100' has no model 'nope' (known: flux.1-dev, wan2.1-t2v-1.3b)"),
    ('"model": "wan2.1-t2v-1.3b"', "model 'wan2.1-t2v-1.3b' serves 'video', not 'image'"),
])
@pytest.mark.parametrize("sweep", [[], ["--sweep-slo-scales", "1,2"]])
def test_simulate_refuses_a_trace_the_profile_cannot_serve(line, message, sweep, tmp_path, capsys):
    """Resolving the trace against the profile raised a ProfileError traceback."""
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "task": "image", "width": 512, "height": 512, %s}\n' % line)
    assert main(["simulate", "--trace", str(trace), "--policy", "fcfs", "--quiet",
                 "--out", str(tmp_path / "out"), *sweep]) == 2
    assert capsys.readouterr().err == f"genserve simulate: {message}\n"
    assert not (tmp_path / "out").exists()


def test_simulate_refuses_a_workload_needing_a_task_the_profile_lacks(tmp_path, capsys):
    """A profile with no video model loads; a workload with videos is one line."""
    data = COST.profile.to_dict()
    del data["models"]["wan2.1-t2v-1.3b"], data["default_models"]["video"]
    profile = tmp_path / "images-only.json"
    profile.write_text(json.dumps(data))
    flags = ["simulate", "--profile", str(profile), "--policy", "fcfs", "--quiet", "--num-requests", "20"]
    assert main(flags) == 2
    assert capsys.readouterr().err == (
        f"genserve simulate: profile {data['name']!r} has no model for task 'video'\n")
    assert main([*flags, "--mix", "1", "--json"]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--devices", "0"], "num_devices must be at least 1"),
    (["--max-sp-degree", "3"], "max_sp_degree must be a power of two"),
    (["--max-image-sp-degree", "0"], "max_image_sp_degree must be at least 1"),
    (["--fixed-sp-degree", "3"], "fixed_sp_degree must be a power of two"),
    (["--static-image-fraction", "1.5"], "static_image_fraction must be in [0, 1]"),
    (["--max-preemptions", "-1"], "max_preemptions must not be negative"),
    (["--rate", "0"], "--rate 0.0 is out of range"),
    (["--arrival", "gamma", "--cv", "0"], "--cv 0.0 is out of range"),
    (["--mix", "1.5"], "--mix 1.5 is out of range"),
    (["--num-requests", "0"], "give --num-requests or --duration-s"),
    (["--slo-scale", "0"], "--slo-scale 0.0 is out of range"),
    (["--slo-scale", "nan"], "--slo-scale nan is out of range"),
    (["--duration-s", "-5"], "--duration-s -5.0 is out of range"),
    (["--jobs", "0"], "--jobs 0 is out of range"),
    (["--image-shapes", "0x512"], "bad shape '0x512': sizes and weight must be positive"),
    (["--image-shapes", "5xa"], "bad shape '5xa'"),
    (["--video-shapes", "832x480"], "bad shape '832x480': WIDTHxHEIGHTxFRAMES"),
    (["--sweep-rates", "0.1,abc"], "--sweep-rates takes comma-separated numbers"),
    (["--sweep-slo-scales", "0,1"], "--sweep-slo-scales takes positive numbers"),
    (["--sweep-rates", "0.2", "--sweep-slo-scales", "2"], "not both"),
    (["--duration-s", "0.01", "--rate", "0.1"], "the workload is empty"),
    (["--video-sp-limit", "4"], "--video-sp-limit '4': give MODEL=K"),
    (["--video-sp-limit", "flux.1-dev=2"], "has no video model 'flux.1-dev'"),
    (["--video-sp-limit", "wan2.1-t2v-1.3b=3"], "SP limit of 'wan2.1-t2v-1.3b' must be a power of two"),
    (["--video-sp-limit", "wan2.1-t2v-1.3b=2", "--video-sp-limit", "wan2.1-t2v-1.3b=4"],
     "gives 'wan2.1-t2v-1.3b' two limits (2 and 4)"),
])
def test_simulate_refuses_bad_input_with_one_line(flags, message, capsys):
    assert main(["simulate", "--num-requests", "5", "--policy", "fcfs,genserve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genserve simulate: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_simulate_warns_when_the_workload_lies_far_outside_the_profile(tmp_path, capsys):
    """A profile measured on tiny models, with the default 512-1024 px shapes:
    the figures rest on an extrapolated curve, and stderr says so (stdout,
    the JSON, stays one object). Inside the measured range: no warning."""
    prof = Profile.from_measurements("tiny", [StepSample("m", "image", w, w, 1, 1, 1, ms)
                                              for w, ms in ((64, 5.0), (128, 12.0))])
    path = tmp_path / "tiny.json"
    save_profile(prof, path)
    flags = ["simulate", "--devices", "2", "--profile", str(path), "--num-requests", "10",
             "--policy", "fcfs", "--mix", "1", "--quiet", "--json"]
    assert main(flags) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["policies"]["fcfs"]["submitted"] == 10
    assert captured.err == ("genserve simulate: warning: profile 'tiny' measured m at 4,096..16,384 "
                            "pixels x frames; the workload asks 262,144..1,048,576, so its times are "
                            "extrapolated (--image-shapes / --video-shapes set the workload's)\n")
    assert main(flags + ["--image-shapes", "64x64,96x96,256x256"]) == 0
    assert capsys.readouterr().err == ""


UNSORTED = ('{"arrival_s": 3.0, "task": "image", "width": 512, "height": 512}\n'
            '{"arrival_s": 2.0, "task": "image", "width": 768, "height": 768}\n'
            '{"arrival_s": 0.2, "task": "video", "width": 832, "height": 480, "num_frames": 33}\n'
            '{"arrival_s": 0.1, "task": "image", "width": 1024, "height": 1024}\n')


@pytest.mark.parametrize("limits, arrivals", [
    ((2, 0.0), (0.1, 0.2)), ((0, 1.0), (0.1, 0.2)), ((9, 2.5), (0.1, 0.2, 2.0)),
    ((0, 0.0), (0.1, 0.2, 2.0, 3.0)), ((1, 0.15), (0.1,))])
def test_truncate_keeps_the_first_arrivals_not_the_first_lines(limits, arrivals, tmp_path):
    """The one meaning of --num-requests / --duration-s on a trace, shared by
    simulate and loadgen: sorted by arrival, then cut."""
    path = tmp_path / "unsorted.jsonl"
    path.write_text(UNSORTED)
    assert tuple(t.arrival_s for t in truncate(read_trace(path), *limits)) == arrivals


@pytest.mark.parametrize("flags, submitted", [
    (["--num-requests", "2"], 2), (["--duration-s", "1"], 2), (["--duration-s", "2.5"], 3), ([], 4)])
def test_simulate_cuts_a_trace_by_its_limits(flags, submitted, tmp_path, capsys):
    """simulate ignored --num-requests and --duration-s with --trace (and its
    generated workload's default of 300 must not cut a trace)."""
    path = tmp_path / "unsorted.jsonl"
    path.write_text(UNSORTED)
    assert main(["simulate", "--devices", "4", "--trace", str(path), "--policy", "fcfs", "--quiet",
                 "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["policies"]["fcfs"]["submitted"] == submitted
    long = tmp_path / "long.jsonl"
    write_trace(long, [TraceRequest(i / 10, "image", 512, 512) for i in range(301)])
    assert main(["simulate", "--devices", "4", "--trace", str(long), "--policy", "fcfs", "--quiet",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["policies"]["fcfs"]["submitted"] == 301


def test_simulate_keeps_each_video_model_within_its_sp_limit(capsys):
    """--video-sp-limit caps that model's videos (every policy, no invalid
    plan) and takes their default SLO at the limit."""
    flags = ["simulate", "--num-requests", "40", "--rate", "0.3", "--mix", "0", "--policy",
             "genserve,fcfs,fixed-sp,tetris", "--quiet", "--json"]
    assert main(flags) == 0
    free = json.loads(capsys.readouterr().out)["policies"]
    assert main([*flags, "--video-sp-limit", "wan2.1-t2v-1.3b=2"]) == 0
    capped = json.loads(capsys.readouterr().out)["policies"]
    assert free["genserve"]["mean_video_max_sp_degree"] > 2
    for name, res in capped.items():
        assert res["completed"] == 40 and 1 <= res["mean_video_max_sp_degree"] <= 2, name
