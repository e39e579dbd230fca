"""What the engine does when a worker process dies, or hangs.

Its in-flight dispatches end: one still waiting for a state move is taken back
(its requests wait again where their state is); in one already sent, the dead
member is no longer awaited. A request whose only copy of its state died
restarts from step 0, once; a second crash fails it (``UNAVAILABLE``). The
worker is restarted (recovery.py: back-off when it keeps dying, and SP off
until every worker has joined a new process group).

A worker whose own step fails in an SP dispatch (out of device memory on
that device alone) leaves the world so that its peers' collectives fail rather
than wait; its report says the group is lost, and SP is off until every
worker has joined a new world, as after a crash.

A hung worker (a stuck device call, a stopped process) shows no sign but a
dispatch that runs on and on, and in an SP group its peers wait with it in a
collective. Far past its prediction the dispatch is logged; past
``EngineConfig.hung_worker_s`` the workers it waits for are killed, and their
deaths take the path above. Members of an SP dispatch that broke (a member
died or left) and that still have not answered ``BROKEN_GRACE_S`` after the
break and after the dispatch's predicted end are killed sooner: they wait for
the lost member (NCCL collectives do not fail when a peer goes; gloo's do).
"""
from __future__ import annotations

import logging
import time

from genserve.dispatcher import Dispatcher
from genserve.inflight import InFlight
from genserve.recovery import RestartBackoff, SPRecovery
from genserve.requests import Requests
from genserve.tracked import Tracked
from genserve.types import EventType
from genserve.workers import protocol as P
from genserve.workers.executor import WorkerDied

log = logging.getLogger("genserve.engine")

# A dispatch this far past its predicted end (and at least OVERDUE_MIN_S) is
# logged: a hung worker (or a peer of its SP group) shows no other sign.
OVERDUE_FACTOR, OVERDUE_MIN_S = 10.0, 60.0
# The members of a broken SP dispatch (a member died or left the group) that
# have not answered this long after it broke, and after its predicted end,
# are killed as hung: they wait in a collective for the lost member. On gloo
# that collective fails within milliseconds; on NCCL it waits.
BROKEN_GRACE_S = 30.0


