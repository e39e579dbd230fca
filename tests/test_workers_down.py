"""Every worker down (crash-looping): the replica says so on the health
services probes check, and refuses new calls UNAVAILABLE, until one is back."""
from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health, health_pb2

from conftest import ServerProcess, wait_for
from genserve.app import WORKERS_HEALTH_SERVICE, set_workers_health
from genserve.client import Client
from genserve.config import EngineConfig
from genserve.engine import NO_WORKER_UP, Engine
from genserve.metrics import Metrics
from genserve.models.base import GenParams
from genserve.scheduler import make_policy
from genserve.server import SERVICE_NAME
from genserve.types import Request, RequestError

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class TwoDevices:
    num_devices, max_sp_degree, configured_sp_degree = 2, 2, 2

    def wake(self) -> None:
        pass


def image(req_id: str) -> Request:
    return Request(req_id, "sd3-tiny", "image", GenParams("a cat", "", 64, 64, 1, 2, 5.0, 0), "raw", 8, 0, 0.0)


def test_a_request_is_refused_unavailable_only_while_every_worker_is_down():
    eng = Engine(EngineConfig(), TwoDevices(), lambda spec: make_policy("fcfs", spec), None, Metrics(), {})
    eng.loss.down = {1}
    eng.submit(image("degraded"), lambda ev: None)  # one worker up: queued as before
    eng.loss.down = {0, 1}
    with pytest.raises(RequestError) as err:
        eng.submit(image("none up"), lambda ev: None)
    assert (err.value.status, err.value.message) == ("UNAVAILABLE", NO_WORKER_UP)


def test_the_servers_health_follows_whether_any_worker_is_up():
    async def statuses(*down_counts: int) -> list[tuple[int, int, int]]:
        servicer, out = health.aio.HealthServicer(), []
        for num_down in down_counts:
            await set_workers_health(servicer, num_down, 2)
            out.append(tuple(servicer._server_status[s] for s in ("", SERVICE_NAME, WORKERS_HEALTH_SERVICE)))
        return out

    assert asyncio.run(statuses(0, 1, 2, 1, 0)) == [
        (SERVING, SERVING, SERVING), (SERVING, SERVING, NOT_SERVING), (NOT_SERVING, NOT_SERVING, NOT_SERVING),
        (SERVING, SERVING, NOT_SERVING), (SERVING, SERVING, SERVING)]


def check(target: str, service: str = "") -> int:
    from grpc_health.v1 import health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


@pytest.mark.slow
def test_the_only_worker_crash_looping_takes_the_replica_out_until_it_is_back(tmp_path):
    """Its checkpoint is gone and it was killed: "" and GenServe NOT_SERVING,
    a new call UNAVAILABLE at once (it was accepted and hung until its
    deadline); the checkpoint back, so is the replica."""
    from test_reliability import worker_pids

    from genserve.models.presets import build_sd3_tiny
    from genserve.models.sd3 import save_sd3

    ckpt, gone = tmp_path / "sd3", tmp_path / "gone"
    save_sd3(build_sd3_tiny(), str(ckpt))
    srv = ServerProcess("--num-workers", "1", "--model", f"sd3={ckpt}")
    try:
        ckpt.rename(gone)
        os.kill(worker_pids(srv.proc.pid)[0], signal.SIGKILL)
        assert wait_for(lambda: "worker 0 failed to start" in srv.output, 120), srv.output[-3000:]
        assert (check(srv.target), check(srv.target, SERVICE_NAME)) == (NOT_SERVING, NOT_SERVING)
        with Client(srv.target) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.generate("while down", steps=2, timeout_s=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details() == NO_WORKER_UP
            gone.rename(ckpt)
            assert wait_for(lambda: "worker 0 is back" in srv.output, 120), srv.output[-3000:]
            assert wait_for(lambda: check(srv.target) == SERVING, 10)
            assert check(srv.target, SERVICE_NAME) == SERVING
            assert client.generate("back", steps=2, timeout_s=60).media.data
    finally:
        srv.stop()
