"""Pieces of the gRPC frontend and its assembly that need no server: how a
caller's leaving is counted, how grpc's log of an undelivered response
reads, addresses, and the checks made as the server starts."""
from __future__ import annotations

import logging
import pathlib

import pytest

from genserve.server import _gone_status, _quiet_undelivered, host_port


class Context:
    def __init__(self, left):
        self.left = left

    def time_remaining(self):
        return self.left


@pytest.mark.parametrize("host, address", [
    ("127.0.0.1", "127.0.0.1:50051"), ("localhost", "localhost:50051"), ("::1", "[::1]:50051"),
    ("[::1]", "[::1]:50051"), ("::", "[::]:50051"), ("fe80::1%eth0", "[fe80::1%eth0]:50051"),
])
def test_an_ipv6_host_is_bracketed_once(host, address):
    assert host_port(host, 50051) == address


@pytest.mark.parametrize("left, budget, status", [
    (0.004, 30.0, "DEADLINE_EXCEEDED"),  # the client's deadline fired first: its cancel came in just before
    (-0.5, 30.0, "DEADLINE_EXCEEDED"),
    (0.9, 30.0, "DEADLINE_EXCEEDED"),
    (5.0, 30.0, "CANCELLED"),  # left with time to spare: it cancelled
    (0.2, 0.5, "DEADLINE_EXCEEDED"),
    (0.4, 0.5, "CANCELLED"),  # a short call that left in its first half
    (None, None, "CANCELLED"),  # no deadline at all
])
def test_a_caller_leaving_at_its_deadline_is_deadline_exceeded(left, budget, status):
    assert _gone_status(Context(left), budget) == status


class ExecuteBatchError(Exception):
    """Stands in for grpc's cython exception (matched by name)."""


def test_an_undelivered_response_is_one_warning_line(caplog):
    _quiet_undelivered()
    _quiet_undelivered()  # installed once however many servers start
    core = logging.getLogger("grpc._cython.cygrpc")
    assert sum(type(f).__name__ == "_UndeliveredResponse" for f in core.filters) == 1
    with caplog.at_level(logging.INFO, logger="grpc._cython.cygrpc"):
        try:
            raise ExecuteBatchError("Failed execute_batch")
        except ExecuteBatchError:
            core.exception("ExecuteBatchError raised in core by servicer method [/genserve.v1.GenServe/Generate]")
        try:
            raise ValueError("something else")
        except ValueError:
            core.exception("another failure")
    first, second = caplog.records
    assert first.levelname == "WARNING" and first.exc_info is None
    assert first.getMessage().startswith("the response to /genserve.v1.GenServe/Generate was not delivered")
    assert second.levelname == "ERROR" and second.exc_info is not None  # other errors keep their traceback


def test_a_profile_that_has_a_served_model_for_the_other_task_is_refused():
    """The built-in profile's wan-tiny (video) for a served image model of
    that name: every request without an SLO failed INTERNAL in admission."""
    from genserve.app import build_cost_model
    from genserve.models.preset_limits import SD3_TINY_LIMITS, WAN_TINY_LIMITS
    from genserve.scheduler import ProfileError
    from genserve.workers.protocol import ModelCard, Ready

    profile = str(pathlib.Path(__file__).parents[1] / "profiles" / "cpu-tiny-2w.json")
    swapped = Ready(0, (ModelCard("wan-tiny", "image", SD3_TINY_LIMITS),
                        ModelCard("sd3-tiny", "video", WAN_TINY_LIMITS)), 1.0)
    with pytest.raises(ProfileError, match="model 'sd3-tiny' serves video but profile 'cpu-tiny-2w' has it as "
                                           "image; model 'wan-tiny' serves image but .* has it as video"):
        build_cost_model(profile, {0: swapped})
    same = Ready(0, (ModelCard("sd3-tiny", "image", SD3_TINY_LIMITS),
                     ModelCard("wan-tiny", "video", WAN_TINY_LIMITS)), 1.0)
    assert build_cost_model(profile, {0: same}).isolated_latency_ms(
        "wan-tiny", 64, 64, 9, 20, "video", 1) > 0


def test_a_generation_refused_at_the_edge_is_counted_under_its_model():
    """The stream limit and the drain refuse a parsed request: its model
    labels the count (it was task "other", model ""); a call refused before
    it is parsed (no token) stays unlabelled."""
    from types import SimpleNamespace

    from genserve.app import Server
    from genserve.config import Limits, ServerConfig
    from genserve.convert import Validator
    from genserve.models.preset_limits import SD3_TINY_LIMITS, WAN_TINY_LIMITS
    from genserve.server import GenServeService
    from genserve.v1 import genserve_pb2 as pb
    from genserve.workers.protocol import ModelCard

    server = Server(ServerConfig(port=0))
    cards = {"sd3-tiny": ModelCard("sd3-tiny", "image", SD3_TINY_LIMITS),
             "wan-tiny": ModelCard("wan-tiny", "video", WAN_TINY_LIMITS)}
    server.service = GenServeService(SimpleNamespace(metrics=server.metrics), Validator(cards, Limits()))
    server._refused_at_the_edge("RESOURCE_EXHAUSTED", pb.GenerateRequest(task=pb.TASK_TEXT_TO_VIDEO))
    server._refused_at_the_edge("UNAUTHENTICATED")
    counts = {(s.labels["task"], s.labels["model"], s.labels["status"]): s.value
              for m in server.metrics.registry.collect() if m.name == "genserve_requests"
              for s in m.samples if s.name.endswith("_total")}
    assert counts[("video", "wan-tiny", "RESOURCE_EXHAUSTED")] == 1
    assert counts[("other", "", "UNAUTHENTICATED")] == 1


def test_a_failed_sp_warm_up_stops_the_start_with_one_error_saying_how_to_serve_without(monkeypatch):
    import genserve.app as app
    from genserve.workers.executor import WorkerStartError

    class TwoDevices:
        max_sp_degree = 2

    def fails(executor, cards):
        raise RuntimeError("profiling wan-tiny failed: denoising step failed: out of memory")

    monkeypatch.setattr(app, "warm_up_sp", fails)
    with pytest.raises(WorkerStartError, match=r"sequence-parallel warm-up failed: profiling wan-tiny failed: "
                                               r".*out of memory \(--max-sp-degree 1 serves without SP\)"):
        app.Server._warm_up_sp(TwoDevices(), {})

    class OneDevice:
        max_sp_degree = 1

    assert app.Server._warm_up_sp(OneDevice(), {}) == []  # no SP: nothing to warm
