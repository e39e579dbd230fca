"""Contract of genserve.metrics: every family is exported with its type and labels,
label values stay bounded, and the registry is private to each Metrics."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from genserve import metrics as gm
from genserve.metrics import FAMILIES, FAMILY_NAMES, Metrics

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def exercise(m: Metrics) -> None:
    """Call every public recording method at least once."""
    m.request_finished("image", "flux-tiny", "OK", latency_s=1.5, queue_s=0.2, slo_met=True)
    m.request_finished("video", "wan-tiny", "DEADLINE_EXCEEDED", latency_s=900.0,
                       queue_s=30.0, slo_met=False)
    m.request_finished("image", "flux-tiny", "CANCELLED", queue_s=0.1)
    m.set_queue("image", queued=3, running=4, paused=0)
    m.set_queue("video", queued=1, running=2, paused=1)
    m.preempted("video")
    m.resharded()
    m.step("video", "wan-tiny", sp_degree=4, batch_size=1, measured_s=2.0,
           predicted_s=1.6, device_ids=[0, 1, 2, 3])
    m.step("image", "flux-tiny", sp_degree=1, batch_size=5, measured_s=0.2,
           predicted_s=0.25, device_ids=[4])
    m.decision(0.0004)
    m.worker_restarted(2)
    m.set_workers(up=7, down=1)
    m.set_sp_max_degree(4)


def parsed(m: Metrics) -> dict:
    """Families by the name PromQL uses (counters keep ``_total``)."""
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = fam
    return out


@pytest.fixture()
def metrics() -> Metrics:
    m = Metrics(version="0.1.0", policy="genserve", device_kind="cpu")
    exercise(m)
    return m


def test_every_family_has_type_and_labels(metrics):
    fams = parsed(metrics)
    assert set(FAMILY_NAMES) <= set(fams), set(FAMILY_NAMES) - set(fams)
    for spec in FAMILIES:
        fam = fams[spec.name]
        assert fam.type == spec.kind, spec.name
        assert fam.samples, f"{spec.name} has no samples"
        for sample in fam.samples:
            keys = set(sample.labels) - {"le"}
            assert keys == set(spec.labels), (spec.name, sample)


def test_names_prefix_and_base_units():
    for spec in FAMILIES:
        assert spec.name.startswith("genserve_")
        assert "_ms" not in spec.name and "millis" not in spec.name
        if spec.kind == "counter":
            assert spec.name.endswith("_total")
    assert len(set(FAMILY_NAMES)) == len(FAMILY_NAMES)


def sample_value(fams, name, suffix="", **labels) -> float:
    for s in fams[name].samples:
        if s.name == name.removesuffix("_total") + suffix and all(
                s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name}{suffix} {labels}")


def test_recorded_values(metrics):
    fams = parsed(metrics)
    assert sample_value(fams, "genserve_requests_total", "_total", task="image",
                        model="flux-tiny", status="OK") == 1
    # latency is observed for OK only; queue delay whenever given
    assert sample_value(fams, "genserve_request_latency_seconds", "_count", task="image") == 1
    with pytest.raises(AssertionError):
        sample_value(fams, "genserve_request_latency_seconds", "_count", task="video")
    assert sample_value(fams, "genserve_queue_delay_seconds", "_count", task="image") == 2
    assert sample_value(fams, "genserve_slo_total", "_total", task="video", outcome="missed") == 1
    assert sample_value(fams, "genserve_paused_requests", task="video") == 1
    assert sample_value(fams, "genserve_device_busy_seconds_total", "_total", device="2") == 2.0
    assert sample_value(fams, "genserve_sp_degree", "_sum") == 4
    assert sample_value(fams, "genserve_image_batch_size", "_sum") == 5
    # batch size 5 is labelled with its power-of-two bucket
    assert sample_value(fams, "genserve_step_latency_seconds", "_count",
                        model="flux-tiny", sp_degree="1", batch_size="8") == 1
    assert sample_value(fams, "genserve_step_prediction_error_ratio", "_sum",
                        model="wan-tiny") == pytest.approx(1.25)
    assert sample_value(fams, "genserve_build_info", version="0.1.0",
                        policy="genserve", device_kind="cpu") == 1
    assert sample_value(fams, "genserve_workers", state="down") == 1
    assert sample_value(fams, "genserve_sp_max_degree") == 4


def test_histogram_buckets_cover_required_ranges():
    assert gm.LATENCY_BUCKETS_S[0] <= 0.05 and gm.LATENCY_BUCKETS_S[-1] >= 3600
    assert gm.DECISION_BUCKETS_S[0] <= 1e-5 and gm.DECISION_BUCKETS_S[-1] >= 1
    assert gm.SP_DEGREE_BUCKETS == (1, 2, 4, 8)
    assert gm.BATCH_SIZE_BUCKETS == (1, 2, 4, 8, 16, 32)
    assert gm.RATIO_BUCKETS[0] <= 0.25 and 1.0 in gm.RATIO_BUCKETS and gm.RATIO_BUCKETS[-1] >= 4
    for buckets in (gm.LATENCY_BUCKETS_S, gm.QUEUE_BUCKETS_S, gm.STEP_BUCKETS_S,
                    gm.RATIO_BUCKETS, gm.DECISION_BUCKETS_S):
        assert list(buckets) == sorted(set(buckets))


def test_label_values_are_bounded():
    m = Metrics(max_label_values=4)
    for i in range(50):
        m.request_finished("image", f"model-{i}", "OK", latency_s=1.0)
        m.request_finished(f"req-{i}", "m", f"status-{i}")  # garbage task/status
        m.step("image", "m", 1, i + 1, 0.1, None, device_ids=[i])
    fams = parsed(m)
    values: dict[str, set] = {}
    for fam in fams.values():
        for s in fam.samples:
            for k, v in s.labels.items():
                values.setdefault(k, set()).add(v)
    assert values["task"] <= {"image", "video", "other"}
    assert values["status"] <= gm.GRPC_STATUS_NAMES
    assert len(values["model"]) <= 4 + 1 and "other" in values["model"]
    assert len(values["device"]) <= 4 + 1
    assert values["batch_size"] <= {str(2 ** k) for k in range(7)}
    assert not any(v.startswith("req-") for vs in values.values() for v in vs)


def test_batch_bucket():
    assert [gm.batch_bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 33)] == \
        ["1", "1", "2", "4", "4", "8", "8", "16", "64"]


def test_registries_are_independent():
    a, b = Metrics(), Metrics()
    a.preempted("video")
    assert sample_value(parsed(a), "genserve_preemptions_total", "_total", task="video") == 1
    with pytest.raises(AssertionError):
        sample_value(parsed(b), "genserve_preemptions_total", "_total", task="video")


def test_http_server_serves_registry(metrics):
    server = metrics.start_http_server(0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read().decode()
        assert 'genserve_requests_total{model="flux-tiny",status="OK",task="image"} 1.0' in body
    finally:
        server.shutdown()
        server.server_close()
