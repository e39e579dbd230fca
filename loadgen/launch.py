"""Start a ``genserve serve`` subprocess (compare mode, tests, benchmarks).

``--port 0``, then wait for the line ``GenServe listening on HOST:PORT``; with
``metrics`` a free metrics port is picked so queue depth can be scraped. The
server's output is kept (``output``) and can be written next to a run's
results. The test suite's ``ServerProcess`` is this class.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

LISTENING = re.compile(r"listening on (\S+:\d+)")


class ServerStartError(RuntimeError):
    """The server exited, or printed no ``listening`` line in time. ``str``:
    the reason and the end of its output; ``line``: the reason in one line."""

    def __init__(self, policy: str, output: str, returncode: int | None, timeout_s: float):
        self.policy, self.output, self.returncode = policy, output, returncode
        name = f"the server ({policy or 'default policy'})"
        last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "")
        self.line = (f"{name} exited with status {returncode} before listening"
                     if returncode is not None else f"{name} was not listening after {timeout_s:g} s")
        self.line += f": {last}" if last else " (no output)"
        super().__init__(f"{name} did not start:\n" + "".join(output.splitlines(True)[-40:]))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LaunchedServer:
    """A server subprocess; ``target`` is its gRPC HOST:PORT, ``metrics_url`` its /metrics."""

    def __init__(self, policy: str = "", *, num_workers: int | None = 2, args: Sequence[str] = (),
                 timeout_s: float = 300.0, metrics: bool = True, env: dict | None = None):
        """``policy`` and ``num_workers`` (None/empty: the server's defaults) come
        before ``args``, the other ``genserve serve`` flags."""
        metrics_port = free_port() if metrics else 0
        cmd = [sys.executable, "-m", "genserve", "serve", "--port", "0"]
        cmd += ["--policy", policy] if policy else []
        cmd += ["--num-workers", str(num_workers)] if num_workers is not None else []
        cmd += ["--metrics-port", str(metrics_port)] if metrics_port else []
        self.policy = policy
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else ""
        self.proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **(env or {})}, start_new_session=True)
        self.lines: list[str] = []
        self.target = ""
        found = threading.Event()
        threading.Thread(target=self._pump, args=(found,), daemon=True).start()
        if not found.wait(timeout_s) or not self.target:
            try:  # the output ended without the line: the server is exiting
                returncode = self.proc.wait(5 if found.is_set() else 0)
            except subprocess.TimeoutExpired:
                returncode = None
            self.stop()
            raise ServerStartError(policy, self.output, returncode, timeout_s)

    def _pump(self, found: threading.Event) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = LISTENING.search(line)
            if m and not found.is_set():
                self.target = m.group(1)
                found.set()
        found.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def save_log(self, path: str | Path) -> None:
        Path(path).write_text(self.output, encoding="utf-8")

    def __enter__(self) -> "LaunchedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
