"""The executor's wait(): what it reports, and in which order, when a worker dies."""
from __future__ import annotations

import multiprocessing as mp
import os

from genserve.workers.executor import Executor, WorkerDied


def _say_and_exit(conn) -> None:
    conn.send("last words")
    os._exit(3)


class PipesOnly(Executor):
    """Device 0 a real process that dies; device 1 a pipe the test writes to."""

    def __init__(self):
        super().__init__([])
        self.procs: dict[int, mp.Process] = {}

    def _sentinels(self) -> dict:
        return {p.sentinel: d for d, p in self.procs.items() if d in self.conns}

    def _exitcode(self, device_id: int) -> int | None:
        self.procs[device_id].join(1.0)
        return self.procs[device_id].exitcode


def test_a_dead_workers_replies_then_its_death_then_the_survivors():
    ctx = mp.get_context("fork")
    ex = PipesOnly()
    parent0, child0 = ctx.Pipe()
    proc = ctx.Process(target=_say_and_exit, args=(child0,))
    proc.start()
    child0.close()
    parent1, child1 = ctx.Pipe()
    ex.conns = {0: parent0, 1: parent1}
    ex.procs = {0: proc}
    proc.join(10)
    child1.send("my peer vanished")  # what a survivor's failed collective reports
    got = []
    while len(got) < 3:
        got += ex.wait(5.0)
    assert got == [(0, "last words"), (0, WorkerDied(0, 3)), (1, "my peer vanished")]
    assert 0 not in ex.conns and 1 in ex.conns
    assert ex.wait(0.01) == []  # the death is reported once
