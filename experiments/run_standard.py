"""Regenerate experiments/REPORT.md: the standard experiments of GENSERVE.md.

Simulated (8 devices, reference-h100 profile, FLUX-like images 512/768/1024²
at 28 steps, Wan-like 480p videos of 33/81 frames at 50 steps), every policy
on the same workload per point:
  rate sweep        Poisson, 70/30 mix, slo_scale 2, rate 0.1–0.8 req/s
  SLO sweep         Poisson, 70/30 mix, rate 0.3, slo_scale 1.0–5.0
  class mix         90/10, 70/30, 50/50 at rate 0.3, slo_scale 2
  burstiness        Poisson, Gamma CV 2 and CV 4 at rate 0.3, slo_scale 2
  trace replay      the reference-point workload written to a trace file and read back
Live (CPU, optional): ``genserve loadgen compare`` on tiny presets with 2 workers,
a server started per policy (skip with --skip-live).

    python experiments/run_standard.py [--skip-live] [--size 150] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
POLICIES = ("genserve", "fcfs", "sjf", "edf", "static", "fixed-sp", "tetris")
PROFILE = "reference-h100"
NUM_DEVICES = 8


@dataclass(frozen=True, slots=True)
class Point:
    """One workload of a sweep; ``x`` is the swept value as shown."""

    sweep: str
    x: str
    rate_rps: float = 0.3
    slo_scale: float = 2.0
    image_fraction: float = 0.7
    arrival: str = "poisson"
    cv: float = 1.0
    trace: str = ""  # replay this trace instead of generating


def standard_points(trace_path: str) -> list[Point]:
    ref = Point("reference", "ref")
    pts = [replace(ref, sweep="rate", x=f"{r:g}", rate_rps=r) for r in (0.1, 0.2, 0.3, 0.5, 0.8)]
    pts += [replace(ref, sweep="slo", x=f"{s:g}", slo_scale=s) for s in (1.0, 1.5, 2.0, 3.0, 5.0)]
    pts += [replace(ref, sweep="mix", x=f"{int(f * 100)}/{100 - int(f * 100)}", image_fraction=f)
            for f in (0.9, 0.7, 0.5)]
    pts += [replace(ref, sweep="burst", x="poisson"),
            replace(ref, sweep="burst", x="gamma cv2", arrival="gamma", cv=2.0),
            replace(ref, sweep="burst", x="gamma cv4", arrival="gamma", cv=4.0)]
    pts.append(replace(ref, sweep="trace", x="replay", trace=trace_path))
    return pts


def workload(point: Point, size: int, seed: int):
    from genserve.scheduler.workload import WorkloadSpec, generate, read_trace

    if point.trace:
        return read_trace(point.trace)
    return generate(WorkloadSpec(rate_rps=point.rate_rps, arrival=point.arrival, cv=point.cv,
                                 image_fraction=point.image_fraction, num_requests=size, seed=seed))


def sim_point(point: Point, policy: str, size: int, seed: int) -> dict:
    """Simulate one policy on one point; the scheduler's summary plus the point."""
    from genserve.scheduler import ClusterSpec, LatencyModel, make_policy
    from genserve.scheduler.metrics import json_safe, summarize
    from genserve.scheduler.simulator import simulate
    from genserve.scheduler.workload import resolve

    cost = LatencyModel.load(PROFILE)
    cluster = ClusterSpec(NUM_DEVICES)
    requests = resolve(workload(point, size, seed), cost, point.slo_scale, NUM_DEVICES)
    result = simulate(make_policy(policy, cluster), requests, cluster, cost.fresh(), cost.fresh())
    return {"point": asdict(point), "policy": policy, **json_safe(summarize(result))}


def run_sims(points: list[Point], policies, size: int, seed: int, jobs: int) -> list[dict]:
    tasks = [(p, pol, size, seed) for p in points for pol in policies]
    if jobs <= 1:
        return [sim_point(*t) for t in tasks]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(sim_point, *zip(*tasks)))


def _get(row: dict, key: str):
    return row.get(key)


def plot_sweep(rows: list[dict], sweep: str, xlabel: str, path: Path, policies) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, key, title in zip(axes, ("attainment", "attainment_image", "attainment_video"),
                              ("overall", "images", "videos")):
        for pol in policies:
            pts = [r for r in rows if r["point"]["sweep"] == sweep and r["policy"] == pol]
            ax.plot([r["point"]["x"] for r in pts], [_get(r, key) for r in pts], marker="o",
                    label=pol, lw=2.2 if pol == "genserve" else 1.2)
        ax.set_title(f"SLO attainment, {title}")
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attainment")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pct(v) -> str:
    return "–" if v is None else f"{v * 100:.0f}%"


def _num(v, spec: str = ".0f") -> str:
    return "–" if v is None else format(v, spec)


