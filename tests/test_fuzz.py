"""Fuzzing the live server's edge: thousands of random GenerateRequests (and
random bytes posing as one) against the session server.

Each request gets OK or a documented status; nothing else is allowed:

- INVALID_ARGUMENT: a field the validator refuses (it names the field);
- RESOURCE_EXHAUSTED: a message over the inbound size limit, a full queue, or
  the per-client stream limit;
- DEADLINE_EXCEEDED: our own deadline, only for valid work (checked after);
  (raw bytes that do not parse as a request get INVALID_ARGUMENT too).

Requests that would be valid are kept cheap (64² or smaller, 1-2 steps,
<= 9 frames), so the run stays short; out-of-range values are drawn from
the invalid side of each limit. Afterwards the server must still answer a
normal request and its health check.
"""
from __future__ import annotations

import math
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.client import build_request
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

U32, I32, I64 = (0, 2**32 - 1), (-2**31, 2**31 - 1), (-2**63, 2**63 - 1)
BATCH, NUM_BATCHES, NUM_RAW = 4, 520, 300  # 2,080 structured requests + 300 raw ones
DEADLINE_S = 60.0
MAX_SIZE, SIZE_MULTIPLE, MAX_STEPS, MAX_FRAMES = 256, 16, 50, 33  # the tiny presets' limits
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED}

