"""Shared fixtures: a real server process on loopback with 2 CPU workers."""
from __future__ import annotations

import time

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