class WorkerLoss:
    """The workers' health as the engine sees it: which are down (restarting)
    or were killed for hanging, and the SP degree the executor can run now
    (``sp_degree``: 1 from a loss until every worker has joined a new world).
    It ends or restarts the requests and dispatches a loss touches."""

    def __init__(self, config, executor, requests: Requests, dispatcher: Dispatcher, metrics):
        self.config, self.executor, self.metrics = config, executor, metrics
        self.requests, self.dispatcher = requests, dispatcher
        self.down: set[int] = set()  # devices whose worker is restarting
        # devices whose worker the watchdog killed, until its death arrives -> how it was lost
        self.hung: dict[int, str] = {}
        self.recovery = SPRecovery(executor)
        self.restarts = RestartBackoff()
        for device_id in range(executor.num_devices):
            self.restarts.started(device_id)
        self.sp_degree = 0
        self._set_sp_degree(executor.max_sp_degree)

    def _set_sp_degree(self, degree: int) -> None:
        self.sp_degree = degree
        self.metrics.set_sp_max_degree(degree)

    def tick(self) -> None:
        """Restart the dead workers that are due; bring SP back once every worker is up."""
        for device_id in self.restarts.due():
            try:
                self.executor.respawn(device_id, standalone=True)  # its Ready arrives through wait()
            except Exception:  # (out of memory or processes): no restart due would leave it down for good
                delay = self.restarts.died(device_id)  # counts as a quick death: the next tries back off
                log.exception("worker %d could not be restarted; trying again in %.0f s", device_id, delay)
        self.recovery.tick(self.down, stuck=any(fl.broken and fl.pending
                                                for fl in self.dispatcher.inflight.values()))

    def watch_overdue(self, now: float) -> None:
        """Warn of a dispatch far past its predicted end; past ``hung_worker_s``
        too, kill (once) every worker it waits for: a stopped one cannot be told
        from SP peers blocked in a collective with it, which could not finish
        the dispatch anyway."""
        kill_s = self.config.hung_worker_s
        for dispatch_id, fl in self.dispatcher.inflight.items():
            predicted_s = max(fl.busy_until(d, 0.0) for d in fl.dispatch.device_ids) - fl.sent_s
            late_s = now - fl.sent_s - predicted_s
            if fl.broken and fl.pending and not fl.killed and 0 < kill_s:
                since_s = now - max(fl.broken_s, fl.sent_s + predicted_s)
                if since_s > min(BROKEN_GRACE_S, kill_s):
                    fl.killed = True
                    stuck = sorted(fl.pending)
                    log.error("dispatch %d of %s on device(s) %s broke %.0f s ago (a member died or left "
                              "its SP group) and worker(s) %s have not answered: stuck in a collective "
                              "with it; killing them to restart them", dispatch_id, ", ".join(fl.dispatch.req_ids),
                              list(fl.dispatch.device_ids), now - fl.broken_s, stuck)
                    self.hung.update((d, "was stuck in a collective with a lost SP member and was killed")
                                     for d in stuck)
                    self.executor.kill(stuck)
                    continue
            if late_s <= OVERDUE_FACTOR * predicted_s:
                continue
            what = (f"dispatch {dispatch_id} of {', '.join(fl.dispatch.req_ids)} on device(s) "
                    f"{list(fl.dispatch.device_ids)} is {late_s:.0f} s past its predicted {predicted_s:.3g} s")
            if not fl.overdue_logged and late_s > OVERDUE_MIN_S:
                fl.overdue_logged = True
                log.warning("%s: a worker there may be hung", what)
            if 0 < kill_s < late_s and not fl.killed:
                fl.killed = True
                hung = self._awaited(fl)
                log.error("%s, over --hung-worker-s %g: a worker there hangs; killing worker(s) %s to "
                          "restart them (their requests go on as after a crash)", what, kill_s, hung)
                self.hung.update((d, f"hung and was killed (--hung-worker-s {kill_s:g})") for d in hung)
                self.executor.kill(hung)

    def _awaited(self, fl: InFlight) -> list[int]:
        """The workers ``fl`` waits for: those exporting a state it needs
        while it waits to go out, else its members yet to report."""
        exporting = [self.requests.get(r) for r, data in fl.moving.items() if data is None]
        if exporting:  # (the Export went to the lowest holder)
            return sorted({min(t.holders) for t in exporting if t is not None and t.holders})
        return sorted(fl.pending)

    def on_lifecycle(self, device_id: int, msg) -> bool:
        """A worker died, came back, failed to come back or joined a new SP
        group; False for any other message."""
        if isinstance(msg, WorkerDied):
            self._on_worker_died(msg)
        elif isinstance(msg, P.Ready):
            log.info("worker %d is back", device_id)
            self.executor.ready[device_id] = msg
            self.down.discard(device_id)
        elif isinstance(msg, P.Failed) and device_id in self.down:  # a restarted worker that did not start
            log.error("worker %d failed to start: %s", device_id, msg.message)
        elif isinstance(msg, P.Rejoined):
            if self.recovery.answered(msg):
                log.info("sequence parallelism is back (groups of up to %d devices)",
                         self.executor.configured_sp_degree)
                self._set_sp_degree(self.executor.configured_sp_degree)
        else:
            return False
        return True

    def _loss(self, msg: WorkerDied) -> str:
        """How worker ``msg.device_id`` was lost, for logs and the requests' reasons."""
        return self.hung.get(msg.device_id, f"crashed (exit code {msg.exitcode})")

    def _on_worker_died(self, msg: WorkerDied) -> None:
        log.error("worker %d %s; restarting it", msg.device_id, self._loss(msg) if msg.device_id in self.hung
                  else f"died (exit code {msg.exitcode})")
        self.down.add(msg.device_id)
        now = time.monotonic()
        for dispatch_id, fl in list(self.dispatcher.inflight.items()):
            if fl.moving and self._involves(fl, msg.device_id):
                # not sent yet (a state move is awaited): it never will be
                self._withdraw(dispatch_id, now, msg)
            elif msg.device_id in fl.dispatch.device_ids:  # (what its leader said takes effect first)
                self.dispatcher.member_lost(dispatch_id, msg.device_id)
        for t in [t for t in self.requests if msg.device_id in t.holders]:
            self._lost_copy(t, msg)
        self.metrics.worker_restarted(msg.device_id)
        self.recovery.lost(msg.device_id)
        if self.sp_degree > 1:
            # a restarted process cannot join the running process groups
            log.warning("sequence parallelism is off until every worker has joined a new process group")
            self._set_sp_degree(1)
        self.hung.pop(msg.device_id, None)
        delay = self.restarts.died(msg.device_id)
        if delay > 0:
            log.warning("worker %d keeps dying soon after it starts (%d times in a row); restarting it in %.0f s",
                        msg.device_id, self.restarts.quick_deaths[msg.device_id], delay)

    def group_broke(self, device_id: int, dispatch_id: int) -> None:
        """Worker ``device_id`` reports that its SP group broke in dispatch
        ``dispatch_id``: a member died, or could not go on with the others
        and left the world (its step failed). It dropped the dispatch's
        requests. Without a death nothing else would tell the engine that the
        world is broken: SP goes off until every worker has joined a new one,
        as after a crash. (A death may also reach the engine just after the
        report it caused: the rejoin waits a moment for that.)"""
        fl = self.dispatcher.inflight.get(dispatch_id)
        for req_id in fl.dispatch.req_ids if fl is not None else ():
            t = self.requests.current(req_id, dispatch_id)
            if t is not None:
                t.holders.discard(device_id)
        if self.sp_degree > 1:
            log.warning("worker %d lost its SP group in dispatch %d; sequence parallelism is off until every "
                        "worker has joined a new process group", device_id, dispatch_id)
            self._set_sp_degree(1)
            self.recovery.broken()

    def _involves(self, fl: InFlight, device_id: int) -> bool:
        """``device_id`` is in the block of ``fl`` or holds a member's state."""
        return device_id in fl.dispatch.device_ids or any(
            device_id in t.holders for t in map(self.requests.get, fl.dispatch.req_ids) if t is not None)

    def _withdraw(self, dispatch_id: int, now: float, msg: WorkerDied) -> None:
        """Take back a dispatch that has not gone out because a worker died:
        its devices free and its requests wait again where their state is (the
        workers never saw it); a state only the dead one held is lost, which
        ``_lost_copy`` reports."""
        fl = self.dispatcher.withdraw(dispatch_id)
        for req_id in fl.dispatch.req_ids:
            t = self.requests.current(req_id, dispatch_id)
            if t is None:
                continue
            t.running, t.paused, t.dispatch_id = False, True, -1
            t.device_ids = tuple(sorted(t.holders))
            if t.cancel_requested:
                self.requests.finish(t, EventType.CANCELLED, "CANCELLED", "cancelled")
            elif t.holders != {msg.device_id}:
                t.emit(now, EventType.PREEMPTED,
                       reason=f"worker {msg.device_id} {self._loss(msg)} before its next step went out")

    def _lost_copy(self, t: Tracked, msg: WorkerDied) -> None:
        """A worker holding ``t``'s state died: go on from a surviving copy,
        else restart from step 0 (once), else fail it."""
        in_group = t.running and msg.device_id in t.device_ids
        t.holders.discard(msg.device_id)
        if t.holders and not in_group:
            return  # a replica on a live worker carries on
        if t.cancel_requested:  # Cancel answered True (or its last caller left): it ends as asked,
            t.running = False    # not restarted (excluded from plans, it would wait forever)
            self.requests.finish(t, EventType.CANCELLED, "CANCELLED", "cancelled")  # (drops the survivors' copies)
            return
        survivors = t.holders
        if survivors:  # its running group lost a member: the others stop at their next collective
            for device_id in survivors:
                self.executor.send(device_id, P.Drop((t.req.req_id,)))
        if t.crash_restarts >= 1:
            t.running = False
            self.requests.finish(t, EventType.FAILED, "UNAVAILABLE",
                                 f"worker {msg.device_id} {self._loss(msg)} while running this request, "
                                 "its second lost worker; not retrying")
            return
        t.restart_from_scratch()
        t.dispatch_id = -1  # whatever its last dispatch still reports is stale
        t.emit(time.monotonic(), EventType.PREEMPTED,
               reason=f"worker {msg.device_id} {self._loss(msg)}; restarting from step 0")
