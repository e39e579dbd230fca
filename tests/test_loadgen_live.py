"""The load generator against the live 2-worker server (tiny presets).

Uses the session's shared ``server`` fixture (tests/conftest.py).
"""
from __future__ import annotations

import json

import pytest

from genserve.loadgen.cli import main
from genserve.loadgen.records import read_records
from genserve.loadgen.summary import summarize
from genserve.scheduler.workload import read_trace

pytestmark = pytest.mark.slow


def _line(t: float, task: str = "image", width: int = 64, frames: int = 1, steps: int = 2, model: str = "",
          slo_ms: float = 0) -> dict:
    return {"arrival_s": t, "task": task, "model": model, "width": width, "height": 64,
            "num_frames": frames, "num_inference_steps": steps, "slo_ms": slo_ms}


TRACE = [
    _line(0.0), _line(0.1, steps=4), _line(0.2, "video", frames=9), _line(0.35, width=32, steps=3),
    _line(0.4, width=70),  # not a multiple of 16: INVALID_ARGUMENT
    _line(0.5, "video", frames=10),  # not 4k+1 frames: INVALID_ARGUMENT
    _line(0.6, steps=99),  # over max_steps: INVALID_ARGUMENT
    _line(0.7, model="no-such-model"),  # INVALID_ARGUMENT
    _line(0.8, "video", frames=9, slo_ms=60_000), _line(0.9, slo_ms=1), _line(1.3, steps=3),
    _line(1.5, "video", frames=5), _line(1.6), _line(2.0, width=48, steps=2),
]
INVALID = {4, 5, 6, 7}


def test_trace_replay_records_every_request_once(server, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(x) + "\n" for x in TRACE))
    out = tmp_path / "run"
    main(["--target", server.target, "--trace", str(trace), "--out", str(out), "--no-progress",
          "--warmup-requests", "1", "--seed", "3"])
    records = read_records(out / "requests.jsonl")
    assert [r.index for r in records] == list(range(len(TRACE)))
    assert len({r.req_id for r in records}) == len(TRACE)
    for i, (rec, line) in enumerate(zip(records, TRACE)):
        assert abs(rec.send_s - line["arrival_s"]) < 0.1, (i, rec.send_s)
        assert (rec.task, rec.width, rec.height) == (line["task"], line["width"], line["height"])
        assert rec.status == ("INVALID_ARGUMENT" if i in INVALID else "OK"), (i, rec.status, rec.reason)
        if i not in INVALID:
            assert rec.num_steps == line["num_inference_steps"] and rec.num_frames == line["num_frames"]
            assert rec.latency_ms > 0 and rec.first_event_s >= rec.send_s and rec.finish_s >= rec.first_event_s
            assert rec.sp_degrees and rec.slo_ms > 0
    assert records[9].slo_ms == 1 and not records[9].slo_met  # 1 ms cannot be met
    assert records[8].slo_ms == 60_000 and records[8].slo_met
    assert [r.warmup for r in records] == [True] + [False] * (len(TRACE) - 1)

    doc = json.loads((out / "summary.json").read_text())
    assert doc["summary"] == summarize(records).to_dict()
    assert doc["summary"]["errors"] == {"INVALID_ARGUMENT": 4}
    assert doc["summary"]["num_requests"] == len(TRACE) - 1
    assert read_trace(out / "workload.jsonl") == read_trace(trace)
    main(["summarize", "--out", str(out)])  # recomputed from the JSON lines alone
    assert json.loads((out / "summary.json").read_text())["summary"] == doc["summary"]


def test_generated_closed_loop(server, tmp_path):
    main(["--target", server.target, "--concurrency", "2", "--num-requests", "8", "--steps-image", "2",
          "--steps-video", "2", "--image-fraction", "0.5", "--out", str(tmp_path), "--no-progress",
          "--no-plots", "--slo-ms-image", "30000", "--slo-ms-video", "30000"])
    records = read_records(tmp_path / "requests.jsonl")
    assert len(records) == 8 and {r.status for r in records} == {"OK"}
    assert {r.slo_ms for r in records} == {30000.0} and all(r.slo_met for r in records)
    assert {r.model for r in records} == {"sd3-tiny", "wan-tiny"}


def test_compare_against_a_running_server_with_measured_profile(server, tmp_path):
    main(["compare", "--targets", f"genserve={server.target}", "--profile", "auto", "--num-requests", "10",
          "--rate", "4", "--steps-image", "2", "--steps-video", "2", "--out", str(tmp_path), "--no-progress"])
    doc = json.loads((tmp_path / "compare.json").read_text())
    row = doc["rows"]["genserve"]
    assert 0 <= row["live all"] <= 1 and 0 <= row["sim all"] <= 1
    assert doc["options"]["sim_video_sp_limits"] == {"wan-tiny": 2}  # the server's, as ListModels tells
    assert (tmp_path / "compare.png").stat().st_size > 1000 and (tmp_path / "profile.json").exists()
    live = read_records(tmp_path / "live-genserve" / "requests.jsonl")
    assert len(live) == 10 and summarize(live).attainment == pytest.approx(row["live all"])
