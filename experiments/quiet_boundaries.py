"""Does GenServe need a decision at every step boundary? An experiment.

Simulating ``genserve`` costs ~36 policy decisions per request (one per step
boundary), which is why the simulator runs it at a few hundred requests per
second of wall time. About 33 of those 36 dispatches repeat the previous one
(the same requests on the same block). This script measures what skipping
them would cost: an *event-driven* variant of the simulator continues a
dispatch at its boundary without asking the policy when nothing happened
since that dispatch began (no arrival, no request ended or was refused, no
pause, no device released early by a decode), and asks the policy otherwise.
It is not a mode of the server or of ``genserve simulate``; it only answers
the question, on the standard setting (8 devices, reference-h100, 70/30
images/videos, 300 requests per run):

    python experiments/quiet_boundaries.py [--seeds 0,1,2] [--policy genserve]

Prints per (rate, SLO scale): attainment, decisions per request and
requests/s of wall time, every step decided vs event-driven. With ``--why``
(slow: a deep copy of the policy per boundary) it asks a copy of the policy
at every quiet boundary too, and counts what it would have done otherwise.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import Counter

from genserve.scheduler import ClusterSpec, LatencyModel, make_policy
from genserve.scheduler.runner import Experiment, resolve_workload
from genserve.scheduler.simulator import Simulator, _device_view
from genserve.scheduler.types import Dispatch
from genserve.scheduler.workload import WorkloadSpec, generate


class EventDriven(Simulator):
    """Asks the policy only at boundaries with an event since the ending
    dispatches began; otherwise re-dispatches them, one step each."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_event_s = -1.0
        self.ended: list[Dispatch] = []
        self.began_s: dict[tuple, float] = {}  # req_ids -> when their latest dispatch began

    def _pop_instant(self) -> bool:
        ended_before, self.ended = len(self.outcomes), []
        arrived = super()._pop_instant()
        if arrived or len(self.outcomes) != ended_before:
            self.last_event_s = self.now
        return arrived

    def _complete(self, disp, step_ms=None, batch=0, released=()):
        super()._complete(disp, step_ms, batch, released)
        if step_ms is not None:
            self.ended.append(disp)
        if step_ms is None or released:  # devices freed early, by a decode
            self.last_event_s = self.now

    def _apply(self, plan):
        if plan.preempted or plan.rejected:
            self.last_event_s = self.now
        super()._apply(plan)

    def _start(self, disp):
        self.began_s[disp.req_ids] = self.now
        super()._start(disp)

    def quiet(self) -> bool:
        return bool(self.ended) and self.last_event_s < self.now and all(
            all(r in self.views for r in d.req_ids)
            and self.began_s.get(d.req_ids, -2.0) > self.last_event_s
            and all(self.busy_view[x] is None for x in d.device_ids)
            for d in self.ended)

    def _decide(self):
        if not self.quiet():
            super()._decide()
            return
        for d in self.ended:
            self._start(Dispatch(d.req_ids, d.device_ids, 1))


class Why(EventDriven):
    """EventDriven, also asking a copy of the policy at each quiet boundary:
    ``why`` counts the boundaries and how its plan would have differed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.why: Counter = Counter()

    def _decide(self):
        if self.quiet():
            self._ask_a_copy()
        super()._decide()

    def _ask_a_copy(self) -> None:
        views = list(self.views.values())
        devices = [v or _device_view(d, True, self.now) for d, v in enumerate(self.busy_view)]
        plan = copy.deepcopy(self.policy).plan(self.now, views, devices, copy.deepcopy(self.cost))
        ended = {(d.req_ids, tuple(d.device_ids)) for d in self.ended}
        self.why["quiet boundaries"] += 1
        if {(d.req_ids, tuple(d.device_ids)) for d in plan.dispatches} == ended and not plan.preempted:
            return
        self.why["plan differs"] += 1
        continuing = {r for d in self.ended for r in d.req_ids}
        planned = {r for d in plan.dispatches for r in d.req_ids}
        if continuing - planned:
            self.why["pauses a continuing request"] += 1
        for kind in {self.views[r].task + (" resumed" if self.views[r].steps_done else " started")
                     for r in planned - continuing}:
            self.why[f"also: {kind}"] += 1
        for d in plan.dispatches:
            for e in self.ended:
                if d.req_ids == e.req_ids and len(d.device_ids) != len(e.device_ids):
                    self.why["shrinks" if len(d.device_ids) < len(e.device_ids) else "grows"] += 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rates", default="0.2,0.4,0.6")
    p.add_argument("--scales", default="1.5,3.0")
    p.add_argument("--policy", default="genserve")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--why", action="store_true",
                   help="count how the policy would have planned the quiet boundaries (slow; the "
                        "event-driven requests/s then include the copies)")
    args = p.parse_args(argv)
    cost = LatencyModel.load("reference-h100")
    cluster = ClusterSpec(8)
    print(f"{'rate':>5} {'scale':>5} | {'every step: att':>15} {'dec/req':>7} {'req/s':>6} | "
          f"{'event-driven: att':>17} {'dec/req':>7} {'req/s':>6}")
    for rate in map(float, args.rates.split(",")):
        for scale in map(float, args.scales.split(",")):
            cols, why = [], Counter()
            for cls in (Simulator, Why if args.why else EventDriven):
                att, dec, speed = [], [], []
                for seed in map(int, args.seeds.split(",")):
                    trace = generate(WorkloadSpec(rate_rps=rate, num_requests=args.num_requests,
                                                  seed=seed))
                    wl = resolve_workload(Experiment(cluster, cost.profile), trace, scale)
                    sim = cls(make_policy(args.policy, cluster), wl, cluster, cost.fresh())
                    t0 = time.perf_counter()
                    res = sim.run()
                    wall = time.perf_counter() - t0
                    why += getattr(sim, "why", Counter())
                    att.append(sum(o.met_slo for o in res.outcomes) / len(wl))
                    dec.append(len(res.decision_ms) / len(wl))
                    speed.append(len(wl) / wall)
                cols.append(f"{statistics.mean(att):>{15 if cls is Simulator else 17}.3f} "
                            f"{statistics.mean(dec):>7.1f} {statistics.median(speed):>6.0f}")
            print(f"{rate:>5} {scale:>5} | {cols[0]} | {cols[1]}", flush=True)
            if why:
                print("      at quiet boundaries, a copy of the policy: "
                      + ", ".join(f"{k} {v}" for k, v in why.most_common()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