# Text with everything but lone surrogates (protobuf strings are UTF-8):
# controls, NUL, bidi overrides, combining marks, astral planes.
weird_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=64)
long_text = st.integers(4_000, 5_000).map(lambda n: "\u202e\u0301字" * (n // 3 + 1))  # over 4,096 chars
huge_text = st.just("x" * ((1 << 20) + 1024))  # over the 1 MiB inbound message limit
bad_prompt = st.sampled_from(["huge"] + ["other"] * 40).flatmap(  # huge ones are rare: 1 MiB each
    lambda kind: huge_text if kind == "huge" else st.one_of(st.just(""), st.just(" \t\n"), weird_text, long_text))

bad_dim = st.one_of(st.just(0), st.integers(MAX_SIZE + 1, U32[1]),
                    st.integers(1, MAX_SIZE).filter(lambda v: v % SIZE_MULTIPLE))
bad_steps = st.one_of(st.just(0), st.integers(MAX_STEPS + 1, U32[1]))
bad_frames = st.one_of(st.just(0), st.integers(MAX_FRAMES + 1, U32[1]),
                       st.integers(2, MAX_FRAMES).filter(lambda v: (v - 1) % 4))
any_float = st.floats(width=32)  # NaN, ±inf, -0.0, subnormals, huge


@st.composite
def requests(draw) -> pb.GenerateRequest:
    """About one in eight is drawn wholly from the cheap valid domain; the
    rest mix valid, unset and invalid values field by field."""
    cheap = draw(st.sampled_from([True] + [False] * 7))

    def pick(valid, invalid=None, unset=True):
        options = [valid] + ([] if cheap or invalid is None else [invalid]) + ([st.none()] if unset else [])
        return draw(st.one_of(*options))

    req = pb.GenerateRequest()
    req.request_id = pick(st.just(""), st.one_of(weird_text, st.text(min_size=129, max_size=200)), unset=False)
    req.model = pick(st.sampled_from(["", "sd3-tiny", "wan-tiny"]), weird_text, unset=False)
    req.task = pick(st.sampled_from([pb.TASK_TEXT_TO_IMAGE, pb.TASK_TEXT_TO_VIDEO]),
                    st.integers(*I32), unset=False)
    req.prompt = pick(weird_text.map(lambda s: "p" + s), bad_prompt, unset=False)
    req.negative_prompt = pick(weird_text, long_text, unset=False)
    req.slo_ms = draw(st.integers(*U32))
    req.output_format = pick(st.just(pb.OUTPUT_FORMAT_UNSPECIFIED), st.integers(*I32), unset=False)
    optional = {
        "width": pick(st.sampled_from([16, 32, 48, 64]), bad_dim),
        "height": pick(st.sampled_from([16, 32, 48, 64]), bad_dim),
        "num_frames": pick(st.sampled_from([1, 5, 9]), bad_frames),
        "fps": pick(st.integers(1, 60), st.integers(*U32)),
        "num_inference_steps": pick(st.sampled_from([1, 2]), bad_steps, unset=False),
        "guidance_scale": pick(st.floats(0.0, 100.0, width=32), any_float),
        "seed": pick(st.integers(*I64)),
    }
    for name, value in optional.items():
        if value is not None:
            setattr(req, name, value)
    return req


def check_ok(req: pb.GenerateRequest, resp: pb.GenerateResponse) -> None:
    """What an accepted request's answer must say."""
    assert resp.media.data and resp.media.mime_type
    if req.request_id:
        assert resp.request_id == req.request_id
    if req.HasField("width"):
        assert resp.media.width == req.width
    if req.HasField("seed"):
        assert resp.seed == req.seed
    assert resp.num_inference_steps == req.num_inference_steps
    assert resp.latency_ms >= 0 and math.isfinite(resp.latency_ms)


def _describe(req: pb.GenerateRequest) -> str:
    text = str(req)
    return text if len(text) < 600 else text[:600] + "..."


def test_generate_fuzz(server):
    stats: Counter = Counter()
    log_start = len(server.lines)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenServeStub(channel)

        @settings(max_examples=NUM_BATCHES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(requests(), min_size=BATCH, max_size=BATCH))
        def batch(reqs):
            calls = [(req, stub.Generate.future(req, timeout=DEADLINE_S)) for req in reqs]
            for req, call in calls:
                stats["sent"] += 1
                try:
                    resp = call.result()
                except grpc.RpcError as err:
                    stats[err.code().name] += 1
                    assert err.code() in ALLOWED, f"{err.code().name}: {err.details()}\n{_describe(req)}"
                    assert err.details(), _describe(req)
                    continue
                stats["OK"] += 1
                check_ok(req, resp)

        batch()
    print("fuzz outcomes:", dict(stats))
    errors = [line for line in server.lines[log_start:] if " ERROR " in line]
    print("server errors during the fuzz:", dict(Counter(line.split(" ERROR ", 1)[1].strip() for line in errors)))
    # Engine-side policy fallbacks are the engine's business; the edge must log none.
    assert not [line for line in errors if "genserve.engine" not in line], errors
    assert stats["sent"] >= 2000
    assert stats["OK"] >= 100 and stats["INVALID_ARGUMENT"] >= 1000  # both sides were exercised
    assert_still_serving(server)


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_raw_bytes_fuzz(server, method):
    """Bytes that may not even parse as a GenerateRequest."""
    stats: Counter = Counter()
    with grpc.insecure_channel(server.target) as channel:
        path = f"/genserve.v1.GenServe/{method}"
        call = (channel.unary_unary if method == "Generate" else channel.unary_stream)(path)

        @settings(max_examples=NUM_RAW // 2, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.one_of(st.binary(max_size=256),
                         requests().map(lambda r: r.SerializeToString()).flatmap(
                             lambda b: st.integers(0, len(b)).map(lambda n: b[:n]))))  # truncated valid ones
        def one(data):
            try:
                reply = call(data, timeout=DEADLINE_S)
                if method == "GenerateStream":
                    list(reply)
                stats["OK"] += 1
            except grpc.RpcError as err:
                stats[err.code().name] += 1
                assert err.code() in ALLOWED, f"{err.code().name}: {err.details()}; {data!r}"

        one()
    print(f"raw {method} outcomes:", dict(stats))
    assert_still_serving(server)


def assert_still_serving(server) -> None:
    assert server.proc.poll() is None, "the server died:\n" + server.output[-3000:]
    with grpc.insecure_channel(server.target) as channel:
        resp = pb_grpc.GenServeStub(channel).Generate(
            build_request("after the storm, a calm sea", task="image", width=64, height=64, steps=2, seed=5),
            timeout=120)
        assert resp.media.data and resp.media.width == 64
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