def sweep_table(rows: list[dict], sweep: str, policies, key: str = "attainment") -> str:
    xs = list(dict.fromkeys(r["point"]["x"] for r in rows if r["point"]["sweep"] == sweep))
    lines = ["| policy | " + " | ".join(xs) + " |", "|---" * (len(xs) + 1) + "|"]
    for pol in policies:
        cells = {r["point"]["x"]: r for r in rows if r["point"]["sweep"] == sweep and r["policy"] == pol}
        lines.append(f"| {pol} | " + " | ".join(_pct(_get(cells[x], key)) for x in xs) + " |")
    return "\n".join(lines)


def detail_table(rows: list[dict], sweep: str, x: str, policies) -> str:
    head = ("| policy | attain | image | video | goodput/s | img p50/p99 s | vid p50/p99 s | "
            "img queue p50 s | preempt/video | busy | decision p99 ms |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for pol in policies:
        (r,) = [r for r in rows if r["point"]["sweep"] == sweep and r["point"]["x"] == x and r["policy"] == pol]
        lat, q = r["latency_ms"], r["queueing_ms"]
        sec = lambda v: _num(v and v / 1e3, ".1f")  # noqa: E731
        lines.append(
            f"| {pol} | {_pct(r['attainment'])} | {_pct(r['attainment_image'])} | {_pct(r['attainment_video'])} "
            f"| {_num(r['goodput_rps'], '.3f')} | {sec(lat['image']['p50'])}/{sec(lat['image']['p99'])} "
            f"| {sec(lat['video']['p50'])}/{sec(lat['video']['p99'])} | {sec(q['image']['p50'])} "
            f"| {_num(r['preemptions_per_video'], '.2f')} | {_pct(r['busy_fraction'])} "
            f"| {_num(r['decision_ms']['p99'], '.2f')} |")
    return "\n".join(lines)


def write_trace_file(size: int, seed: int, path: Path) -> None:
    from genserve.scheduler.workload import write_trace

    write_trace(path, workload(Point("trace", "gen"), size, seed))


def run_live(args, figures: Path) -> dict | None:
    """``loadgen compare`` on tiny presets (a server per policy); None when skipped."""
    from genserve.loadgen.compare import CompareOptions, compare
    from genserve.loadgen.plan import WorkloadOptions, build_workload
    from genserve.loadgen.runner import RunOptions

    items = build_workload(WorkloadOptions(
        rate_rps=args.live_rate, num_requests=args.live_requests, seed=args.seed,
        image_fraction=0.7, image_shapes="64x64", video_shapes="64x64x9",
        steps_image=4, steps_video=2))
    copts = CompareOptions(policies=tuple(args.live_policies.split(",")), num_workers=2,
                           server_args=("--default-slo-scale", str(args.live_slo_scale)),
                           profile=args.live_profile, sim_slo_scale=args.live_slo_scale)
    out = figures / "live"
    # A per-request deadline bounds the run if a server ever strands a request.
    rows = compare(items, RunOptions(target="", warmup_requests=args.live_warmup, progress=False,
                                     timeout_s=args.live_timeout_s, drain_timeout_s=args.live_timeout_s),
                   copts, out)
    (figures / "live_compare.png").write_bytes((out / "compare.png").read_bytes())
    return {"rows": rows, "num_requests": len(items), "rate": args.live_rate,
            "loadavg": (args.load_at_start, os.getloadavg()[0]), "cpus": os.cpu_count()}


def report(rows: list[dict], live: dict | None, args, elapsed_s: float) -> str:
    pols = args.policies.split(",")
    ref = detail_table(rows, "burst", "poisson", pols)
    parts = [
        "# GenServe standard experiments", "",
        f"Generated by `python experiments/run_standard.py {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} in {elapsed_s:.0f} s. Do not edit by hand.", "",
        "## Setup", "",
        f"- Simulated cluster: {NUM_DEVICES} devices, `{PROFILE}` profile (published H100 step times; "
        "see scheduler/profiles). Images FLUX.1-dev-like 512²/768²/1024² (28 steps, equal weights), "
        "videos Wan2.1-1.3B-like 832×480 with 33/81 frames (50 steps).",
        f"- {args.size} requests per point, seed {args.seed}; `slo_ms = slo_scale × isolated latency` "
        "(alone on the cluster at its best SP degree). Failed, rejected and unfinished requests count "
        "as misses.",
        "- Same workload for every policy at a point (`genserve.scheduler.workload`), same simulator "
        "(`genserve.scheduler.simulator`) and cost model; only the policy differs.", "",
        "## Reference point: Poisson, 0.3 req/s, 70/30 images/videos, slo_scale 2", "", ref, "",
    ]
    sweeps = [("rate", "arrival rate (req/s)", "Arrival-rate sweep (slo_scale 2, 70/30, Poisson)"),
              ("slo", "slo_scale", "SLO-scale sweep (0.3 req/s, 70/30, Poisson)"),
              ("mix", "images/videos (%)", "Class mix (0.3 req/s, slo_scale 2, Poisson)"),
              ("burst", "arrivals", "Burstiness (0.3 req/s, slo_scale 2, 70/30)")]
    for sweep, xlabel, title in sweeps:
        plot_sweep(rows, sweep, xlabel, args.figures / f"sim_{sweep}.png", pols)
        parts += [f"## {title}", "", f"![{sweep}](figures/sim_{sweep}.png)", "",
                  "Overall attainment:", "", sweep_table(rows, sweep, pols), "",
                  "Images / videos:", "", _class_table(rows, sweep, pols), ""]
    parts += ["## Trace replay", "",
              "The reference workload written to `figures/trace.jsonl` and replayed from the file: "
              "it must match the Poisson column of the burstiness sweep exactly.", "",
              sweep_table(rows, "trace", pols), ""]
    parts += _live_section(live, args)
    return "\n".join(parts) + "\n"


def _class_table(rows: list[dict], sweep: str, pols) -> str:
    img = sweep_table(rows, sweep, pols, "attainment_image").splitlines()
    vid = sweep_table(rows, sweep, pols, "attainment_video").splitlines()
    out = img[:2]
    for a, b in zip(img[2:], vid[2:]):
        cells_a, cells_b = a.strip("|").split("|"), b.strip("|").split("|")
        out.append("|" + cells_a[0] + "| " + " | ".join(
            f"{x.strip()} / {y.strip()}" for x, y in zip(cells_a[1:], cells_b[1:])) + " |")
    return "\n".join(out)


def _live_section(live: dict | None, args) -> list[str]:
    head = ["## Live CPU comparison (tiny presets, 2 CPU workers, gRPC)", ""]
    if live is None:
        return head + ["Skipped (`--skip-live`).", ""]
    from genserve.loadgen.compare import format_compare

    return head + [
        f"{live['num_requests']} requests (first {args.live_warmup} warm-up), Poisson "
        f"{live['rate']} req/s, 70/30 images (64², 4 steps) / videos (64²×9, 2 steps); SLO = server "
        f"default (`--default-slo-scale {args.live_slo_scale}` × predicted isolated latency); "
        "a fresh server per policy, one after another. Per-run details in `figures/live/`. "
        f"Machine: {live['cpus']} CPUs, 1-minute load average {live['loadavg'][0]:.1f} when the script "
        f"started and {live['loadavg'][1]:.1f} after the live runs ("
        + ("above the CPU count: other processes competed with the server and the figures are noisy)."
           if max(live["loadavg"]) > live["cpus"] else "within the CPU count: nothing else competed for "
           "the cores)."), "",
        "![live](figures/live_compare.png)", "", "```", format_compare(live["rows"]), "```", "",
        "On CPU the live comparison is about policy, not hardware: the two workers share two cores "
        "(with anything else running on the machine) and the tiny models' steps take milliseconds, "
        "so gRPC, the engine loop and media encoding are a visible share of latency. The simulated "
        "columns use a profile measured through the API on each server before its run "
        "(`figures/live/profile.json`: step, encode and decode times at SP 1, batch 1, alone); they "
        "leave out contention between concurrent requests beyond the policy's own queueing, so they "
        "are an optimistic bound.", ""]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=150, help="requests per simulated point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="simulation processes")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--skip-live", action="store_true", help="simulations only")
    p.add_argument("--live-policies", default="genserve,fcfs,static")
    p.add_argument("--live-requests", type=int, default=100)
    p.add_argument("--live-warmup", type=int, default=5)
    p.add_argument("--live-rate", type=float, default=4.0)
    p.add_argument("--live-slo-scale", type=float, default=3.0)
    p.add_argument("--live-timeout-s", type=float, default=60.0, help="per-request deadline (live)")
    p.add_argument("--live-profile", default="auto", help="tiny-model profile for the simulated side "
                                                          "of the live comparison (default: measured)")
    p.add_argument("--out", type=Path, default=HERE / "REPORT.md",
                   help="the report's Markdown file (default experiments/REPORT.md); its figures go to a "
                        "figures/ folder beside it")
    args = p.parse_args(argv)
    args.figures = args.out.parent / "figures"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.figures.mkdir(parents=True, exist_ok=True)
    args.load_at_start = os.getloadavg()[0]
    t0 = time.monotonic()
    trace = args.figures / "trace.jsonl"
    write_trace_file(args.size, args.seed, trace)
    rows = run_sims(standard_points(str(trace)), args.policies.split(","), args.size, args.seed, args.jobs)
    (args.figures / "sim_results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"simulations done in {time.monotonic() - t0:.0f} s", flush=True)
    live = None if args.skip_live else run_live(args, args.figures)
    args.out.write_text(report(rows, live, args, time.monotonic() - t0), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
