"""``compare``: one workload against several policies, live and simulated.

Live: per policy, either start a server (``genserve serve --policy P``, one at
a time, stopped before the next) or use a running one (``NAME=HOST:PORT``);
each run is a normal run directory under ``OUT/live-NAME``. Simulated: the
same requests through ``genserve.scheduler.simulator`` with a latency profile,
on a cluster shaped like the live one. ``profile="auto"`` measures one through
the API (``calibrate.py``) on every live server before its run (the same
warm-up for all) and simulates with the first server's (``OUT/profile.json``).

SLOs: live and simulated runs share the ones the workload carries
(``--slo-ms-*``, or ``--slo-scale`` with a named profile), and with
``profile="auto"`` and ``slo_scale`` the ones the simulator computes from the
first server's measured profile (set before the first run, sent to every
server). Requests with ``slo_ms=0`` get ``sim_slo_scale`` x isolated latency
in the simulator and each server's own ``--default-slo-scale`` live; without
a profile ``--slo-scale`` can reach only the servers compare starts, so running
targets are warned about.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from genserve.scheduler.workload import TraceRequest, write_trace

from genserve.scheduler.profile import save_profile

from .calibrate import calibrate
from .launch import LaunchedServer, ServerStartError
from .plots import compare_bars
from .run import TASKS, check_server, check_workload, run_load, write_run
from .runner import RunOptions

CLASSES = ("all", "image", "video")
AUTO = "auto"


@dataclass(frozen=True, slots=True)
class CompareOptions:
    """Which policies, where, and how to simulate them."""

    policies: tuple[str, ...] = ()  # start a server per policy
    targets: tuple[tuple[str, str], ...] = ()  # (name, HOST:PORT) of running servers
    num_workers: int = 2
    server_args: tuple[str, ...] = ()  # extra `genserve serve` flags
    profile: str = ""  # latency profile for the simulator ("": no simulation; "auto": measure it)
    slo_scale: float = 0.0  # --slo-scale: with "auto", live SLOs of requests without one (above)
    sim_slo_scale: float = 3.0  # SLO of slo_ms=0 requests in the simulator
    # The simulated cluster mirrors the live engine: SP up to the largest
    # power of two of its workers (0: derive it), state moves between
    # devices, images on one device (the SD3 adapter has no SP), batches of 8.
    sim_max_sp_degree: int = 0
    sim_migratable: bool = True
    sim_max_image_batch: int = 8
    sim_max_image_sp_degree: int = 1
    # (model, largest SP degree) of each video model, as the first live
    # server's ListModels tells them (a model whose heads split over fewer
    # devices runs on fewer); set by ``compare`` from the live runs
    sim_video_sp_limits: tuple[tuple[str, int], ...] = ()
    metrics: bool = True  # scrape launched servers' queue depth
    plots: bool = True  # PNGs of each run and compare.png


def sim_max_sp(copts: CompareOptions) -> int:
    """The simulated cluster's SP limit: as the live engine's unless set."""
    return copts.sim_max_sp_degree or 1 << (max(copts.num_workers, 1).bit_length() - 1)


def sim_cluster(copts: CompareOptions):
    """The simulated cluster, shaped like the live engine's."""
    from genserve.scheduler import ClusterSpec

    return ClusterSpec(copts.num_workers, max_sp_degree=sim_max_sp(copts), migratable=copts.sim_migratable,
                       max_image_batch=copts.sim_max_image_batch,
                       max_image_sp_degree=copts.sim_max_image_sp_degree,
                       video_sp_limits=copts.sim_video_sp_limits)


def video_sp_limits(models) -> tuple[tuple[str, int], ...]:
    """(name, max_sp_degree) of each video model a ListModels answer lists (an
    older server, which does not say, is left out: the cluster's limit applies)."""
    return tuple(sorted((m.name, m.max_sp_degree) for m in models
                        if TASKS.get(m.task) == "video" and m.max_sp_degree > 0))


