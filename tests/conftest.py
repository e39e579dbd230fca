"""Shared fixtures: a real server process on loopback with 2 CPU workers."""
from __future__ import annotations

import contextlib
import time
from concurrent import futures

import pytest

from genserve.loadgen.launch import LaunchedServer


class ServerProcess(LaunchedServer):
    """``genserve serve ARGS`` in a subprocess; ``target`` is its HOST:PORT."""

    def __init__(self, *args: str, env: dict | None = None, timeout_s: float = 300.0):
        super().__init__(num_workers=None, args=args, timeout_s=timeout_s, metrics=False, env=env)


@pytest.fixture(scope="session")
def server():
    srv = ServerProcess("--num-workers", "2")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    from genserve.client import Client

    with Client(server.target) as c:
        yield c


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


@contextlib.contextmanager
def fake_genserve(servicer, max_workers: int = 8, port: int = 0):
    """An in-process gRPC server of ``servicer`` (a GenServeServicer stand-in)
    on ``port`` (0: a free one) on loopback; yields its HOST:PORT."""
    import grpc

    from genserve.v1 import genserve_pb2_grpc as pb_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    pb_grpc.add_GenServeServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
