"""Bringing sequence parallelism back after a worker crash.

A restarted worker process cannot rejoin the torch.distributed world its
peers still belong to, so a crash turns SP off. Once every worker is up again
the engine starts a *round*: each worker is told to leave the old world and
join a fresh one (``P.Rejoin``), which it does beside the single-device steps
it keeps running. When every worker has answered that it joined, SP comes
back. A round that fails (a worker died during it, or a join timed out: a
worker still busy with a long dispatch of the old world answers late) ends when
its last answer arrives, or after ``ROUND_TIMEOUT_S`` if one never does (a
join that hangs); the next starts once every worker is up again, after a
back-off that doubles with each failed round (1 s ... 60 s).
"""
from __future__ import annotations

import logging
import time

from genserve.workers import protocol as P

log = logging.getLogger("genserve.engine")


class SPRecovery:
    MAX_BACKOFF_S = 60.0
    ROUND_TIMEOUT_S = 180.0  # a join gives up after DistSpec.timeout_s (120 s); this is the backstop

    def __init__(self, executor, clock=time.monotonic):
        self.executor, self.clock = executor, clock
        self.failures = 0  # failed rounds in a row
        self.not_before = 0.0  # no round starts before this time (back-off)
        self.started_s = 0.0  # when the current round started
        self.wanted = False  # a crash took SP away and no round has brought it back yet
        self.world = ""  # init_method of the world the current round joins ("" : no round)
        self.waiting: set[int] = set()  # workers whose answer the round awaits
        self.problems: list[str] = []

    @property
    def in_progress(self) -> bool:
        return bool(self.world)

    def lost(self, device_id: int) -> None:
        """A worker died: SP is gone until a round succeeds; a round in
        progress has failed (its other members answer when their join times out)."""
        self.wanted = self.executor.configured_sp_degree > 1
        if self.in_progress:  # even if it had joined: the new world has lost a member
            self.waiting.discard(device_id)
            self.problems.append(f"worker {device_id} died during the round")
            if not self.waiting:
                self._end()

    def tick(self, down: set[int]) -> None:
        """Called on every engine loop: give up a round whose answers are
        overdue (a join hung), and start one if SP is wanted back, every
        worker is up and none is running."""
        if self.in_progress and self.clock() - self.started_s > self.ROUND_TIMEOUT_S:
            self.problems.append(f"no answer from worker(s) {sorted(self.waiting)} in "
                                 f"{self.ROUND_TIMEOUT_S:.0f} s")
            self._end()
        if not self.wanted or self.in_progress or down or self.clock() < self.not_before:
            return
        dist = self.executor.new_world()
        if dist is None:
            self.wanted = False
            return
        self.world, self.problems, self.started_s = dist.init_method, [], self.clock()
        self.waiting = set(range(self.executor.num_devices))
        log.info("workers joining a new process group to bring sequence parallelism back")
        for device_id in sorted(self.waiting):
            if not self.executor.send(device_id, P.Rejoin(dist)):
                self.lost(device_id)  # its death is reported by the executor too

    def answered(self, msg: P.Rejoined) -> bool | None:
        """Record one answer. True: every worker joined, SP may come back;
        False: the round failed; None: the round goes on (or the answer is stale)."""
        if msg.init_method != self.world or msg.device_id not in self.waiting:
            return None
        self.waiting.discard(msg.device_id)
        if not msg.ok:
            self.problems.append(f"worker {msg.device_id}: {msg.message}")
        if self.waiting:
            return None
        return self._end()

    def _end(self) -> bool:
        ok = not self.problems
        if ok:
            self.wanted, self.failures = False, 0
        else:
            self.failures += 1
            backoff_s = min(self.MAX_BACKOFF_S, 2.0 ** (self.failures - 1))
            self.not_before = self.clock() + backoff_s
            log.warning("sequence parallelism stays off (%s); next try in %.0f s",
                        "; ".join(self.problems), backoff_s)
        self.world, self.waiting = "", set()
        return ok
