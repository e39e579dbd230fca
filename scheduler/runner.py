"""Running policies over workloads: the library behind ``genserve simulate``
and the benchmark scripts (no argparse, no printing)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from .latency import LatencyModel
from .metrics import summarize
from .policies import make_policy
from .profile import Profile
from .simulator import simulate
from .types import IMAGE, ClusterSpec
from .workload import Request, TraceRequest, WorkloadSpec, generate, resolve


@dataclass(frozen=True, slots=True)
class Experiment:
    """One simulated experiment: a cluster, a planning profile, the hardware's
    true behaviour, and the policy options shared by every policy."""

    cluster: ClusterSpec
    profile: Profile
    true_profile: Profile | None = None  # None: the hardware follows ``profile``
    true_scale: float = 1.0  # true step and decode times × this
    noise_cv: float = 0.0
    seed: int = 0
    check: bool = True
    policy_options: dict = field(default_factory=dict)


def scaled_profile(profile: Profile, factor: float) -> Profile:
    """The same profile with every step, decode and encode time multiplied by ``factor``."""
    models = tuple(replace(m, steps=tuple(replace(p, step_ms=p.step_ms * factor) for p in m.steps),
                           decodes=tuple(replace(p, decode_ms=p.decode_ms * factor)
                                         for p in m.decodes),
                           encode_ms=m.encode_ms * factor) for m in profile.models)
    return replace(profile, models=models, name=f"{profile.name}x{factor:g}")


def image_work_share(requests: Sequence[Request], cost: LatencyModel, video_degree: int) -> float:
    """Share of device time images need, images at degree 1 and videos at
    ``video_degree``: the demand-matched split for the static baseline."""
    work = {True: 0.0, False: 0.0}
    for r in requests:
        k = 1 if r.task == IMAGE else video_degree
        ms = (cost.encode_ms(r.model) + r.num_steps * cost.step_ms(
            r.model, r.width, r.height, r.num_frames, k, 1)
            + cost.decode_ms(r.model, r.width, r.height, r.num_frames, k))
        work[r.task == IMAGE] += k * ms
    total = work[True] + work[False]
    return work[True] / total if total else 0.5


def slo_devices(cluster: ClusterSpec) -> Callable[[str], int]:
    """The devices a model's default SLO is taken at (its isolated latency):
    the cluster's, within a video model's own SP limit (``resolve``)."""
    return lambda model: min(cluster.num_devices, cluster.video_sp_limit(model))


def resolve_workload(exp: Experiment, trace: Sequence[TraceRequest],
                     slo_scale: float) -> tuple[Request, ...]:
    return resolve(trace, LatencyModel(exp.profile), slo_scale, slo_devices(exp.cluster))


def run_one(exp: Experiment, policy: str, requests: Sequence[Request],
            on_progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Summary (metrics.summarize) of one policy over resolved requests;
    ``on_progress(ended, total, wall_s)`` is called every few seconds of a
    long simulation."""
    plan_cost = LatencyModel(exp.profile)
    true_profile = exp.true_profile or exp.profile
    if exp.true_scale != 1.0:
        true_profile = scaled_profile(true_profile, exp.true_scale)
    true_cost = LatencyModel(true_profile) if true_profile is not exp.profile else plan_cost.fresh()
    options = dict(exp.policy_options)
    if policy == "static" and options.get("static_image_fraction") is None:
        return _best_static(exp, requests, options)
    pol = make_policy(policy, exp.cluster, **options)
    result = simulate(pol, requests, exp.cluster, plan_cost, true_cost, exp.noise_cv,
                      exp.seed, exp.check, on_progress)
    summary = summarize(result)
    errors = plan_cost.prediction_error()
    if errors:
        n = sum(e.count for e in errors)
        summary["prediction_mean_abs_rel_error"] = sum(
            e.mean_abs_rel_error * e.count for e in errors) / n
    return summary


def _best_static(exp: Experiment, requests, options: dict) -> dict:
    """The static baseline at its best split for this workload (an oracle: it
    tries every image share of whole devices and keeps the best attainment)."""
    n = exp.cluster.num_devices
    shares = [i / n for i in range(1, n)] if n <= 16 else [i / 16 for i in range(1, 16)]
    best = None
    for share in shares or [0.5]:
        trial = replace(exp, policy_options={**options, "static_image_fraction": share})
        summary = run_one(trial, "static", requests)
        summary["static_image_fraction"] = share
        if best is None or summary["attainment"] > best["attainment"]:
            best = summary
    best["static_demand_share"] = image_work_share(requests, LatencyModel(exp.profile),
                                                   options.get("fixed_sp_degree") or 4)
    return best


# progress(done, total, label, wall_s): called as each simulation ends
Progress = Callable[[int, int, str, float], None]
# heartbeat(label, requests ended, requests in all, wall_s): called every few
# seconds while one simulation runs, in the process that runs it (so it must
# pickle: a module-level function or class instance)
Heartbeat = Callable[[str, int, int, float], None]


def _run_job(job):
    index, exp, policy, requests, label, heartbeat = job
    beat = None if heartbeat is None else (
        lambda ended, total, wall_s: heartbeat(label, ended, total, wall_s))
    t0 = time.perf_counter()
    return index, run_one(exp, policy, requests, beat), time.perf_counter() - t0


def run_policies(exp: Experiment, policies: Sequence[str], requests: Sequence[Request],
                 jobs: int = 1, progress: Progress | None = None,
                 heartbeat: Heartbeat | None = None) -> dict[str, dict]:
    work = [(exp, p, requests, p) for p in policies]
    return dict(zip(policies, _map(work, jobs, progress, heartbeat)))


def sweep(exp: Experiment, policies: Sequence[str], spec: WorkloadSpec | None,
          trace: Sequence[TraceRequest] | None, param: str, values: Sequence[float],
          slo_scale: float, jobs: int = 1, progress: Progress | None = None,
          heartbeat: Heartbeat | None = None) -> list[dict]:
    """Summaries per point of a sweep over ``rate`` or ``slo_scale``; a trace
    can only sweep ``slo_scale``."""
    if param not in ("rate", "slo_scale"):
        raise ValueError("param must be rate or slo_scale")
    if param == "rate" and spec is None:
        raise ValueError("a rate sweep needs a generated workload")
    work, points = [], []
    for x in values:
        base = trace if trace is not None else generate(
            replace(spec, rate_rps=x) if param == "rate" else spec)
        requests = resolve_workload(exp, base, x if param == "slo_scale" else slo_scale)
        points.append(x)
        work += [(exp, p, requests, f"{p} at {param.replace('_', ' ')} {x:g}") for p in policies]
    results = _map(work, jobs, progress, heartbeat)
    out = []
    for i, x in enumerate(points):
        chunk = results[i * len(policies):(i + 1) * len(policies)]
        out.append({"x": x, "policies": dict(zip(policies, chunk))})
    return out


def _map(work: list, jobs: int, progress: Progress | None = None,
         heartbeat: Heartbeat | None = None) -> list:
    """Each (exp, policy, requests, label) of ``work`` run, results in order."""
    work = [(i, *w, heartbeat) for i, w in enumerate(work)]
    out: list = [None] * len(work)

    def collect(done_jobs):
        for n, (i, summary, wall_s) in enumerate(done_jobs, 1):
            out[i] = summary
            if progress is not None:
                progress(n, len(work), work[i][4], wall_s)

    if jobs <= 1 or len(work) <= 1:
        collect(_run_job(w) for w in work)
        return out
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(jobs, len(work), os.cpu_count() or 1)) as pool:
        collect(pool.imap_unordered(_run_job, work))
    return out
