"""``summarize`` is a pure function of the records, and its figures are right."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genserve.loadgen.plots import attainment_series, compare_bars, run_plots
from genserve.loadgen.records import RequestRecord, read_records, write_records
from genserve.loadgen.scrape import MetricSample
from genserve.loadgen.summary import format_table, summarize


def rec(index: int, task: str = "image", status: str = "OK", met: bool = True, send_s: float = 0.0,
        finish_s: float = 1.0, latency_ms: float = 100.0, warmup: bool = False,
        intended_s: float = -1.0, queue_ms: float = 5.0) -> RequestRecord:
    return RequestRecord(
        req_id=f"r{index}", index=index, task=task, model="m", width=64, height=64,
        num_frames=9 if task == "video" else 1, num_steps=2, intended_s=intended_s, send_s=send_s,
        first_event_s=send_s + 0.01 if status != "INVALID_ARGUMENT" else -1.0, finish_s=finish_s,
        status=status, slo_ms=500.0, slo_met=met and status == "OK", num_preemptions=1 if task == "video" else 0,
        sp_degrees=(1,), queue_ms=queue_ms, latency_ms=latency_ms, warmup=warmup)


def test_figures_of_a_small_run():
    records = [
        rec(0, warmup=True, met=False),  # excluded everywhere
        rec(1, send_s=1.0, finish_s=2.0, latency_ms=100.0),
        rec(2, send_s=2.0, finish_s=3.0, latency_ms=300.0, met=False),
        rec(3, "video", send_s=3.0, finish_s=9.0, latency_ms=6000.0),
        rec(4, "video", "RESOURCE_EXHAUSTED", send_s=4.0, finish_s=4.1, latency_ms=0.0),
        rec(5, "image", "INVALID_ARGUMENT", send_s=5.0, finish_s=5.0, latency_ms=0.0),
    ]
    s = summarize(records)
    assert (s.num_requests, s.num_warmup, s.window_s) == (5, 1, 8.0)
    assert s.attainment == pytest.approx(2 / 5) and s.goodput_per_s == pytest.approx(2 / 8)
    assert s.throughput_per_s == pytest.approx(3 / 8)
    assert s.errors == {"INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 1}
    assert s.statuses == {"INVALID_ARGUMENT": 1, "OK": 3, "RESOURCE_EXHAUSTED": 1}
    img, vid = s.classes["image"], s.classes["video"]
    assert (img.num_requests, img.num_ok, img.num_met, img.attainment) == (3, 2, 1, pytest.approx(1 / 3))
    assert img.latency_ms.p50 == pytest.approx(200.0) and img.latency_ms.count == 2
    assert img.latency_ms.p99 == pytest.approx(298.0)
    assert vid.attainment == 0.5 and vid.latency_ms.p50 == 6000.0 and vid.preemptions_per_request == 1.0
    assert s.achieved_rate_per_s == pytest.approx(4 / 4) and s.intended_rate_per_s is None
    assert not s.rate_warning
    table = format_table(s)
    assert "image" in table and "RESOURCE_EXHAUSTED=1" in table


def test_rate_warning_when_sends_lag():
    records = [rec(i, send_s=1.2 * i, intended_s=float(i), finish_s=1.2 * i + 0.5) for i in range(11)]
    s = summarize(records)
    assert s.intended_rate_per_s == pytest.approx(1.0) and s.achieved_rate_per_s == pytest.approx(1 / 1.2)
    assert s.rate_warning and s.send_lag_ms.p50 == pytest.approx(1000.0)
    assert "WARNING" in format_table(s)


def test_empty_and_all_warmup_runs():
    assert summarize([]).attainment is None
    s = summarize([rec(0, warmup=True)])
    assert s.num_requests == 0 and s.num_warmup == 1 and s.classes["all"].latency_ms.p50 is None
    format_table(s)


statuses = st.sampled_from(["OK", "OK", "OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "CANCELLED"])


@st.composite
def records_strategy(draw):
    n = draw(st.integers(0, 25))
    out = []
    for i in range(n):
        send = draw(st.floats(0, 100, allow_nan=False))
        out.append(rec(i, draw(st.sampled_from(["image", "video"])), draw(statuses), draw(st.booleans()),
                       send_s=send, finish_s=send + draw(st.floats(0, 50, allow_nan=False)),
                       latency_ms=draw(st.floats(0, 1e5, allow_nan=False)), warmup=draw(st.booleans()),
                       intended_s=draw(st.sampled_from([-1.0, send])),
                       queue_ms=draw(st.floats(0, 1e4, allow_nan=False))))
    return out


@settings(max_examples=60, deadline=None)
@given(records_strategy())
def test_summary_recomputes_from_json_lines(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("rec") / "requests.jsonl"
    write_records(path, records)
    back = read_records(path)
    assert back == sorted(records, key=lambda r: r.index)
    first = summarize(records).to_dict()
    assert json.loads(json.dumps(first)) == summarize(back).to_dict()
    assert first["num_requests"] + first["num_warmup"] == len(records)
    assert sum(first["statuses"].values()) == first["num_requests"]


def test_plots_are_written(tmp_path):
    records = [rec(i, "video" if i % 3 == 0 else "image", met=i % 2 == 0, send_s=float(i),
                   finish_s=i + 1.0, latency_ms=100.0 * i) for i in range(30)]
    samples = [MetricSample(float(t), "genserve_queue_depth", task, float(t % 3))
               for t in range(10) for task in ("image", "video")]
    paths = run_plots(records, samples, tmp_path)
    assert [p.name for p in paths] == ["latency_cdf.png", "attainment_over_time.png", "queue_depth.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    xs, ys = attainment_series(records, "all", num_bins=3)
    assert len(xs) == 3 and ys == pytest.approx([0.5, 0.5, 0.5], abs=0.11)
    compare_bars({"genserve": {"live all": 0.9, "sim all": 0.8}, "fcfs": {"live all": 0.5, "sim all": None}},
                 tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_first_event_ms_is_of_ok_requests_only():
    """Refused requests that streamed an event (QUEUED, then FAILED) were
    counted: first_event_ms.count was num_ok + refusals, beside figures of OK
    requests only."""
    records = [rec(0, send_s=0.0), rec(1, "image", "ALREADY_EXISTS", send_s=1.0, finish_s=1.01),
               rec(2, "image", "RESOURCE_EXHAUSTED", send_s=2.0, finish_s=2.5)]
    assert records[1].first_event_s >= 0 and records[2].first_event_s >= 0
    image = summarize(records).classes["image"]
    assert image.num_ok == 1 and image.first_event_ms.count == 1
    assert image.first_event_ms.p50 == pytest.approx(10.0)
