"""After a worker crash: restarting it, and bringing sequence parallelism back.

A dead worker is restarted at once, unless it keeps dying soon after it starts
(a model that no longer loads, a device that keeps failing): then each restart
waits twice as long as the last, up to a minute (``RestartBackoff``).

A restarted worker process cannot rejoin the torch.distributed world its
peers still belong to, so a crash turns SP off, as does a worker that leaves
its SP group when its own step fails (its peers' collectives fail with it).
Once every worker is up again the engine starts a *round*: each worker is
told to leave the old world and join a fresh one (``P.Rejoin``), which it does
between the single-device steps it keeps running. When every worker has answered that it joined, SP comes
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


class RestartBackoff:
    """When to restart each dead worker: at once, unless it died within
    ``QUICK_S`` of its start more than once in a row; then after 1, 2, 4 ... 60 s."""

    QUICK_S = 60.0
    MAX_DELAY_S = 60.0

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started_s: dict[int, float] = {}  # device -> when its worker last started
        self.quick_deaths: dict[int, int] = {}  # device -> deaths in a row soon after a start
        self.due_s: dict[int, float] = {}  # device -> when to restart it

    def started(self, device_id: int) -> None:
        self.started_s[device_id] = self.clock()

    def died(self, device_id: int) -> float:
        """Schedule the restart of ``device_id``; the delay chosen (s)."""
        now = self.clock()
        quick = now - self.started_s.get(device_id, float("-inf")) < self.QUICK_S
        n = self.quick_deaths[device_id] = self.quick_deaths.get(device_id, 0) + 1 if quick else 0
        delay = 0.0 if n <= 1 else min(self.MAX_DELAY_S, 2.0 ** (n - 2))
        self.due_s[device_id] = now + delay
        return delay

    def due(self) -> list[int]:
        """Devices whose restart is due now; they count as started."""
        now = self.clock()
        ready = sorted(d for d, t in self.due_s.items() if t <= now)
        for d in ready:
            del self.due_s[d]
            self.started(d)
        return ready

    def next_in_s(self) -> float | None:
        """Seconds until the next restart is due (None: none pending)."""
        return max(0.0, min(self.due_s.values()) - self.clock()) if self.due_s else None


class SPRecovery:
    MAX_BACKOFF_S = 60.0
    ROUND_TIMEOUT_S = 180.0  # a join gives up after DistSpec.timeout_s (120 s); this is the backstop
    BREAK_GRACE_S = 1.0  # after a reported break, for the death that may have caused it

    def __init__(self, executor, clock=time.monotonic):
        self.executor, self.clock = executor, clock
        self.failures = 0  # failed rounds in a row
        self.not_before = 0.0  # no round starts before this time (back-off)
        self.started_s = 0.0  # when the current round started
        self.wanted = False  # a crash took SP away and no round has brought it back yet
        self.world = ""  # init_method of the world the current round joins ("" : no round)
        self.waiting: set[int] = set()  # workers whose answer the round awaits
        self.problems: list[str] = []
        self.held = False  # a worker is stuck in a broken SP dispatch: no round until it answers or dies

    @property
    def in_progress(self) -> bool:
        return bool(self.world)

    def lost(self, device_id: int) -> None:
        """A worker died: SP is gone until a round succeeds; a round in
        progress has failed (its other members answer when their join times out)."""
        self.wanted = self.executor.configured_sp_degree > 1
        problem = f"worker {device_id} died during the round"
        if self.in_progress and problem not in self.problems:  # even if it had joined: the new world
            self.waiting.discard(device_id)                      # has lost a member
            self.problems.append(problem)
            if not self.waiting:
                self._end()

    def broken(self) -> None:
        """A worker reported its SP group broken: SP is gone until a round
        succeeds. A member that died is reported by the executor, sometimes
        just after a peer's report of the break it caused; a round started in
        between would wait for the dead one until the join times out (120 s),
        so the next round waits ``BREAK_GRACE_S`` for it."""
        self.wanted = self.executor.configured_sp_degree > 1
        self.not_before = max(self.not_before, self.clock() + self.BREAK_GRACE_S)

    def next_in_s(self) -> float | None:
        """Seconds until ``tick`` has something to do on its own (a round's
        answers overdue, or the back-off of a wanted round over); None: only
        when a worker is back or answers."""
        if self.in_progress:
            due = self.started_s + self.ROUND_TIMEOUT_S
        elif self.wanted and not self.held:  # (held: its reply or death wakes the engine)
            due = self.not_before
        else:
            return None
        return max(0.0, due - self.clock())

    def tick(self, down: set[int], stuck: bool = False) -> None:
        """Called on every engine loop: give up a round whose answers are
        overdue (a join hung), and start one if SP is wanted back, every
        worker is up and none is running, and no worker is ``stuck`` in a
        broken SP dispatch: it would put the Rejoin off until that dispatch
        ends, which may be never (NCCL), while the others wait for it in the
        new world's rendezvous (120 s) past its kill and restart."""
        if self.in_progress and self.clock() - self.started_s > self.ROUND_TIMEOUT_S:
            self.problems.append(f"no answer from worker(s) {sorted(self.waiting)} in "
                                 f"{self.ROUND_TIMEOUT_S:.0f} s")
            self._end()
        self.held = stuck
        if not self.wanted or self.in_progress or down or stuck or self.clock() < self.not_before:
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
