"""The device worker: holds the models and every request's state between steps.

One worker per device. It answers ``RunSteps`` with a ``StepDone`` after each
step and one ``DispatchDone``; errors in a step fail that step's requests with
a status and the worker goes on. The same ``Worker.serve`` loop runs in a
spawned process (serving) or a thread (unit tests); startup.py loads the
models, warms them up and is the process's entry point.

A video's step may run on a block of devices (sequence parallelism): every
member holds the request's full state, computes its shard of the sequence,
and applies the same all-gathered update, so members stay identical and any
one of them can continue alone later. The block's first member leads: it
decides each step (honouring cancels), reports steps and decodes the result.
A member that dies mid-dispatch breaks the block's collectives: the others
drop that dispatch's requests and go on (the engine restarts them).
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass

from genserve.config import Limits
from genserve.models.base import CollectiveError, RequestState, synchronize, tensors_in
from genserve.workers import protocol as P
from genserve.workers.parallel import DistSpec, Groups, state_from_bytes, state_to_bytes

log = logging.getLogger("genserve.worker")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """How to start one worker. Plain data, so it pickles into a spawned process."""

    device_id: int
    device: str  # "cpu", "cuda:0", ...
    model_specs: tuple[str, ...]  # preset names or NAME=PATH
    dtype: str = "float32"
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    dist: DistSpec | None = None  # join an SP world (None: degree 1 only)
    paused_budget_mb: float = 0.0  # device memory for paused states; 0: no limit (CPU)
    attention: str = "sdpa"  # attention kernel: sdpa | xformers (CUDA only)
    log_level: int = logging.INFO  # the server's (DEBUG with --verbose)
    caps: Limits = Limits()  # the operator's --max-* caps: the warm-up stays within them
    log_format: str = "text"  # the server's --log-format (genserve.logs)


@dataclass(slots=True)
class _Live:
    """A request resident on this worker."""

    new: P.NewRequest
    state: RequestState
    last_used_s: float = 0.0
    on_host: bool = False  # offloaded to host memory while paused


class Worker:
    def __init__(self, spec: WorkerSpec, models: dict, groups: Groups | None = None):
        self.spec, self.models, self.groups = spec, models, groups
        self.live: dict[str, _Live] = {}
        self._joining: threading.Thread | None = None  # a Rejoin in progress
        self._deferred: list = []  # messages held until the running dispatch ends
        self._stopping = False  # a Shutdown arrived during a dispatch: exit after it

    # ---- the loop -------------------------------------------------------
    def serve(self, conn, ready: P.Ready) -> None:
        """Send ``ready``, then answer the engine until Shutdown or its pipe closes."""
        conn = _LockedConn(conn)  # a Rejoin replies from its own thread
        conn.send(ready)
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if isinstance(msg, P.Shutdown):
                return
            self.handle(msg, conn)
            if self._stopping:
                return

    def handle(self, msg, conn) -> None:
        if isinstance(msg, P.RunSteps):
            conn.send(self.run_steps(msg, conn))
            self._enforce_budget()
            while self._deferred:
                self.handle(self._deferred.pop(0), conn)
        elif isinstance(msg, P.Drop):
            self.drop(msg.req_ids)
        elif isinstance(msg, P.Export):
            for r in msg.req_ids:
                live = self.live.get(r)
                conn.send(P.Exported(r, state_to_bytes(live.state) if live else b""))
                if live is not None:  # state_to_bytes moved it to the host
                    live.on_host = True
        elif isinstance(msg, P.Rejoin):
            self.rejoin(msg.dist, conn)
        else:
            log.error("worker %d: unknown message %r", self.spec.device_id, type(msg))

    def rejoin(self, dist: DistSpec, conn) -> None:
        """Leave the old world and join ``dist`` on a thread of its own: the
        join waits for every rank, and this worker goes on running the steps
        it is sent meanwhile (single-device ones: the engine sends no SP step
        until every worker has answered)."""
        if self._joining is not None and self._joining.is_alive():
            conn.send(P.Rejoined(self.spec.device_id, dist.init_method, False,
                                 "an earlier join is still in progress"))
            return

        def join() -> None:
            old, self.groups = self.groups, None
            try:
                if old is not None:
                    old.close()
                self.groups = Groups.join(dist, self.spec.device_id, self.spec.device)
                reply = P.Rejoined(self.spec.device_id, dist.init_method, True)
            except Exception as exc:
                log.error("worker %d could not join the new world: %s", self.spec.device_id, exc)
                reply = P.Rejoined(self.spec.device_id, dist.init_method, False, str(exc))
            try:
                conn.send(reply)
            except (OSError, EOFError):
                pass  # the engine is gone

        self._joining = threading.Thread(target=join, name="genserve-rejoin", daemon=True)
        self._joining.start()

    def drop(self, req_ids) -> list[str]:
        return [r for r in req_ids if self.live.pop(r, None) is not None]

    # ---- one dispatch ---------------------------------------------------
    def run_steps(self, msg: P.RunSteps, conn) -> P.DispatchDone:
        """Run one dispatch; its report. A collective of an SP dispatch that
        fails (a member died) ends the dispatch, not this worker."""
        try:
            return self._run_steps(msg, conn)
        except CollectiveError as exc:
            return self._group_lost(msg, exc)

    def _run_steps(self, msg: P.RunSteps, conn) -> P.DispatchDone:
        block = msg.device_ids or (self.spec.device_id,)
        leader = block[0] == self.spec.device_id
        t0 = time.perf_counter()
        failed = self._admit_all(msg, block)
        synchronize(self.spec.device)
        encode_ms = (time.perf_counter() - t0) * 1e3
        batch = [r for r in msg.req_ids if r in self.live]
        failed += [P.Failed(r, "INTERNAL", f"worker {self.spec.device_id} holds no state for {r}")
                   for r in msg.req_ids if r not in self.live and all(f.req_id != r for f in failed)]
        finished: list[P.Finished] = []
        sp = len(block) > 1
        for _ in range(msg.num_steps):
            batch = [r for r in batch if r in self.live and not self.live[r].state.done]
            if sp:
                batch = self._agree(msg, batch, block, leader, failed)
            elif self._stopping:  # the server is going: no more steps
                break
            if not batch:
                break
            step_failed = self._one_step(msg, batch, block, leader, conn)
            if step_failed and sp:
                return self._leave_group(msg, failed + step_failed, "its step failed")
            failed += step_failed
            for r in [r for r in batch if r in self.live and self.live[r].state.done]:
                if not leader:  # the leader decodes; the other members just let go
                    self.live.pop(r)
                    continue
                result = self._finish(r)
                (finished if isinstance(result, P.Finished) else failed).append(result)
            if leader:
                self._poll_drops(conn, batch, failed, block)
        paused = tuple(r for r in msg.req_ids if r in self.live)
        return P.DispatchDone(msg.dispatch_id, paused, tuple(finished), tuple(failed), encode_ms)

    def _agree(self, msg: P.RunSteps, batch: list[str], block: tuple[int, ...], leader: bool,
               failed: list[P.Failed]) -> list[str]:
        """Before each step of an SP dispatch, its members agree on the batch,
        since each must enter the step's collectives with the same one: the
        leader says whether to go on (not when the server is going), and the
        batch is the requests every member holds. A request one member lacks
        (its preparation failed there; the leader dropped it on a cancel)
        leaves them all, while the others go on; the leader fails it. So no
        member steps alone, and the group holds together (before, a member
        lacking the whole batch left the world, which turned SP off until a
        rejoin, and an NCCL peer would have waited in the step for it)."""
        votes = [0 if leader and self._stopping else 1] + [int(r in batch) for r in msg.req_ids]
        go, *held = self.groups.agree(votes, block)
        if not go:
            return []
        agreed = [r for r, ok in zip(msg.req_ids, held) if ok]
        for r in batch:
            if r not in agreed:
                self.live.pop(r, None)
                if all(f.req_id != r for f in failed):
                    # (only the leader's report reaches the engine; a member's line here may stand for a cancel)
                    failed.append(P.Failed(r, "INTERNAL", f"its preparation failed on another member of "
                                                          f"its SP group {list(block)} (that worker logged why)"))
        return agreed

    def _group_lost(self, msg: P.RunSteps, exc: CollectiveError) -> P.DispatchDone:
        """A collective of this SP dispatch failed: a member of its block died
        or left the world (``_leave_group``). The batch's states may be
        half-updated and the members out of step, so they go, and the dispatch
        ends with no further collective. After a death the engine has already
        taken it (``Executor.wait`` puts it before the survivors' replies, and
        the dead one's connections close only as it dies): it restarted these
        requests, so this report is stale and their 'failed' reaches no client.
        After a member left, the leader's report ends them. This worker leaves
        the world too; it joins a new one on the Rejoin that follows, and
        meanwhile the engine sends only single-device work."""
        block = list(msg.device_ids)
        log.error("worker %d: SP group %s broke in dispatch %d; dropping %s and going on: %s",
                  self.spec.device_id, block, msg.dispatch_id, ", ".join(msg.req_ids), exc)
        # Leave the broken world now: a third member can be waiting in the same
        # collective for data from this one that will never come; this rank's
        # connections closing fails it at once.
        self.groups.close()
        self.drop(msg.req_ids)
        reason = f"worker {self.spec.device_id} lost its SP group {block}: {exc}"
        failed = tuple(P.Failed(r, "UNAVAILABLE", reason) for r in msg.req_ids)
        return P.DispatchDone(msg.dispatch_id, (), (), failed, 0.0, group_lost=True)

    def _leave_group(self, msg: P.RunSteps, failed: list[P.Failed], why: str) -> P.DispatchDone:
        """This member cannot go on with its SP group (``why``: its step
        failed, e.g. out of device memory) while the others, inside the same
        step, would wait for it in their next collective for as long as a
        collective waits (gloo: 30 min). It leaves the world, which fails their
        collectives at once (gloo; measured within milliseconds; on NCCL the
        engine kills them 30 s after the break: worker_loss), so they end
        the dispatch as after a member's death; its requests go, and the report
        tells the engine the group is lost: SP is off until every worker has
        joined a new world, as after a crash."""
        block = list(msg.device_ids)
        log.error("worker %d: leaving SP group %s in dispatch %d: %s", self.spec.device_id, block,
                  msg.dispatch_id, why)
        self.groups.close()
        self.drop(msg.req_ids)
        reason = f"worker {self.spec.device_id} left its SP group {block}: {why}"
        done = {f.req_id for f in failed}
        failed = [*failed, *(P.Failed(r, "UNAVAILABLE", reason) for r in msg.req_ids if r not in done)]
        return P.DispatchDone(msg.dispatch_id, (), (), tuple(failed), 0.0, group_lost=True)

    def _admit_all(self, msg: P.RunSteps, block: tuple[int, ...]) -> list[P.Failed]:
        """Create the state of requests new to this worker; bring back offloaded ones."""
        failed = []
        if msg.state_src >= 0:  # every member joins the broadcast, holder or not
            failed += self._receive_from_peer(msg, block)
        for new in msg.new:
            if new.source == P.PEER:
                continue
            try:
                self._admit(new)
            except Exception as exc:  # bad params, OOM: fail the request, not the worker
                log.exception("prepare failed for %s", new.req_id)
                failed.append(P.Failed(new.req_id, "INTERNAL", f"prepare failed: {exc}"))
        for r in msg.req_ids:
            live = self.live.get(r)
            if live is not None and live.on_host:
                live.state, live.on_host = live.state.to(self.spec.device), False
        return failed

    def _admit(self, new: P.NewRequest) -> None:
        model = self.models[new.model]
        if new.source == P.BYTES:
            state = state_from_bytes(new.state, self.spec.device)
        else:
            state = model.prepare(new.params, model.encode_prompt(new.params))
        self.live[new.req_id] = _Live(new, state, time.monotonic())

    def _receive_from_peer(self, msg: P.RunSteps, block: tuple[int, ...]) -> list[P.Failed]:
        peers = {n.req_id: n for n in msg.new if n.source == P.PEER}
        sending = self.spec.device_id == msg.state_src
        for r in msg.req_ids:
            mine = self.live.get(r) if sending else None
            if mine is not None:  # pickled on the host; _admit_all moves it back
                mine.state, mine.on_host = mine.state.to("cpu"), True
            state = self.groups.broadcast_object(mine.state if mine else None, msg.state_src, block)
            if r in peers:
                self.live[r] = _Live(peers[r], state.to(self.spec.device), time.monotonic())
        return []

    def _one_step(self, msg: P.RunSteps, batch: list[str], block, leader: bool, conn) -> list[P.Failed]:
        states = [self.live[r].state for r in batch]
        t0 = time.perf_counter()
        try:
            model = self.models[msg.model]
            if len(block) > 1:
                from genserve.models.sp import SPGroup
                sp = SPGroup(self.groups.group(block), block.index(self.spec.device_id), len(block),
                             self.spec.attention)
                model.denoise_step(states, sp=sp)
            else:
                model.denoise_step(states)
            synchronize(self.spec.device)
        except CollectiveError:
            raise  # the SP group broke: the whole dispatch ends (run_steps)
        except Exception as exc:
            log.error("step failed on worker %d: %s", self.spec.device_id, traceback.format_exc())
            self.drop(batch)
            return [P.Failed(r, "INTERNAL", f"denoising step failed: {exc}") for r in batch]
        now = time.monotonic()
        for r in batch:
            self.live[r].last_used_s = now
        if leader:
            conn.send(P.StepDone(msg.dispatch_id, tuple(batch), tuple(s.step_index for s in states),
                                 (time.perf_counter() - t0) * 1e3))
        return []

    def _finish(self, req_id: str):
        from genserve.models.media import encode_media

        live = self.live.pop(req_id)
        t0 = time.perf_counter()
        try:
            frames = self.models[live.new.model].decode(live.state)
            data, mime = encode_media(frames, live.new.output_format, live.new.fps)
        except Exception as exc:
            log.exception("decode failed for %s", req_id)
            return P.Failed(req_id, "INTERNAL", f"decode failed: {exc}")
        n, h, w = frames.shape[:3]
        return P.Finished(req_id, data, mime, w, h, n, (time.perf_counter() - t0) * 1e3)

    def _poll_drops(self, conn, batch: list[str], failed: list[P.Failed], block: tuple[int, ...]) -> None:
        """Between steps, honour Drop messages (cancels) that arrived meanwhile,
        and the Export and Rejoin messages that need not wait for the dispatch."""
        while conn.poll():
            msg = conn.recv()
            if isinstance(msg, P.Drop):
                for r in self.drop(msg.req_ids):
                    if r in batch:
                        failed.append(P.Failed(r, "CANCELLED", "cancelled"))
            elif isinstance(msg, P.Export):
                self.handle(msg, conn)
            elif isinstance(msg, P.Rejoin):
                if len(block) == 1:  # this dispatch uses no process group: join beside it
                    self.handle(msg, conn)
                else:  # an old-world SP dispatch: leave that world once it ends
                    self._deferred.append(msg)
            elif isinstance(msg, P.Shutdown):  # the server stops while this dispatch runs
                self._stopping = True
            else:  # only Drop, Export, Rejoin and Shutdown may arrive while a dispatch runs
                log.error("worker %d: unexpected %r during a dispatch", self.spec.device_id, type(msg))

    def _enforce_budget(self) -> None:
        """Move the least recently used paused states to host memory while the
        device holds more than its budget of them."""
        budget = self.spec.paused_budget_mb * 2**20
        if budget <= 0 or self.spec.device == "cpu":
            return
        resident = sorted((l for l in self.live.values() if not l.on_host), key=lambda l: l.last_used_s)
        total = sum(_state_bytes(l.state) for l in resident)
        for live in resident:
            if total <= budget:
                break
            total -= _state_bytes(live.state)
            live.state, live.on_host = live.state.to("cpu"), True


class _LockedConn:
    """A worker's pipe with sends serialised: replies come from the serving
    loop and from a join thread."""

    def __init__(self, conn):
        self._conn, self._lock = conn, threading.Lock()

    def send(self, msg) -> None:
        with self._lock:
            self._conn.send(msg)

    def recv(self):
        return self._conn.recv()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._conn.poll(timeout)


def _state_bytes(state: RequestState) -> int:
    """Device memory ``state`` holds: its tensors off the host (its noise
    scheduler's history included), each once (the state and its scheduler
    share the timesteps)."""
    seen, total = set(), 0
    for t in tensors_in(state):
        if t.device.type != "cpu" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