def _calibrated(items: Sequence[TraceRequest], target: str, copts: CompareOptions, out_dir: Path,
                client_options: dict | None = None, *, first: bool) -> tuple[TraceRequest, ...]:
    """The items to send ``target``: with profile "auto", after measuring its
    profile; the first server's is the simulator's (``OUT/profile.json``) and,
    with ``copts.slo_scale``, gives each request without an SLO the one the
    simulator computes from it, so that every live run is sent the same."""
    if copts.profile != AUTO:
        return tuple(items)
    profile = calibrate(target, items, client_options=client_options)
    if not first:
        return tuple(items)
    save_profile(profile, out_dir / "profile.json")
    if not copts.slo_scale:
        return tuple(items)
    from genserve.scheduler.latency import LatencyModel

    from genserve.scheduler.runner import slo_devices

    from .plan import with_scaled_slos

    cost = LatencyModel.load(str(out_dir / "profile.json"))  # as simulate_policy loads it
    return with_scaled_slos(items, cost, copts.slo_scale, slo_devices(sim_cluster(copts)))


def run_live(items: Sequence[TraceRequest], run_opts: RunOptions, copts: CompareOptions,
             out_dir: Path, client_options: dict | None = None
             ) -> tuple[dict[str, dict], tuple[TraceRequest, ...], CompareOptions]:
    """Every live run: ({name: summary dict}, the items sent, with the SLOs
    ``_calibrated`` set, and ``copts`` with the first server's video SP
    limits). ``client_options`` (TLS credentials, token) are for the running
    ``targets``; servers this starts listen in plaintext on loopback."""
    results = {}
    names = [(p, "") for p in copts.policies] + list(copts.targets)
    for n, (name, target) in enumerate(names):
        run_dir = out_dir / f"live-{name.replace(':', '_')}"
        # each run its own ids (two targets may be one server): a fresh prefix, or PREFIX-NAME
        prefix = f"{run_opts.id_prefix}-{name}" if run_opts.id_prefix else ""
        if target:
            if n == 0:
                copts = _with_limits(copts, check_server(target, client_options))
            items = _calibrated(items, target, copts, out_dir, client_options, first=n == 0)
            result = run_load(items, replace(run_opts, target=target, id_prefix=prefix),
                              client_options=client_options)
        else:
            try:
                server = LaunchedServer(name, num_workers=copts.num_workers,
                                        args=copts.server_args, metrics=copts.metrics)
            except ServerStartError as err:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "server.log").write_text(err.output, encoding="utf-8")
                err.line += f" (its output: {run_dir / 'server.log'})"
                raise
            with server:
                try:
                    models = check_server(server.target)
                    check_workload(items, models, run_opts.output_format, f"the {name} server")
                    if n == 0:
                        copts = _with_limits(copts, models)
                    items = _calibrated(items, server.target, copts, out_dir, first=n == 0)
                    result = run_load(items, replace(run_opts, target=server.target, id_prefix=prefix),
                                      metrics_url=server.metrics_url)
                finally:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    server.save_log(run_dir / "server.log")
        print(f"\n== {name} (live)")
        results[name] = write_run(run_dir, result, items, plots=copts.plots).to_dict()
    return results, tuple(items), copts


def _with_limits(copts: CompareOptions, models) -> CompareOptions:
    """``copts`` with the video SP limits ``models`` (ListModels) tell, unless set."""
    if copts.sim_video_sp_limits:
        return copts
    return replace(copts, sim_video_sp_limits=video_sp_limits(models))


def simulate_policy(items: Sequence[TraceRequest], policy: str, copts: CompareOptions,
                    warmup_ids: frozenset[str] = frozenset()) -> dict:
    """The simulator's figures for one policy; attainment excludes ``warmup_ids``
    (ids ``r000000``... in arrival order, as ``resolve`` names them)."""
    from genserve.scheduler import LatencyModel, make_policy
    from genserve.scheduler.metrics import json_safe, summarize
    from genserve.scheduler.runner import slo_devices
    from genserve.scheduler.simulator import simulate
    from genserve.scheduler.workload import resolve

    cost = LatencyModel.load(copts.profile)
    cluster = sim_cluster(copts)
    requests = resolve(items, cost, copts.sim_slo_scale, slo_devices(cluster))
    try:
        result = simulate(make_policy(policy, cluster), requests, cluster, cost.fresh(), cost.fresh())
    except Exception as err:  # noqa: BLE001 - one policy's failure must not lose the live runs
        return {"summary": {"error": f"{type(err).__name__}: {err}"}}
    measured = [o for o in result.outcomes if o.req_id not in warmup_ids]
    figures = {"summary": json_safe(summarize(result))}
    for name in CLASSES:
        group = [o for o in measured if name == "all" or o.task == name]
        figures[f"sim {name}"] = sum(o.met_slo for o in group) / len(group) if group else None
    return figures


