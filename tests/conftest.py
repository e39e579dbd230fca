"""Shared fixtures: a real server process on loopback with 2 CPU workers."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest


class ServerProcess:
    """``genserve serve`` in a subprocess; ``target`` is its HOST:PORT."""

    def __init__(self, *args: str, env: dict | None = None, timeout_s: float = 300.0):
        cmd = [sys.executable, "-m", "genserve", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.lines: list[str] = []
        self.target = ""
        found = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"listening on (\S+:\d+)", line)
                if m and not found.is_set():
                    self.target = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout_s) or not self.target:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-50:]))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


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
