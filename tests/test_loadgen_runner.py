"""The load generator's send loop against a scripted in-process gRPC server.

The fake server answers by request fields, so every outcome the loop must
record is reachable in milliseconds: width 70 → INVALID_ARGUMENT at submit,
slo_ms 1 → a FAILED event with RESOURCE_EXHAUSTED, slo_ms 2 → a stream that
never ends (drain timeout), anything else → QUEUED, STARTED, STEP×n, COMPLETED.
"""
from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from genserve.loadgen.plan import WorkloadOptions, build_workload
from genserve.loadgen.records import read_records
from genserve.loadgen.run import resummarize, run_load, write_run
from genserve.loadgen.runner import RunOptions
from genserve.loadgen.scrape import Scraper, parse_gauges
from genserve.loadgen.summary import summarize
from genserve.scheduler.workload import TraceRequest
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

from conftest import fake_genserve

EV = pb.GenerateEvent.Type
STEP_S = 0.002


class FakeGenServe(pb_grpc.GenServeServicer):
    def __init__(self):
        self.received: list[tuple[float, pb.GenerateRequest]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()

    def GenerateStream(self, request, context):
        with self.lock:
            self.received.append((time.monotonic(), request))
        if request.width == 70:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "width: 70 is not a multiple of 16")
        if request.width == 80:  # a per-client limit's refusal, with its hint
            context.set_trailing_metadata((("retry-after-ms", "300"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams")
        yield pb.GenerateEvent(request_id=request.request_id, type=EV.QUEUED)
        if request.slo_ms == 1:
            yield pb.GenerateEvent(request_id=request.request_id, type=EV.FAILED,
                                   status_code="RESOURCE_EXHAUSTED", reason="cannot meet SLO")
            return
        if request.slo_ms == 2:
            self.release.wait(30)
            return
        yield pb.GenerateEvent(request_id=request.request_id, type=EV.STARTED, sp_degree=1)
        steps = request.num_inference_steps or 2
        for i in range(steps):
            time.sleep(STEP_S)
            yield pb.GenerateEvent(request_id=request.request_id, type=EV.STEP, step=i + 1, num_steps=steps)
        yield pb.GenerateEvent(request_id=request.request_id, type=EV.COMPLETED, response=pb.GenerateResponse(
            request_id=request.request_id, model="fake-" + ("video" if request.num_frames else "image"),
            queue_ms=1.0, latency_ms=10.0 * steps, slo_ms=request.slo_ms or 1000,
            slo_met=request.slo_ms != 3, num_preemptions=0, sp_degrees=[1], num_inference_steps=steps))


@pytest.fixture(scope="module")
def fake():
    servicer = FakeGenServe()
    with fake_genserve(servicer, max_workers=64) as target:
        yield servicer, target
        servicer.release.set()


def _item(t: float, task: str = "image", width: int = 64, slo_ms: float = 0, steps: int = 2) -> TraceRequest:
    return TraceRequest(arrival_s=t, task=task, width=width, height=64, num_frames=9 if task == "video" else 1,
                        num_inference_steps=steps, slo_ms=slo_ms)


def _opts(target: str, **kw) -> RunOptions:
    return RunOptions(target=target, progress=False, **kw)


def test_a_positive_slo_is_never_sent_as_the_default():
    """slo_ms is whole milliseconds on the wire: 0.4 was sent as 0, the
    server's default SLO, and reported met; the API's smallest SLO is 1 ms."""
    from genserve.loadgen.runner import to_proto

    opts = _opts("unused", id_prefix="p")
    assert [to_proto(_item(0, slo_ms=ms), 0, opts).slo_ms for ms in (0, 0.4, 1.4, 2.6)] == [0, 1, 1, 3]


def test_every_request_recorded_once_whatever_its_outcome(fake, tmp_path):
    servicer, target = fake
    items = [_item(0.01 * i) for i in range(6)] + [
        _item(0.07, width=70), _item(0.08, slo_ms=1), _item(0.09, slo_ms=3), _item(0.10, "video"),
        _item(0.11, slo_ms=2)]
    result = run_load(items, _opts(target, drain_timeout_s=1.0, id_prefix="once"))
    recs = result.records
    assert [r.index for r in recs] == list(range(len(items)))
    assert len({r.req_id for r in recs}) == len(items)
    by_status = {r.index: r.status for r in recs}
    assert by_status[6] == "INVALID_ARGUMENT" and by_status[7] == "RESOURCE_EXHAUSTED"
    assert by_status[10] == "CANCELLED" and "drain" in recs[10].reason
    assert [by_status[i] for i in (0, 1, 2, 3, 4, 5, 8, 9)] == ["OK"] * 8
    assert not recs[8].slo_met and recs[9].slo_met and recs[9].task == "video"
    assert recs[6].first_event_s < 0 and recs[7].first_event_s >= recs[7].send_s
    assert recs[0].model == "fake-image" and recs[0].sp_degrees == (1,)
    sent = [r.request_id for _, r in servicer.received if r.request_id.startswith("once-")]
    assert sorted(sent) == sorted(r.req_id for r in recs)

    write_run(tmp_path, result, quiet=True)
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["summary"] == summarize(read_records(tmp_path / "requests.jsonl")).to_dict()
    assert resummarize(tmp_path).to_dict() == doc["summary"]
    assert doc["summary"]["errors"] == {"CANCELLED": 1, "INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 1}
    assert doc["summary"]["classes"]["all"]["num_met"] == 7
    assert {p.name for p in tmp_path.glob("*.png")} == {"latency_cdf.png", "attainment_over_time.png"}


def test_each_run_sends_its_own_request_ids(fake):
    """Ids were lg-000000, lg-000001, ... in every run: a second load generator
    on the same server had its calls attached to the first's requests (same
    seed: half the work, identical latencies) or refused ALREADY_EXISTS."""
    servicer, target = fake
    items = [_item(0.0), _item(0.01)]
    runs = [run_load(items, RunOptions(target=target, progress=False)) for _ in range(2)]
    ids = [[r.req_id for r in run.records] for run in runs]
    assert not set(ids[0]) & set(ids[1])
    for run, run_ids in zip(runs, ids):
        prefix = run.settings["run"]["id_prefix"]  # recorded in summary.json's settings
        assert prefix.startswith("lg-") and run_ids == [f"{prefix}-000000", f"{prefix}-000001"]
        with servicer.lock:
            assert {r.request_id for _, r in servicer.received} >= set(run_ids)
    mine = run_load(items, RunOptions(target=target, progress=False, id_prefix="mine"))
    assert [r.req_id for r in mine.records] == ["mine-000000", "mine-000001"]


def test_open_loop_replays_arrival_times_and_fields(fake, tmp_path):
    servicer, target = fake
    trace = tmp_path / "trace.jsonl"
    lines = [{"arrival_s": 0.05 * i + (0.2 if i > 10 else 0.0), "task": "video" if i % 3 == 0 else "image",
              "model": "", "width": 64 if i % 2 else 32, "height": 48, "num_frames": 9,
              "num_inference_steps": 2 + i % 3, "slo_ms": 0} for i in range(20)]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    items = build_workload(WorkloadOptions(trace=str(trace)))
    result = run_load(items, _opts(target, id_prefix="replay", seed=5))
    for rec, line in zip(result.records, lines):
        assert abs(rec.send_s - line["arrival_s"]) < 0.05
        assert (rec.task, rec.width, rec.height, rec.num_steps) == (
            line["task"], line["width"], 48, line["num_inference_steps"])
    got = {r.request_id: r for _, r in servicer.received if r.request_id.startswith("replay-")}
    assert len(got) == 20
    assert got["replay-000000"].num_frames == 9 and not got["replay-000001"].HasField("num_frames")
    assert got["replay-000004"].num_inference_steps == 3 and got["replay-000004"].seed == 5 * 1_000_003 + 4
    summary = summarize(result.records)
    assert summary.intended_rate_per_s == pytest.approx(19 / lines[-1]["arrival_s"])
    assert abs(summary.rate_deviation) < 0.05 and not summary.rate_warning


def test_closed_loop_keeps_concurrency_and_flags_warmup(fake):
    servicer, target = fake
    items = [_item(0.0, steps=3) for _ in range(12)]
    result = run_load(items, _opts(target, concurrency=3, warmup_requests=3, id_prefix="closed"))
    assert len(result.records) == 12 and {r.status for r in result.records} == {"OK"}
    assert [r.warmup for r in result.records] == [True] * 3 + [False] * 9
    assert all(r.intended_s == -1.0 for r in result.records)
    # never more than 3 in flight: each send happens after some earlier request finished
    sends = sorted(r.send_s for r in result.records)
    finishes = sorted(r.finish_s for r in result.records)
    assert all(s >= f - 1e-6 for s, f in zip(sends[3:], finishes))
    assert summarize(result.records).num_warmup == 3


def test_closed_loop_client_waits_out_a_refusals_retry_after(fake):
    servicer, target = fake
    items = [_item(0, width=80), _item(0), _item(0, width=80), _item(0)]
    recs = run_load(items, _opts(target, concurrency=1, id_prefix="backoff")).records
    assert [r.status for r in recs] == ["RESOURCE_EXHAUSTED", "OK", "RESOURCE_EXHAUSTED", "OK"]
    # the hint is 300 ms (an event loop's timer may fire a millisecond early)
    assert recs[1].send_s - recs[0].finish_s >= 0.29 and recs[3].send_s - recs[2].finish_s >= 0.29
    assert recs[2].send_s - recs[1].finish_s < 0.3  # no wait after a request that was served


def test_closed_loop_duration_stops_sending(fake):
    _, target = fake
    items = [_item(0.0, steps=5) for _ in range(10_000)]
    result = run_load(items, _opts(target, concurrency=2, duration_s=0.3, id_prefix="dur"))
    assert 4 <= len(result.records) < 10_000
    assert max(r.send_s for r in result.records) < 0.3 + 0.05


@pytest.mark.parametrize("concurrency", [0, 2])
def test_ctrl_c_stops_sending_and_keeps_what_was_sent(fake, concurrency):
    """Ctrl-C raised KeyboardInterrupt out of the loop with nothing written,
    and a closed-loop client whose request was cancelled sent the next one."""
    import os
    import signal

    servicer, target = fake
    prefix = f"sigint{concurrency}"
    before = signal.getsignal(signal.SIGINT)
    items = [_item(0.0, slo_ms=2) for _ in range(2)] + [_item(30.0 if not concurrency else 0.0, slo_ms=2)
                                                        for _ in range(3)]

    def press_ctrl_c():  # once both open requests reached the server: the loop is running
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with servicer.lock:
                if sum(r.request_id.startswith(prefix) for _, r in servicer.received) >= 2:
                    break
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    t0 = time.monotonic()
    result = run_load(items, _opts(target, concurrency=concurrency, id_prefix=prefix), stop_on_sigint=True)
    assert time.monotonic() - t0 < 20
    assert result.settings["interrupted"]
    assert [r.index for r in result.records] == [0, 1]  # nothing sent after the press
    assert all(r.status == "CANCELLED" and "Ctrl-C" in r.reason for r in result.records)
    assert signal.getsignal(signal.SIGINT) is before


def test_scraper_reads_gauges_from_a_prometheus_endpoint():
    from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

    registry = CollectorRegistry()
    depth = Gauge("genserve_queue_depth", "waiting", ["task"], registry=registry)
    depth.labels(task="image").set(3)
    depth.labels(task="video").set(1)
    overhead = Histogram("genserve_dispatch_overhead_seconds", "overhead", registry=registry)
    overhead.observe(0.003)
    overhead.observe(0.005)
    from genserve.loadgen.launch import free_port

    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        scraper = Scraper(f"127.0.0.1:{port}", time.monotonic(), interval_s=0.05).start()
        time.sleep(0.3)
        depth.labels(task="image").set(5)
        samples = scraper.stop()
    finally:
        server.shutdown()
    image = [s.value for s in samples if s.name == "genserve_queue_depth" and s.task == "image"]
    assert image[0] == 3 and image[-1] == 5 and len(image) >= 3
    assert scraper.num_failed == 0
    assert [s.t_s for s in samples] == sorted(s.t_s for s in samples)
    last = {s.name: s.value for s in samples}  # the mean overhead per dispatch is sum / count
    assert last["genserve_dispatch_overhead_seconds_count"] == 2
    assert last["genserve_dispatch_overhead_seconds_sum"] == pytest.approx(0.008)


def test_parse_gauges_ignores_other_families():
    text = ("# TYPE genserve_queue_depth gauge\ngenserve_queue_depth{task=\"video\"} 2.0\n"
            "# TYPE other gauge\nother 7\n")
    (s,) = parse_gauges(text, 1.5)
    assert (s.t_s, s.name, s.task, s.value) == (1.5, "genserve_queue_depth", "video", 2.0)