def warmup_ids(items: Sequence[TraceRequest], run_opts: RunOptions) -> frozenset[str]:
    """The simulator ids of requests the live run counts as warm-up (open loop)."""
    ordered = sorted(range(len(items)), key=lambda i: items[i].arrival_s)
    return frozenset(f"r{rank:06d}" for rank, i in enumerate(ordered)
                     if i < run_opts.warmup_requests or items[i].arrival_s < run_opts.warmup_s)


def compare(items: Sequence[TraceRequest], run_opts: RunOptions, copts: CompareOptions,
            out_dir: str | Path, client_options: dict | None = None) -> dict:
    """Run everything, write ``compare.json`` (and ``compare.png`` unless
    ``copts.plots`` is off); returns the table rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _notes(copts)
    live, items, copts = run_live(items, run_opts, copts, out, client_options)
    write_trace(out / "workload.jsonl", items)  # with the SLOs sent (profile "auto")
    if copts.profile == AUTO:
        copts = replace(copts, profile=str(out / "profile.json"))
    rows: dict[str, dict] = {}
    for name, summary in live.items():
        rows[name] = {f"live {c}": summary["classes"].get(c, {}).get("attainment") for c in CLASSES}
        rows[name]["live goodput/s"] = summary["goodput_per_s"]
    if copts.profile:
        from genserve.scheduler import POLICY_NAMES

        skip = warmup_ids(items, run_opts)
        for name in list(live) or list(copts.policies):
            if name in POLICY_NAMES:
                sim = simulate_policy(items, name, copts, skip)
                rows.setdefault(name, {}).update({k: v for k, v in sim.items() if k != "summary"})
                rows[name]["sim detail"] = sim["summary"]
    doc = {"rows": rows, "live": live, "options": _jsonable(copts), "num_requests": len(items)}
    (out / "compare.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if copts.plots:
        bars = {n: {k: v for k, v in r.items() if k.split()[-1] in CLASSES} for n, r in rows.items()}
        compare_bars(bars, out / "compare.png")
    print("\n" + format_compare(rows))
    return rows


def _notes(copts: CompareOptions) -> None:
    """What the table cannot show: running targets that keep their own SLO
    scale, and targets the simulator cannot run (it knows a policy by its
    name: the sim columns of another name read as a simulation that failed)."""
    from genserve.scheduler import POLICY_NAMES

    if copts.slo_scale and not copts.profile and copts.targets:
        print(f"loadgen: warning: --slo-scale {copts.slo_scale:g} without --profile reaches only the "
              f"servers compare starts (as --default-slo-scale); the running target(s) "
              f"{', '.join(repr(name) for name, _ in copts.targets)} give requests their own default "
              f"SLOs (--profile, or auto, sends every server the same SLOs)", file=sys.stderr)

    for name, _ in copts.targets if copts.profile else ():
        if name not in POLICY_NAMES:
            print(f"loadgen: note: target {name!r} is not a policy name, so it is not simulated "
                  f"(its sim columns read -); name it after its server's --policy "
                  f"({', '.join(POLICY_NAMES)}) to simulate that policy", file=sys.stderr)


def _jsonable(copts: CompareOptions) -> dict:
    return {"policies": list(copts.policies), "targets": [list(t) for t in copts.targets],
            "num_workers": copts.num_workers, "server_args": list(copts.server_args),
            "profile": copts.profile, "slo_scale": copts.slo_scale, "sim_slo_scale": copts.sim_slo_scale,
            "sim_max_sp_degree": copts.sim_max_sp_degree,
            "sim_video_sp_limits": dict(copts.sim_video_sp_limits)}


def _pct(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * 100:.1f}%"


def format_compare(rows: dict[str, dict]) -> str:
    """One line per policy: live and simulated attainment side by side."""
    cols = [f"{src} {c}" for src in ("live", "sim") for c in CLASSES]
    head = f"{'policy':<24}" + "".join(f"{c:>12}" for c in cols) + f"{'goodput/s':>11}"
    lines = [head, "-" * len(head)]
    for name, row in rows.items():
        good = row.get("live goodput/s")
        lines.append(f"{name:<24}" + "".join(f"{_pct(row.get(c)):>12}" for c in cols)
                     + f"{'-' if good is None else format(good, '.3f'):>11}")
    return "\n".join(lines)
