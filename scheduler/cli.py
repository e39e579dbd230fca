"""``genserve simulate``: run policies over a workload in the simulator.

Mount it under the main CLI with ``add_simulate_parser(subparsers)``; it also
runs standalone: ``python -m genserve.scheduler.cli simulate --help``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from .metrics import json_safe
from .policies import BASELINES, POLICY_NAMES, make_policy
from .profile import load_profile
from .runner import Experiment, resolve_workload, run_policies, sweep
from .types import ClusterSpec
from .workload import WorkloadSpec, generate, parse_shapes, read_trace, truncate, write_trace

DEFAULT_POLICIES = ("genserve",) + BASELINES
GENERATED_REQUESTS = 300  # --num-requests of a generated workload when not given


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="run scheduling policies in the discrete-event simulator",
        description="Run scheduling policies over a generated workload or a trace "
                    "file in the simulator (same policy code as the server).")
    g = p.add_argument_group("cluster and profile")
    g.add_argument("--devices", type=int, default=8, help="number of devices (default 8)")
    g.add_argument("--max-sp-degree", type=int, default=8)
    g.add_argument("--max-image-sp-degree", type=int, default=8,
                   help="largest block an image batch may use (1 models the live CPU server's SD3 adapter)")
    g.add_argument("--max-image-batch", type=int, default=16)
    g.add_argument("--video-sp-limit", action="append", default=[], metavar="MODEL=K",
                   help="videos of this profile model run on at most K devices (a power of two: "
                        "e.g. 4 for a model whose attention heads split over no more, as the "
                        "server's ListModels tells); repeat per model (default: --max-sp-degree)")
    g.add_argument("--profile", default="reference-h100", help="built-in profile name or JSON path")
    g.add_argument("--true-profile", help="profile the simulated hardware follows "
                                          "(default: --profile)")
    g.add_argument("--true-scale", type=float, default=1.0,
                   help="true step, decode and encode times x this (exercises calibration)")
    g.add_argument("--noise-cv", type=float, default=0.0, help="log-normal noise on step times")
    g = p.add_argument_group("policies")
    g.add_argument("--policy", default=",".join(DEFAULT_POLICIES),
                   help=f"comma-separated, from: {', '.join(POLICY_NAMES)}")
    g.add_argument("--admission-control", action="store_true")
    g.add_argument("--fixed-sp-degree", type=int, default=4,
                   help="video SP degree of fcfs, sjf, edf, static, fixed-sp and "
                        "genserve:no-elastic-sp (a power of two; capped at the devices; default 4)")
    g.add_argument("--static-image-fraction", type=float,
                   help="static: image share of devices (default: the best whole-device share "
                        "for this workload, an oracle; its demand share is reported as static_demand_share)")
    g.add_argument("--max-preemptions", type=int)
    g = p.add_argument_group("workload")
    g.add_argument("--trace", help="JSON-lines trace file (instead of a generated workload)")
    g.add_argument("--write-trace", help="write the generated workload to this file")
    g.add_argument("--rate", type=float, default=0.4, help="arrivals per second")
    g.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    g.add_argument("--cv", type=float, default=2.0, help="gamma arrivals: coefficient of variation")
    g.add_argument("--mix", type=float, default=0.7, help="image fraction of requests")
    g.add_argument("--image-shapes", default="512x512,768x768,1024x1024")
    g.add_argument("--video-shapes", default="832x480x33,832x480x81")
    g.add_argument("--slo-scale", type=float, default=2.0)
    g.add_argument("--num-requests", type=int, default=None,
                   help="stop after N arrivals (default 300 for a generated workload; a "
                        "trace: its first N arrivals, default all)")
    g.add_argument("--duration-s", type=float, default=0.0,
                   help="keep only the arrivals within S seconds, a trace's too "
                        "(default 0: no limit); with --num-requests, whichever ends first")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object")
    g.add_argument("--sweep-rates", help="comma-separated rates: sweep mode")
    g.add_argument("--sweep-slo-scales", help="comma-separated SLO scales: sweep mode")
    g.add_argument("--out", default="out/simulate", help="sweep mode: folder for CSV and PNG")
    g.add_argument("--jobs", type=int, default=1, help="parallel simulations")
    g.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (one per finished simulation, and "
                        "one every 10 s of a long one)")
    g.add_argument("--no-check", action="store_true", help="skip checking every plan")
    p.set_defaults(func=run_simulate)
    return p


def run_simulate(args: argparse.Namespace) -> int:
    try:
        swept = _sweep_values(args)
        exp, policies, spec, trace = _setup(args)
        # a trace naming a model the profile lacks, or one of the other task,
        # or a task the profile has no model for, is refused here (ProfileError
        # is a ValueError); a sweep resolves again at each point
        requests = resolve_workload(exp, trace, args.slo_scale)
    except (ValueError, OSError) as e:
        print(f"genserve simulate: {e}", file=sys.stderr)
        return 2
    for line in extrapolations(exp.profile, requests):
        print(f"genserve simulate: warning: {line}", file=sys.stderr)
    if swept:
        return _run_sweep(args, exp, policies, spec, trace, *swept)
    results = run_policies(exp, policies, requests, args.jobs, _progress(args),
                           None if args.quiet else heartbeat)
    if args.json:
        print(json.dumps(json_safe({"policies": results})))
    else:
        print(format_table(results))
    return 0


# A workload size this many times past the profile's measured range (either
# way) is worth a warning: the figures then rest on an extrapolated curve.
EXTRAPOLATION_WARN = 4


def extrapolations(profile, requests) -> list[str]:
    """One line per model whose workload sizes (width × height × frames) lie
    far outside the profile's step points (e.g. the default 512-1024 px
    shapes against a profile measured on tiny CPU models)."""
    out = []
    for model in sorted({r.model for r in requests}):
        lo, hi = profile.model(model).size_range()
        sizes = [r.width * r.height * r.num_frames for r in requests if r.model == model]
        if max(sizes) > EXTRAPOLATION_WARN * hi or min(sizes) * EXTRAPOLATION_WARN < lo:
            out.append(f"profile {profile.name!r} measured {model} at {lo:,}..{hi:,} "
                       f"pixels x frames; the workload asks {min(sizes):,}..{max(sizes):,}, "
                       f"so its times are extrapolated (--image-shapes / --video-shapes "
                       f"set the workload's)")
    return out


def _progress(args):
    """One stderr line per finished simulation (step-level policies take
    seconds to minutes per thousand requests), unless --quiet."""
    if args.quiet:
        return None

    def report(done: int, total: int, label: str, wall_s: float) -> None:
        print(f"genserve simulate: [{done}/{total}] {label} done in {wall_s:.1f} s",
              file=sys.stderr, flush=True)
    return report


def heartbeat(label: str, ended: int, total: int, wall_s: float) -> None:
    """A line every few seconds of one long simulation (genserve at 100-200
    requests/s: 20,000 requests take minutes). Module-level, so it pickles
    into --jobs workers, which print it themselves."""
    print(f"genserve simulate: {label}: {ended:,} of {total:,} requests ended after {wall_s:.0f} s",
          file=sys.stderr, flush=True)


def _video_sp_limits(items: list[str], profile) -> tuple[tuple[str, int], ...]:
    """``--video-sp-limit MODEL=K`` values, checked against the profile."""
    out = {}
    for item in items:
        model, sep, k = item.rpartition("=")
        if not sep or not model or not k.strip().isdigit():
            raise ValueError(f"--video-sp-limit {item!r}: give MODEL=K, e.g. wan2.1-t2v-1.3b=4")
        videos = [m.name for m in profile.models if m.task == "video"]
        if model not in videos:
            raise ValueError(f"--video-sp-limit {item!r}: the profile {profile.name!r} has no video "
                             f"model {model!r} (its video models: {', '.join(videos) or 'none'})")
        if model in out and out[model] != int(k):
            raise ValueError(f"--video-sp-limit gives {model!r} two limits ({out[model]} and {int(k)})")
        out[model] = int(k)
    return tuple(sorted(out.items()))


def _setup(args):
    policies = tuple(x.strip() for x in args.policy.split(",") if x.strip())
    bad = [p for p in policies if p not in POLICY_NAMES]
    if bad or not policies:
        raise ValueError(f"unknown policies {bad}; choose from {', '.join(POLICY_NAMES)}")
    num_requests = GENERATED_REQUESTS if args.num_requests is None else args.num_requests
    if num_requests <= 0 and args.duration_s <= 0 and not args.trace:
        raise ValueError("give --num-requests or --duration-s (a positive number)")
    for flag, value, ok in (("--rate", args.rate, args.rate > 0),
                            ("--cv", args.cv, args.cv > 0 or args.arrival != "gamma"),
                            ("--mix", args.mix, 0 <= args.mix <= 1),
                            ("--slo-scale", args.slo_scale, args.slo_scale > 0),
                            ("--true-scale", args.true_scale, args.true_scale > 0),
                            ("--noise-cv", args.noise_cv, args.noise_cv >= 0),
                            ("--duration-s", args.duration_s, args.duration_s >= 0),
                            ("--num-requests", num_requests, num_requests >= 0),
                            ("--jobs", args.jobs, args.jobs >= 1)):
        if not ok:  # also NaN
            raise ValueError(f"{flag} {value} is out of range")
    profile = load_profile(args.profile)
    cluster = ClusterSpec(args.devices, args.max_sp_degree, True, args.max_image_batch,
                          args.max_image_sp_degree, _video_sp_limits(args.video_sp_limit, profile))
    options = {"admission_control": args.admission_control,
               "fixed_sp_degree": args.fixed_sp_degree,
               "static_image_fraction": args.static_image_fraction,
               "max_preemptions": args.max_preemptions}
    options = {k: v for k, v in options.items() if v is not None}
    for name in policies:  # bad cluster or option values: an error before any run
        make_policy(name, cluster, **options)
    exp = Experiment(cluster, profile,
                     load_profile(args.true_profile) if args.true_profile else None,
                     args.true_scale, args.noise_cv, args.seed, not args.no_check, options)
    spec = None
    if args.trace:  # cut as loadgen cuts a trace: by arrival time
        trace = truncate(read_trace(args.trace), args.num_requests or 0, args.duration_s)
    else:
        spec = WorkloadSpec(args.rate, args.arrival, args.cv, args.mix,
                            parse_shapes(args.image_shapes, "image"),
                            parse_shapes(args.video_shapes, "video"),
                            num_requests, args.duration_s, args.seed)
        trace = generate(spec)
        if args.write_trace:
            write_trace(args.write_trace, trace)
    if not trace:
        raise ValueError(f"--trace {args.trace}: no requests in it{_within(args)}" if args.trace
                         else "the workload is empty (raise --duration-s or --rate)")
    return exp, policies, spec, trace


def _within(args) -> str:
    limits = [f"{flag} {value:g}" for flag, value in (("--num-requests", args.num_requests or 0),
                                                       ("--duration-s", args.duration_s)) if value]
    return f" within {' and '.join(limits)}" if limits else ""


def _sweep_values(args) -> tuple[str, list[float]] | None:
    """(swept parameter, its values) in sweep mode, else None."""
    if args.sweep_rates and args.sweep_slo_scales:
        raise ValueError("give --sweep-rates or --sweep-slo-scales, not both")
    text = args.sweep_rates or args.sweep_slo_scales
    if not text:
        return None
    flag = "--sweep-rates" if args.sweep_rates else "--sweep-slo-scales"
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, not {text!r}") from None
    if not values or not all(v > 0 for v in values):
        raise ValueError(f"{flag} takes positive numbers, not {text!r}")
    return ("rate" if args.sweep_rates else "slo_scale"), values


def _run_sweep(args, exp, policies, spec, trace, param: str, values: list[float]) -> int:
    if param == "rate" and trace is not None and spec is None:
        print("genserve simulate: --sweep-rates needs a generated workload", file=sys.stderr)
        return 2
    points = sweep(exp, policies, spec, None if spec else trace, param, values,
                   args.slo_scale, args.jobs, _progress(args), None if args.quiet else heartbeat)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"sweep_{param}.csv"
    write_csv(csv_path, param, points)
    png_path = out / f"sweep_{param}.png"
    plotted = plot_sweep(png_path, param, points, policies)
    if args.json:
        print(json.dumps(json_safe({"sweep": {"param": param, "points": points,
                                              "csv": str(csv_path),
                                              "png": str(png_path) if plotted else None}})))
    else:
        for pt in points:
            print(f"\n{param} = {pt['x']:g}")
            print(format_table(pt["policies"]))
        print(f"\nwrote {csv_path}" + (f" and {png_path}" if plotted else " (no matplotlib: no PNG)"))
    return 0


CSV_FIELDS = ("attainment", "attainment_image", "attainment_video", "goodput_rps",
              "preemptions_per_video", "busy_fraction", "completed", "submitted", "rejected")


def write_csv(path, param: str, points: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([param, "policy", *CSV_FIELDS, "latency_image_p99_ms",
                    "latency_video_p99_ms", "decision_p99_ms"])
        for pt in points:
            for name, s in pt["policies"].items():
                w.writerow([pt["x"], name, *(s[k] for k in CSV_FIELDS),
                            s["latency_ms"]["image"]["p99"], s["latency_ms"]["video"]["p99"],
                            s["decision_ms"]["p99"]])


def plot_sweep(path, param: str, points: list[dict], policies) -> bool:
    """Attainment (overall, images, videos) per policy against the swept value."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [pt["x"] for pt in points]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, key, title in zip(axes, ("attainment", "attainment_image", "attainment_video"),
                              ("all requests", "images", "videos")):
        for name in policies:
            ys = [pt["policies"][name][key] for pt in points]
            ax.plot(xs, ys, marker="o", label=name, linewidth=2.2 if name == "genserve" else 1.2)
        ax.set_title(f"SLO attainment: {title}")
        ax.set_xlabel("arrival rate (req/s)" if param == "rate" else "SLO scale")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction meeting SLO")
    axes[-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def format_table(results: dict[str, dict]) -> str:
    head = (f"{'policy':24s} {'attain':>6s} {'image':>6s} {'video':>6s} {'goodput':>8s} "
            f"{'img p99 s':>9s} {'vid p99 s':>9s} {'pre/vid':>7s} {'busy':>5s} {'dec p99':>8s}")
    lines = [head, "-" * len(head)]
    for name, s in results.items():
        lat = s["latency_ms"]
        lines.append(
            f"{name:24s} {_f(s['attainment'])} {_f(s['attainment_image'])} "
            f"{_f(s['attainment_video'])} {s['goodput_rps']:8.3f} "
            f"{_s(lat['image']['p99'])} {_s(lat['video']['p99'])} "
            f"{_f(s['preemptions_per_video'], 7)} {s['busy_fraction']:5.2f} "
            f"{s['decision_ms']['p99']:6.2f}ms")
    return "\n".join(lines)


def _f(x, width: int = 6) -> str:
    return f"{'-':>{width}s}" if x is None or (isinstance(x, float) and math.isnan(x)) else (
        f"{x:{width}.3f}")


def _s(ms) -> str:
    return f"{'-':>9s}" if ms is None or math.isnan(ms) else f"{ms / 1e3:9.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="genserve-scheduler")
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
