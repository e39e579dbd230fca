"""``loadgen compare`` against an in-process fake server that can be calibrated.

The fake streams STEP events 5 ms apart (``elapsed_s``), so ``--profile auto``
measures a profile through it in milliseconds; it records the SLO of every
request it is sent.
"""
from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from genserve.loadgen.cli import main
from genserve.loadgen.runner import wire_slo_ms
from genserve.scheduler import LatencyModel, load_profile
from genserve.scheduler.profile import save_profile
from genserve.scheduler.workload import read_trace, resolve
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

from conftest import fake_genserve

EV = pb.GenerateEvent.Type


class Calibratable(pb_grpc.GenServeServicer):
    """One image model (2 steps by default); every request completes."""

    def __init__(self):
        self.slo_ms: dict[str, int] = {}  # request id -> slo_ms sent (calibration: no id)
        self.lock = threading.Lock()

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name="tiny-image", task=pb.TASK_TEXT_TO_IMAGE, is_default=True, default_steps=2,
            output_formats=[pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_RAW])])

    def GenerateStream(self, request, context):
        with self.lock:
            if request.request_id:
                self.slo_ms[request.request_id] = request.slo_ms
        rid, steps = request.request_id, request.num_inference_steps or 2
        yield pb.GenerateEvent(request_id=rid, type=EV.QUEUED, elapsed_s=0.0)
        yield pb.GenerateEvent(request_id=rid, type=EV.STARTED, elapsed_s=0.001, sp_degree=1)
        for i in range(steps):
            yield pb.GenerateEvent(request_id=rid, type=EV.STEP, step=i + 1, num_steps=steps,
                                   elapsed_s=0.010 + 0.005 * i)
        done_s = 0.010 + 0.005 * steps
        yield pb.GenerateEvent(request_id=rid, type=EV.COMPLETED, elapsed_s=done_s, response=pb.GenerateResponse(
            request_id=rid, model="tiny-image", latency_ms=done_s * 1e3, slo_ms=request.slo_ms or 99_999,
            slo_met=True, num_inference_steps=steps, sp_degrees=[1]))


@pytest.fixture
def calibratable():
    servicer = Calibratable()
    with fake_genserve(servicer) as target:
        yield servicer, target


FLAGS = ["--image-fraction", "1", "--num-requests", "3", "--rate", "50", "--image-shapes", "64x64,128x128",
         "--no-progress", "--no-plots"]


def test_slo_scale_with_a_measured_profile_reaches_the_live_runs(calibratable, tmp_path):
    """--slo-scale with --profile auto went to the simulator only: the live
    requests carried slo_ms=0 (a running server's own --default-slo-scale), so
    the table set live and simulated attainment under different SLOs. Now the
    live requests carry the SLOs the simulator computes from the measured profile."""
    servicer, target = calibratable
    save_profile(load_profile("reference-h100"), tmp_path / "profile.json")  # an earlier run's: replaced
    main(["compare", "--targets", f"genserve={target}", "--profile", "auto", "--slo-scale", "2.5",
          *FLAGS, "--out", str(tmp_path)])
    sent = read_trace(tmp_path / "live-genserve" / "workload.jsonl")
    cost = LatencyModel.load(str(tmp_path / "profile.json"))
    assert [m.name for m in cost.profile.models] == ["tiny-image"]
    unset = [replace(t, slo_ms=0.0) for t in sent]
    expected = [r.slo_ms for r in resolve(unset, cost, 2.5, 2)]  # the simulator's: 2 workers, SP up to 2
    assert [t.slo_ms for t in sent] == pytest.approx(expected, abs=1e-3)
    assert min(expected) > 1.0
    assert sorted(servicer.slo_ms.values()) == sorted(wire_slo_ms(ms) for ms in expected)
    assert read_trace(tmp_path / "workload.jsonl") == sent  # the simulator's requests


def test_slo_scale_without_a_profile_warns_that_targets_keep_their_own(calibratable, tmp_path, capsys):
    """Without a profile no SLO can be computed: the scale reaches the servers
    compare starts (--default-slo-scale), not the running targets. Say so."""
    servicer, target = calibratable
    main(["compare", "--targets", f"genserve={target}", "--slo-scale", "2.5", *FLAGS, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "loadgen: warning: --slo-scale 2.5 without --profile" in err and "'genserve'" in err
    assert set(servicer.slo_ms.values()) == {0}


def test_the_simulated_twin_keeps_each_video_model_within_the_servers_limit():
    """The live engine runs a video model within its own SP limit (ListModels'
    max_sp_degree); the simulator's twin of an 8-worker server does too, and
    takes that model's default SLO at the limit, as the engine does."""
    from genserve.loadgen.compare import CompareOptions, simulate_policy, video_sp_limits
    from genserve.scheduler.workload import TraceRequest

    models = [pb.ModelInfo(name="wan2.1-t2v-1.3b", task=pb.TASK_TEXT_TO_VIDEO, max_sp_degree=2),
              pb.ModelInfo(name="flux.1-dev", task=pb.TASK_TEXT_TO_IMAGE, max_sp_degree=1),
              pb.ModelInfo(name="older", task=pb.TASK_TEXT_TO_VIDEO)]  # an older server: 0, left out
    assert video_sp_limits(models) == (("wan2.1-t2v-1.3b", 2),)
    items = [TraceRequest(60.0 * i, "video", 832, 480, 81) for i in range(3)]
    free = CompareOptions(policies=("genserve",), num_workers=8, profile="reference-h100")
    capped = replace(free, sim_video_sp_limits=video_sp_limits(models))
    runs = {name: simulate_policy(items, "genserve", copts)["summary"]
            for name, copts in (("free", free), ("capped", capped))}
    assert runs["free"]["mean_video_max_sp_degree"] > 2
    assert runs["capped"]["mean_video_max_sp_degree"] == 2 and runs["capped"]["attainment"] == 1.0
